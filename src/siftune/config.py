"""SiftConfig: what SIFT trains and how it selects, as one documented dataclass."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch

from .errors import ConfigError

MODES = ("fixed", "periodic", "per_step")
SELECTIONS = ("gradient", "random", "mixed", "balanced", "grow_drop")
AUTO = "auto"  # selection and step_scale: what the density sweep found best, where the rest of the config allows it
# Each selection's own field, with the range it takes: (name, selection, low, high, low included).
SELECTION_FIELDS = (("score_share", "mixed", 0.0, 1.0, True), ("line_cap", "balanced", 1.0, float("inf"), True),
                    ("drop_share", "grow_drop", 0.0, 1.0, False))
STORAGES = ("in_place", "delta")
STEP_SCALES = (None, "input")
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# The highest density the sweep measured balanced at (docs/selection.md, "Defaults"). Above it "auto" is the
# top-k: there balanced's rounds at line_cap=1 stall more and more often, and each further component costs a
# search over the whole weight (at 15% of a 1024 x 4096 score, 121 chains of swaps took 19 s).
BALANCED_UP_TO = 0.1
# shrink_after: before the shrink the targeted components step at the rate times shrink_from ** -WIDE_RATE_EXPONENT,
# the density rule of balanced and random components' rates (siftune.recipes.train.default_lr): a rate given for the
# final count suits the wider one so.
WIDE_RATE_EXPONENT = 0.8


def resolve_auto(selection: str, step_scale: str | None, mode: str, budget: str, structure: str | None,
                 density: float, sharded: bool = False, scalable: bool = True) -> tuple[str, str | None]:
    """``(selection, step_scale)`` with ``"auto"`` made concrete.

    ``selection="auto"`` is ``"balanced"`` (at ``line_cap``, 1 by default)
    where balanced can run and was measured: ``density`` at most 10%
    (``BALANCED_UP_TO``), ``budget="per_tensor"``, mode ``"fixed"`` or
    ``"periodic"``, no ``structure``, weights whole on every process (not
    FSDP2 shards); else ``"gradient"``, the top-k. ``step_scale="auto"`` is
    ``"input"`` where it can run and was measured: mode ``"fixed"`` or
    ``"periodic"``, weights whole, every target Linear-like (``scalable``),
    single components (no ``structure``); else ``None``.
    """
    if selection == AUTO:
        balanced = (density <= BALANCED_UP_TO and budget == "per_tensor" and mode != "per_step"
                    and structure in (None, "none") and not sharded)
        selection = "balanced" if balanced else "gradient"
    if step_scale == AUTO:
        whole = structure in (None, "none")
        step_scale = "input" if mode != "per_step" and not sharded and scalable and whole else None
    return selection, step_scale


def unused_options(selection: str | None) -> set[str]:
    """The selection options (``score_share``, ``line_cap``, ``drop_share``) that ``selection`` does not read;
    ``"auto"`` may become balanced and reads ``line_cap``. Two runs that differ only in options neither reads
    trained the same (a checkpoint saved when ``line_cap`` defaulted to 2 resumes a top-k run today)."""
    return {name for name, owner, *_ in SELECTION_FIELDS
            if owner != selection and not (selection == AUTO and owner == "balanced")}


@dataclass
class SiftConfig:
    """How SIFT picks and trains the sparse increment.

    Args:
        density: fraction of the components of each targeted tensor that is
            trained, in (0, 1]. ``0.01`` trains the top 1% |gradient| entries of
            every targeted weight. Default ``0.01``.
        target_modules: which modules' weights get a sparse increment. A list of
            names (a module matches when its qualified name equals the entry or
            ends with ``"." + entry``, as in peft), or one string: a name as in
            the list (``"query"`` is ``["query"]``), or else a regular expression
            that must match the whole qualified name. Only
            ``nn.Linear``-like modules with a 2-D ``weight`` (and ``nn.Embedding``,
            convolutions) are targeted; their biases are not. ``None`` or
            ``"all-linear"`` (as in peft) targets every Linear-like layer
            (``nn.Linear`` and transformers' ``Conv1D``) outside
            ``dense_modules`` except the output layer (``lm_head``, or a
            ``classifier``/``score`` head); embeddings only when named. A weight
            reached under several names (tied weights) is trained once, under
            the name ``named_parameters()`` gives it. Default ``None``.
        dense_modules: modules whose parameters are all trained densely, e.g. a
            new classification head (``["classifier"]``). Same matching rules
            as ``target_modules``. Default ``()``.
        mode: ``"fixed"`` (select once from the first ``selection_batches``
            micro-batches, then hold: the memory-efficient mode), ``"periodic"``
            (select again every ``refresh_every`` optimizer steps; components
            that stay selected keep their optimizer state) or ``"per_step"``
            (the paper's statement: top-k of every step's gradient; keeps dense
            gradients and dense optimizer moments, i.e. the memory of full
            fine-tuning plus a copy of the base weights). Default ``"fixed"``.
        selection_batches: number of micro-batches whose gradient is summed
            before the top-k is taken, N >= 1. With N = 1 each tensor's dense
            gradient lives only inside its backward hook; with N > 1 dense
            gradients are kept until the N-th micro-batch. Steps that end before
            the selection is complete do not update targeted tensors. Default ``1``.
        refresh_every: in ``"periodic"`` mode, optimizer steps between two
            selections. Default ``100``.
        state_dtype: dtype of the optimizer moments of selected components,
            ``"float32"`` or ``"bfloat16"`` (saves 4 bytes a component).
            Default ``"float32"``.
        master_weights: keep fp32 master copies of the selected components when
            weights are bf16/fp16, so that many tiny updates are not rounded
            away. Ignored for fp32 weights. Default ``True``.
        max_grad_norm: if set, clip the global norm of the gradient the
            optimizer applies (selected components and dense modules) to it.
            Default ``None``.
        seed: seed of the random ablation (``selection="random"``); gradient
            selection is deterministic. Default ``0``.
        selection: how each tensor's k components are chosen from the
            window's ``score`` (:mod:`siftune.core.select`): ``"gradient"`` (its
            top-k, the paper's SIFT), ``"random"`` (k uniformly random
            components: the paper's ablation), ``"mixed"`` (the top
            ``score_share`` of k by score, the rest uniformly random among the
            others, from ``seed``), ``"balanced"`` (top-k by score with no row
            and no column holding more than ``line_cap`` times its fair share,
            k/rows or k/columns, always) or ``"grow_drop"``
            (``mode="periodic"``: the first selection is the top-k; at every
            refresh the ``drop_share`` of the selected components that changed
            least since training began is dropped and as many unselected ones
            are grown by score; grown components start with zero moments).
            The last three need ``budget="per_tensor"`` and are refused on
            FSDP2 shards. ``"auto"`` is ``"balanced"`` where it can run
            and was measured (``density`` at most 10%,
            ``budget="per_tensor"``, mode ``"fixed"`` or ``"periodic"``, no
            ``structure``, weights whole on every process), else
            ``"gradient"`` (:func:`resolve_auto`; the engine saves the
            concrete choice). Measured on the benchmark tasks
            (docs/selection.md, every rate chosen on validation), balanced at
            ``line_cap=1`` with ``step_scale="input"`` has the best
            validation of every selection at LoRA r=8's count on both tasks,
            and beats the top-k's at every density measured from 0.01% to
            10% on both; on test it is level with random components at
            LoRA's count (81.37 against 81.23% on classification, loss 1.134
            against 1.141 on causal-LM data, three seeds) and ahead of them
            at 0.1% on classification (eleven seeds, +0.68 ± 0.24). It
            wants random components' rate, 2 to 16 times the top-k's, the
            more the sparser: ``siftune train``'s default rate follows the
            selection; at a rate chosen for the top-k keep
            ``"gradient"``. At 0.1% the first gradient chooses poorly: there
            an earlier run at ten times the density chooses far better
            (``select_from``: level with LoRA r=8 on classification at a
            thirty-first of its count). Default ``"auto"``.
        score_share: with ``selection="mixed"``, the share of each tensor's
            count chosen by score, in [0, 1]. Default ``0.5``.
        line_cap: with ``selection="balanced"``, the most a row (a column)
            may hold, as a multiple >= 1 of its fair share: a row holds at
            most ceil(line_cap * k / rows), a column ceil(line_cap * k /
            columns), always. Such caps admit k components at any value >= 1;
            where choosing by score stalls before k (the rows and columns with
            room left meet only at chosen components), chains of swaps within
            the caps add the rest (docs/selection.md). ``1`` had the better
            validation on both benchmark tasks at LoRA r=8's count. Default
            ``1.0``.
        drop_share: with ``selection="grow_drop"``, the share of each
            tensor's count dropped and regrown at every refresh, in (0, 1].
            Default ``0.25``.
        update_in_backward: apply each targeted tensor's AdamW update inside
            its backward hook, as soon as its gradient exists, instead of at
            ``optimizer.step()``: no sparse gradient buffers are kept (2-4 bytes
            less per selected component). Needs one backward per optimizer step
            (no gradient accumulation), ``max_grad_norm=None`` (0 on the command
            line: a global norm is only known after the whole backward), mode ``"fixed"`` or
            ``"periodic"``, and one process. A tensor whose gradient is not
            finite keeps its values that step. Default ``False``.
        compact_indices: keep each selection packed in 2 bytes a component
            (16-bit offsets in blocks of 65,536 entries) instead of int32 flat
            indices, unpacked for a moment when used: 2 bytes less per selected
            component for a little compute each step. Modes ``"fixed"`` and
            ``"periodic"``; with ``storage="delta"`` the delta keeps its
            indices packed too (one copy in fixed mode). Default ``False``.
        storage: where the trained values live. ``"in_place"`` writes them
            into the weights (no cost in the forward). ``"delta"`` keeps the
            targeted weights frozen in whatever form the model holds them
            (fp32, bf16, bitsandbytes nf4/fp4 or int8, torchao int8) and
            trains a vector of values beside each, added in the forward: the
            way to SIFT a quantized base. Weight decay then acts on the
            increment, as on a LoRA adapter. Linear-like targets only; modes
            ``"fixed"`` and ``"periodic"``. Default ``"in_place"``.
        delta_dtype: dtype of the trained values with ``storage="delta"``:
            ``"float32"`` or ``"bfloat16"`` (2 bytes less a component; with
            ``master_weights`` the optimizer keeps fp32 copies). Default
            ``"float32"``.
        score: what ranks components at the end of the selection window
            (:mod:`siftune.core.budget`): ``"grad"`` (|g| of the window's summed
            gradient, the paper's), ``"grad_squared"`` (each micro-batch's g^2,
            summed over the window; frees autograd's gradient every micro-batch
            and keeps the step's sum instead) or ``"grad_weight"`` (|g * w|,
            with the weight's value at selection: for ``storage="delta"`` the
            dequantized base plus the delta) or ``"grad_snr"`` (|sum g| /
            sqrt(sum g^2) over the window's micro-batches, the gradient's
            signal-to-noise ratio: the loss drop of a Newton step with the
            empirical Fisher as curvature, which does not grow with a
            component's scale; needs ``selection_batches >= 2``, best with
            ``engine.select``). Under torch.distributed
            ``"grad_squared"`` and ``"grad_snr"`` square the combined batch's gradient (DDP:
            one all-reduce per micro-batch of the window); ``selection="random"`` ranks
            nothing and ignores it. Default ``"grad_weight"``: chosen on
            validation over the paper's ``"grad"`` on both benchmark tasks
            (docs/bench.md, "Selection options").
        budget: how the selected count is shared: ``"per_tensor"`` (each
            targeted tensor its ``density`` share, the paper's) or
            ``"global"`` (one ranking over all targeted tensors, the same total
            count; a tensor may get more or fewer than its share, or none
            without ``min_density``). ``"global"`` needs gradient selection,
            modes ``"fixed"``/``"periodic"`` and no ``update_in_backward``
            (several processes rank by their summed score; FSDP2 shards by a
            cut found over the ranks).
            Default ``"per_tensor"``.
        min_density: with ``budget="global"``, the floor: every targeted
            tensor keeps at least round(numel * min_density) of its top
            components, in [0, density]. Default ``0.0``.
        structure: ``None`` (or ``"none"``: single components, the paper's),
            ``"rows"`` or ``"columns"``: select whole output rows (input
            columns) of each targeted weight, ranked by the score summed over
            the row (column), as many as the density's count rounded to whole
            rows (columns). The backward then computes only the selected
            slice's weight gradient, never the dense one, so a step costs
            less than a dense backward (:mod:`siftune.core.structured`).
            ``nn.Linear`` targets only; modes ``"fixed"`` and ``"periodic"``,
            ``budget="per_tensor"``, not on FSDP2 shards. Default ``None``.
        step_scale: ``None`` (or ``"none"``: every selected component steps
            at the rate, as AdamW does), ``"input"`` or ``"auto"``. With
            ``"input"`` each component's step (and its weight decay) is the
            rate times median(r) / r_j, where r_j is the root mean square of
            its input feature j over the selection window's tokens and the
            median is over the weight's input features, held within [0.1,
            10]. AdamW moves every component by about the rate whatever its
            input's scale, so a component on a large input feature moves the
            layer's output many times more than one on a typical feature;
            scaled, each moves it about as much. The scale is taken with each
            selection (forward hooks on the targeted layers count the
            window's inputs: one fp32 factor a feature). Linear-like targets
            only (``nn.Linear``, its quantized subclasses, ``Conv1D``); modes
            ``"fixed"`` and ``"periodic"``; not on FSDP2 shards. ``"auto"``
            is ``"input"`` where it can run, for single components (no
            ``structure``), else ``None`` (:func:`resolve_auto`). At LoRA r=8's count it makes
            ``selection="balanced"`` (``line_cap=1``) lead random components
            on the causal-LM benchmark (docs/selection.md). Default
            ``"auto"``.
        select_after: optimizer steps the ``dense_modules`` (a new
            classification head) train alone before the first selection
            window opens; the targeted weights' gradients are dropped until
            then. A head that starts random makes the first steps' gradient
            on the body a projection through random weights, so a choice
            made from it follows the head's initial draw more than the task.
            Needs ``dense_modules``; modes ``"fixed"`` and ``"periodic"``
            (refreshes keep their ``refresh_every`` steps); not with
            ``engine.select``. On the classification benchmark 30 steps gained
            nothing the seeds can tell, at LoRA r=8's count or at 0.1%
            (docs/selection.md, "The head first"). Default ``0`` (select at
            the first step).
        shrink_after: train ``shrink_from`` times the count for this many
            optimizer steps, then keep the ``density`` share: the components
            whose trained change is largest (chosen by ``selection``'s rule:
            balanced keeps its caps), the others put back to their untrained
            values. Kept components keep their values and moments; the
            increment holds exactly the ``density`` share. Before the
            shrink the targeted components step at the rate times
            ``shrink_from ** -0.8`` (the density rule of the rates the sweep
            chose: the rate is given for the final count). On the
            classification benchmark at 0.1% a whole 1% run's change chose
            far better than the first gradient (``select_from``), but 100
            steps of it did no better than the gradient (docs/selection.md,
            "Narrowed within the run"). Mode ``"fixed"``, selection
            ``"gradient"`` or ``"balanced"``, ``budget="per_tensor"``, single
            components, weights whole on every process (not FSDP2 shards).
            Default ``0`` (off).
        shrink_from: with ``shrink_after``, the factor (> 1) of the count
            trained before the shrink; ``density * shrink_from`` at most 1.
            Default ``10.0``.
        select_from: an increment folder (``siftune train``'s output, a
            :class:`~siftune.SparseIncrement` saved) of an earlier run on the
            same model: each tensor's components are ranked by the size of
            that run's change instead of by the window's score, within
            ``selection``'s rule (balanced keeps its caps; a component the
            earlier run left unchanged ranks 0). Training starts from the
            base as usual: the earlier run only chooses. The lottery-ticket
            recipe (Ansell et al., 2022): train a wider run first (e.g. 10
            times the density), then this one. It costs that run; on the
            classification benchmark at 0.1% a 1% run's change chose
            components that trained to LoRA r=8's accuracy (80.62 ± 0.68
            against 80.50 ± 0.38, three seeds; the gradient's choice 79.23 ±
            0.34), and on the causal-LM one it lowered the loss from 1.229 to
            1.166 (docs/selection.md, "A choice from a trained run"). Mode
            ``"fixed"``, selection ``"gradient"`` or ``"balanced"``,
            ``budget="per_tensor"``, single components, weights whole on every
            process (not FSDP2 shards), not with ``shrink_after``. Default
            ``None`` (rank by the score).
    """

    density: float = 0.01
    target_modules: list[str] | str | None = None
    dense_modules: list[str] | str = field(default_factory=tuple)
    mode: str = "fixed"
    selection_batches: int = 1
    refresh_every: int = 100
    state_dtype: str = "float32"
    master_weights: bool = True
    max_grad_norm: float | None = None
    seed: int = 0
    selection: str = AUTO
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
    step_scale: str | None = AUTO
    select_after: int = 0
    shrink_after: int = 0
    shrink_from: float = 10.0
    select_from: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field and the valid choices."""
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise ConfigError(f"density must be a number in (0, 1], got {self.density!r}")
        if not 0.0 < float(self.density) <= 1.0:
            raise ConfigError(
                f"density must be in (0, 1], got {self.density}; "
                "e.g. 0.01 trains the top 1% of each targeted tensor"
            )
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.selection not in (*SELECTIONS, AUTO):
            raise ConfigError(f"selection must be one of {', '.join((*SELECTIONS, AUTO))}, got {self.selection!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        for name in ("master_weights", "update_in_backward", "compact_indices"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.update_in_backward and self.mode == "per_step":
            raise ConfigError("update_in_backward works in modes 'fixed' and 'periodic'; per_step selects from "
                              "the whole step's gradient, after backward")
        if self.storage not in STORAGES:
            raise ConfigError(f"storage must be one of {', '.join(STORAGES)}, got {self.storage!r}")
        if self.delta_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"delta_dtype must be 'float32' or 'bfloat16', got {self.delta_dtype!r}")
        self._validate_selection_options()
        if self.storage == "delta" and self.mode == "per_step":
            raise ConfigError("storage='delta' works in modes 'fixed' and 'periodic'; per_step keeps dense "
                              "gradients of every weight, which a quantized base cannot take")
        if self.compact_indices and self.mode == "per_step":
            raise ConfigError("compact_indices works in modes 'fixed' and 'periodic'; per_step keeps dense state")
        if self.update_in_backward and self.max_grad_norm is not None:
            raise ConfigError("update_in_backward cannot clip by the global norm (it is known only after the "
                              "whole backward); set max_grad_norm=None (0 on the command line) or update_in_backward=False")
        for name in ("selection_batches", "refresh_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.state_dtype not in STATE_DTYPES:
            raise ConfigError(
                f"state_dtype must be one of {', '.join(STATE_DTYPES)}, got {self.state_dtype!r}"
            )
        if self.max_grad_norm is not None and (
            isinstance(self.max_grad_norm, bool) or not isinstance(self.max_grad_norm, (int, float))
            or not self.max_grad_norm > 0
        ):
            raise ConfigError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        for name in ("target_modules", "dense_modules"):
            value = getattr(self, name)
            if value is None and name == "target_modules":
                continue
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ConfigError(f"{name} {value!r} is not a valid regular expression ({exc})") from None
                continue
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a list of module names or one regex string, got {value!r}")

    def _validate_selection_options(self) -> None:
        from .core.budget import BUDGETS, SCORES

        if self.score not in SCORES:
            raise ConfigError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.budget not in BUDGETS:
            raise ConfigError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if isinstance(self.min_density, bool) or not isinstance(self.min_density, (int, float)) or not (
                0.0 <= self.min_density <= self.density):
            raise ConfigError(f"min_density must be a number in [0, density={self.density}], got {self.min_density!r}")
        if self.min_density and self.budget != "global":
            raise ConfigError("min_density is the floor of budget='global'; per_tensor gives every tensor its share")
        if self.selection == "random" and self.budget != "per_tensor":
            raise ConfigError("budget ranks gradients; selection='random' draws each tensor's share uniformly: "
                              "leave budget='per_tensor'")
        if self.score == "grad_snr" and self.selection_batches < 2 and self.selection != "random":
            raise ConfigError("score='grad_snr' compares the gradients of a window's micro-batches: set "
                              "selection_batches to 2 or more (e.g. 16, with engine.select / --select-first)")
        if self.mode == "per_step" and (self.score in ("grad_squared", "grad_snr") or self.budget != "per_tensor"):
            raise ConfigError("mode='per_step' selects each tensor from its step's gradient: score 'grad' or "
                              "'grad_weight', budget='per_tensor'")
        for name, selection, low, high, low_included in SELECTION_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    (low <= value if low_included else low < value) and value <= high):
                bounds = f"{'[' if low_included else '('}{low:g}, {high:g}{']' if high != float('inf') else ')'}"
                raise ConfigError(f"{name} must be a number in {bounds}, got {value!r}")
            # "auto" may become balanced, never another selection
            allowed = (selection, AUTO) if selection == "balanced" else (selection,)
            if value != type(self).__dataclass_fields__[name].default and self.selection not in allowed:
                raise ConfigError(f"{name} is an option of selection='{selection}'; this config selects "
                                  f"{self.selection!r}: drop {name} or set selection='{selection}'")
        if self.selection in ("mixed", "balanced", "grow_drop") and (self.budget != "per_tensor" or
                                                                     self.mode == "per_step"):
            raise ConfigError(f"selection={self.selection!r} chooses within each tensor once a window is complete: "
                              "budget='per_tensor' and mode 'fixed' or 'periodic'")
        if self.selection == "grow_drop" and self.mode != "periodic":
            raise ConfigError("selection='grow_drop' drops and grows components at each refresh: set "
                              "mode='periodic' (refresh_every steps apart)")
        if self.structure == "none":
            self.structure = None
        if self.structure not in (None, "rows", "columns"):
            raise ConfigError(f"structure must be None, 'rows' or 'columns', got {self.structure!r}")
        if self.structure and (self.mode == "per_step" or self.budget != "per_tensor"):
            raise ConfigError(f"structure={self.structure!r} selects whole rows/columns of each tensor from its own "
                              "score, once or periodically: use mode 'fixed' or 'periodic' and budget='per_tensor'")
        if self.structure and self.selection in ("mixed", "balanced", "grow_drop"):
            raise ConfigError(f"structure={self.structure!r} chooses whole rows or columns; selection="
                              f"{self.selection!r} chooses single components: use one of them")
        if self.step_scale == "none":
            self.step_scale = None
        if self.step_scale not in (*STEP_SCALES, AUTO):
            raise ConfigError(f"step_scale must be None, 'input' or 'auto', got {self.step_scale!r}")
        if self.step_scale == "input" and self.mode == "per_step":
            raise ConfigError("step_scale='input' scales the steps of a selection by its window's inputs; "
                              "mode='per_step' selects anew each step: use mode 'fixed' or 'periodic'")
        if isinstance(self.select_after, bool) or not isinstance(self.select_after, int) or self.select_after < 0:
            raise ConfigError(f"select_after must be an integer >= 0 (steps before the first selection), "
                              f"got {self.select_after!r}")
        if self.select_after and self.mode == "per_step":
            raise ConfigError("select_after delays the first selection window; mode='per_step' selects at every "
                              "step: use mode 'fixed' or 'periodic'")
        self._validate_shrink()
        self._validate_select_from()
        if self.budget == "global" and self.update_in_backward:
            raise ConfigError("budget='global' selects after the whole backward, so updates cannot be applied "
                              "inside it; set update_in_backward=False or budget='per_tensor'")

    def _validate_select_from(self) -> None:
        if self.select_from is None:
            return
        if not isinstance(self.select_from, str) or not self.select_from:
            raise ConfigError(f"select_from must be the path of an increment folder, got {self.select_from!r}")
        if (self.mode != "fixed" or self.budget != "per_tensor" or self.structure or self.shrink_after
                or self.selection not in ("gradient", "balanced", AUTO)):
            raise ConfigError("select_from ranks one selection by an earlier run's change: use mode 'fixed', "
                              "budget='per_tensor', single components (no structure), no shrink_after and "
                              "selection 'gradient', 'balanced' or 'auto'")

    def _validate_shrink(self) -> None:
        if isinstance(self.shrink_after, bool) or not isinstance(self.shrink_after, int) or self.shrink_after < 0:
            raise ConfigError(f"shrink_after must be an integer >= 0 (steps before the shrink), got {self.shrink_after!r}")
        if isinstance(self.shrink_from, bool) or not isinstance(self.shrink_from, (int, float)) or not self.shrink_from > 1:
            raise ConfigError(f"shrink_from must be a number > 1 (the factor of the count trained before the "
                              f"shrink), got {self.shrink_from!r}")
        if not self.shrink_after:
            if self.shrink_from != type(self).__dataclass_fields__["shrink_from"].default:
                raise ConfigError("shrink_from is the factor of the count trained before shrink_after steps; "
                                  "set shrink_after too, or drop shrink_from")
            return
        if self.density * self.shrink_from > 1:
            raise ConfigError(f"shrink_from={self.shrink_from:g} times density={self.density:g} is more than every "
                              "component: lower one of them so that their product is at most 1")
        if (self.mode != "fixed" or self.budget != "per_tensor" or self.structure
                or self.selection not in ("gradient", "balanced", AUTO)):
            raise ConfigError("shrink_after narrows one selection to the components that changed most: use mode "
                              "'fixed', budget='per_tensor', single components (no structure) and selection "
                              "'gradient', 'balanced' or 'auto'")
        if self.shrink_after <= self.select_after:
            raise ConfigError(f"shrink_after={self.shrink_after} must come after the first selection, at "
                              f"select_after={self.select_after} steps: set shrink_after > select_after")

    def rate_factor(self, steps: int) -> float:
        """The factor of the targeted components' rate after ``steps`` optimizer steps: ``shrink_from **
        -WIDE_RATE_EXPONENT`` before the shrink, else 1."""
        return self.shrink_from ** -WIDE_RATE_EXPONENT if self.shrink_after and steps < self.shrink_after else 1.0

    @property
    def selected_density(self) -> float:
        """The share each tensor trains from its first selection: ``density``, or ``shrink_from`` times it
        until the shrink."""
        return self.density * self.shrink_from if self.shrink_after else self.density

    @property
    def torch_state_dtype(self) -> torch.dtype:
        return STATE_DTYPES[self.state_dtype]

    def resolve(self, sharded: bool = False, scalable: bool = True) -> "SiftConfig":
        """This config with ``selection`` and ``step_scale`` ``"auto"`` made concrete (:func:`resolve_auto`):
        ``sharded``, the targeted weights are FSDP2 shards; ``scalable``, every target is Linear-like. The
        engine and :class:`~siftune.core.reference.ReferenceSift` train the resolved config, and save it."""
        selection, step_scale = resolve_auto(self.selection, self.step_scale, self.mode, self.budget,
                                             self.structure, self.selected_density, sharded, scalable)
        if (selection, step_scale) == (self.selection, self.step_scale):
            return self
        return dataclasses.replace(self, selection=selection, step_scale=step_scale)

    @property
    def torch_delta_dtype(self) -> torch.dtype:
        return STATE_DTYPES[self.delta_dtype]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name in ("target_modules", "dense_modules"):
            if isinstance(out[name], tuple):
                out[name] = list(out[name])
        return out

    @classmethod
    def saved_defaults(cls) -> dict:
        """The value a saved config that lacks a field ran with: the default of its time. ``score`` was
        added with default ``"grad"`` (the paper's), and so ran every config saved without it; ``selection``,
        ``line_cap`` and ``step_scale`` came with ``"gradient"``, 2 and ``None``. (An engine saves its resolved
        config, never ``"auto"``.)"""
        return {**cls().to_dict(), "score": "grad", "selection": "gradient", "line_cap": 2.0, "step_scale": None}

    @classmethod
    def from_dict(cls, data: dict) -> "SiftConfig":
        """Build from a dict, rejecting unknown keys with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown SiftConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)
