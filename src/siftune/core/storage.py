"""Where a targeted tensor's trained values live: in the weight itself, or beside a frozen weight.

``SiftConfig.storage`` picks one of the two, per engine:

* :class:`InPlace` (``"in_place"``, the default): the optimizer writes the
  selected components straight into the weight; the forward costs nothing
  extra. Needs a floating-point weight.
* :class:`Delta` (``"delta"``): the weight stays frozen in whatever form the
  model holds it (fp32, bf16, a bitsandbytes nf4/fp4 ``Linear4bit``, an int8
  ``Linear8bitLt``, a torchao weight-only int8 tensor) and the trained
  values are a small vector beside it, one entry per component ever
  selected. A forward hook adds ``x @ delta^T`` to the layer's output.

A weight sharded by FSDP2 is trained in place too, each rank its own rows
(:class:`ShardedInPlace`); :mod:`siftune.core.structured` adds whole rows
or columns of either kind.

Every kind offers the engine and the optimizer one interface,
:class:`Storage`: ``read(idx)`` and ``write(idx, values)`` on the
components they train (the weight's values in place, the increment's
values, which start at 0, for a delta: so AdamW's weight decay acts on the
weights in place and on the increment for a delta, as it acts on a LoRA
adapter's weights), how a selection is drawn (``count_at``, ``top_k``,
``random``, ``agreed``), how the gradient reaches the engine (``attach``,
``take_pending``) and what the increment holds (``whole``). The engine never
asks which kind it has.

The functions at the end apply a finished increment to a model: written
into a float weight, added to the output of a quantized layer.

Kernels, chosen by measurement (``python bench/delta_kernels.py``: one
2048 x 2048 layer, 512 tokens, fp32, 2 threads on this 2-core CPU, loaded by
other work, so the figures are rough): at 1% and 5% density the forward
product took 64/30 ms as a CSR matrix against 144/102 ms scattered into a
dense transient, the input gradient 11/40 ms (CSR of ``delta^T``) against
122/77 ms, and the values' gradient 11/27 ms (``sampled_addmm``, which never
forms the dense weight gradient) against 96/69 ms. So on a CPU in fp32 the
delta runs as sparse kernels, at 12 more bytes a component of index layout
(columns, and the transposed layout). torch has no bf16 CSR kernels on a
CPU, and cuSPARSE was not measured here (no GPU lent): there the delta is a
dense transient, one layer at a time, as QLoRA dequantizes one layer at a
time, and the values' gradient is gathered from that layer's dense weight
gradient, the matrix the in-place path computes too. A selection always
needs that dense gradient once.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from ..errors import CheckpointError, ConfigError, IncrementError
from ..parallel import distributed
from .quantize import dequantized_weight, keep_training_layout
from .select import count_selected, index_dtype, pack_indices, random_indices, top_k_indices, unpack_indices


def quantized_kind(weight: torch.Tensor) -> str | None:
    """How ``weight`` is quantized (bitsandbytes, torchao, an integer dtype), or None for a plain float weight."""
    kind = type(weight).__name__
    if kind in ("Params4bit", "Int8Params"):
        return f"bitsandbytes {kind}"
    if type(weight.data) not in (torch.Tensor, FakeTensor):  # a fake tensor stands for a plain one
        return f"{type(weight.data).__name__}, a tensor subclass (e.g. torchao)"
    if not weight.is_floating_point():
        return str(weight.dtype)
    return None


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """The logical weight shape of a Linear-like layer, whatever its storage packs it into.

    ``(out_features, in_features)`` for ``nn.Linear`` and its quantised
    subclasses; ``(in, out)`` for transformers' ``Conv1D``, whose weight is
    stored transposed.
    """
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    return (module.out_features, module.in_features)


class Storage:
    """What the engine and the optimizer call on a targeted weight, whatever holds its trained values.

    ``trainable`` is the tensor the optimizer trains; ``numel`` and
    ``shape`` are those of the weight the selection's flat indices point
    into (on FSDP2 shards, this rank's rows), ``full_numel`` and
    ``full_shape`` those of the whole weight; ``base_dtype`` is the dtype the
    weight stands for.
    """

    # The gradient arrives averaged over the ranks already (FSDP2's reduce-scatter); under DDP each
    # rank's is its own, and the engine combines them.
    averaged_over_ranks = False
    # This process holds part of the weight (its FSDP2 rows), and so part of the selection.
    partial = False
    # The weight takes no gradient of its own (requires_grad stays False): the storage hands it over.
    frozen = False
    # A selection window's gradient so far, where no ``.grad`` sums the micro-batches (see _summing).
    pending: torch.Tensor | None = None

    def count_at(self, density: float) -> int:
        """Components selected in this weight at ``density`` (of the whole weight, on shards too)."""
        return count_selected(self.full_numel, density)

    def top_k(self, score: torch.Tensor, k: int) -> torch.Tensor:
        """Sorted flat indices of the ``k`` components with the largest |``score``|."""
        return top_k_indices(score, k)

    def random(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """Sorted flat indices of ``k`` components drawn uniformly from ``generator``."""
        return random_indices(self.numel, k, generator, self.trainable.device)

    def agreed(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` as every process holds it: rank 0's (the ranks' rankings may differ by rounding)."""
        if distributed.world_size() > 1:
            distributed.broadcast(idx, src=0)
        return idx

    def narrow(self, idx: torch.Tensor) -> None:
        """Hold only ``idx`` (sorted flat indices) from now on; the engine has written the untrained values of
        the components left out (``SiftConfig.shrink_after``). The weight holds every component: nothing to do."""

    def part(self, t: torch.Tensor) -> torch.Tensor:
        """This process's part of ``t``, a tensor shaped like the weight (its gradient), detached."""
        return distributed.local(t)

    def kept_as(self, idx: torch.Tensor) -> torch.Tensor | None:
        """The storage's own tensor of the sorted indices ``idx`` when it holds exactly those, to share."""
        return None

    def held_bytes(self, selection: torch.Tensor | None) -> dict[str, int]:
        """Bytes held beside the weight: trained ``values`` and ``indices`` other than ``selection``."""
        return {"values": 0, "indices": 0}

    def whole(self, indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An increment's indices and values of the whole weight, from this process's ``indices`` and
        ``values`` (on FSDP2 shards, gathered from every rank; every rank must call this)."""
        return indices, values

    def take_pending(self) -> torch.Tensor | None:
        """The gradient of a selection window that ended inside a step (autograd's ``.grad``, or the one
        this storage summed), taken away; None if there is none."""
        p = self.trainable
        pending = p.grad if p.grad is not None else self.pending
        p.grad = self.pending = None
        return None if pending is None else self.part(pending)

    def drop_pending(self) -> None:
        """Forget a selection window's gradient summed so far (a skipped step)."""
        self.pending = None

    def _summing(self, on_gradient):
        """``on_gradient`` given this step's earlier micro-batches' gradient too, as autograd sums ``.grad``:
        a gradient the engine does not take yet (a selection window not complete) waits in ``pending``."""
        def hand_over(dense: torch.Tensor | None, at_indices: torch.Tensor | None) -> None:
            if dense is not None and self.pending is not None:
                dense, self.pending = self.pending.add_(dense), None
            if not on_gradient(dense, at_indices):
                self.pending = dense

        return hand_over


class InPlace(Storage):
    """The trained values are the weight's own: read and written at the selected indices."""

    _handle = None

    def __init__(self, param: nn.Parameter, name: str):
        kind = quantized_kind(param)
        if kind:
            raise ConfigError(f"targeted weight {name} is quantized ({kind}); SIFT cannot write "
                              "updates into it: attach with storage='delta' (the values train beside the "
                              "frozen weight)")
        self.trainable = param
        self.numel, self.shape = param.numel(), tuple(param.shape)
        self.full_numel, self.full_shape = self.numel, self.shape
        self.base_dtype = param.dtype

    def select(self, idx: torch.Tensor) -> None:
        pass  # every component of the weight is already there to train

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        return self.trainable.detach().view(-1)[idx]

    def write(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        self.trainable.detach().view(-1)[idx] = values.to(self.trainable.dtype)  # index_put_: int32 indices

    def current_weight(self) -> torch.Tensor:
        """The weight's values now (score="grad_weight" ranks by them)."""
        return self.trainable.detach()

    def attach(self, wants_dense, on_gradient) -> None:
        """Hand the engine the weight's gradient once autograd has summed it into ``.grad`` (see
        :meth:`Delta.attach` for the callbacks); ``.grad`` is freed once the engine has taken it, else
        autograd sums the next micro-batch's into it."""
        def hook(param: torch.Tensor) -> None:
            if on_gradient(self.part(param.grad), None):
                param.grad = None

        self._handle = self.trainable.register_post_accumulate_grad_hook(hook)

    def attached_to(self, model: nn.Module, name: str) -> bool:
        return model.get_parameter(name) is self.trainable

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # The weight's values are the model's: checkpoints take them from its state dict.
    def state(self) -> dict:
        return {}

    def check_state(self, saved: dict, where: str) -> None:
        pass

    def load_state(self, saved: dict) -> None:
        pass


class ShardedInPlace(InPlace):
    """The trained values of a weight sharded by FSDP2 along dim 0: this rank's rows, read and written in place.

    FSDP2's ``fully_shard`` replaces every parameter by a ``DTensor`` whose
    rank-local part holds a contiguous block of rows (``Shard(0)``; the last
    ranks hold fewer rows, or none, when the rows do not divide evenly).
    After each backward it reduce-scatters the gradient, so the weight's
    post-accumulate-grad hook sees the local rows of the gradient **already
    averaged** over the ranks. Each rank then works on its own rows:

    * **Selection.** A tensor selects the global top-k of the averaged
      gradient, exactly as one process would (:meth:`top_k`): every rank
      sends its local top-k magnitudes (k floats), the k-th largest of the
      gathered values is the threshold, each rank keeps its entries above
      it, and the entries equal to it are taken in global index order
      (ranks hold increasing index ranges). Ranks so hold different counts
      that sum to k. ``selection="random"`` draws the same global indices on
      every rank (same seed) and each keeps its own.
    * **Indices, state, ledger** are local to the shard (flat indices into
      the rank's rows): optimizer moments, fp32 masters and the increment
      ledger are split across the ranks like the weights.
    * **Updates** are written into the local rows in place; FSDP2's next
      all-gather carries them to every rank.
    * **Results.** :meth:`whole` gathers the per-rank parts (global indices
      in order) for an increment.

    No weight or dense gradient is gathered beyond what FSDP2 does itself.
    ``numel`` and ``shape`` are the local part's, which the engine's
    indices point into; ``full_numel`` and ``full_shape`` the whole
    weight's; global flat index = ``offset`` + local flat index.
    """

    averaged_over_ranks = True  # by FSDP2's reduce-scatter
    partial = True

    def __init__(self, param: nn.Parameter, name: str):
        from torch.distributed.tensor import Replicate, Shard

        placements = tuple(param.placements)
        if placements not in ((Shard(0),), (Replicate(), Shard(0))):
            raise ConfigError(f"targeted weight {name} is sharded as {placements}; SIFT trains weights sharded "
                              "along dim 0 (fully_shard's default, no shard_placement_fn), replicated or not (HSDP)")
        if not param.is_floating_point():
            raise ConfigError(f"targeted weight {name} is {param.dtype}; SIFT writes updates into float weights")
        self.trainable = param
        self.full_shape, self.full_numel = tuple(param.shape), param.numel()
        part = param.to_local()
        self.shape, self.numel = tuple(part.shape), part.numel()
        self.base_dtype = param.dtype
        # Under HSDP the replicas hold the same shards and, after FSDP2's all-reduce, the same
        # gradients: they select alike, and only the ranks along the shard dimension split a tensor.
        mesh = param.device_mesh
        dim = mesh.ndim - 1
        self.group, self.world, self.rank = mesh.get_group(dim), mesh.size(dim), mesh.get_local_rank(dim)
        # FSDP2 cuts the rows as torch.chunk does: ceil(rows / world) per rank, the last ones short or empty.
        rows = self.full_shape[0]
        per_rank = -(-rows // self.world)
        self.offset = min(self.rank * per_rank, rows) * (self.full_numel // rows if rows else 0)

    def attached_to(self, model: nn.Module, name: str) -> bool:
        distributed.reshard(model)  # a forward since attach may have left the whole tensor in the parameter's place
        return super().attached_to(model, name)

    def _flat(self) -> torch.Tensor:
        # Looked up each time: FSDP2 may re-point the local tensor (lazy init after model.to()).
        return self.trainable.detach().to_local().view(-1)

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        return self._flat()[idx]

    def current_weight(self) -> torch.Tensor:
        """This rank's rows of the weight, as they are now (the local part of score="grad_weight")."""
        return self._flat().view(self.shape)

    def write(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        flat = self._flat()
        flat[idx] = values.to(flat.dtype)

    def random(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """This rank's part of ``k`` components drawn from the whole weight, the same draw on every rank."""
        drawn = random_indices(self.full_numel, k, generator, self._flat().device).long()
        mine = drawn[(drawn >= self.offset) & (drawn < self.offset + self.numel)] - self.offset
        return mine.to(index_dtype(self.numel))

    def top_k(self, score: torch.Tensor, k: int) -> torch.Tensor:
        """This rank's part of the whole weight's top-k by |``score``| (this rank's rows of it): sorted local
        flat indices. Every rank of the shard group must call this for the same tensor at the same time."""
        device = score.device
        magnitude = score.detach().reshape(-1).abs().float()
        own = torch.topk(magnitude, min(k, magnitude.numel())).values  # descending
        padded = torch.full((k,), -1.0, device=device)  # -1 is below every magnitude: padding never counts
        padded[:own.numel()] = own
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        with distributed.collective_errors():
            dist.all_gather(gathered, padded, group=self.group)
        every = torch.cat(gathered)
        threshold = torch.topk(every, k).values[-1]
        keep = magnitude > threshold
        # Entries equal to the threshold fill the rest of k in global index order. A rank whose
        # sent values end in ties may hold more of them than it sent, but then it alone can fill
        # the remainder, so the counts it sent are enough for the ranks after it.
        wanted = k - int((every > threshold).sum())
        before = sum(int((g == threshold).sum()) for g in gathered[:self.rank])
        take = max(0, wanted - before)
        if take:
            keep[(magnitude == threshold).nonzero().squeeze(1)[:take]] = True
        return keep.nonzero().squeeze(1).to(index_dtype(self.numel))

    def agreed(self, idx: torch.Tensor) -> torch.Tensor:
        return idx  # each rank's own rows: the ranks' parts are different by design

    def whole(self, indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.trainable.device
        global_idx = torch.cat(self.gathered((indices.long() + self.offset).to(device)))
        all_values = torch.cat(self.gathered(values.float().to(device)))
        return global_idx.to(index_dtype(self.full_numel)), all_values

    def gathered(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's 1-D ``t`` (lengths may differ), in rank order, on the CPU."""
        with distributed.collective_errors():
            count = torch.tensor([t.numel()], device=t.device)
            counts = [torch.empty_like(count) for _ in range(self.world)]
            dist.all_gather(counts, count, group=self.group)
            longest = max(int(c) for c in counts)
            padded = t.new_zeros(longest)
            padded[:t.numel()] = t
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(parts, padded, group=self.group)
        return [part[:int(c)].cpu() for part, c in zip(parts, counts)]



class Delta(Storage):
    """Trained values beside a frozen Linear-like layer, added to its output by a forward hook.

    ``trainable`` is a 1-D parameter of the increment's values at
    ``indices`` (sorted flat indices into the logical weight): the current
    selection, plus in periodic mode every component selected before, whose
    trained change stays in the forward. The engine gets the dense gradient
    of the logical weight from :meth:`attach` 's callback, once per backward.

    With ``compact`` (``SiftConfig.compact_indices``) the indices are kept
    packed, 2 bytes a component (``siftune.core.select.pack_indices``), and
    unpacked for each use: one layer's transient, as its dense delta is.
    """

    def __init__(self, module: nn.Module, name: str, k: int, dtype: torch.dtype, compact: bool = False):
        _require_linear_like(module, name)
        keep_training_layout(module)
        self.module = module
        self.transposed = type(module).__name__ == "Conv1D"
        self.shape = weight_shape(module)
        self.numel = self.shape[0] * self.shape[1]
        self.full_numel, self.full_shape = self.numel, self.shape
        device = _device_of(module)
        self.trainable = nn.Parameter(torch.zeros(k, dtype=dtype, device=device))
        self.compact = compact
        # The indices as kept (sorted flat, or packed with compact); None until the first selection.
        self.stored: torch.Tensor | None = None
        self.count = 0  # how many indices (and values) there are
        self.base_dtype = _base_dtype(module)
        self._handle = None
        self._structure, self._structure_of = None, None  # CSR layout of ``indices``, for the sparse kernels

    @property
    def indices(self) -> torch.Tensor | None:
        """Sorted flat indices into the logical weight (unpacked anew when kept packed), or None."""
        if self.stored is None or not self.compact:
            return self.stored
        return unpack_indices(self.stored, self.numel)

    @indices.setter
    def indices(self, idx: torch.Tensor | None) -> None:
        self.count = 0 if idx is None else idx.numel()
        self.stored = pack_indices(idx, self.numel) if idx is not None and self.compact else idx

    def kept_as(self, idx: torch.Tensor) -> torch.Tensor | None:
        """The stored form of ``idx`` (sorted) when the delta holds exactly ``idx``, to share rather than copy."""
        return self.stored if self.stored is not None and self.count == idx.numel() else None

    def held_bytes(self, selection: torch.Tensor | None) -> dict[str, int]:
        """The values, and the indices unless they are the selection's own tensor (periodic mode: its own)."""
        return {"values": _nbytes(self.trainable),
                "indices": 0 if self.stored is selection else _nbytes(self.stored)}

    # -- selection ------------------------------------------------------------
    def select(self, idx: torch.Tensor) -> None:
        """Make ``idx`` (sorted flat indices) trainable; components selected before keep their values."""
        if self.stored is None:
            self.indices = idx
            if self.trainable.numel() != idx.numel():  # budget="global": this tensor's own share of the total
                self.trainable.data = self.trainable.new_zeros(idx.numel())
            return
        indices = self.indices
        new = torch.isin(idx, indices, invert=True)
        if new.any():
            merged = torch.cat([indices, idx[new]])
            order = torch.argsort(merged)
            values = torch.cat([self.trainable.detach(), self.trainable.new_zeros(int(new.sum()))])[order]
            self.indices = merged[order]
            self.trainable.data = values  # same Parameter: the optimizer keeps its handle

    def narrow(self, idx: torch.Tensor) -> None:
        """Hold only ``idx``: the values of those already held, zero (no change) for the others."""
        indices = self.indices
        pos = torch.searchsorted(indices, idx).clamp_(max=indices.numel() - 1)
        inside = indices[pos] == idx
        values = self.trainable.new_zeros(idx.numel())
        values[inside] = self.trainable.detach()[pos[inside]]
        self.indices = idx
        self.trainable.data = values  # same Parameter: the optimizer keeps its handle

    def positions(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Rows of ``indices`` holding ``idx`` (a sorted subset); None when ``idx`` is all of them."""
        return None if idx.numel() == self.count else torch.searchsorted(self.indices, idx)

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        values = self.trainable.detach()
        if self.stored is None:
            return values.new_zeros(idx.numel())
        pos = self.positions(idx)
        return values if pos is None else values[pos]

    def current_weight(self) -> torch.Tensor:
        """The values the layer computes with now, base plus delta, as a dense fp32 tensor of the logical
        weight's shape (score="grad_weight" ranks by them): one layer's transient, as its dense gradient is."""
        weight = dequantized_weight(self.module).float().reshape(self.shape)
        if self.stored is not None:
            weight.view(-1)[self.indices] += self.trainable.detach().float()
        return weight

    def write(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        pos = self.positions(idx)
        if pos is None:
            self.trainable.detach().copy_(values)
        else:
            self.trainable.detach()[pos] = values.to(self.trainable.dtype)

    # -- checkpoints -------------------------------------------------------------
    def state(self) -> dict:
        """The values and their indices, which the model's state dict does not hold."""
        return {"delta_indices": self.indices, "delta_values": self.trainable.detach()}

    def check_state(self, saved: dict, where: str) -> None:
        indices, values = saved.get("delta_indices"), saved.get("delta_values")
        if indices is None and isinstance(values, torch.Tensor) and values.numel() == self.trainable.numel():
            return  # saved before the first selection
        if (not isinstance(indices, torch.Tensor) or not isinstance(values, torch.Tensor) or indices.dim() != 1
                or values.shape != indices.shape or values.dtype != self.trainable.dtype):
            raise CheckpointError(f"{where}: delta values must be saved with their indices, one "
                                  f"{self.trainable.dtype} value per index (was the run saved with storage='delta'?)")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.numel
                                or not bool((indices[1:] > indices[:-1]).all())):
            raise CheckpointError(f"{where}: delta indices must be sorted, unique and in [0, {self.numel})")

    def load_state(self, saved: dict) -> None:
        indices, values = saved.get("delta_indices"), saved["delta_values"]
        device = self.trainable.device
        self.indices = None if indices is None else indices.to(device, index_dtype(self.numel))
        self.trainable.data = values.to(device).clone()

    # -- forward and backward ---------------------------------------------------
    def attach(self, wants_dense, on_gradient) -> None:
        """Add the delta to the layer's output; the engine gets the weight's gradient in backward.

        ``wants_dense()`` says whether the engine needs the dense gradient
        (it is selecting); ``on_gradient(dense, values)`` takes either the
        dense gradient or the gradient at every index of :attr:`indices`, and
        returns whether it took it (a dense gradient not taken waits in
        ``pending`` and the next micro-batch's is added to it).
        """
        callbacks = (wants_dense, self._summing(on_gradient))

        def hook(module, args, output):
            return output + _DeltaMatmul.apply(args[0], self.trainable, self, callbacks)

        self._handle = self.module.register_forward_hook(hook)

    def attached_to(self, model: nn.Module, name: str) -> bool:
        return self._handle is not None and model.get_submodule(name.rsplit(".", 1)[0]) is self.module

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The delta as a dense ``(out, in)`` matrix (the layer's transient)."""
        flat = torch.zeros(self.numel, dtype=dtype, device=self.trainable.device)
        if self.stored is not None:
            flat[self.indices] = self.trainable.detach().to(dtype)
        return flat.view(self.shape).t() if self.transposed else flat.view(self.shape)

    def sparse_kernels(self, dtype: torch.dtype) -> bool:
        """Whether this layer's delta products run as sparse kernels (CPU, fp32 activations and values,
        nn.Linear layout): torch has no bf16 CSR product on a CPU."""
        return (self.trainable.device.type == "cpu" and dtype == torch.float32
                and self.trainable.dtype == torch.float32 and not self.transposed)

    def csr(self, transposed: bool = False) -> torch.Tensor:
        """The delta (or its transpose) as a CSR matrix over the current values."""
        if self._structure_of is not self.stored:  # the layout changes with the indices only
            out, inp = self.shape
            indices = self.indices
            rows, cols = (indices // inp).int(), (indices % inp).int()
            order = torch.argsort(cols.long() * out + rows).int()  # int32, as the other index tensors
            self._structure = (_crow(rows, out), cols, _crow(cols, inp), rows[order], order)
            self._structure_of = self.stored
        crow, cols, tcrow, trows, order = self._structure
        values = self.trainable.detach()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta", "invariant checks disabled"
            if transposed:
                return torch.sparse_csr_tensor(tcrow, trows, values[order], self.shape[::-1])
            return torch.sparse_csr_tensor(crow, cols, values, self.shape)


def _crow(rows: torch.Tensor, count: int) -> torch.Tensor:
    """CSR row pointers of sorted row ids."""
    counts = torch.bincount(rows, minlength=count)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).int()


class _DeltaMatmul(torch.autograd.Function):
    """``x @ delta^T``, whose backward hands the weight's gradient to the engine, not to autograd.

    While a selection is being made the engine gets the dense gradient of
    the logical weight (one layer's transient); afterwards only the selected
    entries, gathered from it or, with sparse kernels, computed directly
    (``sampled_addmm``). So autograd never accumulates a dense tensor here.
    """

    @staticmethod
    def forward(ctx, x, trainable, storage: Delta, callbacks):
        ctx.storage, ctx.callbacks = storage, callbacks
        ctx.save_for_backward(x)
        ctx.has_values = storage.stored is not None
        if not ctx.has_values:  # nothing trained yet: the output is the base's alone
            out_features = storage.shape[1] if storage.transposed else storage.shape[0]
            return x.new_zeros(*x.shape[:-1], out_features)
        if storage.sparse_kernels(x.dtype):
            x2 = x.reshape(-1, x.shape[-1])
            return (storage.csr() @ x2.t()).t().reshape(*x.shape[:-1], storage.shape[0])
        return x @ storage.dense(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        storage = ctx.storage
        wants_dense, on_gradient = ctx.callbacks
        sparse = storage.sparse_kernels(grad_out.dtype)
        g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_x = None
        if ctx.has_values and ctx.needs_input_grad[0]:
            if sparse:
                grad_x = (storage.csr(transposed=True) @ g2.t()).t().reshape(x.shape)
            else:
                grad_x = grad_out @ storage.dense(grad_out.dtype)
        if not ctx.needs_input_grad[1]:
            pass  # fixed values (an applied increment): no gradient wanted
        elif sparse and ctx.has_values and not wants_dense():
            picked = torch.sparse.sampled_addmm(storage.csr(), g2.t().contiguous(), x2, beta=0.0).values()
            on_gradient(None, picked)
        else:
            weight_grad = g2.t() @ x2  # (out, in): the gradient of the logical weight
            if storage.transposed:
                weight_grad = weight_grad.t()
            on_gradient(weight_grad.contiguous(), None)
        return grad_x, None, None, None


def _base_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype the frozen weight stands for (a quantised weight's original dtype)."""
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "dtype", None) is not None:
        return quant_state.dtype
    if weight.is_floating_point():
        return weight.dtype
    return getattr(module, "compute_dtype", None) or torch.float32


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters(recurse=False):
        return t.device
    return torch.device("cpu")


def make(kind: str, module: nn.Module, param: nn.Parameter, name: str, density: float, delta_dtype: torch.dtype,
         compact: bool = False):
    """The storage ``SiftConfig.storage`` (``kind``) names for the targeted weight ``param`` of ``module``."""
    if distributed.is_sharded(param):
        if kind != "in_place":
            raise ConfigError(f"targeted weight {name} is sharded (FSDP2); storage={kind!r} needs whole weights: "
                              "attach with storage='in_place' (the default)")
        return ShardedInPlace(param, name)
    if kind == "delta":
        _require_linear_like(module, name)
        rows, cols = weight_shape(module)
        return Delta(module, name, count_selected(rows * cols, density), delta_dtype, compact)
    return InPlace(param, name)


def _require_linear_like(module: nn.Module, name: str) -> None:
    if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
        raise ConfigError(f"storage='delta' works on Linear-like layers; {name} is a {type(module).__name__}: "
                          "leave it out of target_modules or use storage='in_place'")


# -- a finished increment on a model -------------------------------------------
def writable(weight: torch.Tensor) -> bool:
    """Whether values can be written into ``weight``: a plain float tensor, not a quantized one."""
    return quantized_kind(weight) is None


def increment_shape(model: nn.Module, name: str, weight: torch.Tensor) -> tuple[int, ...]:
    """The shape an increment's tensor ``name`` (``weight`` of ``model``) has: the weight's own, or a quantized
    layer's logical ``(out, in)``."""
    return tuple(weight.shape) if writable(weight) else tuple(weight_shape(_owner(model, name)))


@torch.no_grad()
def add_increment(model: nn.Module, name: str, weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor):
    """Add an increment's fp32 ``values`` at the flat ``indices`` of ``weight`` (the tensor ``name`` of ``model``).

    A float weight takes them in place. A quantized one (bitsandbytes,
    torchao) cannot: its layer gets them added to its output instead (a
    forward hook), so increments swap on one quantized model without
    reloading it. Returns what :func:`remove_increment` needs to undo it
    exactly: the overwritten values, or the hook.
    """
    if not writable(weight):
        module = _owner(model, name)
        delta = Delta(module, name, indices.numel(), torch.float32)
        delta.indices = indices.to(delta.trainable.device, index_dtype(delta.numel))
        delta.trainable.data = values.to(delta.trainable.device, torch.float32)
        delta.trainable.requires_grad_(False)
        delta.attach(lambda: False, _no_gradient)
        return delta
    flat = weight.detach().view(-1)
    idx = indices.to(flat.device, torch.int64)
    old = flat[idx].clone()
    flat.index_copy_(0, idx, (old.float() + values.to(flat.device)).to(flat.dtype))
    return old


@torch.no_grad()
def remove_increment(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, applied=None) -> None:
    """Undo :func:`add_increment`: exactly with what it returned (``applied``), else by subtraction, which
    needs a writable weight (IncrementError otherwise)."""
    if isinstance(applied, Delta):
        applied.remove()  # the hook that added the values
        return
    if applied is None and not writable(weight):
        raise IncrementError("a quantized weight's increment can only be removed from the model object it was "
                             "applied to")
    flat = weight.detach().view(-1)
    idx = indices.to(flat.device, torch.int64)
    if applied is not None:
        flat.index_copy_(0, idx, applied)
    else:
        flat.index_copy_(0, idx, (flat[idx].float() - values.to(flat.device)).to(flat.dtype))


def _owner(model: nn.Module, name: str) -> nn.Module:
    """The module holding the tensor named ``name``."""
    return model.get_submodule(name.rpartition(".")[0])


def _no_gradient(dense, values) -> bool:
    return True  # an applied increment is not trained


def _nbytes(t: torch.Tensor | None) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
