"""The ``siftune train`` recipe: data -> model -> SIFT loop -> increment, metrics, plot.

Reads top to bottom as one straight line (:func:`run`); every knob is a field
of :class:`TrainArgs`, which the CLI fills from flags or a YAML file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import checkpoint
from ..parallel import distributed, sharding
from . import tracking
from .data import IGNORE_INDEX, examples_in
from .loss import batch_loss, check_packing, labelled_logits
from ..config import SiftConfig, resolve_auto, unused_options
from ..core.engine import attach
from ..errors import CheckpointError, ConfigError, DataError
from ..core.quantize import QUANTIZATIONS
from ..core.select import HEAD_NAMES
from ..artifacts.io import atomic_write, atomic_write_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
REPORT_TO = ("none", "tensorboard")
# Settings a resumed run may change, because they do not change what is trained.
RESUME_MAY_CHANGE = ("output_dir", "resume", "overwrite", "checkpoint_every", "eval_batch_size",
                     "gradient_checkpointing", "report_to")
# Settings that name files: a resumed run compares what they hold, not how they were spelled.
INPUTS = ("model", "dataset", "eval_dataset")
# TrainArgs' fields that are SiftConfig's, with SiftConfig's defaults (tests/test_cli.py holds them equal).
SIFT_FIELDS = ("density", "mode", "selection_batches", "refresh_every", "state_dtype", "selection", "master_weights",
               "update_in_backward", "compact_indices", "delta_dtype", "score", "budget", "min_density",
               "score_share", "line_cap", "drop_share", "structure", "step_scale", "select_after", "shrink_after",
               "shrink_from", "select_from")
_SAMPLE_BYTES = 1 << 20  # of each input file, hashed with its size to recognise it


@dataclass
class TrainArgs:
    """Everything ``siftune train`` takes; YAML keys and ``--flags`` share these names.

    Args:
        model: model name or local folder: built-in ``minilm`` (for classification)
            or ``smollm2`` (for causal_lm), a folder written by ``save_pretrained``, or
            a name in the local Hugging Face cache (siftune never downloads).
            Default ``"minilm"``.
        dataset: training data: built-in ``rotten_tomatoes`` or ``chatterbot``, a
            .csv or .jsonl file (optionally .gz or .bz2), a .parquet file, or a folder
            written by ``datasets``' ``save_to_disk``. Default ``"rotten_tomatoes"``.
        eval_dataset: held-out data, in any form ``dataset`` takes; all of
            ``dataset`` then trains. Default ``None``: ``eval_size`` examples of
            ``dataset`` are held out.
        task: ``"classification"`` (a sequence classifier) or ``"causal_lm"`` (the
            loss covers response tokens only). Default ``"classification"``.
        output_dir: folder for the increment, metrics.json, loss_curve.png,
            checkpoints/ and tensorboard/. Default ``"runs/train"``.
        target_modules: modules whose weights get a sparse increment: names (a
            module matches its qualified name or a ``.name`` suffix) or one regex;
            one name alone (``query``, in YAML or after the flag) is a name.
            Default ``None`` (or ``all-linear``): every Linear-like layer but the
            output layer and the dense modules.
        dense_modules: modules trained densely: names or one regex. Default
            ``None``: the classification head (``classifier`` or ``score``), if any.
        lr: peak AdamW learning rate of the selected components. Default ``None``:
            by density and selection, fitted to the density sweep
            (:func:`default_lr`; docs/selection.md, "Defaults"): for the default
            selection (balanced with scaled steps), random components and
            ``"balanced"`` 1e-2 x (0.01 / density)^0.8 (6.3e-2 at 0.1%, 1.6e-3
            at 10%); for the top-k
            2.5e-3 x (0.01 / density)^0.6 up to 3.2e-2 (1e-2 at 0.1%, 6.3e-4
            at 10%), twice that for ``structure="rows"``; held below 0.01% at
            0.01%'s rate. At 0.01% and below give a rate: there the sweep's two
            tasks chose rates 4x apart, and on the classification task four
            times its chosen rate falls to the majority class.
        select_first: make the selection before training, from
            ``selection_batches`` micro-batches of its own (forward and backward,
            nothing trained: :meth:`SiftEngine.select`), so that every one of
            ``steps`` trains the selection; without it a window longer than one
            micro-batch trains the targeted weights only once it is complete.
            Modes ``"fixed"`` and ``"periodic"``. Default ``False``.
        dense_lr: peak learning rate of the densely trained modules. Default
            ``None``: the same as ``lr`` when ``lr`` is given, else 4e-3 (the
            head rate the density sweep's validation chose on (a): the
            density rule scales the rate of sparse components, not of a
            dense head).
        steps: optimizer steps to train; 0 trains for ``epochs`` instead.
            Default ``300``.
        epochs: passes over the training examples (fractions allowed), used when
            ``steps`` is 0; with ``packing``, an epoch's steps are counted from the
            first epoch's packed batches. Default ``0.0``.
        batch_size: examples per micro-batch; under several processes the
            global batch, split equally between them. Default ``16``.
        grad_accum: micro-batches whose gradients make one optimizer step.
            Default ``1``.
        max_length: tokens per example; longer examples are cut. Default ``64``.
        packing: causal_lm only: fill each row of a batch with whole examples end to
            end, up to ``max_length`` tokens, instead of one example a row padded to
            the batch's longest. Each example attends to itself only (its position
            ids start again at 0; the model must be a Llama, Mistral, Qwen2 or
            Qwen3), so the loss is the same as unpacked, and a batch holds more
            examples and less padding: an epoch takes fewer steps. Default ``False``.
        warmup_steps: optimizer steps of linear learning-rate warm-up from 0,
            followed by linear decay to 0 at the last step. Default ``30``.
        weight_decay: AdamW's decoupled weight decay on the trained weight
            values. Default ``0.0``.
        max_grad_norm: clip the global gradient norm (selected components and
            dense modules) to this; 0 turns clipping off. Default ``1.0``.
        eval_size: examples of ``dataset`` held out for evaluation: a count, or a
            fraction of the examples if below 1; 0 trains without evaluating.
            Not used with ``eval_dataset``. Default ``None``: a tenth of the
            examples, at most 2,000, and at least as many as there are labels.
        eval_batch_size: examples per held-out batch. Default ``64``.
        dtype: dtype of the weights during training: ``"float32"``,
            ``"bfloat16"`` or ``"float16"``. Default ``"float32"``.
        gradient_checkpointing: recompute activations in the backward pass
            instead of keeping them: less memory for about a third more compute.
            Default ``False``.
        seed: seed of the data order, the held-out split and new heads'
            initialisation; an integer in [0, 2**32). Default ``0``.
        text_column: column of a user file holding the text (classification),
            or the whole text of a causal_lm example. Default ``None``: ``text``,
            else ``sentence``.
        label_column: column of a user file holding the class label (text or
            integer). Default ``None``: ``label``.
        prompt_column: column of a user file holding the prompt (causal_lm).
            Default ``None``: ``prompt``, else ``instruction``.
        response_column: column of a user file holding the response (causal_lm).
            Default ``None``: ``response``, else ``output``.
        checkpoint_every: save the complete training state to
            output_dir/checkpoints every this many optimizer steps, keeping the
            newest two; 0 never saves. Default ``0``.
        resume: continue from the newest intact checkpoint in
            output_dir/checkpoints (a fresh start when there is none), with the same
            settings, the same data (compared by content, wherever it now lies) and
            the same checkpoint layout (with or without ``fsdp``, on as many
            processes). Default ``False``.
        overwrite: a run without ``resume`` into an output_dir holding checkpoints
            deletes them and trains afresh; without it, such a run stops and says
            so, keeping them. Default ``False``.
        nonfinite: a step whose loss or gradient is NaN/Inf is ``"skip"``-ped
            (nothing updated; counted as skipped_steps in metrics.json) or
            ``"raise"``-s an error that ends the run. Default ``"skip"``.
        device: ``"auto"`` (CUDA if there is one, else CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``; under a launcher, auto and cuda take the
            process's LOCAL_RANK GPU. Default ``"auto"``.
        report_to: ``"tensorboard"`` also logs loss, learning rate, gradient
            norm, skipped steps and held-out metrics by optimizer step to
            output_dir/tensorboard (``pip install siftune[tensorboard]``);
            ``"none"`` logs to metrics.json only. Default ``"none"``.
        fsdp: shard the model with FSDP2's ``fully_shard`` (each transformer
            block, then the whole model) so that each process holds 1/N of the
            weights, gradients and SIFT state; start with torchrun. Every
            process evaluates the whole held-out set; checkpoints are folders
            of per-process files and resume on the same number of processes.
            Default ``False``.

        quantize: load the model's Linear layers quantized by bitsandbytes,
            ``"nf4"``, ``"fp4"`` or ``"int8"`` (``pip install siftune[quant]``), and
            train the increment beside them (``storage`` becomes ``"delta"``);
            they compute in ``dtype``. Default ``None``: not quantized.

    The SIFT fields (``SIFT_FIELDS`` and ``storage``: ``density``, ``mode``,
    ``selection``, ``score``, ``structure``, ...) are :class:`SiftConfig`'s,
    with its defaults, documented there.
    """

    model: str = "minilm"
    dataset: str = "rotten_tomatoes"
    eval_dataset: str | None = None
    task: str = "classification"
    output_dir: str = "runs/train"
    density: float = 0.01
    mode: str = "fixed"
    selection_batches: int = 1
    select_first: bool = False
    refresh_every: int = 100
    state_dtype: str = "float32"
    selection: str = "auto"
    master_weights: bool = True
    update_in_backward: bool = False
    compact_indices: bool = False
    storage: str = "in_place"
    delta_dtype: str = "float32"
    score: str = "grad_weight"
    budget: str = "per_tensor"
    min_density: float = 0.0
    score_share: float = 0.5
    line_cap: float = 1.0
    drop_share: float = 0.25
    structure: str | None = None
    step_scale: str | None = "auto"
    select_after: int = 0
    shrink_after: int = 0
    shrink_from: float = 10.0
    select_from: str | None = None
    quantize: str | None = None
    target_modules: list[str] | str | None = None
    dense_modules: list[str] | str | None = None
    lr: float | None = None
    dense_lr: float | None = None
    steps: int = 300
    epochs: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 64
    packing: bool = False
    warmup_steps: int = 30
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_size: float | None = None
    eval_batch_size: int = 64
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    seed: int = 0
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    overwrite: bool = False
    nonfinite: str = "skip"
    device: str = "auto"
    report_to: str = "none"
    fsdp: bool = False

    def validate(self, sources: dict[str, str] | None = None) -> None:
        """ConfigError naming the field for every value no run could use.

        ``sources`` maps a field to where its value came from (a YAML file);
        the message then names that too.
        """
        def fail(name: str, problem: str):
            where = f"{sources[name]}: " if sources and name in sources else ""
            raise ConfigError(f"{where}{name} {problem}")

        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _accepts(hints[f.name], value):
                fail(f.name, f"must be {_describe(hints[f.name])}, got {value!r}")
        if self.task not in ("classification", "causal_lm"):
            fail("task", f"must be 'classification' or 'causal_lm', got {self.task!r}")
        if self.dtype not in DTYPES:
            fail("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            fail("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            fail("device", f"is {self.device!r} but torch sees no CUDA device here; use cpu or auto")
        if self.nonfinite not in ("skip", "raise"):
            fail("nonfinite", f"must be 'skip' or 'raise', got {self.nonfinite!r}")
        if self.report_to not in REPORT_TO:
            fail("report_to", f"must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.report_to == "tensorboard":
            tracking.check_installed()
        if self.packing and self.task != "causal_lm":
            fail("packing", "joins causal_lm examples into rows; a classification batch holds one example a row: "
                            "drop --packing")
        if self.eval_dataset is not None and self.eval_size == 0:
            fail("eval_size", f"is 0 (no evaluation) but eval_dataset is {self.eval_dataset!r}; drop one of the two")
        for name in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "lr", "dense_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                fail(name, f"must be > 0, got {value!r}")
        for name in ("steps", "epochs", "warmup_steps", "max_grad_norm", "weight_decay", "eval_size",
                     "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)!r}")
        if self.steps == 0 and self.epochs == 0:
            fail("steps", "or epochs must be > 0 (both are 0)")
        if not 0 <= self.seed < 2**32:
            fail("seed", f"must be in [0, 2**32), got {self.seed}")
        for name in ("target_modules", "dense_modules"):
            pattern = getattr(self, name)
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    fail(name, f"is not a valid regular expression ({exc})")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            fail("quantize", f"must be one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}")
        if self.update_in_backward is True and self.grad_accum != 1:
            fail("update_in_backward", "applies the update at every backward, so it needs grad_accum 1")
        if self.select_first is True and self.mode == "per_step":
            fail("select_first", "makes one selection before training; mode per_step selects at every step: use "
                                 "--mode fixed or periodic, or drop --select-first")
        if self.select_first is True and self.select_after:
            fail("select_first", f"makes the selection before training; select_after {self.select_after} makes it "
                                 "after that many steps of the dense modules: pass one of them")
        if self.select_after and self.task == "causal_lm" and not self.dense_modules:
            fail("select_after", "lets the dense modules (a new head) train alone first; a causal_lm run has no "
                                 "head: name modules with --dense-modules, or drop --select-after")
        if self.resume and self.overwrite:
            fail("resume", "and overwrite contradict each other: --resume continues the run in output_dir, "
                           "--overwrite deletes its checkpoints; pass one of them")
        processes = int(os.environ.get("WORLD_SIZE", "1") or 1)  # as torchrun sets it, before the job joins
        if self.fsdp and self.quantize:
            fail("fsdp", "cannot be combined with quantize: a quantized base trains its increment beside whole "
                         "frozen weights, which FSDP2 splits; drop --fsdp or --quantize")
        if self.fsdp and self.storage == "delta":
            fail("fsdp", "cannot be combined with storage delta, which needs whole weights; drop --fsdp, or use "
                         "--storage in_place")
        if self.update_in_backward is True and processes > 1:
            fail("update_in_backward", f"works in one process; this job has {processes}: drop "
                                       "--update-in-backward, or start one process")
        try:
            self.sift_config()  # density, mode, ... are checked there
        except ConfigError as exc:
            # SiftConfig's messages start with the field's name, which is also ours.
            name, _, problem = str(exc).partition(" ")
            fail(name, problem)

    def sift_config(self, dense_modules=None) -> SiftConfig:
        values = {name: getattr(self, name) for name in SIFT_FIELDS}
        return SiftConfig(
            **values, storage="delta" if self.quantize else self.storage,
            target_modules=self.target_modules, dense_modules=dense_modules or self.dense_modules or (),
            max_grad_norm=self.max_grad_norm or None, seed=self.seed,
        )

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def _accepts(hint, value) -> bool:
    """Whether ``value`` has the type ``hint`` (a field annotation) asks for; YAML gives ints for floats."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_accepts(typing.get_args(hint)[0], v) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    names = {str: "text", int: "an integer", float: "a finite number", bool: "true or false", type(None): "null"}
    return names.get(hint, "a list of names" if typing.get_origin(hint) is list else str(hint))


# The density rule: a selection's rate at 1% density, the exponent it rises with below (and falls with above),
# and a cap, each fitted to the rates chosen on validation in the density sweep (docs/selection.md, "Defaults";
# `python bench/rate_rule.py` scores the rule against the sweep's records). Below the sweep's lowest density the
# rate is held at that density's.
RATE_RULES = {"gradient": (2.5e-3, 0.6, 3.2e-2), "random": (1e-2, 0.8, None), "balanced": (1e-2, 0.8, None)}
REFERENCE_DENSITY, LOWEST_DENSITY = 0.01, 1e-4
# Whole rows chosen by the score train at this multiple of the top-k's rate; the selections without a rule of
# their own (mixed, grow and drop) and columns at the top-k's.
ROWS_LR_FACTOR = 2.0
# A choice from an earlier run (select_from) trains at this multiple of its selection's rate: both tasks' grids
# chose half the rule's rate at 0.1% (3.2e-2 against 6.3e-2; docs/selection.md, "A choice from a trained run").
SELECT_FROM_LR_FACTOR = 0.5
LR_RULE = "default_lr(density, selection, structure, step_scale, select_from)"


def default_lr(density: float, selection: str = "auto", structure: str | None = None,
               step_scale: str | None = "auto", select_from: bool = False) -> float:
    """SIFT's peak learning rate for ``density`` when none is given.

    ``rate * (0.01 / density) ** exponent``, fitted per selection to the rates
    chosen on validation in the density sweep: for the top-k
    (``selection="gradient"``) 2.5e-3 at 1% with exponent 0.6 and a cap of
    3.2e-2 (1e-2 at 0.1%, 6.3e-4 at 10%); for random components 1e-2 at 1%
    with exponent 0.8 (6.3e-2 at 0.1%, 1.6e-3 at 10%), and the same for
    ``balanced``. Below 0.01%, the sweep's lowest density, the
    rate is held at 0.01%'s. Whole rows chosen by the score
    (``structure="rows"``) train at twice the top-k's rate; ``mixed``,
    ``grow_drop`` and columns at the top-k's (docs/selection.md, "Defaults").
    With ``step_scale="input"`` every selection takes random components'
    rule: scaled, balanced at ``line_cap=1`` chose random components'
    unscaled rate on both tasks at LoRA r=8's count, and random components
    the same or twice it (docs/selection.md, "Steps scaled by each input's size").
    ``"auto"`` is what :class:`SiftConfig` makes of it in mode ``"fixed"``
    (balanced with scaled steps: random components' rule). A choice ranked by an
    earlier run's change (``select_from``) takes half its selection's rate.
    """
    if not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1], got {density!r}")
    selection, step_scale = resolve_auto(selection, step_scale, "fixed", "per_tensor", structure, density)
    if step_scale == "input":
        selection, structure = "random", None
    rate, exponent, cap = RATE_RULES.get(selection, RATE_RULES["gradient"])
    lr = rate * (REFERENCE_DENSITY / max(density, LOWEST_DENSITY)) ** exponent
    if cap is not None:
        lr = min(cap, lr)
    if structure == "rows" and selection == "gradient":
        lr *= ROWS_LR_FACTOR
    return lr * SELECT_FROM_LR_FACTOR if select_from else lr


def lr_used(args: TrainArgs) -> tuple[float, str]:
    """The peak rate a run trains at and where it came from: ``"given"`` or the density rule."""
    if args.lr is not None:
        return args.lr, "given"
    # "auto" made concrete as the engine will (FSDP2 shards: the top-k, plain steps)
    selection, step_scale = resolve_auto(args.selection, args.step_scale, args.mode, args.budget, args.structure,
                                         args.density, sharded=args.fsdp)
    return default_lr(args.density, selection, args.structure, step_scale, bool(args.select_from)), LR_RULE


# The dense modules' rate when neither lr nor dense_lr is given: the head rate seed 0's validation chose, or came
# within 0.1 point of, in each of the sweep's head grids on (a) (docs/selection.md, "The head's rate").
DEFAULT_DENSE_LR = 4e-3


def dense_lr_used(args: TrainArgs, lr: float) -> float:
    """The dense modules' peak rate: ``dense_lr``, else ``lr`` when given, else ``DEFAULT_DENSE_LR``."""
    if args.dense_lr is not None:
        return args.dense_lr
    return lr if args.lr is not None else DEFAULT_DENSE_LR


def run(args: TrainArgs, progress: bool = True) -> dict:
    """Train a SIFT increment as ``args`` says; returns the metrics it also writes."""
    # A process lost inside FSDP2's collectives (in a forward or backward) ends the run as DistributedError.
    with sharding.fsdp_collective_errors():
        return _run(args, progress)


def _run(args: TrainArgs, progress: bool) -> dict:
    from . import data, models

    args.validate()
    out = Path(args.output_dir)
    # Before the job's processes join: they all find the same files and stop with the same one-line error.
    _check_checkpoint_folder(args, out / CHECKPOINT_DIR)
    distributed.init()  # joins the job when started by torchrun or accelerate launch, else does nothing
    if args.fsdp and distributed.world_size() < 2:
        raise ConfigError("fsdp shards the model across the processes of a job; start it with "
                          "torchrun --nproc_per_node N -m siftune.cli train ... (N >= 2)")
    if args.batch_size % distributed.world_size():
        raise ConfigError(f"batch_size {args.batch_size} must be a multiple of the {distributed.world_size()} "
                          "processes: each takes an equal slice of every batch")
    torch.manual_seed(args.seed)
    checkpoints = (sharding.ShardedCheckpoints if args.fsdp else checkpoint.Checkpoints)(out / CHECKPOINT_DIR)
    resumed = checkpoints.load_latest() if args.resume else None  # before the slow loading: fail fast
    if resumed is not None:
        _check_resumable(resumed, args)

    columns = dict(text_column=args.text_column, label_column=args.label_column,
                   prompt_column=args.prompt_column, response_column=args.response_column)
    examples = data.load_examples(args.dataset, args.task, **columns)
    if args.eval_dataset is None:
        if args.eval_size is None:
            eval_size = default_eval_size(examples, args.task)
        else:
            eval_size = int(args.eval_size) if args.eval_size >= 1 else args.eval_size  # a count, or a fraction
        train_set, eval_set = data.split_examples(examples, eval_size, seed=args.seed)
    else:
        train_set, eval_set = examples, data.load_examples(args.eval_dataset, args.task, **columns)
    labels = data.label_names(train_set) if args.task == "classification" else None
    device = _device(args.device)
    model, tokenizer = models.load_model(args.model, args.task, num_labels=len(labels) if labels else None,
                                         dtype=DTYPES[args.dtype], labels=labels, quantize=args.quantize,
                                         device=device)
    model.to(device)
    if args.packing:
        check_packing(model)
    if args.gradient_checkpointing:
        models.checkpoint_activations(model)
    if args.fsdp:
        sharding.shard_model(model)  # before attach: SIFT trains the shards
    batches = _BatchMaker(args, tokenizer, labels, device)
    _print(f"siftune train: {args.model} on {args.dataset} ({len(train_set)} train / {len(eval_set)} held out)")

    if resumed is None:
        if distributed.is_main_process():  # a fresh run must never later resume from an older run's checkpoints
            checkpoint.Checkpoints(out / CHECKPOINT_DIR).clear()
            sharding.ShardedCheckpoints(out / CHECKPOINT_DIR).clear()
        before = evaluate(model, batches.eval(eval_set), args.task) if eval_set else {}
    else:
        before = resumed["progress"]["before"]
        _print(f"resuming from {resumed['path']} (step {resumed['step']})")
    _report("before", before)

    dense = args.dense_modules or _default_head(model, args.task)
    engine = attach(model, args.sift_config(dense_modules=dense))
    lr, lr_from = lr_used(args)
    dense_lr = dense_lr_used(args, lr)
    chosen = engine.config
    _print(f"selection {chosen.selection}" + (f" (line_cap {chosen.line_cap:g})" if chosen.selection == "balanced"
                                              else "") + (", steps scaled by input" if chosen.step_scale else ""))
    _print(f"learning rate {lr:.3g}" + (f" (by density {args.density:g} and selection {chosen.selection}"
                                        f"{', scaled' if chosen.step_scale else ''}: {LR_RULE})"
                                        if lr_from != "given" else "")
           + (f", dense modules {dense_lr:.3g}" if dense and dense_lr != lr else ""))
    optimizer = engine.optimizer(lr=lr, dense_lr=dense_lr, weight_decay=args.weight_decay,
                                 nonfinite=args.nonfinite)
    steps = args.steps or max(1, math.ceil(args.epochs * batches.per_epoch(train_set) / args.grad_accum))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_decay(args.warmup_steps, steps))
    start, consumed, losses, earlier_s = 0, 0, [], 0.0
    settings = _resume_settings(args)  # what a later --resume must find the same
    if resumed is not None:  # model values, engine, optimizer, scheduler and RNGs as they were
        done = checkpoint.restore(resumed, engine, optimizer, scheduler)
        start, consumed, losses, earlier_s = resumed["step"], done["micro_batches"], done["losses"], done["train_s"]
    board = None
    if args.report_to == "tensorboard" and distributed.is_main_process():
        board = tracking.TensorBoard(out / TENSORBOARD_DIR, resumed_at=start)
        if resumed is None:
            board.held_out(0, before)

    model.train()
    started = time.perf_counter()
    if args.select_first and resumed is None:  # a resumed run restores the selection it made
        used = engine.select(distributed.shard(batches.train_forever(train_set)), loss_of=batch_loss)
        _print(f"selected from {used} micro-batches of {args.batch_size} before training")
    # From the data position the checkpoint recorded; each process takes its slice of every batch.
    stream = distributed.shard(batches.train_forever(train_set, skip=consumed))
    bar = _progress(steps, progress and distributed.is_main_process(), initial=start)
    seen = 0  # examples this process has trained on since the loop started
    for step in range(start, steps):
        step_loss = 0.0
        for _ in range(args.grad_accum):
            batch = next(stream)
            seen += examples_in(batch)  # this process's share (a packed batch's rows hold several)
            loss = batch_loss(model, batch) / args.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
        optimizer.step()  # skips (or raises on) a non-finite gradient, as args.nonfinite says
        learning_rate = optimizer.param_groups[0]["lr"]  # this step's rate, before the schedule moves on
        scheduler.step()
        optimizer.zero_grad()
        losses.append(distributed.mean_across_ranks(step_loss))  # the loss of the whole batch
        if board is not None:
            # With update_in_backward the optimizer sees only the dense modules' gradient: no global norm.
            grad_norm = None if args.update_in_backward else optimizer.last_grad_norm
            board.train_step(step + 1, losses[-1], learning_rate, grad_norm, optimizer.skipped_steps)
        # A sharded checkpoint takes every process's part; otherwise rank 0 holds it all.
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and (
                args.fsdp or distributed.is_main_process()):
            checkpoints.save(checkpoint.capture(step + 1, engine, optimizer, scheduler, {
                "micro_batches": (step + 1) * args.grad_accum, "losses": losses, "before": before,
                "train_s": earlier_s + time.perf_counter() - started, "settings": settings}))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}",
                        ex_s=f"{seen * distributed.world_size() / (time.perf_counter() - started):.1f}")
        bar.update(1)
    bar.close()
    train_s = earlier_s + time.perf_counter() - started
    model.eval()

    after = evaluate(model, batches.eval(eval_set), args.task) if eval_set else {}
    _report("after", after)
    if board is not None:
        board.held_out(steps, after)
        board.close()

    increment = engine.increment(base_model=args.model, values=optimizer.master_values())
    increment.metadata.update(task=args.task, labels=labels, dataset=args.dataset,
                              metrics=_json_safe({"before": before, "after": after}))  # for the model card
    increment.metadata.update(lr=lr, lr_from=lr_from, dense_lr=dense_lr)
    if args.quantize:
        increment.metadata["quantize"] = args.quantize  # merge quantizes the base the same way
    metrics = {
        "before": before, "after": after, "steps": steps, "train_s": round(train_s, 2),
        "step_s": round(train_s / steps, 4), "trainable": engine.num_trainable,
        "increment_bytes": increment.nbytes, "skipped_steps": optimizer.skipped_steps,
        "losses": losses, "args": {**dataclasses.asdict(args), "lr": lr}, "lr_from": lr_from,
    }
    if distributed.is_main_process():  # one writer, whatever the number of processes
        increment.save(out)
        atomic_write_text(out / "metrics.json", json.dumps(_json_safe(metrics), indent=2))
        atomic_write(out / "loss_curve.png", lambda tmp: plot_losses(losses, tmp, title=_title(args, before, after)))
    _print(f"wrote {out}/ ({increment.nbytes / 1e6:.2f} MB increment, {engine.num_trainable:,} trainable, "
          f"{train_s:.0f} s training)")
    distributed.wait_for_all()  # every process returns once the files are written
    return metrics


def default_eval_size(examples: list, task: str) -> int:
    """Examples held out when ``eval_size`` is not given: a tenth, at most 2,000, and for classification at
    least one per label, so that a file of a few dozen rows trains and evaluates as a big one does."""
    count = min(2000, round(len(examples) / 10))
    if task == "classification":
        count = max(count, len({example["label"] for example in examples}))
    return min(max(count, 1), max(len(examples) - 1, 1))


def _check_checkpoint_folder(args: TrainArgs, folder: Path) -> None:
    """CheckpointError, before anything is loaded, when ``folder``'s checkpoints must not be used or lost:
    a fresh run (no --resume, no --overwrite) would delete them; --resume would not see them (written
    with or without --fsdp, the other way), or would need as many processes as wrote them."""
    single = checkpoint.Checkpoints(folder).steps()
    sharded_checkpoints = sharding.ShardedCheckpoints(folder)
    sharded = sharded_checkpoints.steps()
    if not args.resume:
        if (single or sharded) and not args.overwrite:
            newest = (checkpoint.Checkpoints(folder).path(single[0]) if single else
                      sharded_checkpoints.path(sharded[0]))
            raise CheckpointError(f"{folder} holds checkpoints of an earlier run (newest {newest.name}); continue "
                                  "it with --resume, or pass --overwrite to delete them and train afresh")
        return
    restart = "or pass --overwrite (without --resume) to delete them and train afresh"
    if not args.fsdp and sharded and not single:
        writers = sharded_checkpoints.writers(sharded[0])
        count = writers or "N"
        raise CheckpointError(f"{sharded_checkpoints.path(sharded[0])} is a sharded checkpoint, written with --fsdp by "
                              f"{writers or 'several'} processes; resume it as it was written (torchrun "
                              f"--nproc_per_node {count} -m siftune.cli train ... --fsdp --resume), {restart}")
    if args.fsdp and single and not sharded:
        raise CheckpointError(f"{checkpoint.Checkpoints(folder).path(single[0])} was written by one process without "
                              f"--fsdp; resume it without --fsdp, as it was written, {restart}")
    if args.fsdp and sharded:
        writers, processes = sharded_checkpoints.writers(sharded[0]), int(os.environ.get("WORLD_SIZE", "1"))
        if writers is not None and writers != processes:
            raise CheckpointError(f"{sharded_checkpoints.path(sharded[0])} was written by {writers} processes, this "
                                  f"job has {processes}; resume with torchrun --nproc_per_node {writers}, {restart}")


def _resume_settings(args: TrainArgs) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in RESUME_MAY_CHANGE}
    settings["lr"] = lr_used(args)[0]  # the rate trained at, given or by density
    for name in INPUTS:
        settings[name] = _input_identity(settings[name])
    return settings


def _input_identity(name: str | None):
    """What a run's input is, to recognise it on resume: a built-in or hub name as given; a local file or
    folder by its resolved path and content (sizes, SHA-256 of each file's first MiB)."""
    if name is None or not Path(name).expanduser().exists():
        return name
    path = Path(name).expanduser().resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest, size = hashlib.sha256(), 0
    for file in files:
        with open(file, "rb") as f:
            head = f.read(_SAMPLE_BYTES)
        length = file.stat().st_size
        size += length
        digest.update(f"{file.relative_to(path) if file != path else ''}\0{length}\0".encode("utf-8"))
        digest.update(hashlib.sha256(head).digest())
    return {"path": str(path), "bytes": size, "files": len(files), "sha256_first_mib": digest.hexdigest()}


def _same_input(saved, now) -> bool:
    """Whether an input recorded at a checkpoint is the run's now: same content (a moved file is the same
    data), or for a checkpoint of an older siftune, which recorded the text given, the same resolved path."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return {k: v for k, v in saved.items() if k != "path"} == {k: v for k, v in now.items() if k != "path"}
    if isinstance(saved, str) and isinstance(now, dict):
        return Path(saved).expanduser().resolve() == Path(now["path"])
    return saved == now


def _check_resumable(resumed: dict, args: TrainArgs) -> None:
    saved, now = resumed["progress"].get("settings", {}), _resume_settings(args)
    # A field added since the checkpoint was written had its default then.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainArgs) if f.default is not dataclasses.MISSING}
    # an option of a selection neither run trained with (line_cap, once 2 by default, for the top-k) changes nothing
    unread = unused_options(saved.get("selection", defaults["selection"])) & unused_options(now["selection"])
    changed = sorted(k for k in now.keys() | saved.keys()
                     if k not in INPUTS and k not in unread
                     and saved.get(k, defaults.get(k)) != now.get(k, defaults.get(k)))
    changed += [k for k in INPUTS if not _same_input(saved.get(k), now.get(k))]
    if changed:
        # every value, then and now: a rate set by the default rule is in no flag the user could compare
        detail = [f"{k}: {_shown(saved.get(k))} then, {_shown(now.get(k))} now" for k in changed]
        raise CheckpointError(f"{resumed['path']} was written with other settings ({'; '.join(detail)}); resume "
                              "with the same settings and data, or pass --overwrite without --resume to train afresh")


def _shown(identity) -> str:
    """An input's identity in a message: its path, and whether its content is what was recorded."""
    if isinstance(identity, dict):
        return f"{identity['path']} ({identity['bytes']:,} bytes)"
    return repr(identity)


def _json_safe(value):
    """``value`` with NaN/Inf (a skipped step's loss) as null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


class _BatchMaker:
    """Tokenised batches for the task, with the run's sizes and seed."""

    def __init__(self, args: TrainArgs, tokenizer, labels, device=None):
        self.args, self.tokenizer, self.labels = args, tokenizer, labels
        self.device = device or torch.device("cpu")

    def _make(self, examples, batch_size, shuffle, seed, packing=False):
        from . import data

        a = self.args
        if a.task == "classification":
            held_out = a.eval_dataset or f"the held-out part of {a.dataset}"  # named by an unseen-label error
            made = data.classification_batches(examples, self.tokenizer, self.labels, batch_size, a.max_length,
                                               shuffle=shuffle, seed=seed, source=held_out)
        else:
            made = data.causal_lm_batches(examples, self.tokenizer, batch_size, a.max_length, shuffle=shuffle,
                                          seed=seed, packing=packing)
        return ({k: v.to(self.device) for k, v in batch.items()} for batch in made)

    def per_epoch(self, examples) -> int:
        """Micro-batches in an epoch of ``examples``: packed, as many as their lengths fill (tokenised to count)."""
        if not self.args.packing:
            return math.ceil(len(examples) / self.args.batch_size)
        return sum(1 for _ in self._make(examples, self.args.batch_size, shuffle=True, seed=self.args.seed,
                                         packing=True))

    def eval(self, examples):
        """This process's share of the held-out examples (all of them in a single process).

        With fsdp each forward of a sharded model needs every process, so all
        run as many batches: a shorter share ends with batches of one example
        that :func:`evaluate` runs but does not count (:data:`NOT_COUNTED`).
        """
        share = distributed.shard_examples(examples)
        size = self.args.eval_batch_size
        batches = self._make(share, size, shuffle=False, seed=0)
        if not self.args.fsdp:
            return batches
        longest = math.ceil(math.ceil(len(examples) / distributed.world_size()) / size)
        padding = longest - math.ceil(len(share) / size)
        if not padding:
            return batches
        filler = {**next(self._make(examples[:1], 1, shuffle=False, seed=0)), NOT_COUNTED: True}
        return itertools.chain(batches, itertools.repeat(filler, padding))

    def train_forever(self, examples, skip: int = 0):
        """Micro-batches epoch after epoch, each shuffled by seed + epoch, after the first ``skip`` of them."""
        if not examples:  # else an endless loop over empty epochs
            raise DataError("the training set has no examples; give a dataset with some")
        epoch = 0
        if not self.args.packing:  # every epoch has as many batches: skip whole epochs without tokenising them
            epoch, skip = divmod(skip, self.per_epoch(examples))
        batches = itertools.chain.from_iterable(
            self._make(examples, self.args.batch_size, shuffle=True, seed=self.args.seed + e, packing=self.args.packing)
            for e in itertools.count(epoch))
        return itertools.islice(batches, skip, None)


NOT_COUNTED = "_siftune_not_counted"  # the key that marks an evaluation batch run only to keep ranks in step


@torch.no_grad()
def evaluate(model, batches, task: str, split: bool = True) -> dict:
    """Held-out accuracy (classification) or response-token loss and perplexity (causal LM).

    Under several processes each evaluates its share of the examples and the
    counts are summed (``split``), or each evaluates them all. A batch marked
    :data:`NOT_COUNTED` runs (a sharded model's forward needs every process)
    but is not counted.
    """
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = tokens = 0.0
    for batch in batches:
        counted = not batch.get(NOT_COUNTED, False)
        inputs = {k: v for k, v in batch.items() if k != NOT_COUNTED}
        gathered = labelled_logits(model, inputs) if task != "classification" else None
        if gathered is None:
            output = model(**inputs)
        if not counted:
            continue
        if task == "classification":
            correct += int((output.logits.argmax(-1) == batch["labels"]).sum())
            total += batch["labels"].numel()
        else:
            if gathered is None:  # every position's logits; the unlabelled ones are ignored
                logits, target = output.logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten()
            else:
                logits, target = gathered
            loss_sum += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX,
                                                                reduction="sum"))
            tokens += int((target != IGNORE_INDEX).sum())
    model.train(was_training)
    if split:
        correct, total, loss_sum, tokens = distributed.sum_across_ranks([correct, total, loss_sum, tokens])
    if task == "classification":
        return {"accuracy": correct / max(total, 1), "examples": int(total)}
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(tokens)}


def _device(name: str) -> torch.device:
    """The device ``--device`` names; under a launcher, CUDA means this process's LOCAL_RANK GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device(name)


def _default_head(model, task: str) -> list[str]:
    if task != "classification":
        return []
    names = {n for n, _ in model.named_children()}
    return [n for n in HEAD_NAMES if n in names]


def _warmup_then_decay(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


def _report(when: str, metrics: dict) -> None:
    if metrics:
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        _print(f"held-out {when}: {shown}")


def _print(text: str) -> None:
    if distributed.is_main_process():  # one copy of the output, whatever the number of processes
        print(text)


def _title(args: TrainArgs, before: dict, after: dict) -> str:
    key = "accuracy" if args.task == "classification" else "loss"
    change = f"; held-out {key} {before[key]:.3f} -> {after[key]:.3f}" if key in before and key in after else ""
    return f"SIFT {args.mode}, density {args.density:g}, {args.model}{change}"


def plot_losses(losses: list[float], path: Path, title: str = "") -> None:
    """Training loss per step and its moving average, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, color="0.75", linewidth=0.8, label="per step")
    window = max(1, len(losses) // 20)
    if len(losses) >= window:
        smooth = [sum(losses[i - window + 1:i + 1]) / window for i in range(window - 1, len(losses))]
        ax.plot(range(window, len(losses) + 1), smooth, color="C0", label=f"mean of {window}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
