"""The fine-tuning set-ups an estimate compares, built as a user would build them.

Every Linear layer but the output layer is targeted (``"all-linear"``, as in
peft: on Llama, q/k/v/o/gate/up/down). Optimizers are torch AdamW, fused (the
kernel a GPU runs); SIFT's is its own sparse AdamW.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

METHODS = {
    "sift": "SIFT with siftune's defaults: fp32 master values and moments, int32 indices",
    "sift-lean": "SIFT with every saver: bf16 moments, no masters, 16-bit packed indices, "
                 "the update inside the backward hook (one GPU)",
    "sift-rows": "SIFT selecting whole output rows (structure='rows'): backward computes only their gradient",
    "lora": "peft LoRA of rank --rank on every Linear, fp32 adapters, AdamW",
    "qlora": "LoRA on a quantized base (--quantize, nf4 unless told)",
    "full": "every weight trained by AdamW (moments in the weights' dtype)",
    "frozen": "backward through every layer, no weight gradient: the floor under every method",
    "shira": "peft SHiRA of rank --rank: a random sparse mask of r x (in + out) entries per layer",
}
SIFT_METHODS = ("sift", "sift-lean", "sift-rows")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANTIZE = ("nf4", "int8")
# The share of an int8 layer's input columns taken as outlier columns unless told (siftune.estimate.int8).
INT8_OUTLIERS = 0.01
# The lean set-up; under FSDP the update cannot run in backward (the clipping norm spans the ranks).
LEAN = dict(state_dtype="bfloat16", master_weights=False, compact_indices=True, update_in_backward=True)


@dataclass
class Setup:
    """One training step to estimate.

    Args:
        method: one of :data:`METHODS`.
        density: fraction of each targeted weight SIFT trains, in (0, 1]. Default ``0.01``.
        trainable: SIFT's trained component count instead of ``density`` (the
            density is this over the targeted weights' entries). Default ``None``.
        rank: LoRA/QLoRA/SHiRA rank. Default ``64``.
        dtype: the weights' dtype, ``"bfloat16"``, ``"float16"`` or ``"float32"``. Default ``"bfloat16"``.
        quantize: the base's Linear layers in bitsandbytes ``"nf4"`` or ``"int8"``; SIFT
            then trains a delta beside them. ``qlora`` takes nf4 when unset. Default ``None``.
        int8_outliers: on an int8 base, the fraction of each layer's input columns
            bitsandbytes' LLM.int8() matmul takes as outlier columns (a count only the
            data can tell: an assumption, :mod:`.int8`). Default ``0.01`` with
            ``quantize="int8"``, else ``None``.
        batch_size: sequences per step (per GPU). Default ``1``.
        seq_len: tokens per sequence. Default ``2048``.
        gradient_checkpointing: recompute each layer's activations in backward
            (non-reentrant). Default ``False``.
        sift_options: further :class:`~siftune.SiftConfig` fields for the SIFT
            methods (the benchmark scripts reproduce their set-ups with these). Default ``{}``.
    """

    method: str
    density: float | None = None
    trainable: int | None = None
    rank: int = 64
    dtype: str = "bfloat16"
    quantize: str | None = None
    int8_outliers: float | None = None
    batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    sift_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.density is not None and not (0 < self.density <= 1):
            raise ConfigError(f"density must be in (0, 1], got {self.density}")
        if self.density is not None and self.trainable is not None:
            raise ConfigError("give --density or --trainable, not both")
        if self.trainable is not None and self.trainable < 1:
            raise ConfigError(f"trainable must be a positive count, got {self.trainable}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.method == "qlora" and self.quantize is None:
            self.quantize = "nf4"
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.int8_outliers is not None and self.quantize != "int8":
            raise ConfigError("--int8-outliers is the outlier share of an int8 base: give it with --quantize int8")
        if self.quantize == "int8" and self.int8_outliers is None:
            self.int8_outliers = INT8_OUTLIERS
        if self.int8_outliers is not None and not (0 <= self.int8_outliers <= 1):
            raise ConfigError(f"int8-outliers is a fraction of the input columns, in [0, 1]; got {self.int8_outliers}")
        for name in ("rank", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    def replace(self, **changes) -> "Setup":
        return dataclasses.replace(self, **changes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def targeted(model) -> list[tuple[str, torch.nn.Module]]:
    """The Linear-like layers every method targets: all but the output layer."""
    from ..core.quantize import KEEP_FULL_PRECISION

    out = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in KEEP_FULL_PRECISION:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            out.append((name, module))
    return out


def targeted_entries(model) -> int:
    """Entries of the targeted weights by their logical shape (a packed 4-bit weight holds half)."""
    total = 0
    for _, module in targeted(model):
        if isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features
        else:
            total += module.weight.numel()
    return total


def logical_params(model) -> int:
    """Parameters of the base model, a quantized weight counted by its logical shape."""
    weights = {id(module.weight) for _, module in targeted(model)}
    return sum(p.numel() for p in model.parameters() if id(p) not in weights) + targeted_entries(model)


def density_of(setup: Setup, entries: int) -> float:
    """SIFT's density: ``--density``, or ``--trainable`` over the targeted ``entries``."""
    if setup.trainable is not None:
        if setup.trainable > entries:
            raise ConfigError(f"trainable {setup.trainable:,} is more than the {entries:,} entries of the "
                              "targeted weights")
        return setup.trainable / entries
    return 0.01 if setup.density is None else setup.density


def sift_config(setup: Setup, density: float, distributed: bool = False):
    """The :class:`~siftune.SiftConfig` of a SIFT method at ``density``."""
    from ..config import SiftConfig

    # SiftConfig's selection and step scale, as siftune train runs them: "auto" (balanced with steps scaled by
    # input up to 10% density, where the engine can run them); sift_options may name others
    options = dict(density=density, target_modules="all-linear")
    if setup.method == "sift-lean":
        options.update(LEAN)
        if distributed:
            options["update_in_backward"] = False
        if setup.quantize:
            options["delta_dtype"] = "bfloat16"
    if setup.method == "sift-rows":
        options["structure"] = "rows"
    if setup.quantize:
        options["storage"] = "delta"
    options.update(setup.sift_options)
    return SiftConfig(**options)


def set_up(setup: Setup, model, density: float, fused: bool = True, distributed: bool = False):
    """``(model, optimizer or None, engine or None)`` for ``setup.method`` on ``model``."""
    method = setup.method
    if method == "frozen":
        for p in model.parameters():
            p.requires_grad = False
        model.enable_input_require_grads()  # backward still runs through every layer
        return model, None, None
    if method == "full":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused), None
    if method in ("lora", "qlora", "shira"):
        import peft

        if method == "shira":
            config = peft.ShiraConfig(r=setup.rank, target_modules="all-linear")
        else:
            config = peft.LoraConfig(r=setup.rank, lora_alpha=2 * setup.rank, target_modules="all-linear",
                                     lora_dropout=0.0)
        model = peft.get_peft_model(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trainable, lr=1e-4, fused=fused), None
    from ..core.engine import attach

    engine = attach(model, sift_config(setup, density, distributed))
    model.enable_input_require_grads()  # checkpointed layers need an input that requires grad, as with peft
    return model, engine.optimizer(lr=1e-4), engine


def shira_entries(rank: int):
    """The nonzero count of peft SHiRA's random mask: r x (in + out) ones."""
    return lambda mask: rank * sum(mask.shape)
