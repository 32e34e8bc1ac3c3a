"""The sparse increment as an artifact: save, load, apply, remove, merge.

On disk an increment is a folder with two files, written atomically:

* ``increment.safetensors``: for each targeted tensor ``<name>``, the flat
  indices ``<name>::indices`` (int32, or int64 for tensors past 2**31
  entries) and the fp32 changes ``<name>::values``; for each densely
  trained parameter, its full trained value ``<name>::dense``;
* ``increment_config.json``: format version, base model name or path, the
  SIFT config, the shape and dtype of every tensor, so a mismatched base
  model is caught before anything is written into it, and the SHA-256 of
  every stored tensor, so a damaged or edited file is caught on load;
* ``README.md``: a model card for people: base model, task, density,
  trained components, metrics when known, and the code that loads, applies
  and merges the increment.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, IncrementError
from .io import atomic_write_bytes, atomic_write_dir, atomic_write_text
from ..core.select import index_dtype
from ..core.storage import add_increment, increment_shape, remove_increment, writable

FORMAT_VERSION = 1
WEIGHTS_NAME = "increment.safetensors"
CONFIG_NAME = "increment_config.json"
CARD_NAME = "README.md"
_DTYPES = {"float32", "float16", "bfloat16", "float64"}
_APPLIED = "_siftune_applied"  # attribute of a model: content fingerprint -> what apply() overwrote


@dataclass
class TensorDelta:
    """The change of one targeted tensor: ``flat[indices] += values``."""

    indices: torch.Tensor  # 1-D int64, sorted, unique
    values: torch.Tensor  # 1-D fp32, same length
    shape: tuple[int, ...]
    dtype: str  # dtype of the weight it applies to, e.g. "float32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class SparseIncrement:
    """A trained SIFT increment: sparse deltas of targeted tensors, dense values of dense modules.

    Get one from :meth:`SiftEngine.increment` (or ``siftune.Trainer``), or
    :meth:`load` it from a folder. :meth:`apply` writes it into a base model,
    :meth:`remove` takes it out again, :meth:`merge` writes a plain
    transformers model folder with it applied.
    """

    def __init__(self, tensors: dict[str, TensorDelta], dense: dict[str, torch.Tensor] | None = None,
                 base_model: str | None = None, config: dict | None = None, metadata: dict | None = None):
        self.tensors = tensors
        self.dense = dense or {}
        self.base_model = base_model
        self.config = config or {}
        self.metadata = metadata or {}
        self.source: Path | None = None  # the folder load() read, which merge() must never replace

    # -- facts ---------------------------------------------------------------
    @property
    def num_components(self) -> int:
        """Entries changed: sparse components plus dense parameter entries."""
        return sum(t.indices.numel() for t in self.tensors.values()) + sum(v.numel() for v in self.dense.values())

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data as saved (indices, values and dense tensors)."""
        total = 0
        for t in self.tensors.values():
            total += t.indices.numel() * index_dtype(t.numel).itemsize + t.values.numel() * 4
        return total + sum(v.numel() * v.element_size() for v in self.dense.values())

    def summary(self) -> dict:
        """Facts for ``siftune info``: counts, density, size, base model, per-tensor rows."""
        targeted = sum(t.numel for t in self.tensors.values())
        selected = sum(t.indices.numel() for t in self.tensors.values())
        return {
            "format_version": FORMAT_VERSION,
            "base_model": self.base_model,
            "targeted_tensors": len(self.tensors),
            "dense_tensors": len(self.dense),
            "selected_components": selected,
            "targeted_components": targeted,
            "density": selected / targeted if targeted else 0.0,
            "dense_components": sum(v.numel() for v in self.dense.values()),
            "tensor_bytes": self.nbytes,
            "config": self.config,
            "tensors": {
                name: {"shape": list(t.shape), "dtype": t.dtype, "selected": t.indices.numel(),
                       "abs_max": float(t.values.abs().max()) if t.values.numel() else 0.0}
                for name, t in self.tensors.items()
            },
        }

    # -- model edits -----------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise IncrementError naming the first tensor that does not fit ``model``; changes nothing."""
        params = _named_tensors(model)
        for name, t in self.tensors.items():
            p = params.get(name)
            if p is None:
                raise IncrementError(f"tensor {name} of the increment is not in the model; is this the right base model "
                                     f"({self.base_model})?")
            shape = increment_shape(model, name, p)
            if shape != tuple(t.shape):
                raise IncrementError(f"tensor {name} has shape {shape} in the model but {tuple(t.shape)} in the "
                                     f"increment; load the base model it was trained on ({self.base_model})")
        for name, value in self.dense.items():
            p = params.get(name)
            if p is None:
                raise IncrementError(f"dense tensor {name} of the increment is not in the model (base: {self.base_model})")
            if tuple(p.shape) != tuple(value.shape):
                raise IncrementError(f"dense tensor {name} has shape {tuple(p.shape)} in the model but "
                                     f"{tuple(value.shape)} in the increment")

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Write the increment into ``model`` in place (checked first: all or nothing).

        A quantized weight (bitsandbytes, torchao) cannot take the values: its
        layer gets them added to its output instead (a forward hook), so two
        increments swap on one quantized model with :meth:`remove` and
        :meth:`apply`, without reloading it.

        Applying an increment to a model it is already applied to (the same
        tensors, from this object or another one, e.g. loaded again) is an
        IncrementError: it would add the change twice.
        """
        self.check(model)
        fingerprint = self.fingerprint()
        applied = model.__dict__.setdefault(_APPLIED, {})
        if fingerprint in applied:
            raise IncrementError("this increment is already applied to this model; applying it again would add "
                                 "its change twice (remove() it first, or load a fresh base model)")
        params = _named_tensors(model)
        replaced = {}
        for name, t in self.tensors.items():
            replaced[name] = add_increment(model, name, params[name], t.indices, t.values)
        for name, value in self.dense.items():
            replaced[name] = params[name].detach().clone()
            params[name].detach().copy_(value)
        applied[fingerprint] = replaced
        return model

    def fingerprint(self) -> str:
        """SHA-256 of the increment's content (names, indices, values, dense tensors): equal for equal increments."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self._stored_tensors().items()):
            digest.update(key.encode("utf-8") + b"\0" + _sha256(tensor).encode("ascii"))
        return digest.hexdigest()

    def applied_to(self, model: nn.Module) -> bool:
        """Whether this increment (these tensors) is applied to ``model`` by :meth:`apply` and not removed."""
        return self.fingerprint() in model.__dict__.get(_APPLIED, {})

    @torch.no_grad()
    def remove(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`apply`: exactly (the values it overwrote come back bit for bit) on a model it was
        applied to, else by subtraction (e.g. from a model loaded from a merged folder).

        Dense tensors can only be restored on the model they were applied to.
        """
        self.check(model)
        params = _named_tensors(model)
        replaced = model.__dict__.get(_APPLIED, {}).pop(self.fingerprint(), None)
        if replaced is None and self.dense:
            raise IncrementError("this increment has dense tensors, which can only be removed from the model object "
                                 "it was applied to; reload the base model instead")
        fixed = [name for name in self.tensors if not writable(params[name])]
        if fixed and replaced is None:
            raise IncrementError(f"{fixed[0]} is quantized: the increment can only be removed from the model "
                                 "object it was applied to")
        for name, t in self.tensors.items():
            remove_increment(params[name], t.indices, t.values, None if replaced is None else replaced[name])
        for name in self.dense:
            params[name].detach().copy_(replaced[name])
        return model

    def merge(self, out_dir: str | os.PathLike, base_model: str | None = None, model: nn.Module | None = None,
              overwrite: bool = False) -> Path:
        """Write a plain transformers model folder: base model + this increment.

        ``model`` (already loaded, with or without this increment applied; it is
        left as it was given) or ``base_model`` (name or path, default: the one
        recorded in the increment) gives the base. The tokenizer, when the base
        folder has one, is saved alongside.

        ``out_dir`` must be new or an empty folder; ``overwrite=True`` replaces
        a non-empty one (or a file) once the merged folder is complete. Never
        replaced, whatever ``overwrite`` says: the increment's own folder, the
        base model's folder, the current folder, or any folder holding one of
        them. On any failure ``out_dir`` is as it was and nothing is left behind.
        """
        out_dir = Path(out_dir)
        check_destination(out_dir, overwrite, self._protected(base_model))
        tokenizer = None
        if model is None:
            model, tokenizer = self.load_base(base_model)
        applied_here = not self.applied_to(model)
        if applied_here:
            self.apply(model)
        try:
            atomic_write_dir(out_dir, lambda tmp: (
                model.save_pretrained(tmp), tokenizer.save_pretrained(tmp) if tokenizer is not None else None))
        finally:
            if applied_here:
                self.remove(model)
        return out_dir

    def _protected(self, base_model: str | None = None) -> dict[str, Path]:
        """Folders a merge must not replace, by what they are: this increment's, the base model's."""
        protected = {"the increment being merged": self.source} if self.source is not None else {}
        base = base_model or self.base_model
        if base and Path(base).expanduser().is_dir():
            protected["the base model"] = Path(base).expanduser()
        return protected

    def load_base(self, base_model: str | None = None, dtype: torch.dtype = torch.float32):
        """The untrained base model and its tokenizer, as ``(model, tokenizer)``, ready for :meth:`apply`.

        Loaded offline as ``siftune train`` loads models: ``base_model`` (a
        built-in name, a folder or a cached hub name; default: the one
        recorded in the increment), for the recorded task (default
        ``causal_lm``), with a classification head sized for the recorded labels.
        An increment trained on a quantized base (``metadata["quantize"]``)
        gets that base dequantized, in plain layers: the weights it was
        trained beside, so that base + increment is the trained model.
        """
        from ..recipes.models import copy_dequantized, load_model

        source = base_model or self.base_model
        if not source:
            raise IncrementError("the increment records no base model; pass base_model=...")
        task = self.metadata.get("task", "causal_lm")
        labels = self.metadata.get("labels")
        kwargs = dict(num_labels=len(labels) if labels else None, dtype=dtype, labels=labels)
        model, tokenizer = load_model(source, task, **kwargs)
        quantize = self.metadata.get("quantize")
        if quantize:
            quantized, _ = load_model(source, task, quantize=quantize, **kwargs)
            copy_dequantized(quantized, model)
        return model, tokenizer

    # -- files -----------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Save to ``directory`` (created): the two increment files and a ``README.md`` model card.

        Each file is replaced atomically. The card's code refers to the folder
        by ``directory`` as given.
        """
        from safetensors.torch import save

        directory = Path(directory)
        tensors = self._stored_tensors()
        layout = {name: {"shape": list(t.shape), "dtype": t.dtype} for name, t in self.tensors.items()}
        dense_layout = {name: {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
                        for name, value in self.dense.items()}
        header = {
            "format_version": FORMAT_VERSION, "format": "siftune-sparse-increment",
            "base_model": self.base_model, "sift_config": self.config, "tensors": layout,
            "dense": dense_layout, "metadata": self.metadata, "save_id": uuid.uuid4().hex,
            "sha256": {key: _sha256(tensor) for key, tensor in tensors.items()},
        }
        # The weights file carries the header too: each file is replaced atomically,
        # but not the pair, so if a save dies between the two, load() finds a stale
        # JSON (another save_id) and takes the header from the weights file.
        # Serialised in memory first: safetensors reports a full disk as its own error type, not as OSError.
        atomic_write_bytes(directory / WEIGHTS_NAME,
                           save(tensors, metadata={"format": "siftune", "header": json.dumps(header)}))
        atomic_write_text(directory / CONFIG_NAME, json.dumps(header, indent=2))
        atomic_write_text(directory / CARD_NAME, _model_card(self, directory))
        return directory

    def _stored_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of increment.safetensors by key, in the dtypes they are saved in."""
        tensors = {}
        for name, t in self.tensors.items():
            tensors[f"{name}::indices"] = t.indices.to(index_dtype(t.numel)).contiguous()
            tensors[f"{name}::values"] = t.values.float().contiguous()
        for name, value in self.dense.items():
            tensors[f"{name}::dense"] = value.contiguous()
        return tensors

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SparseIncrement":
        """Load and validate a saved increment; every problem is an IncrementError naming the file.

        Each tensor is checked against the SHA-256 its header records; a file
        saved before increments carried checksums loads with a warning that
        it cannot be verified.
        """
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise IncrementError(f"{path} not found; an increment folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        header, header_path = _read_header(config_path), config_path
        try:
            from safetensors import safe_open

            with safe_open(str(weights_path), framework="pt") as f:
                stored = {key: f.get_tensor(key) for key in f.keys()}
                embedded = (f.metadata() or {}).get("header")
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise IncrementError(f"{weights_path} is corrupt or truncated ({exc}); save the increment again") from None
        if embedded is not None:
            inner = _read_header(weights_path, embedded)
            if inner.get("save_id") != header.get("save_id"):
                warnings.warn(f"{config_path} is from another save than {weights_path} (a save was interrupted "
                              f"between the two files?); loading the increment {weights_path} holds", stacklevel=2)
                header, header_path = inner, weights_path
        _verify(weights_path, header_path, header.get("sha256"), stored)
        tensors = {}
        for name, info in header["tensors"].items():
            tensors[name] = _read_delta(weights_path, header_path, name, info, stored)
        dense = {}
        for name, info in header["dense"].items():
            key = f"{name}::dense"
            if key not in stored:
                raise IncrementError(f"{weights_path} lacks {key} listed in {header_path.name}")
            if not isinstance(info, dict) or list(stored[key].shape) != info.get("shape"):
                raise IncrementError(f"{header_path}: dense tensor {name} has shape "
                                     f"{info.get('shape') if isinstance(info, dict) else info!r}, but "
                                     f"{list(stored[key].shape)} in {weights_path.name}")
            dense[name] = stored[key]
        increment = cls(tensors, dense=dense, base_model=header.get("base_model"),
                        config=header.get("sift_config") or {}, metadata=header.get("metadata") or {})
        increment.source = directory
        return increment


def check_destination(out_dir: str | os.PathLike, overwrite: bool, protected: dict[str, Path],
                      option: str = "overwrite=True") -> None:
    """ConfigError when writing a folder at ``out_dir`` would destroy what nobody asked to replace.

    Refused always: the current folder, the ``protected`` folders (``{what
    it is: path}``) and any folder holding one of them. Refused unless
    ``overwrite``: a folder that is not empty, or anything else already at
    ``out_dir`` (a file, a link); the message names ``option``, the way to
    say overwrite where the caller stands (a flag or an argument).
    """
    out = Path(out_dir).expanduser()
    target = out.resolve()
    keep = {"the current folder": Path.cwd(), **{what: Path(path).expanduser() for what, path in protected.items()}}
    for what, folder in keep.items():
        folder = folder.resolve()
        if folder == target or target in folder.parents:
            relation = "is" if folder == target else "holds"
            raise ConfigError(f"output {out_dir} {relation} {what} ({folder}), which is never replaced; choose "
                              "another output folder")
    if not os.path.lexists(out):
        return
    if out.is_dir() and not out.is_symlink():
        if overwrite or not any(out.iterdir()):
            return
        raise ConfigError(f"output {out_dir} is a folder that is not empty; choose a new folder, or pass {option} "
                          "to replace it")
    if not overwrite:
        kind = "link" if out.is_symlink() else "file"
        raise ConfigError(f"output {out_dir} is an existing {kind}; choose a new folder, or pass {option} to "
                          "replace it")


def _model_card(increment: SparseIncrement, directory: Path) -> str:
    """The README.md of a saved increment: what it is, how well it did, and the code that uses it."""
    facts = increment.summary()
    base, meta = increment.base_model, increment.metadata
    task = meta.get("task")
    density = increment.config.get("density")
    rows = [
        ("base model", f"`{base}`" if base else "not recorded"),
        ("task", task or "not recorded (load_base loads a causal LM)"),
        ("density", (f"{_percent(density)} configured, " if isinstance(density, (int, float)) else "")
         + f"{_percent(facts['density'])} of the targeted weights' entries trained"),
        ("trained components", f"{increment.num_components:,}: {facts['selected_components']:,} of "
                               f"{facts['targeted_components']:,} in {facts['targeted_tensors']} targeted tensors"
                               + (f", {facts['dense_components']:,} in {facts['dense_tensors']} densely trained "
                                  "tensors" if increment.dense else "")),
        ("size", f"{_megabytes(increment.nbytes)} of tensors in {WEIGHTS_NAME}"),
    ]
    if "mode" in increment.config:
        rows.append(("selection", f"{increment.config.get('selection', 'gradient')}, {increment.config['mode']}"))
    if meta.get("dataset"):
        rows.append(("dataset", f"`{meta['dataset']}`"))
    if meta.get("labels"):
        rows.append(("labels", ", ".join(f"`{label}`" for label in meta["labels"])))
    front = ["---", "library_name: siftune"] + ([f"base_model: {json.dumps(base)}"] if base else [])
    front += ["tags:", "- siftune", "- sparse-fine-tuning", "---", ""]
    lines = front + [
        f"# SIFT increment of {base or 'an unrecorded base model'}", "",
        "A sparse increment trained with siftune (sparse increment fine-tuning, after Song et al., ICML 2024): "
        "which few entries of the base model's weights it changes, and by how much. It is not a model by "
        "itself: apply it to the base model, or merge the two into a plain transformers folder.", "",
        "| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), "",
    ]
    stages = _metric_stages(meta.get("metrics"))
    names = list(dict.fromkeys(name for stage in stages.values() for name in stage))
    if names:
        lines += ["## Metrics", "", "| metric | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
        lines += [f"| {name} | " + " | ".join(_figure(stage.get(name)) for stage in stages.values()) + " |"
                  for name in names]
        lines.append("")
    merged = str(directory.parent / f"{directory.name}-merged") if directory.name else "merged-model"
    base_arg = "" if base else '"path/or/name of the base model"'
    lines += [
        "## Use", "", "```python", "from siftune import SparseIncrement", "",
        f"increment = SparseIncrement.load({str(directory)!r})",
        f"model, tokenizer = increment.load_base({base_arg})  # the base model, loaded offline as siftune loads it",
        "increment.apply(model)  # model now holds the fine-tuned weights",
        f"increment.merge({merged!r})  # or: base + increment as a plain transformers folder",
        "```", "",
        f"From the command line: `siftune info {shlex.quote(str(directory))} --tensors` lists the tensors, "
        f"`siftune merge {shlex.quote(str(directory))} {shlex.quote(merged)}` merges.", "",
    ]
    return "\n".join(lines)


def _metric_stages(metrics) -> dict[str, dict]:
    """Metrics as ``{stage: {name: value}}`` (e.g. before/after); a flat ``{name: value}`` is one stage."""
    if not isinstance(metrics, dict):
        return {}
    if not any(isinstance(value, dict) for value in metrics.values()):
        return {"value": metrics}
    return {stage: values for stage, values in metrics.items() if isinstance(values, dict)}


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 10_000 else f"{nbytes:,} bytes"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.4g}%"


def _figure(value) -> str:
    """A metric value for a table cell: 4 significant digits, thousands separators, or '' when unknown."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by qualified name: an increment may target either."""
    tensors = dict(model.named_parameters())
    tensors.update({n: b for n, b in model.named_buffers() if n not in tensors})
    return tensors


def _read_header(path: Path, text: str | None = None) -> dict:
    """The checked header in ``path`` (or ``text``, the copy stored inside the weights file ``path``)."""
    try:
        header = json.loads(path.read_text(encoding="utf-8") if text is None else text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an endless integer
        raise IncrementError(f"{path} is not valid JSON ({type(exc).__name__}); the increment folder is "
                             "damaged") from None
    if not isinstance(header, dict) or header.get("format") != "siftune-sparse-increment":
        raise IncrementError(f"{path} is not a siftune increment header (no 'format': 'siftune-sparse-increment')")
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise IncrementError(f"{path}: format_version must be an integer, got {version!r} "
                             f"({type(version).__name__}); the file was edited by hand or is damaged")
    if version > FORMAT_VERSION:
        raise IncrementError(f"{path} has format_version {version}, newer than this siftune reads "
                             f"({FORMAT_VERSION}); upgrade siftune")
    if version != FORMAT_VERSION:
        raise IncrementError(f"{path} has format_version {version}; siftune's formats start at 1 and this one "
                             f"reads {FORMAT_VERSION}: the file was edited by hand or is damaged")
    if not isinstance(header.get("tensors"), dict) or not isinstance(header.get("dense", {}), dict):
        raise IncrementError(f"{path}: 'tensors' and 'dense' must be objects")
    if not isinstance(header.get("base_model"), (str, type(None))):
        raise IncrementError(f"{path}: 'base_model' must be a name, a path or null")
    if not isinstance(header.get("sift_config", {}), dict) or not isinstance(header.get("metadata", {}), dict):
        raise IncrementError(f"{path}: 'sift_config' and 'metadata' must be objects")
    _check_sift_config(path, header.get("sift_config") or {})
    _check_metadata(path, header.get("metadata") or {})
    digests = header.get("sha256")
    if digests is not None and not (isinstance(digests, dict) and all(
            isinstance(v, str) and len(v) == 64 for v in digests.values())):
        raise IncrementError(f"{path}: 'sha256' must map each tensor to its 64-digit SHA-256")
    header.setdefault("dense", {})
    return header


def _check_sift_config(path: Path, config: dict) -> None:
    """IncrementError naming ``path`` and the field when a recorded SIFT setting has a wrong type or range."""
    from ..config import SiftConfig

    known = {key: value for key, value in config.items() if key in SiftConfig.saved_defaults()}
    for key in ("target_modules", "dense_modules"):
        if isinstance(known.get(key), list):
            known[key] = list(known[key])
    try:
        SiftConfig.from_dict({**SiftConfig.saved_defaults(), **known})
    except ConfigError as exc:
        raise IncrementError(f"{path}: sift_config: {exc}") from None
    except TypeError as exc:  # a value of a type no comparison accepts
        raise IncrementError(f"{path}: sift_config holds a value of the wrong type ({exc})") from None


def _check_metadata(path: Path, metadata: dict) -> None:
    """IncrementError naming ``path`` and the field when the metadata ``load_base`` uses is malformed."""
    from ..core.quantize import QUANTIZATIONS

    task, labels, quantize = metadata.get("task"), metadata.get("labels"), metadata.get("quantize")
    if task is not None and task not in ("classification", "causal_lm"):
        raise IncrementError(f"{path}: metadata task must be 'classification' or 'causal_lm', got {task!r}")
    if labels is not None and not (isinstance(labels, list) and labels and all(
            isinstance(label, (str, int)) and not isinstance(label, bool) for label in labels)):
        raise IncrementError(f"{path}: metadata labels must be a non-empty list of label names, got {labels!r}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise IncrementError(f"{path}: metadata quantize must be one of {', '.join(QUANTIZATIONS)} or null, "
                             f"got {quantize!r}")


def _sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as stored (any dtype)."""
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()


_UNVERIFIED_WARNED: set[str] = set()


def _verify(weights_path: Path, header_path: Path, digests: dict | None, stored: dict) -> None:
    """IncrementError naming the first tensor whose bytes differ from the SHA-256 its header records."""
    if digests is None:
        if str(weights_path) not in _UNVERIFIED_WARNED:  # once per file and process
            _UNVERIFIED_WARNED.add(str(weights_path))
            warnings.warn(f"{weights_path} was saved without checksums (by an older siftune), so damage to it "
                          "cannot be detected; save the increment again to add them", stacklevel=3)
        return
    for key in sorted(set(stored) | set(digests)):
        if key not in digests:
            raise IncrementError(f"{weights_path}: tensor {key} has no checksum in {header_path.name} (added after "
                                 "saving?); save the increment again")
        if key not in stored:
            raise IncrementError(f"{weights_path} lacks tensor {key} listed in {header_path.name}")
        if _sha256(stored[key]) != digests[key]:
            raise IncrementError(f"{weights_path}: tensor {key} does not match its SHA-256 (the file is damaged or "
                                 "was changed after saving); use an intact copy or save the increment again")


def _read_delta(weights_path: Path, header_path: Path, name: str, info, stored: dict) -> TensorDelta:
    where, listed = f"{weights_path}: tensor {name}", f"{header_path}: tensor {name}"
    if not isinstance(info, dict):
        raise IncrementError(f"{listed}: entry must be an object with shape and dtype")
    shape, dtype = info.get("shape"), info.get("dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise IncrementError(f"{listed}: shape {shape!r} must be a list of positive integers")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise IncrementError(f"{listed}: dtype {dtype!r} must be one of {sorted(_DTYPES)}")
    idx, values = stored.get(f"{name}::indices"), stored.get(f"{name}::values")
    if idx is None or values is None:
        raise IncrementError(f"{where}: indices or values missing from the file")
    if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
        raise IncrementError(f"{where}: indices must be a 1-D int32/int64 tensor, got {idx.dtype} {tuple(idx.shape)}")
    if values.dtype != torch.float32 or values.shape != idx.shape:
        raise IncrementError(f"{where}: values must be fp32 with one value per index")
    numel = 1
    for d in shape:
        numel *= d
    idx = idx.long()
    if idx.numel():
        if int(idx.min()) < 0 or int(idx.max()) >= numel:
            raise IncrementError(f"{where}: index out of range [0, {numel}) for shape {shape} (as {header_path.name} "
                                 "says)")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise IncrementError(f"{where}: indices must be sorted and unique (duplicates found or unsorted)")
    if not bool(torch.isfinite(values).all()):
        raise IncrementError(f"{where}: values hold NaN or Inf")
    return TensorDelta(indices=idx, values=values, shape=tuple(shape), dtype=dtype)
