"""Structured SIFT: whole rows or columns of a weight, and a backward that computes only their gradient.

Unstructured SIFT keeps a few scattered components of each weight, so it
must compute every targeted weight's dense gradient, ``grad_out^T @ x``,
to read the few entries it keeps: a SIFT step costs what a dense backward
costs. When the selected components are whole output rows of ``W`` (or
whole input columns), their gradient is a product of its own,
``grad_out[..., rows]^T @ x`` (``grad_out^T @ x[..., cols]``), as small as
the selection; the rest of the dense product is never formed.
``SiftConfig(structure="rows" | "columns")`` selects that way:

* the score (``SiftConfig.score``) is summed over each row (column) as
  magnitudes, and the rows (columns) with the largest sums are selected,
  as many as the density's count rounded to whole rows (columns), at
  least one; ``selection="random"`` draws them uniformly;
* the targeted ``nn.Linear`` keeps its weight frozen (``requires_grad``
  False, so autograd never forms its gradient) and computes its forward
  through :class:`_SliceLinear`, whose backward returns the input's
  gradient as usual and hands the selected slice's gradient to the engine;
* what the backward keeps of the layer's input is what the slice's gradient
  needs: the selected columns' entries (columns), or for rows the whole
  input, held as what it is formed from when it is a product of tensors
  autograd keeps anyway (a gated MLP's input to its down projection, an
  RMSNorm's output), so that the product itself is freed after the forward;
* with ``storage="delta"`` (a quantized base) the slice's values train
  beside the frozen weight (:class:`SliceDelta`), added to the slice's
  outputs (rows) or taken from the slice's inputs (columns).

While a selection is being made, the engine gets the dense gradient once
(a selection needs every component's score), as in unstructured SIFT.
The selection is held as flat indices of the slice's entries, so the
optimizer, the increment file and its apply/merge/remove are those of
unstructured SIFT.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..parallel import distributed
from .select import count_selected, index_dtype, top_set
from .storage import Delta, InPlace, weight_shape

STRUCTURES = ("rows", "columns")


def line_length(shape: tuple[int, int], structure: str) -> int:
    """Components in one row (``in_features``) or one column (``out_features``) of an ``(out, in)`` weight."""
    return shape[1] if structure == "rows" else shape[0]


def selected_count(shape: tuple[int, int], density: float, structure: str) -> int:
    """Components selected from an ``(out, in)`` weight: the density's count rounded to whole lines, at least one."""
    lines = shape[0] if structure == "rows" else shape[1]
    length = line_length(shape, structure)
    return max(1, min(lines, round(count_selected(shape[0] * shape[1], density) / length))) * length


def line_scores(score: torch.Tensor, structure: str) -> torch.Tensor:
    """|score| summed over each row (or column) of the 2-D ``score``, in fp32."""
    return score.detach().float().abs().sum(dim=1 if structure == "rows" else 0)


def line_indices(lines: torch.Tensor, shape: tuple[int, int], structure: str) -> torch.Tensor:
    """Sorted flat indices of the entries of ``lines`` (sorted row or column numbers)."""
    out, inp = shape
    dtype = index_dtype(out * inp)
    lines = lines.to(dtype)
    if structure == "rows":
        return (lines[:, None] * inp + torch.arange(inp, dtype=dtype, device=lines.device)).reshape(-1)
    return (torch.arange(out, dtype=dtype, device=lines.device)[:, None] * inp + lines[None, :]).reshape(-1)


def lines_of(idx: torch.Tensor, shape: tuple[int, int], structure: str) -> torch.Tensor:
    """The sorted row (column) numbers whose entries the sorted flat indices ``idx`` are (inverse of
    :func:`line_indices`), as int64."""
    out, inp = shape
    if structure == "rows":  # one index a line, widened: not the whole selection
        return idx[::inp].long() // inp
    return idx[:idx.numel() // out].long() % inp


def top_lines(score: torch.Tensor, k: int, structure: str) -> torch.Tensor:
    """Sorted flat indices of the ``k // line length`` rows (columns) of the 2-D ``score`` whose |score|
    sums are largest (ties: the lower line first)."""
    shape = tuple(score.shape)
    lines = torch.sort(top_set(line_scores(score, structure), k // line_length(shape, structure))).values
    return line_indices(lines, shape, structure)


def random_lines(shape: tuple[int, int], k: int, structure: str, generator: torch.Generator,
                 device) -> torch.Tensor:
    """Sorted flat indices of ``k // line length`` rows (columns) drawn uniformly."""
    count = shape[0] if structure == "rows" else shape[1]
    lines = torch.sort(torch.randperm(count, generator=generator)[:k // line_length(shape, structure)]).values
    return line_indices(lines.to(device), shape, structure)


def check_target(module: nn.Module, name: str) -> None:
    """Refuse what structured SIFT cannot slice: anything but an ``nn.Linear`` (or its quantized kinds)."""
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"structure works on nn.Linear layers; {name} is a {type(module).__name__}: leave it out "
                          "of target_modules or set structure=None")


def make(config, module: nn.Module, param: nn.Parameter, name: str):
    """The storage of the targeted weight ``param`` of ``module`` under ``config.structure``."""
    if distributed.is_sharded(param):
        raise ConfigError(f"structure={config.structure!r} does not work on FSDP2 shards ({name} is sharded): "
                          "set structure=None, or train without fully_shard")
    check_target(module, name)
    if config.storage == "delta":
        k = selected_count(weight_shape(module), config.density, config.structure)
        return SliceDelta(module, name, k, config.torch_delta_dtype, config.structure, config.compact_indices)
    return SliceInPlace(module, param, name, config.structure)


class _Lines:
    """What a selection of whole rows (columns) changes in the :class:`siftune.core.storage.Storage` interface."""

    def count_at(self, density: float) -> int:
        return selected_count(self.shape, density, self.structure)

    def top_k(self, score: torch.Tensor, k: int) -> torch.Tensor:
        return top_lines(score.reshape(self.shape), k, self.structure)

    def random(self, k: int, generator: torch.Generator) -> torch.Tensor:
        return random_lines(self.shape, k, self.structure, generator, self.trainable.device)


class SliceInPlace(_Lines, InPlace):
    """The trained values are the weight's own, as :class:`InPlace`; the weight itself stays frozen.

    The layer's forward runs through :class:`_SliceLinear`, which hands the
    engine the selected rows' (columns') gradient, or the dense gradient
    while a selection is being made.
    """

    frozen = True  # the engine leaves requires_grad False on the weight

    def __init__(self, module: nn.Module, param: nn.Parameter, name: str, structure: str):
        super().__init__(param, name)
        self.module, self.structure = module, structure
        self.lines: torch.Tensor | None = None  # sorted rows (columns) selected now, int64
        # No weight requires a gradient, so this empty tensor does: every layer's output then
        # requires one, and its backward runs even when nothing before the layer is trained.
        self.anchor = torch.empty(0, device=param.device, requires_grad=True)
        self._forward = None

    def select(self, idx: torch.Tensor) -> None:
        self.lines = lines_of(idx, self.shape, self.structure)

    def positions(self, idx: torch.Tensor) -> None:
        return None  # the slice's gradient is the selection's, in its order

    def attach(self, wants_dense, on_gradient) -> None:
        """Route the layer's forward through :class:`_SliceLinear` (see :meth:`Delta.attach` for the callbacks)."""
        module, callbacks = self.module, (wants_dense, self._summing(on_gradient))

        def forward(x):
            return _SliceLinear.apply(x, module.weight, module.bias, self.anchor, self, callbacks)

        module.forward = forward  # an instance attribute: shadows the class's forward until removed
        self._forward = forward

    def attached_to(self, model: nn.Module, name: str) -> bool:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        return module is self.module and module.__dict__.get("forward") is self._forward and super().attached_to(
            model, name)

    def remove(self) -> None:
        if self._forward is not None and self.module.__dict__.get("forward") is self._forward:
            del self.module.forward
        self._forward = None

    # The weight's values are the model's; the slice's lines are the engine's selection.
    def state(self) -> dict:
        return {"slice_lines": self.lines}

    def check_state(self, saved: dict, where: str) -> None:
        lines = saved.get("slice_lines")
        count = self.shape[0] if self.structure == "rows" else self.shape[1]
        if lines is not None and (not isinstance(lines, torch.Tensor) or lines.dim() != 1 or (lines.numel() and (
                int(lines.min()) < 0 or int(lines.max()) >= count))):
            raise CheckpointError(f"{where}: slice_lines must be a 1-D tensor of {self.structure} in [0, {count}) "
                                  "(was the run saved with this structure?)")

    def load_state(self, saved: dict) -> None:
        lines = saved.get("slice_lines")
        self.lines = None if lines is None else lines.to(self.trainable.device, torch.long)


def _kept_input(x: torch.Tensor, lines: torch.Tensor | None, structure: str):
    """What a backward keeps of the layer's input ``x`` to compute the weight gradient: ``(tensors,
    recipe)``, from which :func:`_input_from` forms it again. All of ``x`` for a dense gradient (``lines``
    None), only the selected columns' entries for columns. For rows, when ``x`` is a product of tensors
    autograd keeps anyway for the products' own backward (a gated MLP's ``act(gate(x)) * up(x)`` into its
    down projection, an RMSNorm's ``weight * (h * rsqrt(mean(h²) + eps))`` into q/k/v and gate/up), those
    tensors rather than ``x``: the product is formed again in the backward, bit for bit, and ``x`` is freed
    after the forward. The input's own gradient needs ``grad_out`` and the weight alone, so what is not
    kept of ``x`` is freed when nothing else holds it."""
    if lines is None:
        return (x,), 0
    if structure == "rows":
        leaves: list[torch.Tensor] = []
        recipe = _product_recipe(x.grad_fn, leaves, depth=1)
        if recipe is not None and _recipe_meta(recipe, leaves) == (x.shape, x.dtype):
            return tuple(leaves), recipe
        return (x,), 0
    return (x.index_select(-1, lines),), 0


def _product_recipe(fn, leaves: list, depth: int):
    """How to form again the output of the product node ``fn`` (a ``MulBackward0``) from tensors autograd
    saved for it: a pair of recipes, each an index into ``leaves`` (a saved factor, appended there) or,
    for a factor not saved but itself the output of a product, that product's recipe (``depth`` levels
    down at most); None when it cannot be."""
    if fn is None or type(fn).__name__ != "MulBackward0":
        return None
    parts = []
    for name, (producer, _) in zip(("_saved_self", "_saved_other"), fn.next_functions):
        try:
            factor = getattr(fn, name)
        except RuntimeError:  # already released (a backward ran through it)
            return None
        if isinstance(factor, torch.Tensor):
            leaves.append(factor)
            parts.append(len(leaves) - 1)
        elif depth > 0 and (inner := _product_recipe(producer, leaves, depth - 1)) is not None:
            parts.append(inner)
        else:
            return None
    return tuple(parts)


def _recipe_meta(recipe, leaves: list) -> tuple[torch.Size, torch.dtype]:
    """The shape and dtype :func:`_input_from` forms from ``recipe``."""
    if isinstance(recipe, int):
        return leaves[recipe].shape, leaves[recipe].dtype
    (shape_a, dtype_a), (shape_b, dtype_b) = (_recipe_meta(part, leaves) for part in recipe)
    return torch.broadcast_shapes(shape_a, shape_b), torch.promote_types(dtype_a, dtype_b)


def _input_from(kept, recipe) -> torch.Tensor:
    """The layer's input formed from what :func:`_kept_input` kept."""
    if isinstance(recipe, int):
        return kept[recipe]
    return _input_from(kept, recipe[0]) * _input_from(kept, recipe[1])


def _slice_gradient(g2: torch.Tensor, kept2: torch.Tensor, lines: torch.Tensor, structure: str) -> torch.Tensor:
    """The gradient of the weight's selected rows (columns) from 2-D ``grad_out`` and kept input
    (:func:`_kept_input`), flattened in the order of their sorted flat indices: ``g[:, rows]^T @ x`` or
    ``g^T @ x[:, cols]``."""
    if structure == "rows":
        return (g2.index_select(1, lines).t() @ kept2).reshape(-1)
    return (g2.t() @ kept2).reshape(-1)


class _SliceLinear(torch.autograd.Function):
    """``F.linear(x, W, b)`` for a frozen ``W`` whose backward also computes the selected slice's gradient.

    The input's (and a trained bias's) gradient is returned as autograd
    expects; the weight's is handed to the engine: dense while it selects,
    else only the selected rows' (columns') product.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, storage: SliceInPlace, callbacks):
        ctx.storage, ctx.callbacks = storage, callbacks
        wants_dense = callbacks[0]
        # Whether this forward's backward computes the dense gradient (a selection needs it) or the
        # slice's: decided now, since that decides what of the input is kept for the backward.
        ctx.lines = None if wants_dense() or storage.lines is None else storage.lines
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        if autocast:  # cast as autocast would, so that backward sees one dtype
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, bias))
        kept, ctx.recipe = _kept_input(x, ctx.lines, storage.structure)
        ctx.save_for_backward(weight, *kept)
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight, *kept = ctx.saved_tensors
        on_gradient = ctx.callbacks[1]
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[3]:
            x = _input_from(kept, ctx.recipe)
            g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
            if ctx.lines is None:
                on_gradient(g2.t() @ x2, None)
            else:
                on_gradient(None, _slice_gradient(g2, x2, ctx.lines, ctx.storage.structure))
        return grad_x, None, grad_bias, None, None, None


class SliceDelta(_Lines, Delta):
    """:class:`Delta` whose values are whole rows (columns) of the logical weight.

    Added in the forward as ``x @ D^T`` into the rows' outputs (rows) or as
    ``x[..., cols] @ D^T`` (columns); the values' gradient is the slice's
    own product. In periodic mode the delta holds every line ever selected,
    still whole lines, and the engine takes the current selection's part.
    """

    def __init__(self, module: nn.Module, name: str, k: int, dtype: torch.dtype, structure: str,
                 compact: bool = False):
        super().__init__(module, name, k, dtype, compact)
        self.structure = structure
        self._lines, self._lines_of = None, None

    @property
    def lines(self) -> torch.Tensor:
        """The sorted rows (columns) the delta holds values of."""
        if self._lines_of is not self.stored:  # they change with the indices only
            self._lines, self._lines_of = lines_of(self.indices, self.shape, self.structure), self.stored
        return self._lines

    def block(self, dtype: torch.dtype) -> torch.Tensor:
        """The values as the dense ``(rows, in)`` or ``(out, columns)`` block of the slice."""
        values = self.trainable.to(dtype)
        if self.structure == "rows":
            return values.view(-1, self.shape[1])
        return values.view(self.shape[0], -1)

    def attach(self, wants_dense, on_gradient) -> None:
        callbacks = (wants_dense, self._summing(on_gradient))

        def hook(module, args, output):
            return _SliceDeltaMatmul.apply(output, args[0], self.trainable, self, callbacks)

        self._handle = self.module.register_forward_hook(hook)


class _SliceDeltaMatmul(torch.autograd.Function):
    """The base's output plus the slice's values' contribution; backward as :class:`_SliceLinear`'s."""

    @staticmethod
    def forward(ctx, output, x, values, storage: SliceDelta, callbacks):
        ctx.storage, ctx.callbacks = storage, callbacks
        ctx.has_values = storage.stored is not None
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        if not ctx.has_values:  # nothing trained yet
            ctx.save_for_backward(values, x)
            ctx.lines, ctx.recipe = None, 0
            return output.clone()
        lines, block = storage.lines, storage.block(x.dtype)
        ctx.lines = lines
        # the backward's weight gradient: dense while selecting (as _SliceLinear), else the slice's
        ctx.slice_lines = None if callbacks[0]() else lines
        kept, ctx.recipe = _kept_input(x, ctx.slice_lines, storage.structure)
        ctx.save_for_backward(values, *kept)
        if storage.structure == "rows":  # in the output's dtype: a base under autocast computes in another
            return output.index_add(-1, lines, (x @ block.t()).to(output.dtype))
        return output + (x.index_select(-1, lines) @ block.t()).to(output.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        storage = ctx.storage
        on_gradient = ctx.callbacks[1]
        x = _input_from(ctx.saved_tensors[1:], ctx.recipe)
        g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype), x.reshape(-1, x.shape[-1])
        grad_x = None
        if ctx.has_values and ctx.needs_input_grad[1]:
            block = storage.block(grad_out.dtype)
            if storage.structure == "rows":
                grad_x = grad_out.index_select(-1, ctx.lines) @ block
            else:
                grad_x = grad_out.new_zeros(ctx.input_shape, dtype=ctx.input_dtype).index_add_(
                    -1, ctx.lines, grad_out @ block)
        if ctx.needs_input_grad[2]:
            if not ctx.has_values or ctx.slice_lines is None:
                on_gradient(g2.t() @ x2, None)
            else:
                on_gradient(None, _slice_gradient(g2, x2, ctx.slice_lines, storage.structure))
        return grad_out, grad_x, None, None, None
