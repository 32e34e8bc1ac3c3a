"""The SIFT engine: backward hooks that keep only the selected gradient entries.

This is the one module that touches ``.grad``. For every targeted weight a
post-accumulate-grad hook runs as soon as autograd has written that weight's
gradient; it takes the selected entries into a small fp32 buffer and frees
the dense gradient, so dense weight gradients never pile up. The optimizer
(:mod:`siftune.core.optim`) then updates exactly those entries in the same step:
no lag, and no tensor left for "the next backward".

Selection, per targeted tensor, in the modes of :class:`SiftConfig`:

* ``fixed``: the gradient is summed over the first ``selection_batches``
  micro-batches, its top-k |entries| are selected and held for good;
* ``periodic``: the same, again every ``refresh_every`` optimizer steps;
* ``per_step``: dense gradients are kept and the top-k is taken from each
  step's accumulated gradient.

What ranks a component (``score``) and whether the count is shared per tensor
or over all of them (``budget``) is :mod:`siftune.core.budget`'s.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import budget, heap, storage, structured
from ..parallel import distributed
from ..config import SiftConfig, unused_options
from ..artifacts.increment import SparseIncrement, TensorDelta
from ..errors import CheckpointError, ConfigError, IncrementError
from .stepscale import InputScale, feature_axis, scalable
from .select import (balanced_indices, find_targets, grow_drop_indices, index_dtype, mixed_indices, pack_indices,
                     tensor_generator, unpack_indices)

# Where the increment ledger (untrained values and indices of every component ever
# selected) is kept: host memory, read only when an increment or checkpoint is saved.
LEDGER_DEVICE = torch.device("cpu")


class _Slot:
    """Selection state of one targeted tensor."""

    def __init__(self, name: str, store, k: int, generator: torch.Generator, compact: bool = False):
        self.name = name
        self.storage = store  # where the trained values live (siftune.core.storage)
        self.param = store.trainable  # what the optimizer trains: the weight, or the delta's values
        self.numel, self.shape = store.numel, store.shape  # of the (logical) weight the indices point into
        self.k = k
        self.generator = generator  # for selection="random"
        # The selection, on the param's device: sorted flat indices (int32 below 2**31
        # entries), or packed into int16 with compact_indices; flat() reads either.
        self.idx: torch.Tensor | None = None
        self.compact = compact
        self.version = 0  # bumped at each new selection, so the optimizer can remap its state
        # The selection in force before this step's, restored if the step is skipped.
        self.previous: tuple[torch.Tensor | None, int, int] | None = None  # idx, version, k
        self.pending_base: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None  # gradient of the selected entries, in the gradient's dtype
        self.selecting = True
        self.applied = False  # update_in_backward: this step's update is already in the weights
        self.seen = 0  # micro-batches summed since this selection began
        self.score: torch.Tensor | None = None  # gradient of earlier windows of a long selection
        # Ledger of every component ever selected, with its value before training.
        # Only saving an increment or checkpoint reads it, so it lives in host
        # memory: on a GPU it costs no device memory.
        self.ever_idx: torch.Tensor | None = None
        self.base: torch.Tensor | None = None
        self.input: InputScale | None = None  # step_scale="input": the window's inputs and the step factors

    def flat(self, stored: torch.Tensor | None = None) -> torch.Tensor | None:
        """Flat indices of ``stored`` (default: the current selection), unpacked if packed."""
        stored = self.idx if stored is None else stored
        if stored is None or stored.dtype != torch.int16:
            return stored
        return unpack_indices(stored, self.numel)

    def ledger_indices(self) -> torch.Tensor:
        """The ledger's indices (kept in host memory) on the param's device, to read or write its values."""
        return self.ever_idx.to(self.param.device)


def _stored_selection(slot: _Slot, idx: torch.Tensor) -> torch.Tensor:
    """``slot.idx`` for the sorted flat indices ``idx``: packed with compact_indices, and one tensor with
    a delta that holds exactly these indices (fixed mode), rather than a second copy."""
    shared = slot.storage.kept_as(idx)
    if shared is not None:
        return shared
    return pack_indices(idx, slot.numel) if slot.compact else idx


class SiftEngine:
    """SIFT attached to a model: targets resolved, hooks registered, gradients kept sparse.

    Build it with :func:`siftune.attach`, then get the matching optimizer with
    :meth:`optimizer`. Every parameter that is neither targeted nor in
    ``dense_modules`` is frozen (``requires_grad=False``) and stays
    bit-identical. :meth:`detach` removes the hooks and restores the
    ``requires_grad`` flags.
    """

    def __init__(self, model: nn.Module, config: SiftConfig):
        config.validate()
        self.model = model
        distributed.reshard(model)  # an FSDP2 model must show its sharded parameters, even after a forward
        targeted, dense = find_targets(model, config.target_modules, config.dense_modules)
        sharded = any(map(distributed.is_sharded, targeted.values()))
        # "auto" made concrete: balanced and scaled steps where they can run (config.resolve_auto)
        self.config = config = config.resolve(sharded=sharded, scalable=scalable(model, targeted))
        for name, p in targeted.items():
            if config.storage == "in_place" and not p.is_contiguous():
                raise ConfigError(f"targeted weight {name} is not contiguous; call .contiguous() on it before attaching")
        if config.selection in ("mixed", "balanced", "grow_drop") and sharded:
            raise ConfigError(f"selection={config.selection!r} chooses among a whole tensor's components, which "
                              "FSDP2 shards split over the ranks; use selection='gradient' or 'random' on shards")
        if config.select_from and sharded:
            raise ConfigError("select_from ranks each whole tensor by an earlier run's change, which FSDP2 shards "
                              "split over the ranks: leave select_from=None on shards")
        if config.shrink_after and sharded:
            raise ConfigError("shrink_after ranks each whole tensor's trained changes, which FSDP2 shards split "
                              "over the ranks: leave shrink_after=0 on shards")
        if config.step_scale and sharded:
            raise ConfigError("step_scale='input' needs each weight whole on every process; FSDP2 shards split "
                              "it: leave step_scale=None on shards")
        if config.step_scale:  # before any hook is registered: a refused target leaves the model as it was
            for name in targeted:
                feature_axis(model.get_submodule(name.rpartition(".")[0]), name)
        if config.select_after and not dense:
            raise ConfigError(f"select_after={config.select_after}: the dense modules train alone before the "
                              "first selection, and this config names none (dense_modules); name the head there, "
                              "or leave select_after=0")
        self.dense = dense
        stores = {n: self._make_storage(model, n, p) for n, p in targeted.items()}
        # k counts the whole tensor's components; a shard holds its part of them.
        self.slots = [_Slot(n, store, store.count_at(config.selected_density), tensor_generator(config.seed, i),
                            compact=config.compact_indices)
                      for i, (n, store) in enumerate(stores.items())]
        for slot in self.slots:  # the count from the shrink on (shrink_after), else the count throughout
            slot.final_k = slot.storage.count_at(config.density)
        # select_from: the earlier run's change of each tensor, which ranks its selection (host memory)
        self.changes = earlier_changes(config.select_from, {s.name: s.shape for s in self.slots}) \
            if config.select_from else None
        self.selector = budget.Selector(config, self.slots, _summed_over_ranks if _distributed() else None)
        if config.step_scale:
            for slot in self.slots:
                module = model.get_submodule(slot.name.rpartition(".")[0])
                slot.input = InputScale(module, slot.name, slot.shape, lambda slot=slot: self._window_open(slot))
        self.steps = 0  # optimizer steps taken (skipped ones not counted)
        self._saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        # A structured slice's weight stays frozen: its gradient is the slice's, computed by structured.py.
        trainable = {id(p) for p in dense.values()} | {
            id(s.param) for s in self.slots if not s.storage.frozen}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        # Under DistributedDataParallel the engine exchanges the selected gradient
        # entries itself; DDP must leave targeted weights alone. Dense modules are
        # reduced by DDP when it wraps the model (set reduce_dense=False then),
        # else by the engine.
        self.reduce_dense = True
        self._ddp_ignore_before = getattr(model, "_ddp_params_and_buffers_to_ignore", None)
        model._ddp_params_and_buffers_to_ignore = list(self._ddp_ignore_before or []) + [s.name for s in self.slots]
        # update_in_backward: the optimizer's per-tensor update, called from the hooks.
        self.apply_in_backward = None
        if config.mode != "per_step":  # per_step takes each step's gradient at the step (gradients())
            for slot in self.slots:
                slot.storage.attach(lambda slot=slot: slot.selecting, self._gradient_for(slot))
        # A step's memory peaks at the start of its backward; with SIFTUNE_TRIM_HEAP=1 (read here, at attach)
        # the heap's free pages go back to the system just before, once a training forward has passed the
        # last targeted layer (siftune.core.heap). Off, no hook runs in the forward.
        self._heap_hook = None
        if self.slots and heap.enabled():
            last = model.get_submodule(self.slots[-1].name.rpartition(".")[0])
            self._heap_hook = last.register_forward_hook(_release_heap)

    def _make_storage(self, model: nn.Module, name: str, param: nn.Parameter):
        config, module = self.config, model.get_submodule(name.rpartition(".")[0])
        if config.structure:
            return structured.make(config, module, param, name)
        return storage.make(config.storage, module, param, name, config.density, config.torch_delta_dtype,
                            config.compact_indices)

    def _window_open(self, slot: _Slot) -> bool:
        """Whether ``slot``'s selection window takes this step's gradient (not before ``select_after`` steps)."""
        return slot.selecting and self.steps >= self.config.select_after

    # -- backward ----------------------------------------------------------
    def _gradient_for(self, slot: _Slot):
        def on_gradient(grad: torch.Tensor | None, at_indices: torch.Tensor | None) -> bool:
            if at_indices is not None:  # the gradient at every index the storage holds
                pos = slot.storage.positions(slot.flat())
                return self._take_gradient(slot, None, at_indices if pos is None else at_indices[pos])
            return self._take_gradient(slot, grad)

        return on_gradient

    def _take_gradient(self, slot: _Slot, grad: torch.Tensor | None, picked: torch.Tensor | None = None) -> bool:
        """One micro-batch's dense gradient of a targeted weight: select from it or keep its selected entries.

        ``picked``, given instead of ``grad`` once the selection is made, is
        the gradient at the selected entries already. Returns False when the
        gradient is still needed whole (a selection window not complete yet).
        """
        if slot.selecting and not self._window_open(slot):
            return True  # before select_after steps the dense modules train alone: this gradient is dropped
        if slot.selecting:
            slot.seen += 1
            window = self.selector.fold(slot, grad)
            if window is None:
                return self.selector.frees_gradient
            grad, score = window
            if self.selector.pool is not None:
                self._select_globally(slot, score, grad)
                return True
            idx = self._select(slot, score)
            slot.grad = grad.reshape(-1)[idx]
        else:
            idx = slot.flat()
            if picked is None:
                picked = grad.reshape(-1)[idx]
            slot.grad = picked if slot.grad is None else slot.grad.add_(picked)
        if self.apply_in_backward is not None:
            if slot.applied:
                raise ConfigError(
                    f"update_in_backward: {slot.name} got a second backward before optimizer.step(); the "
                    "update is applied at each backward, so gradient accumulation cannot work with it. "
                    "Call step() after every backward, or set update_in_backward=False")
            self.apply_in_backward(slot, idx)
            slot.grad, slot.applied = None, True
        return True

    def _select_globally(self, slot: _Slot, score: torch.Tensor, grad: torch.Tensor) -> None:
        """Offer ``slot``'s window to the global ranking; the last tensor to arrive selects for all."""
        # Ranked by the ranks' summed score, the same on every rank, so every rank builds the
        # same pool; the pooled gradient values stay this rank's own, averaged at the step.
        chosen = self.selector.pool.offer(slot, self.selector.ranked(slot, score), grad)
        for each, (idx, picked) in zip(self.slots, chosen or ()):
            self._select(each, None, chosen=idx)
            each.grad = picked

    def _select(self, slot: _Slot, score: torch.Tensor | None, chosen: torch.Tensor | None = None) -> torch.Tensor:
        """Select anew from ``score``, or take the indices ``chosen`` by a global budget; returns the flat
        indices (``slot.idx`` may hold them packed)."""
        p = slot.param
        if slot.previous is None:
            slot.previous = (slot.idx, slot.version, slot.k)
            if slot.input is not None:
                slot.input.before = slot.input.scale
        if slot.input is not None:  # the window's inputs, of every process (so in step with the selection)
            slot.input.scale = slot.input.take()
        if chosen is not None:  # by the global budget (siftune.core.budget)
            idx = chosen.to(p.device)
            slot.k = idx.numel()
        elif self.config.selection == "random":
            idx = slot.storage.random(slot.k, slot.generator)
        elif self.changes is not None:  # select_from: ranked by the earlier run's change
            idx = self._chosen(slot, budget.change_ranking(self.changes[slot.name], slot.shape, p.device))
        else:
            idx = self._chosen(slot, self.selector.ranked(slot, score))
        idx = slot.storage.agreed(idx)  # one selection on every rank, whatever the rounding
        slot.version += 1
        slot.selecting = False
        slot.storage.select(idx)
        slot.idx = _stored_selection(slot, idx)
        # Untrained values, taken before this step's update changes them (to host memory).
        slot.pending_base = slot.storage.read(idx).to(LEDGER_DEVICE, copy=True)
        return idx

    def _chosen(self, slot: _Slot, ranking: torch.Tensor) -> torch.Tensor:
        """``slot``'s k components by ``ranking``, as ``config.selection`` chooses them (sorted flat indices)."""
        config = self.config
        if config.selection == "mixed":
            return mixed_indices(ranking, slot.k, config.score_share, slot.generator)
        if config.selection == "balanced":
            return balanced_indices(ranking, slot.k, slot.shape, config.line_cap)
        if config.selection == "grow_drop" and slot.idx is not None:  # a refresh: the first selection is the top-k
            held = slot.flat()
            where = torch.searchsorted(slot.ever_idx, held.to(LEDGER_DEVICE).to(slot.ever_idx.dtype))
            change = slot.storage.read(held).float().cpu() - slot.base[where].float()  # since training began
            return grow_drop_indices(held, change, ranking, round(config.drop_share * slot.k))
        return slot.storage.top_k(ranking, slot.k)

    def _forget_change(self, slot: _Slot) -> None:
        """select_from: a tensor whose selection is committed needs the earlier run's change no more."""
        if self.changes is not None:
            self.changes.pop(slot.name, None)

    @staticmethod
    def _record(slot: _Slot) -> None:
        """Add a committed selection's new components to the ledger, with their untrained values."""
        idx, base = slot.flat().to(LEDGER_DEVICE), slot.pending_base
        if slot.ever_idx is None:
            slot.ever_idx, slot.base = idx, base
            return
        new = torch.isin(idx, slot.ever_idx, invert=True)
        if new.any():
            merged = torch.cat([slot.ever_idx, idx[new]])
            order = torch.argsort(merged)
            slot.ever_idx = merged[order]
            slot.base = torch.cat([slot.base, base[new]])[order]

    # -- optimizer step ----------------------------------------------------
    def gradients(self) -> list[tuple[nn.Parameter, torch.Tensor | None, torch.Tensor]]:
        """The gradient the optimizer applies this step: ``(param, idx, grad)`` triples.

        ``idx`` is ``None`` for densely trained parameters (``grad`` is then
        their ``.grad``). Targeted tensors whose selection is not complete
        yet fold this window's gradient into their selection score and are
        left out.
        """
        out = []
        for slot in self.slots:
            p = slot.param
            if self.config.mode == "per_step":
                grad = slot.storage.take_pending()
                if grad is None:
                    continue
                slot.grad = grad.reshape(-1)[self._select(slot, budget.rank_score(self.config.score, grad, slot.storage))]
            elif slot.selecting:
                grad = slot.storage.take_pending()  # autograd's .grad, or what the storage summed
                if grad is not None:  # window ended inside a multi-batch selection
                    slot.score = grad.float() if slot.score is None else slot.score.add_(grad)
                self.selector.end_step(slot)
                continue
            if slot.grad is not None:
                out.append((p, slot.flat(), slot.grad))
        if self.selector.pool is not None and self.selector.pool.kept:
            raise ConfigError(f"budget='global': {self.selector.pool.missing()[0]} got no gradient in the selection "
                              "window, so no global ranking could be made; target only weights the loss depends "
                              "on, or use budget='per_tensor'")
        for p in self.dense.values():
            if p.grad is not None:
                out.append((p, None, distributed.local(p.grad)))
        if _distributed():
            self._average_across_ranks(out)
        return out

    def _average_across_ranks(self, grads) -> None:
        """All-reduce the selected entries (and dense grads unless DDP did) in one flat buffer."""
        # FSDP2 has averaged sharded parameters' gradients in its reduce-scatter.
        parts = [g for p, idx, g in grads if not distributed.is_sharded(p) and (idx is not None or self.reduce_dense)]
        if not parts:
            return
        flat = torch.cat([g.reshape(-1).float() for g in parts])
        distributed.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in parts:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def exchanged_elements(self) -> int:
        """Gradient entries one rank sends per optimizer step (for the bandwidth benchmark)."""
        sparse = sum(s.k for s in self.slots)
        return sparse + (sum(p.numel() for p in self.dense.values()) if self.reduce_dense else 0)

    def finish_step(self, skipped: bool = False) -> None:
        """Drop this step's sparse gradients; commit or (``skipped``) undo its new selections.

        A skipped step (non-finite gradient) must not fix a selection taken
        from that gradient: the tensor selects again from the next batches.
        """
        for slot in self.slots:
            slot.grad = None
            applied, slot.applied = slot.applied, False  # an update made in backward is committed
            if skipped and slot.selecting and self.config.mode != "per_step":
                # a window folded into the score this step holds the bad gradient
                slot.seen, slot.score = 0, None
                if slot.input is not None:
                    slot.input.forget()
                slot.storage.drop_pending()
            if slot.previous is None:
                continue
            if skipped and self.config.mode != "per_step" and not applied:
                self.undo_selection(slot)
            else:
                self._record(slot)
                self._forget_change(slot)
            slot.previous = slot.pending_base = None
        if skipped:
            return
        self.steps += 1
        if self.config.shrink_after and self.steps == self.config.shrink_after:
            for slot in self.slots:
                self._shrink(slot)
        if self.config.mode == "periodic" and self.steps % self.config.refresh_every == 0:
            for slot in self.slots:
                slot.selecting, slot.seen = True, 0

    def _shrink(self, slot: _Slot) -> None:
        """shrink_after: keep ``slot``'s final count of its components, those whose trained change is largest
        (by the selection's rule), and put the others back to their untrained values."""
        held = slot.flat()
        if held is None:  # never selected (no gradient reached it): it selects at the final count
            slot.k = slot.final_k
            return
        where = torch.searchsorted(slot.ever_idx, held.to(LEDGER_DEVICE).to(slot.ever_idx.dtype))
        base = slot.base[where]
        ranking = torch.zeros(slot.numel, dtype=torch.float32, device=slot.param.device)
        ranking[held] = (slot.storage.read(held).float() - base.float().to(slot.param.device)).abs()
        slot.k = slot.final_k
        keep = slot.storage.agreed(self._chosen(slot, ranking.view(slot.shape)))
        kept = torch.isin(held, keep)
        slot.storage.write(held[~kept], base[~kept.cpu()].to(slot.param.device))  # dropped: untrained again
        # A component the caps bring in from outside the wider selection starts untrained, as any new one.
        ledger = held.to(LEDGER_DEVICE)
        pos = torch.searchsorted(ledger, keep.to(LEDGER_DEVICE).to(ledger.dtype)).clamp_(max=ledger.numel() - 1)
        inside = ledger[pos] == keep.to(LEDGER_DEVICE)
        kept_base = slot.storage.read(keep).to(LEDGER_DEVICE, copy=True)
        kept_base[inside] = base[pos[inside]]
        slot.storage.narrow(keep)
        slot.ever_idx, slot.base = keep.to(LEDGER_DEVICE).to(slot.ever_idx.dtype), kept_base
        slot.idx = _stored_selection(slot, keep)
        slot.version += 1

    @staticmethod
    def undo_selection(slot: _Slot) -> None:
        """Go back to the selection in force before this step's (whose gradient was not finite)."""
        if slot.previous is not None:
            slot.idx, slot.version, slot.k = slot.previous
            slot.selecting, slot.seen, slot.score = True, 0, None
            slot.previous = slot.pending_base = None
            if slot.input is not None:
                slot.input.scale = slot.input.before
                slot.input.forget()

    def select(self, batches, loss_of=None) -> int:
        """Complete the selection window on ``batches`` before training; returns the micro-batches used.

        Each batch goes through ``loss_of(model, batch)`` (default
        ``model(**batch).loss``) and a backward, until every targeted tensor
        has selected (``selection_batches`` micro-batches). Nothing is
        trained: the window's gradients, dense modules' included, are dropped
        and no optimizer step is counted, so training then starts with the
        selection made, on as many steps as it is given. With
        ``selection_batches=N`` and ``score="grad_squared"`` the ranking is
        the squared gradient summed over N micro-batches (an empirical Fisher
        diagonal, one term a micro-batch). Modes ``"fixed"`` and
        ``"periodic"`` (its later refreshes select during training, as
        before); call it before the first step.
        """
        if self.config.mode == "per_step":
            raise ConfigError("select() completes a selection window before training; mode='per_step' selects "
                              "at every step: use mode 'fixed' or 'periodic'")
        if self.config.select_after:
            raise ConfigError(f"select() makes the first selection before training; select_after="
                              f"{self.config.select_after} makes it after that many steps of the dense modules: "
                              "use one of them")
        if self.steps or any(not s.selecting or s.seen for s in self.slots):
            raise ConfigError("select() makes the first selection before training: call it on a freshly attached "
                              "engine, before the first backward")
        loss_of = loss_of or (lambda model, batch: model(**batch).loss)
        in_backward, self.apply_in_backward = self.apply_in_backward, None  # nothing is trained here
        used = 0
        try:
            for batch in batches:
                loss_of(self.model, batch).backward()
                used += 1
                if not any(s.selecting for s in self.slots):
                    break
        finally:
            self.apply_in_backward = in_backward
            for slot in self.slots:
                slot.grad = None
                slot.storage.drop_pending()
            self.selector.sums.clear()
            for p in self.model.parameters():
                p.grad = None
        waiting = [s.name for s in self.slots if s.selecting]
        if waiting:
            for slot in self.slots:  # start again from nothing: no half window is kept
                self.undo_selection(slot)
                slot.selecting, slot.seen, slot.score = True, 0, None
                if slot.input is not None:
                    slot.input.forget()
            raise ConfigError(f"select(): the batches ran out after {used} before {waiting[0]} (and "
                              f"{len(waiting) - 1} more) had selected; give at least selection_batches="
                              f"{self.config.selection_batches} batches whose loss depends on every targeted weight")
        for slot in self.slots:  # commit: the untrained values go to the ledger
            self._record(slot)
            self._forget_change(slot)
            slot.previous = slot.pending_base = None
        return used

    def zero_grad(self) -> None:
        """Forget accumulated sparse gradients (the dense ones are the optimizer's ``zero_grad``)."""
        for slot in self.slots:
            slot.grad = None
        self.selector.sums.clear()

    def optimizer(self, lr: float = 1e-4, **kwargs):
        """A :class:`siftune.core.optim.SiftAdamW` over the selected components and dense modules."""
        from .optim import SiftAdamW

        replaced = [s.name for s in self.slots if not s.storage.attached_to(self.model, s.name)]
        if replaced:
            # The hooks sit on the old tensors: training would silently change nothing.
            raise ConfigError(f"the model's {replaced[0]} is no longer the tensor SIFT attached to (was the model "
                              "sharded, e.g. by fully_shard, or its weights reassigned after attach?); "
                              "attach to the model as it will be trained")
        return SiftAdamW(self, lr=lr, **kwargs)

    # -- checkpoints -------------------------------------------------------
    def state_dict(self) -> dict:
        """Selection state for a checkpoint: config, step count, and per targeted tensor its
        selection, selection window, ledger and random stream.

        Take it between optimizer steps. Tensors are the engine's own (as in
        ``nn.Module.state_dict``); save or copy them before training on.
        """
        if any(s.grad is not None or s.previous is not None for s in self.slots):
            raise CheckpointError("take the engine state between optimizer steps (after step() and zero_grad())")
        slots = {
            s.name: {"k": s.k, "version": s.version, "selecting": s.selecting, "seen": s.seen, "idx": s.idx,
                     "score": s.score, "ever_idx": s.ever_idx, "base": s.base, "generator": s.generator.get_state(),
                     **s.storage.state(), **(s.input.state() if s.input is not None else {})}
            for s in self.slots
        }
        return {"config": self.config.to_dict(), "steps": self.steps, "slots": slots}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into an engine attached with the same config to the same architecture.

        Load it before the optimizer's state. Everything is checked first;
        CheckpointError names the first field or tensor that does not fit,
        and the engine is then left as it was.
        """
        if not isinstance(state, dict) or not isinstance(state.get("slots"), dict):
            raise CheckpointError("engine state must be a dict with 'config', 'steps' and 'slots'")
        config = self.config.to_dict()
        saved = {**SiftConfig.saved_defaults(), **state.get("config", {})}  # a field added since: what it ran
        unread = unused_options(saved.get("selection")) & unused_options(config["selection"])
        changed = sorted(k for k in config if saved.get(k) != config[k] and k not in unread)
        if changed:
            raise CheckpointError(f"engine state was saved with other SIFT settings ({', '.join(changed)}); "
                                  "attach with the settings of the saved run")
        if set(state["slots"]) != {s.name for s in self.slots}:
            raise CheckpointError("engine state targets other tensors than this engine; attach to the same model")
        steps = state.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise CheckpointError(f"engine state: steps {steps!r} must be an integer >= 0")
        shrunk = bool(self.config.shrink_after) and steps >= self.config.shrink_after
        loaded = {s.name: _checked_slot_state(s, state["slots"][s.name], self.config.budget, self.config.score,
                                              s.final_k if shrunk else None)
                  for s in self.slots}
        for slot in self.slots:
            saved = loaded[slot.name]
            slot.version, slot.selecting, slot.seen, slot.k = (saved[k] for k in ("version", "selecting", "seen", "k"))
            slot.idx, slot.score, slot.ever_idx, slot.base = (saved[k] for k in ("idx", "score", "ever_idx", "base"))
            slot.generator.set_state(saved["generator"])
            slot.storage.load_state(saved)
            if slot.input is not None:
                slot.input.load_state(saved, slot.param.device)
            if slot.idx is not None and slot.compact:
                slot.idx = _stored_selection(slot, slot.flat())
            slot.grad = slot.previous = slot.pending_base = None
            if not slot.selecting:
                self._forget_change(slot)
        self.steps = steps

    # -- results -----------------------------------------------------------
    @property
    def num_trainable(self) -> int:
        """Components trained: selected entries of targeted tensors plus dense parameters."""
        return sum(s.k for s in self.slots) + sum(p.numel() for p in self.dense.values())

    @property
    def selected(self) -> dict[str, torch.Tensor]:
        """Current selection: tensor name -> sorted flat indices (absent until selected).

        On a model sharded by FSDP2, this rank's part: indices into its own rows.
        """
        return {s.name: s.flat() for s in self.slots if s.idx is not None}

    def state_bytes(self, optimizer=None) -> dict[str, int]:
        """Bytes the engine (and ``optimizer``'s state) holds for the targeted tensors right now.

        ``indices``: the selections; ``gradients``: the sparse gradient buffers
        (alive from backward to the step); ``values``: with ``storage="delta"``,
        the trained values beside the frozen weights; ``optimizer``: master values,
        moments and step counts of the selected components. These live on the
        model's device; the increment ledger (host memory) is not counted.
        Divide by :attr:`num_selected` for the cost per selected component (on a
        sharded model, by this rank's count: the lengths of :attr:`selected`).
        """
        def size(t):
            return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

        out = {"indices": sum(size(s.idx) for s in self.slots), "gradients": sum(size(s.grad) for s in self.slots),
               "values": 0, "optimizer": 0}
        for slot in self.slots:  # a delta's values, and its own indices in periodic mode
            for kind, nbytes in slot.storage.held_bytes(slot.idx).items():
                out[kind] += nbytes
        if optimizer is not None:
            for slot in self.slots:
                state = optimizer.state.get(slot.param, {})
                out["optimizer"] += sum(size(v) for k, v in state.items() if k != "idx")
        return out

    @property
    def num_selected(self) -> int:
        """Components selected in the targeted tensors (dense modules not counted; all ranks' when sharded)."""
        return sum(s.k for s in self.slots)

    def increment(self, base_model: str | None = None, values: dict | None = None):
        """The trained sparse increment as a :class:`siftune.SparseIncrement`.

        Holds, per targeted tensor, every component ever selected and its change
        from the untrained value (fp32), plus the densely trained parameters
        in full. ``values`` may map a tensor name to fp32 values at the ledger's
        indices (the optimizer passes its master copies).
        """

        tensors = {}
        for slot in self.slots:
            if slot.ever_idx is None:
                continue
            current = slot.storage.read(slot.ledger_indices()).float()
            if values and slot.name in values:
                current = values[slot.name]
            # On FSDP2 shards: every rank's part, on every rank.
            indices, change = slot.storage.whole(slot.ever_idx, current.cpu() - slot.base.float())
            tensors[slot.name] = TensorDelta(indices=indices, values=change, shape=slot.storage.full_shape,
                                             dtype=str(slot.storage.base_dtype).replace("torch.", ""))
        dense = {n: distributed.full(p) for n, p in self.dense.items()}
        return SparseIncrement(tensors, dense=dense, base_model=base_model, config=self.config.to_dict())

    def detach(self) -> None:
        """Remove the hooks and restore every ``requires_grad`` flag; trained weights stay."""
        for slot in self.slots:
            slot.storage.remove()
            if slot.input is not None:
                slot.input.remove()
        if self._heap_hook is not None:
            self._heap_hook.remove()
            self._heap_hook = None
        if self._ddp_ignore_before is None:
            del self.model._ddp_params_and_buffers_to_ignore
        else:
            self.model._ddp_params_and_buffers_to_ignore = self._ddp_ignore_before
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._saved_flags.get(name, p.requires_grad))


def earlier_changes(path: str, shapes: dict[str, tuple[int, ...]],
                    increment: SparseIncrement | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``SiftConfig.select_from``: each targeted tensor's (sorted flat indices, |change|) in the increment at
    ``path`` (``increment``, when already loaded from it), on the host; ConfigError when it holds no change of a
    targeted tensor, or one of another shape."""
    if increment is None:
        try:
            increment = SparseIncrement.load(path)
        except IncrementError as exc:
            raise ConfigError(f"select_from: {exc}") from None
    out = {}
    for name, shape in shapes.items():
        delta = increment.tensors.get(name)
        if delta is None:
            raise ConfigError(f"select_from: the increment at {path} holds no change of {name}; it must come from a "
                              "run on the same model with the same target_modules")
        if tuple(delta.shape) != tuple(shape):
            raise ConfigError(f"select_from: the increment's {name} is {tuple(delta.shape)}, this model's "
                              f"{tuple(shape)}: it comes from another model")
        out[name] = (delta.indices.long(), delta.values.float().abs())
    return out


def _release_heap(module: nn.Module, args, output) -> None:
    """Forward hook of the last targeted layer: trim the host heap in a training forward on the host."""
    if module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.device.type == "cpu":
        heap.release()


def _summed_over_ranks(score: torch.Tensor) -> torch.Tensor:
    """``score`` summed over the ranks, in fp32, as a new tensor: a copy even when already fp32 (.float()
    would alias it), since the rank's own gradient must stay local; it is averaged once at the step."""
    score = score.to(torch.float32, copy=True)
    distributed.all_reduce(score)
    return score


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def attach(model: nn.Module, config: SiftConfig | None = None, **overrides) -> SiftEngine:
    """Attach SIFT to ``model`` and return the engine.

    ``attach(model, density=0.01, target_modules=["query", "value"])`` is the
    same as ``attach(model, SiftConfig(density=0.01, ...))``.
    """
    if config is None:
        config = SiftConfig(**overrides)
    elif overrides:
        config = SiftConfig.from_dict({**config.to_dict(), **overrides})
    return SiftEngine(model, config)


def _checked_slot_state(slot: _Slot, saved, budget_kind: str = "per_tensor", score_kind: str = "grad",
                        k: int | None = None) -> dict:
    """``saved`` with its tensors on the slot's device, after checking it fits the slot (``k`` selected
    components, default the slot's own count)."""
    where = f"engine state of {slot.name}"
    p, numel = slot.param, slot.numel
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where} must be a dict")
    for key in ("k", "version", "seen"):
        value = saved.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{where}: {key} {value!r} must be an integer >= 0")
    k = slot.k if k is None else k
    if saved["k"] != k and budget_kind == "per_tensor":  # a global budget gives each tensor its own k
        raise CheckpointError(f"{where}: {saved['k']} selected components saved, this engine selects {k}")
    if not isinstance(saved.get("selecting"), bool):
        raise CheckpointError(f"{where}: selecting must be true or false")
    out = dict(saved)
    # A shard holds its own part of the k selected components: any count.
    for key, length in (("idx", None if slot.storage.partial else saved["k"]),
                        ("ever_idx", None)):
        idx = saved.get(key)
        if idx is None:
            continue
        if key == "idx" and slot.compact:
            if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int16 or idx.dim() != 1:
                raise CheckpointError(f"{where}: idx must be packed (1-D int16) with compact_indices")
            try:
                packed, idx = idx, unpack_indices(idx, numel)
            except RuntimeError:
                raise CheckpointError(f"{where}: packed idx does not unpack to indices of {numel} entries") from None
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1 or (
                length is not None and idx.numel() != length):
            raise CheckpointError(f"{where}: {key} must be a 1-D integer tensor" + (f" of {length}" if length else ""))
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel or not bool((idx[1:] > idx[:-1]).all())):
            raise CheckpointError(f"{where}: {key} must be sorted, unique and in [0, {numel})")
        out[key] = idx.to(p.device if key == "idx" else LEDGER_DEVICE, index_dtype(numel))
        if key == "idx" and slot.compact:
            out[key] = packed.to(p.device)
    base = saved.get("base")
    if (base is None) != (saved.get("ever_idx") is None):
        raise CheckpointError(f"{where}: ledger indices and base values must be saved together")
    if base is not None:
        if not isinstance(base, torch.Tensor) or base.dtype != p.dtype or base.shape != saved["ever_idx"].shape:
            raise CheckpointError(f"{where}: base values must be {p.dtype}, one per ledger index")
        out["base"] = base.to(LEDGER_DEVICE)
    score = saved.get("score")
    if score is not None:
        # grad_snr keeps the window's sum and its sum of squares, stacked (siftune.core.budget)
        shape = (2, *slot.shape) if score_kind == "grad_snr" else slot.shape
        if not isinstance(score, torch.Tensor) or tuple(score.shape) != shape or not score.is_floating_point():
            raise CheckpointError(f"{where}: selection score must be a float tensor of shape {shape}")
        out["score"] = score.to(p.device)
    generator = saved.get("generator")
    if (not isinstance(generator, torch.Tensor) or generator.dtype != torch.uint8
            or generator.shape != slot.generator.get_state().shape):
        raise CheckpointError(f"{where}: random stream state is not a generator state of this torch")
    slot.storage.check_state(saved, where)
    if slot.input is not None:
        slot.input.check_state(saved, where)
    return out
