"""How a selection window is scored, and how the count of selected components is shared among tensors.

:class:`SiftConfig` picks, besides the window (``selection_batches``):

* ``score``: what ranks a component at the end of the window. ``"grad"``:
  |g| of the gradient summed over the window (the paper's); ``"grad_squared"``:
  g^2 of each micro-batch's gradient, summed over the window (a component
  whose gradient changes sign between batches ranks high too); ``"grad_weight"``:
  |g * w|, the window's gradient times the weight's value at selection (a
  first-order estimate of the loss change from zeroing the weight); ``"grad_snr"``:
  |sum g| / sqrt(sum g^2) over the window's micro-batches, the gradient's
  signal-to-noise ratio. With the empirical Fisher diagonal sum g^2 / N as
  the curvature, a Newton step on one component lowers the loss by
  (sum g / N)^2 / (2 sum g^2 / N), a function of this ratio alone: it does
  not grow with the component's scale (an input feature with large
  activations scales a whole column's gradients, and |g| piles the
  selection onto those columns). It needs a window of two micro-batches or
  more.
* ``budget``: ``"per_tensor"`` takes the top-k_i of each tensor (k_i its
  density share, the paper's); ``"global"`` ranks all targeted tensors
  together for the same total count, sum k_i, so that the tensors whose
  gradients are largest get more. ``min_density`` gives every tensor a floor.

A global selection never holds all dense gradients. Backward delivers the
tensors one at a time and each dense gradient is freed in its hook, so the
ranking is built as they arrive: a tensor keeps its floor (its top f_i) and
offers its next R = sum k_i - sum f_i best components to a running pool.
The pool is cut back to the R best (by a top-k threshold, no sort) whenever
it passes 2R, and a tensor offers only what reaches the last cut's R-th best
score, so it holds at most 3R entries (score, position, gradient value: 16 B
each), during the selecting backward only. When the last tensor has arrived
it is cut to exactly the global top-R.

On FSDP2 shards each rank pools its own rows' candidates. After each
tensor the ranks add up their pool sizes (one scalar all-reduce); once the
sum passes 2R, every rank drops its entries below the R-th best of all
ranks' (found bit by bit, :func:`siftune.parallel.distributed.cut_over_ranks`). The
ranks' pools so hold at most 2R entries together, plus one tensor's offers:
a rank holds about its share of the ranking (2R/N of N ranks), not R of its
own. The last cut over the ranks takes ties in global model order.

Ties rank the lower flat position (tensor order, then index) first, so that
the dense :class:`siftune.ReferenceSift` gets the same selection.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .select import index_dtype, top_set

SCORES = ("grad", "grad_squared", "grad_weight", "grad_snr")
PER_BATCH = ("grad_squared", "grad_snr")  # scores that need each micro-batch's gradient on its own
BUDGETS = ("per_tensor", "global")


def rank_score(kind: str, score: torch.Tensor, store) -> torch.Tensor:
    """What components are ranked by (largest magnitude first), from the window's ``score`` and the
    weight's storage (``siftune.core.storage``: its values now, for grad_weight)."""
    if kind == "grad_weight":
        return score.float() * store.current_weight().float()
    return score  # grad: the window's sum; grad_squared: the window's sum of squares; grad_snr: the ratio


def change_ranking(change: tuple[torch.Tensor, torch.Tensor], shape, device) -> torch.Tensor:
    """A dense ranking of ``shape`` from :func:`earlier_changes`' entry: |change| where it changed, else 0."""
    indices, sizes = change
    ranking = torch.zeros(shape, dtype=torch.float32, device=device)
    ranking.view(-1)[indices.to(device)] = sizes.to(device)
    return ranking


def signal_to_noise(total: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
    """|sum g| / sqrt(sum g^2) in fp32, 0 where every micro-batch's gradient was 0."""
    return total.float().abs() / squares.sqrt().clamp_min(torch.finfo(torch.float32).tiny)


class Selector:
    """The selection windows of an engine's targeted tensors, and the global ranking across them.

    ``over_ranks``, under torch.distributed, sums a tensor over the ranks: a
    rank's gradient of a whole (unsharded) weight is that of its own slice of
    each micro-batch, so the ranking is taken from the score of the combined
    batch, the same on every rank. FSDP2 shards need none: their gradient is
    averaged already.
    """

    def __init__(self, config, slots, over_ranks=None):
        self.kind = config.score
        self.window = config.selection_batches
        self.over_ranks = over_ranks
        # grad_squared and grad_snr need each micro-batch's gradient, so autograd's
        # .grad is freed every micro-batch and this step's sum is kept here instead.
        self.sums: dict[str, torch.Tensor] = {}
        self.pool = GlobalPool(slots, config.min_density) if config.budget == "global" else None

    @property
    def frees_gradient(self) -> bool:
        """Whether a tensor's dense gradient may be freed in a window that is not complete yet."""
        return self.kind in PER_BATCH

    def fold(self, slot, grad: torch.Tensor):
        """Fold one micro-batch's ``grad`` into ``slot``'s window.

        Returns ``(gradient of this step, score)`` when the window is
        complete (``slot.seen`` counts it), else None.
        """
        if self.kind in PER_BATCH:
            step = self.sums.pop(slot.name, None)
            step = grad if step is None else step + grad
            # The combined micro-batch's gradient is squared, not each rank's own (summed over
            # the ranks, not averaged: the same ranking). grad_snr keeps the window's sum beside
            # the squares (one tensor, so that every reset of the score resets both).
            combined = self._combined(slot, grad).float()
            term = combined ** 2 if self.kind == "grad_squared" else torch.stack([combined, combined ** 2])
            slot.score = term if slot.score is None else slot.score.add_(term)
            if slot.seen < self.window:
                self.sums[slot.name] = step
                return None
        elif slot.seen < self.window:
            return None  # autograd goes on summing .grad
        else:
            step = grad
            slot.score = grad if slot.score is None else slot.score + grad
        score, slot.score = slot.score, None
        if self.kind == "grad_snr":
            score = signal_to_noise(score[0], score[1])
        return step, rank_score(self.kind, score, slot.storage)

    def ranked(self, slot, score: torch.Tensor) -> torch.Tensor:
        """``slot``'s window ``score`` as every rank ranks it: a rank's own summed over the ranks (a
        grad_squared or grad_snr score is taken over them per micro-batch already)."""
        return score if self.kind in PER_BATCH else self._combined(slot, score)

    def _combined(self, slot, t: torch.Tensor) -> torch.Tensor:
        if self.over_ranks is None or slot.storage.averaged_over_ranks:
            return t
        return self.over_ranks(t)

    def end_step(self, slot) -> None:
        """A step ended inside ``slot``'s window: this step's gradient is not applied."""
        self.sums.pop(slot.name, None)


class GlobalPool:
    """One top-k over all targeted tensors, built as their gradients arrive (see the module's docstring)."""

    def __init__(self, slots, min_density: float):
        self.names = [s.name for s in slots]
        self.position = {name: i for i, name in enumerate(self.names)}
        self.numels = [s.numel for s in slots]  # on FSDP2 shards: this rank's part
        self.counts = [s.k for s in slots]  # the per-tensor shares: their sum is the total
        self.floors = [int(round(s.storage.full_numel * min_density)) for s in slots]
        # On FSDP2 shards every rank pools its own rows' candidates; the floors and the final
        # cut are then taken over the ranks (siftune.parallel.distributed).
        self.shards = [s.storage for s in slots] if slots[0].storage.partial else None
        self.rest = sum(self.counts) - sum(self.floors)
        self.offsets = [sum(self.numels[:i]) for i in range(len(slots))]
        self.peak = 0  # the most entries this rank's pool has held at once
        self.reset()

    def reset(self) -> None:
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (scores, places, gradient values)
        self.pooled = 0
        self.cut = None  # the R-th best score pooled so far: nothing below it can enter

    def offer(self, slot, score: torch.Tensor, grad: torch.Tensor):
        """``slot``'s window is complete: keep its floor, pool its best others.

        Returns, once every tensor has offered, one ``(indices, gradient at
        them)`` per tensor in model order (indices sorted); else None.
        """
        i = self.position[slot.name]
        if i in self.kept:
            raise ConfigError(f"budget='global': {slot.name} got a gradient again before every targeted tensor "
                              f"got one ({self.missing()[0]} got none); target only weights the loss depends on, "
                              "or use budget='per_tensor'")
        flat, g = score.detach().reshape(-1).abs().float(), grad.reshape(-1)  # abs(): a copy of our own
        if self.shards is None:
            floor = top_set(flat, self.floors[i])
        elif self.floors[i]:  # this rank's part of the whole tensor's top f_i
            floor = self.shards[i].top_k(flat, self.floors[i]).long()
        else:
            floor = torch.zeros(0, dtype=torch.long, device=flat.device)
        self.kept[i] = (floor, g[floor])
        flat[floor] = -1.0  # scores are >= 0: the floor is out of the pool's ranking
        extra = top_set(flat, min(flat.numel() - floor.numel(), self.rest), self.cut)
        self.parts.append((flat[extra], extra + self.offsets[i], g[extra].float()))
        self.pooled += extra.numel()
        self.peak = max(self.peak, self.pooled)
        if self.shards is not None:
            self._cut_over_ranks()
        elif self.pooled > 2 * self.rest:  # trimmed now and then, not at every tensor: fewer passes
            self._trim()
        if len(self.kept) < len(self.numels):
            return None
        self._trim()
        return self._split()

    def _trim(self) -> None:
        """Keep the R best pooled; among equal scores the lower places (model order, then index)."""
        scores, places, values = (torch.cat(part) for part in zip(*self.parts))
        if scores.numel() > self.rest:
            value = torch.topk(scores, self.rest, sorted=False).values.min()
            keep = (scores > value).nonzero().squeeze(1)
            ties = (scores == value).nonzero().squeeze(1)
            keep = torch.cat([keep, ties[torch.argsort(places[ties])[:self.rest - keep.numel()]]])
            scores, places, values = scores[keep], places[keep], values[keep]
            self.cut = value
        self.parts, self.pooled = [(scores, places, values)], scores.numel()

    def _cut_over_ranks(self) -> None:
        """FSDP2 shards: once the ranks' pools together pass 2R entries, each rank drops what is below the
        R-th best of all of them, so that a rank holds about its share of the ranking, not R of its own."""
        from ..parallel.distributed import cut_over_ranks, sum_across_ranks

        group = self.shards[0].group
        if sum_across_ranks([self.pooled], group)[0] <= 2 * self.rest:
            return
        scores, places, values = (torch.cat(part) for part in zip(*self.parts))
        value = cut_over_ranks(scores, self.rest, group)
        keep = (scores >= value).nonzero().squeeze(1)  # ties stay: the last cut takes them in model order
        self.parts, self.pooled, self.cut = [(scores[keep], places[keep], values[keep])], keep.numel(), value

    def missing(self) -> list[str]:
        """Names of the tensors that have not offered yet."""
        return [name for i, name in enumerate(self.names) if i not in self.kept]

    def _split(self):
        scores, places, values = self.parts[0]
        if self.shards is not None:  # this rank's part of the R best over all ranks
            order = torch.argsort(places)
            scores, places, values = scores[order], places[order], values[order]
            offsets = torch.tensor(self.offsets, device=places.device)
            tensors = torch.bucketize(places, offsets, right=True) - 1
            from ..parallel.distributed import top_over_ranks

            keep = top_over_ranks(scores, tensors, len(self.numels), self.rest, self.shards[0].group)
            places, values = places[keep], values[keep]
        order = torch.argsort(places)
        places, values = places[order], values[order]
        offsets = torch.tensor(self.offsets, device=places.device)
        counts = torch.bincount(torch.bucketize(places, offsets, right=True) - 1, minlength=len(self.numels))
        out = []
        for i, (mine, picked) in enumerate(zip(torch.split(places, counts.tolist()),
                                               torch.split(values, counts.tolist()))):
            floor, floor_grad = self.kept[i]
            idx = torch.cat([floor, mine - self.offsets[i]])
            grad = torch.cat([floor_grad, picked.to(floor_grad.dtype)])
            order = torch.argsort(idx)
            out.append((idx[order].to(index_dtype(self.numels[i])), grad[order]))
        self.reset()
        return out
