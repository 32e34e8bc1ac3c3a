"""The benchmark's methods: each one turns a freshly loaded model into something to train.

Every ``prepare_*`` function takes the model and a :class:`MethodRun` and
returns a :class:`Prepared`: the model to call (peft wraps it for LoRA and
SHiRA), its optimizer, how many components it trains, and a function that
gives the bytes a trained result would take on disk. The training loop,
schedule and evaluation are shared (:mod:`siftune.bench.runner`), so methods differ
only here.

Method names: ``head`` (only the new classification head), ``full`` (AdamW on
every weight), ``lora`` and ``shira`` (peft, setting = rank), ``random``
(SIFT's engine with uniformly random components, the paper's ablation) and
``sift-fixed`` / ``sift-periodic`` / ``sift-per_step`` (setting = density);
``sift-rows`` / ``sift-columns``: SIFT fixed mode selecting whole rows or
columns (``SiftConfig.structure``), whose backward computes only their
gradient; ``random-rows`` / ``random-columns``: the same with rows (columns)
drawn uniformly at random (as S2FT chooses them). ``dense-backward`` trains nothing: it computes the targeted
weights' dense gradients and drops them, the step of any method that must
form them (unstructured SIFT's limit), for step-time comparisons.
On a base whose Linear layers are loaded in nf4 (:data:`QUANTIZED`):
``qlora`` (peft LoRA, setting = rank) and ``sift-nf4`` (SIFT fixed mode with
``storage="delta"``, setting = density). ``sift-bf16``: SIFT fixed mode on a
base loaded in bf16 (:data:`DTYPES`; fp32 masters and moments, the defaults).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..core.select import find_targets
from ..core.storage import weight_shape
from ..recipes.loss import batch_loss

# The weights every sparse and low-rank method adapts, per task: all encoder
# Linear layers of BERT-style classifiers, all attention and MLP projections
# of Llama-style causal LMs.
TARGETS = {
    "classification": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "causal_lm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# A --sift option of the bench, not a SiftConfig field: with 1 the selection window runs on batches of
# its own before training (SiftEngine.select), so every method trains for the same steps on the same batches.
SELECT_FIRST = "select_first"
HEADS = {"classification": ["classifier"], "causal_lm": []}  # trained densely where one exists

SIFT_MODES = {"sift-fixed": "fixed", "sift-periodic": "periodic", "sift-per_step": "per_step", "sift-nf4": "fixed",
              "sift-bf16": "fixed", "sift-rows": "fixed", "sift-columns": "fixed"}
STRUCTURES = {"sift-rows": "rows", "sift-columns": "columns", "random-rows": "rows",
              "random-columns": "columns"}  # method -> SiftConfig.structure
RANDOM = ("random", "random-rows", "random-columns")  # SIFT's engine with selection="random"
RANDOM_OPTIONS = ("step_scale", "select_after")  # the --sift options random components take (the others choose by score)
RANKED = ("lora", "shira", "qlora")
DENSITY_METHODS = (*RANDOM, *SIFT_MODES)
QUANTIZED = {"qlora": "nf4", "sift-nf4": "nf4"}  # method -> how its base model's Linear layers are loaded
DTYPES = {"sift-bf16": torch.bfloat16}  # method -> the dtype its base model is loaded in (else fp32)
METHODS = ("base", "head", "full", "dense-backward", *RANKED, *DENSITY_METHODS)
MATCHED_RANK = 8  # "matched" density = LoRA at this rank's count / targeted components
LORA_ALPHA_PER_RANK = 2  # lora_alpha = 2 r: the usual scale alpha / r = 2
PERIODIC_REFRESH = 100  # optimizer steps between two selections in sift-periodic


@dataclass
class MethodRun:
    """One method at one setting, as the worker builds it.

    ``setting`` is the rank for lora/shira, a density (float) or "matched"
    for random/sift-*, and ``None`` for base/head/full.
    """

    method: str
    task: str
    setting: float | int | str | None
    lr: float
    dense_lr: float
    seed: int
    max_grad_norm: float = 1.0
    sift: dict = field(default_factory=dict)  # more SiftConfig fields for sift-* (budget, score, ...)


@dataclass
class Prepared:
    """What the shared loop needs from a method."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None  # None for "base" (evaluated untrained)
    trainable: int  # components updated by training, head included
    head: int  # of which in the densely trained head
    increment_bytes: Callable[[], int]  # bytes of the trained result as it would be saved
    density: float | None = None  # trained fraction of the targeted components
    rank: int | None = None
    select: Callable | None = None  # given the training batches, makes the selection before training
    increment: Callable | None = None  # SIFT: the trained increment (SparseIncrement), to save


class ClippedAdamW(torch.optim.AdamW):
    """torch AdamW that clips the global gradient norm first, as SiftAdamW does.

    Clipping inside ``step`` keeps every method on the same loop.
    """

    def __init__(self, params, lr: float, max_grad_norm: float):
        super().__init__(params, lr=lr, weight_decay=0.0)
        self.max_grad_norm = max_grad_norm

    def step(self, closure=None):
        if self.max_grad_norm:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return super().step(closure)


def targeted_shapes(model: nn.Module, task: str) -> list[tuple[int, int]]:
    """The (logical) weight shapes the sparse and low-rank methods adapt on ``model``, quantized or not."""
    return [weight_shape(model.get_submodule(name.rpartition(".")[0])) for name in find_targets(model, TARGETS[task])[0]]


def lora_count(model: nn.Module, task: str, rank: int) -> int:
    """Trainable components of LoRA at ``rank`` on the targets: r * (in + out) per weight."""
    return sum(rank * (rows + cols) for rows, cols in targeted_shapes(model, task))


def resolve_density(model: nn.Module, task: str, setting) -> float:
    """A density setting as a number; "matched" gives LoRA r=MATCHED_RANK's count / targeted numel."""
    if setting == "matched":
        total = sum(rows * cols for rows, cols in targeted_shapes(model, task))
        return lora_count(model, task, MATCHED_RANK) / total
    return float(setting)


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _head_params(model: nn.Module, task: str) -> list[nn.Parameter]:
    return [p for name in HEADS[task] for p in model.get_submodule(name).parameters()]


def prepare_base(model, run: MethodRun) -> Prepared:
    """No training: the untrained model's held-out metric (the 'before' figure)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return Prepared(model, None, 0, 0, lambda: 0)


def prepare_head(model, run: MethodRun) -> Prepared:
    """Only the new head is trained (a linear probe of the frozen encoder)."""
    if not HEADS[run.task]:
        raise ConfigError(f"method 'head' needs a classification head; task {run.task!r} has none")
    head = _head_params(model, run.task)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    count = sum(p.numel() for p in head)
    return Prepared(model, ClippedAdamW(head, run.dense_lr, run.max_grad_norm), count, count,
                    lambda: _param_bytes(head))


def prepare_full(model, run: MethodRun) -> Prepared:
    """Full fine-tuning: AdamW on every parameter; the result is the whole model."""
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    head = _head_params(model, run.task)
    head_ids = {id(p) for p in head}
    groups = [{"params": [p for p in params if id(p) not in head_ids]}]
    if head:
        groups.append({"params": head, "lr": run.dense_lr})
    return Prepared(model, ClippedAdamW(groups, run.lr, run.max_grad_norm), sum(p.numel() for p in params),
                    sum(p.numel() for p in head), lambda: _param_bytes(params))


class DropGradients(torch.optim.Optimizer):
    """An optimizer that takes no step: ``zero_grad`` drops what backward computed."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})

    def step(self, closure=None):
        return None


def prepare_dense_backward(model, run: MethodRun) -> Prepared:
    """The targeted weights' (and head's) dense gradients computed and dropped; nothing is trained."""
    targeted, _ = find_targets(model, TARGETS[run.task])
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(targeted.values()) + _head_params(model, run.task)
    for p in params:
        p.requires_grad_(True)
    return Prepared(model, DropGradients(params), 0, 0, lambda: 0)


def _prepare_peft(model, run: MethodRun, config) -> Prepared:
    from peft import get_peft_model, get_peft_model_state_dict

    peft_model = get_peft_model(model, config)
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if "modules_to_save" in n]
    adapter = [p for n, p in trainable if "modules_to_save" not in n]
    groups = [{"params": adapter}] + ([{"params": head, "lr": run.dense_lr}] if head else [])
    optimizer = ClippedAdamW(groups, run.lr, run.max_grad_norm)

    def saved_bytes() -> int:
        # What save_pretrained writes: adapter weights, SHiRA's indices, the head.
        return sum(t.numel() * t.element_size() for t in get_peft_model_state_dict(peft_model).values())

    return Prepared(peft_model, optimizer, sum(p.numel() for _, p in trainable), sum(p.numel() for p in head),
                    saved_bytes, rank=int(run.setting))


def prepare_lora(model, run: MethodRun) -> Prepared:
    """LoRA (peft) at rank ``setting`` on the task's targets; the head via modules_to_save."""
    from peft import LoraConfig

    rank = int(run.setting)
    config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA_PER_RANK * rank, lora_dropout=0.0,
                        target_modules=TARGETS[run.task], modules_to_save=HEADS[run.task] or None)
    return _prepare_peft(model, run, config)


def prepare_shira(model, run: MethodRun) -> Prepared:
    """SHiRA (peft): r * (in + out) random components per target, LoRA's count at the same r."""
    from peft import ShiraConfig

    config = ShiraConfig(r=int(run.setting), target_modules=TARGETS[run.task], random_seed=run.seed,
                         modules_to_save=HEADS[run.task] or None)
    return _prepare_peft(model, run, config)


# The bench's sift-* methods run the top-k (random-* random components) with AdamW's plain steps, and
# --sift selection=balanced at line_cap 2, unless --sift names them: the recorded sweep is one protocol
# whatever SiftConfig's defaults ("auto": balanced at line_cap 1 with scaled steps). `--sift
# selection=balanced line_cap=1 step_scale=input` runs SiftConfig's default.
BALANCED_LINE_CAP = 2.0


def prepare_sift(model, run: MethodRun) -> Prepared:
    """siftune's engine: SIFT in the method's mode, or ``random`` selection at the same density."""
    from ..config import SiftConfig
    from ..core.engine import attach

    density = resolve_density(model, run.task, run.setting)
    options = {k: v for k, v in run.sift.items() if k != SELECT_FIRST}
    if isinstance(options.get("select_from"), str):  # an increment a seed: {seed} names the run's
        options["select_from"] = options["select_from"].format(seed=run.seed)
    config = SiftConfig(
        density=density, target_modules=TARGETS[run.task], dense_modules=HEADS[run.task],
        mode=SIFT_MODES.get(run.method, "fixed"), max_grad_norm=run.max_grad_norm, seed=run.seed,
        storage="delta" if run.method in QUANTIZED else "in_place", structure=STRUCTURES.get(run.method),
        **{"refresh_every": PERIODIC_REFRESH, "step_scale": None,
           "selection": "random" if run.method in RANDOM else "gradient",
           **({"line_cap": BALANCED_LINE_CAP} if run.sift.get("selection") == "balanced" else {}),
           **options},
    )
    engine = attach(model, config)
    select = None
    if run.sift.get(SELECT_FIRST):
        def select(batches) -> None:
            model.train()
            engine.select(batches, loss_of=batch_loss)
    optimizer = engine.optimizer(lr=run.lr, dense_lr=run.dense_lr)
    selected = sum(s.final_k for s in engine.slots)  # with shrink_after, what the increment holds
    targeted = sum(s.numel for s in engine.slots)

    def saved_bytes() -> int:
        return engine.increment(values=optimizer.master_values()).nbytes

    head = sum(p.numel() for p in engine.dense.values())
    return Prepared(model, optimizer, selected + head, head,
                    saved_bytes, density=selected / targeted, select=select,
                    increment=lambda: engine.increment(values=optimizer.master_values()))


PREPARE = {"base": prepare_base, "head": prepare_head, "full": prepare_full, "dense-backward": prepare_dense_backward,
           "lora": prepare_lora,
           "qlora": prepare_lora, "shira": prepare_shira, **{name: prepare_sift for name in DENSITY_METHODS}}


def prepare(model: nn.Module, run: MethodRun) -> Prepared:
    """Dispatch to the method's ``prepare_*``."""
    if run.method not in PREPARE:
        raise ConfigError(f"unknown method {run.method!r}; methods: {', '.join(METHODS)}")
    return PREPARE[run.method](model, run)
