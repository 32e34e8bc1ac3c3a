"""How a selection window is scored, and how the count of selected components is shared among tensors.

:class:`SiftConfig` picks, besides the window (``selection_batches``):

* ``score``: what ranks a component at the end of the window. ``"grad"``:
  |g| of the gradient summed over the window (the paper's); ``"grad_squared"``:
  g^2 of each micro-batch's gradient, summed over the window (a component
  whose gradient changes sign between batches ranks high too); ``"grad_weight"``:
  |g * w|, the window's gradient times the weight's value at selection (a
  first-order estimate of the loss change from zeroing the weight).
* ``budget``: ``"per_tensor"`` takes the top-k_i of each tensor (k_i its
  density share, the paper's); ``"global"`` ranks all targeted tensors
  together for the same total count, sum k_i, so that the tensors whose
  gradients are largest get more. ``min_density`` gives every tensor a floor.

A global selection never holds all dense gradients. Backward delivers the
tensors one at a time and each dense gradient is freed in its hook, so the
ranking is built as they arrive: a tensor keeps its floor (its top f_i) and
offers its next R = sum k_i - sum f_i best components to a running pool,
which keeps the R best it has seen. When the last tensor has arrived the pool
is exactly the global top-R. The pool holds score, position and gradient
value (16 B) for at most R components, during the selecting backward only.

Ties rank the lower flat position (tensor order, then index) first, so that
the dense :class:`siftune.ReferenceSift` gets the same selection.
"""
from __future__ import annotations

import torch

from .errors import ConfigError
from .select import index_dtype

SCORES = ("grad", "grad_squared", "grad_weight")
BUDGETS = ("per_tensor", "global")


def check_placement(config, sharded: bool, multi_process: bool) -> None:
    """ConfigError for options whose ranking this placement of the weights cannot compute."""
    if sharded and (config.score != "grad" or config.budget != "per_tensor"):
        raise ConfigError("score and budget options work on unsharded weights; on an FSDP2 model use "
                          "score='grad' and budget='per_tensor'")
    if multi_process and (config.score == "grad_squared" or config.budget == "global"):
        # Ranks hold their own gradients: a sum of squares over ranks is not the square of
        # the averaged gradient, and a global ranking's gradient values would stay on rank 0.
        raise ConfigError("score='grad_squared' and budget='global' run in one process; under torch.distributed "
                          "use budget='per_tensor' with score 'grad' or 'grad_weight'")


def rank_score(kind: str, score: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What components are ranked by (largest magnitude first), from the window's ``score``."""
    if kind == "grad_weight":
        return score.float() * weight.detach().float()
    return score  # grad: the window's sum; grad_squared: the window's sum of squares


def ranked(score: torch.Tensor, m: int) -> torch.Tensor:
    """Flat indices of the ``m`` largest entries of the 1-D ``score``: by score, then by index."""
    if m == 0:
        return torch.zeros(0, dtype=torch.long, device=score.device)
    threshold = torch.topk(score, m, sorted=False).values.min()
    above = (score > threshold).nonzero().squeeze(1)
    ties = (score == threshold).nonzero().squeeze(1)[:m - above.numel()]  # ascending: lowest index first
    idx = torch.cat([above, ties]).sort().values
    return idx[torch.sort(score[idx], descending=True, stable=True).indices]


class Selector:
    """The selection windows of an engine's targeted tensors, and the global ranking across them."""

    def __init__(self, config, slots):
        self.kind = config.score
        self.window = config.selection_batches
        # grad_squared needs each micro-batch's gradient, so autograd's .grad is
        # freed every micro-batch and this step's sum is kept here instead.
        self.sums: dict[str, torch.Tensor] = {}
        self.pool = GlobalPool(slots, config.min_density) if config.budget == "global" else None

    @property
    def frees_gradient(self) -> bool:
        """Whether a tensor's dense gradient may be freed in a window that is not complete yet."""
        return self.kind == "grad_squared"

    def fold(self, slot, grad: torch.Tensor):
        """Fold one micro-batch's ``grad`` into ``slot``'s window.

        Returns ``(gradient of this step, score)`` when the window is
        complete (``slot.seen`` counts it), else None.
        """
        if self.kind == "grad_squared":
            step = self.sums.pop(slot.name, None)
            step = grad if step is None else step + grad
            square = grad.float() ** 2
            slot.score = square if slot.score is None else slot.score.add_(square)
            if slot.seen < self.window:
                self.sums[slot.name] = step
                return None
        elif slot.seen < self.window:
            return None  # autograd goes on summing .grad
        else:
            step = grad
            slot.score = grad if slot.score is None else slot.score + grad
        score, slot.score = slot.score, None
        return step, rank_score(self.kind, score, slot.param)

    def end_step(self, slot) -> None:
        """A step ended inside ``slot``'s window: this step's gradient is not applied."""
        self.sums.pop(slot.name, None)


class GlobalPool:
    """One top-k over all targeted tensors, built as their gradients arrive (see the module's docstring)."""

    def __init__(self, slots, min_density: float):
        self.names = [s.name for s in slots]
        self.position = {name: i for i, name in enumerate(self.names)}
        self.numels = [s.numel for s in slots]
        self.counts = [s.k for s in slots]  # the per-tensor shares: their sum is the total
        self.floors = [int(round(n * min_density)) for n in self.numels]
        self.rest = sum(self.counts) - sum(self.floors)
        self.offsets = [sum(self.numels[:i]) for i in range(len(slots))]
        self.reset()

    def reset(self) -> None:
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scores = self.places = self.values = None

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
        flat, g = score.detach().reshape(-1).abs().float(), grad.reshape(-1)
        top = ranked(flat, min(flat.numel(), self.floors[i] + self.rest))
        floor, extra = top[:self.floors[i]], top[self.floors[i]:]
        self.kept[i] = (floor, g[floor])
        scores, places, values = flat[extra], extra + self.offsets[i], g[extra].float()
        if self.scores is not None:
            scores = torch.cat([self.scores, scores])
            places = torch.cat([self.places, places])
            values = torch.cat([self.values, values])
        by_place = torch.argsort(places)
        best = by_place[torch.sort(scores[by_place], descending=True, stable=True).indices[:self.rest]]
        self.scores, self.places, self.values = scores[best], places[best], values[best]
        if len(self.kept) < len(self.numels):
            return None
        return self._split()

    def missing(self) -> list[str]:
        """Names of the tensors that have not offered yet."""
        return [name for i, name in enumerate(self.names) if i not in self.kept]

    def _split(self):
        out = []
        for i, (floor, picked) in sorted(self.kept.items()):
            mine = (self.places >= self.offsets[i]) & (self.places < self.offsets[i] + self.numels[i])
            idx = torch.cat([floor, self.places[mine] - self.offsets[i]])
            grad = torch.cat([picked, self.values[mine].to(picked.dtype)])
            order = torch.argsort(idx)
            out.append((idx[order].to(index_dtype(self.numels[i])), grad[order]))
        self.reset()
        return out
