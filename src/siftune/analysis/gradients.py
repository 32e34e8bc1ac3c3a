"""Gradient quasi-sparsity: how much of the task gradient's norm its largest components hold.

The gradient is the one SIFT selects from: the task loss's gradient summed
over the chosen batches, on the weights SIFT targets by default (every
``nn.Linear`` but a classification head). For the pretrained model and,
side by side, the same architecture with random weights, it reports per
tensor, per module type and pooled over the whole model: the share of
the squared norm in the top 0.1 / 1 / 5 / 10 % of components, the
smallest fraction holding 50 / 90 / 99 % of it, and the density at which
SIFT's per-tensor selection keeps a target share.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..core.select import HEAD_NAMES, find_targets
from ..recipes.loss import batch_loss
from . import inputs, plots, report
from .stats import TOP_FRACTIONS, Concentration, density_for_share, selection_share

# A layer index is a dotted name component made of digits ("encoder.layer.3.attention...").
_LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class GradientArgs(inputs.AnalysisArgs):
    """:class:`AnalysisArgs` plus the norm share that the suggested density must keep.

    ``target_modules`` defaults to SIFT's default targets.
    """

    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "modules whose weights are analysed, names or one regex (default: every Linear but the head)"})
    target_share: float = field(default=0.9, metadata={
        "help": "share of the squared norm the suggested density must keep (default: 0.9)"})

    def validate(self) -> None:
        super().validate()
        if isinstance(self.target_share, bool) or not isinstance(self.target_share, (int, float)) \
                or not 0 < self.target_share <= 1:
            raise ConfigError(f"target_share must be a number in (0, 1], got {self.target_share!r}")


def targeted_weights(model, task: str, target_modules=None) -> dict[str, torch.nn.Parameter]:
    """The weights SIFT would target: ``find_targets`` with the classification head left out."""
    children = {name for name, _ in model.named_children()}
    head = [name for name in HEAD_NAMES if name in children] if task == "classification" else []
    targeted, _ = find_targets(model, target_modules, dense_modules=head)
    return targeted


def accumulated_gradient(model, batches, params: dict, progress: bool = False,
                         desc: str = "gradient", squares: dict | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """``(gradients, mean loss)``: the loss's gradient summed over ``batches``, for ``params`` only.

    The model's ``.grad`` fields are left alone (``torch.autograd.grad``
    returns the gradient instead), and a parameter the loss does not reach
    gets zeros. ``squares``, a dict, receives each batch's gradient squared
    and summed over the batches (fp32), by parameter name.
    """
    from tqdm.auto import tqdm

    names, tensors = list(params), list(params.values())
    flags = [p.requires_grad for p in tensors]
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
    if squares is not None:
        squares.update((n, torch.zeros_like(p, dtype=torch.float32)) for n, p in params.items())
    loss_sum = 0.0
    try:
        for p in tensors:
            p.requires_grad_(True)
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
            loss = batch_loss(model, batch)
            pieces = torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True)
            for name, total, piece in zip(names, sums, pieces):
                total.add_(piece.float())
                if squares is not None:
                    squares[name].add_(piece.float() ** 2)
            loss_sum += float(loss.detach())
    finally:
        for p, flag in zip(tensors, flags):
            p.requires_grad_(flag)
    return dict(zip(names, sums)), loss_sum / len(batches)


def layer_and_type(name: str) -> tuple[int | None, str]:
    """Layer index and module type of a weight: ``a.layer.3.attn.q.weight`` -> ``(3, "attn.q")``.

    A weight outside the numbered blocks (a pooler, an LM head) has layer
    None and its module name as type.
    """
    module = name.removesuffix(".weight")
    match = _LAYER.search(module)
    if match is None:
        return None, module
    return int(match.group(1)), module[match.end():]


def concentration_report(gradients: dict[str, torch.Tensor], target_share: float,
                         progress: bool = False, desc: str = "statistics") -> dict:
    """Every concentration statistic of a set of named gradients, as a JSON-ready dict.

    ``tensors``: per tensor; ``module_types``: pooled over the tensors of one
    module type, with curve; ``whole_model``: pooled over everything, with
    curve; ``sift_selection``: what SIFT's per-tensor selection keeps at
    each top fraction, with curve; ``suggested_density``: the density at
    which that selection keeps ``target_share``; ``pooled_fraction_for_target``:
    the fraction a single global top-k would need for the same share.
    """
    from tqdm.auto import tqdm

    parts, tensors, by_type = [], {}, {}
    for name, gradient in tqdm(gradients.items(), desc=desc, unit="tensor", disable=not progress,
                               dynamic_ncols=True):
        part = Concentration(gradient)
        layer, module_type = layer_and_type(name)
        tensors[name] = {"shape": list(gradient.shape), "layer": layer, "module_type": module_type,
                         **part.summary()}
        parts.append(part)
        by_type.setdefault(module_type, []).append(name)
    module_types = {}
    for module_type, names in by_type.items():
        pooled = Concentration(torch.cat([gradients[n].reshape(-1) for n in names]))
        module_types[module_type] = {"tensors": len(names), **pooled.summary(), "curve": pooled.curve()}
    whole = Concentration(torch.cat([g.reshape(-1) for g in gradients.values()]))
    curve = whole.curve()
    return {
        "whole_model": {**whole.summary(), "curve": curve},
        "sift_selection": {
            "top_share": {str(f): selection_share(parts, f) for f in TOP_FRACTIONS},
            "curve": {"fraction": curve["fraction"],
                      "share": [selection_share(parts, f) for f in curve["fraction"]]},
        },
        "suggested_density": density_for_share(parts, target_share),
        "pooled_fraction_for_target": whole.fraction_for_share(target_share),
        "module_types": module_types,
        "tensors": tensors,
    }


def analyze_model(model, batches, args: GradientArgs, init: str, progress: bool = False) -> dict:
    """The statistics of one model's gradient (``init`` names it in progress bars)."""
    params = targeted_weights(model, args.task, args.target_modules)
    gradients, loss = accumulated_gradient(model, batches, params, progress, desc=f"gradient ({init})")
    result = concentration_report(gradients, args.target_share, progress, desc=f"statistics ({init})")
    return {"loss": loss, **result}


def analyze_gradients(args: GradientArgs, progress: bool = True) -> dict:
    """Run the gradient analysis as ``args`` says; writes and returns ``gradients.json``'s content.

    Also writes ``gradients_cumulative.png``, ``gradients_layers.png`` and
    ``gradients.md`` to ``args.output_dir``.
    """
    args.validate()
    started = time.perf_counter()
    model, batches = inputs.pretrained_and_batches(args)
    inits = {"pretrained": analyze_model(model, batches, args, "pretrained", progress)}
    if args.random_init:
        twin = inputs.random_twin(model, args.task, args.seed)
        del model  # only one model's gradients need be in memory at a time
        inits["random"] = analyze_model(twin, batches, args, "random", progress)
    result = {
        "setup": {**args.setup(), "batches": len(batches), "target_share": args.target_share},
        "seconds": round(time.perf_counter() - started, 1),
        "inits": inits,
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradients.json").write_text(json.dumps(report.json_ready(result), indent=1))
    plots.plot_cumulative(result, out / "gradients_cumulative.png")
    plots.plot_layers(result, out / "gradients_layers.png")
    (out / "gradients.md").write_text(report.gradients_markdown(result))
    return result
