"""Loss landscapes: the task loss along random, filter-normalised directions around the weights.

After Li et al., "Visualizing the Loss Landscape of Neural Nets" (2018):
a direction has one Gaussian draw per weight, and each filter of it (a
row of a Linear or Embedding weight, an output channel of a Conv) is
rescaled to the norm of the same filter of the weights, so that a step
of 1 moves every filter by its own size. The directions span every weight
with at least two dimensions; 1-D parameters (biases, LayerNorm and
RMSNorm scales) get a zero direction, as in Li et al., because a bias
filter is a single number whose "norm" would only flip its sign.
``target_modules`` narrows the directions to the weights of those modules.

The loss at ``w + a*d1`` (1-D) and ``w + a*d1 + b*d2`` (2-D) is the mean
of the model's loss over a fixed set of batches. The weights are copied
back bit for bit afterwards, also when the run stops on an error or an
interrupt.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..core.select import find_targets
from . import inputs, plots, report
from .stats import amplitude_1d, amplitude_2d

DIMS = ("1", "2", "both")


@dataclass
class LandscapeArgs(inputs.AnalysisArgs):
    """:class:`AnalysisArgs` plus the slices' shape.

    Args:
        grid: points per axis of the 2-D slice (odd, so the weights themselves are a point).
        line_points: points of the 1-D slice (odd).
        span: the slices cover [-span, span] along each direction.
        dims: "1", "2" or "both" slices.

    ``target_modules`` defaults to every weight with two or more dimensions.
    """

    batches: int = field(default=1, metadata={"help": "batches the loss is averaged over (default: 1)"})
    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "modules whose weights the directions move, names or one regex "
                "(default: every weight with 2+ dimensions)"})
    grid: int = field(default=7, metadata={"help": "points per axis of the 2-D slice, odd (default: 7)"})
    line_points: int = field(default=17, metadata={"help": "points of the 1-D slice, odd (default: 17)"})
    span: float = field(default=1.0, metadata={"help": "slices cover [-span, span] (default: 1.0)"})
    dims: str = field(default="both", metadata={"help": "1, 2 or both (default: both)"})

    def validate(self) -> None:
        super().validate()
        for name in ("grid", "line_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 3 or value % 2 == 0:
                raise ConfigError(f"{name} must be an odd number of at least 3 (so the weights themselves "
                                  f"are a point), got {value!r}")
        if isinstance(self.span, bool) or not isinstance(self.span, (int, float)) or not self.span > 0:
            raise ConfigError(f"span must be a positive number, got {self.span!r}")
        if self.dims not in DIMS:
            raise ConfigError(f"dims must be one of {', '.join(DIMS)}, got {self.dims!r}")


def perturbed_weights(model, target_modules=None) -> dict[str, torch.nn.Parameter]:
    """The weights the directions span: every parameter with 2+ dims, or those of ``target_modules``.

    A weight shared by two modules (tied embeddings) appears once.
    """
    if target_modules is not None:
        targeted, _ = find_targets(model, target_modules)
        return targeted
    return {name: p for name, p in model.named_parameters() if p.dim() >= 2}


def filter_normalized_direction(weights: dict[str, torch.Tensor], generator: torch.Generator) -> dict:
    """A Gaussian direction whose every filter (slice along dim 0) has its weight filter's norm.

    Drawn on the CPU from ``generator`` in the order of ``weights``, so a
    seed gives the same direction on any device. A filter whose weights
    are all zero gets a zero direction.
    """
    direction = {}
    for name, weight in weights.items():
        if weight.dim() < 2:
            raise ConfigError(f"{name} has {weight.dim()} dimension(s); filter-wise directions need 2 or more")
        draw = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
        rows = draw.reshape(weight.shape[0], -1)
        target = weight.detach().float().cpu().reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        rows.mul_(target / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny))
        direction[name] = draw.to(device=weight.device, dtype=weight.dtype)
    return direction


def axis(points: int, span: float) -> np.ndarray:
    """``points`` evenly spaced coordinates over [-span, span], the middle one exactly 0."""
    half = (points - 1) // 2
    return span * (np.arange(points) - half) / half


@contextlib.contextmanager
def restored(weights: dict[str, torch.nn.Parameter]):
    """Copy ``weights`` on entry and copy them back on exit, however the block ends."""
    saved = {name: p.detach().clone() for name, p in weights.items()}
    try:
        yield saved
    finally:
        with torch.no_grad():
            for name, p in weights.items():
                p.copy_(saved[name])


@torch.no_grad()
def loss_slice(model, batches, weights: dict, directions: list[dict], coords: list[np.ndarray],
               progress: bool = False, desc: str = "landscape") -> np.ndarray:
    """Mean loss over ``batches`` at every point of the grid ``coords`` spans along ``directions``.

    One direction and axis give a 1-D array; two give a 2-D array indexed
    ``[i, j]`` = loss at ``w + coords[0][i] * d1 + coords[1][j] * d2``.
    """
    from tqdm.auto import tqdm

    if len(directions) != len(coords) or len(directions) not in (1, 2):
        raise ConfigError(f"a slice needs 1 or 2 directions with one axis each, got "
                          f"{len(directions)} directions and {len(coords)} axes")
    shape = tuple(len(c) for c in coords)
    losses = np.empty(shape)
    model.eval()
    bar = tqdm(total=losses.size, desc=desc, unit="point", disable=not progress, dynamic_ncols=True)
    with bar, restored(weights) as origin:
        for index in np.ndindex(*shape):
            steps = [(direction, float(c[i])) for direction, c, i in zip(directions, coords, index) if c[i] != 0]
            for name, p in weights.items():
                # The first step writes origin + step in one pass; at the origin
                # itself the weights are the saved copy, bit for bit.
                if steps:
                    torch.add(origin[name], steps[0][0][name], alpha=steps[0][1], out=p)
                else:
                    p.copy_(origin[name])
                for direction, step in steps[1:]:
                    p.add_(direction[name], alpha=step)
            losses[index] = inputs.mean_loss(model, batches)
            bar.update(1)
    return losses


def landscape_of(model, batches, args: LandscapeArgs, init: str, progress: bool = False) -> dict:
    """Loss at the weights, and the 1-D / 2-D slices ``args.dims`` asks for, with amplitude statistics."""
    weights = perturbed_weights(model, args.target_modules)
    generator = torch.Generator().manual_seed(args.seed)
    first = filter_normalized_direction(weights, generator)
    result = {"origin_loss": inputs.mean_loss(model.eval(), batches),
              "perturbed_tensors": len(weights), "perturbed_numel": sum(p.numel() for p in weights.values())}
    if args.dims in ("1", "both"):
        line = axis(args.line_points, args.span)
        losses = loss_slice(model, batches, weights, [first], [line], progress, desc=f"1-D ({init})")
        result["line"] = {"coords": line.tolist(), "loss": losses.tolist(), "stats": amplitude_1d(losses)}
    if args.dims in ("2", "both"):
        second = filter_normalized_direction(weights, generator)
        square = axis(args.grid, args.span)
        losses = loss_slice(model, batches, weights, [first, second], [square, square], progress,
                            desc=f"2-D ({init})")
        result["surface"] = {"coords": square.tolist(), "loss": losses.tolist(), "stats": amplitude_2d(losses)}
    return result


def analyze_landscape(args: LandscapeArgs, progress: bool = True) -> dict:
    """Run the landscape analysis as ``args`` says; writes and returns ``landscape.json``'s content.

    Also writes ``landscape_1d.png`` and/or ``landscape_2d_contour.png`` and
    ``landscape_2d_surface.png``, and ``landscape.md``, to ``args.output_dir``.
    """
    args.validate()
    started = time.perf_counter()
    model, batches = inputs.pretrained_and_batches(args)
    inits = {"pretrained": landscape_of(model, batches, args, "pretrained", progress)}
    if args.random_init:
        twin = inputs.random_twin(model, args.task, args.seed)
        del model
        inits["random"] = landscape_of(twin, batches, args, "random", progress)
    result = {
        "setup": {**args.setup(), "batches": len(batches), "grid": args.grid, "line_points": args.line_points,
                  "span": args.span, "dims": args.dims},
        "seconds": round(time.perf_counter() - started, 1),
        "inits": inits,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "landscape.json").write_text(json.dumps(report.json_ready(result), indent=1))
    if args.dims in ("1", "both"):
        plots.plot_line(result, out / "landscape_1d.png")
    if args.dims in ("2", "both"):
        plots.plot_contours(result, out / "landscape_2d_contour.png")
        plots.plot_surfaces(result, out / "landscape_2d_surface.png")
    (out / "landscape.md").write_text(report.landscape_markdown(result))
    return result
