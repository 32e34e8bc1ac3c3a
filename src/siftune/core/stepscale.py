"""``SiftConfig.step_scale="input"``: each selected component's step scaled by its input feature's size.

AdamW moves every trained component by about the rate, whatever the scale of
its input. Component (i, j) of a Linear weight changes the layer's output by
its step times input feature j, so a component on a large input feature moves
the output many times more than one on a typical feature. With this option
each targeted tensor keeps one factor per input feature,

    s_j = median(r) / r_j, held within [1 / LIMIT, LIMIT],

where r_j is the root mean square of input feature j over the selection
window's tokens (a forward hook on the layer sums x_j^2 while its window is
open), and the optimizer multiplies component (i, j)'s rate by s_j. The
factors are taken anew with each selection; under several processes from the
window's inputs of them all. :class:`siftune.core.reference.ReferenceSift`
spells the same out densely (:func:`factors`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..parallel import distributed

LIMIT = 10.0  # the factors lie within [1 / LIMIT, LIMIT]


def feature_axis(module: nn.Module, name: str) -> int:
    """The axis of ``module``'s logical weight that runs over its input features; ConfigError if it has none."""
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight (in, out)
        return 0
    if isinstance(module, nn.Linear):  # and its quantized subclasses: weight (out, in)
        return 1
    raise ConfigError(f"step_scale='input' scales steps by a Linear layer's input features; {name} is a "
                      f"{type(module).__name__}: target Linear layers only, or leave step_scale=None")


def scalable(model: nn.Module, names) -> bool:
    """Whether every weight in ``names`` (qualified parameter names) sits in a layer with input features,
    which ``step_scale="input"`` needs (``SiftConfig.resolve``'s ``scalable``)."""
    try:
        for name in names:
            feature_axis(model.get_submodule(name.rpartition(".")[0]), name)
    except ConfigError:
        return False
    return True


def factors(sum_sq: torch.Tensor, count: int) -> torch.Tensor:
    """median(r) / r_j within [1 / LIMIT, LIMIT], r the features' root mean square; ones without tokens."""
    if count == 0:
        return torch.ones_like(sum_sq)
    rms = (sum_sq / count).sqrt()
    return (rms.median() / rms.clamp_min(torch.finfo(torch.float32).tiny)).clamp(1 / LIMIT, LIMIT)


class InputScale:
    """One targeted layer's window statistics and step factors."""

    def __init__(self, module: nn.Module, name: str, shape: tuple[int, int], is_open):
        self.axis = feature_axis(module, name)
        self.shape = shape  # the logical weight's (this rank's rows on shards are refused at attach)
        self.features = shape[self.axis]
        self.is_open = is_open  # () -> bool: is the layer's selection window open
        self.sum_sq: torch.Tensor | None = None  # the open window's sum of x_j^2 over its tokens
        self.count = 0  # and how many tokens
        self.scale: torch.Tensor | None = None  # the factors of the selection in force (fp32, one a feature)
        self.before: torch.Tensor | None = None  # those of the selection before this step's (undone if skipped)
        self._handle = module.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        if not (torch.is_grad_enabled() and self.is_open()) or not args:
            return
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])
        # sum of squares per feature in fp32, without an fp32 copy or a square of the whole input
        sums = torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).square()
        self.sum_sq = sums if self.sum_sq is None else self.sum_sq.add_(sums)
        self.count += x.shape[0]

    def take(self) -> torch.Tensor:
        """The window's factors (summed over the processes first); the window's sums start again."""
        sum_sq = self.sum_sq if self.sum_sq is not None else torch.zeros(self.features)
        count = torch.tensor([float(self.count)], device=sum_sq.device)
        if distributed.world_size() > 1:
            both = torch.cat([sum_sq.float(), count])
            distributed.all_reduce(both)
            sum_sq, count = both[:-1], both[-1:]
        self.forget()
        return factors(sum_sq.float(), int(count.item()))

    def forget(self) -> None:
        """Drop the open window's sums (a window started again)."""
        self.sum_sq, self.count = None, 0

    def at(self, idx: torch.Tensor) -> torch.Tensor | None:
        """The factor in force of each flat index in ``idx`` (of the logical weight); None before any."""
        if self.scale is None:
            return None
        idx = idx.long()
        feature = idx % self.shape[1] if self.axis == 1 else idx // self.shape[1]
        return self.scale.to(idx.device)[feature]

    def state(self) -> dict:
        return {"step_scale": self.scale, "input_sum_sq": self.sum_sq, "input_count": self.count}

    def check_state(self, saved: dict, where: str) -> None:
        """CheckpointError unless ``saved`` holds :meth:`state` of this layer (a checkpoint from before the
        option holds none of it: no factors yet)."""
        for key in ("step_scale", "input_sum_sq"):
            value = saved.get(key)
            if value is not None and (not isinstance(value, torch.Tensor) or value.dtype != torch.float32
                                      or tuple(value.shape) != (self.features,)):
                raise CheckpointError(f"{where}: {key} must be a float32 tensor of {self.features} values")
        count = saved.get("input_count", 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise CheckpointError(f"{where}: input_count {count!r} must be an integer >= 0")

    def load_state(self, saved: dict, device: torch.device) -> None:
        """Restore :meth:`state`, checked by :meth:`check_state`."""
        scale, sum_sq = saved.get("step_scale"), saved.get("input_sum_sq")
        self.scale = None if scale is None else scale.to(device)
        self.sum_sq = None if sum_sq is None else sum_sq.to(device)
        self.count = saved.get("input_count", 0)

    def remove(self) -> None:
        self._handle.remove()
