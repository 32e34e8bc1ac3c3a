"""SIFT chosen by a scale-free score: the correlation between a weight's output gradient and its input.

    python bench/correlation_score.py causal_lm 3.2e-3          # (b), seed 0, one rate
    python bench/correlation_score.py classification 1e-3 --seed 1

For a linear layer y = W x over the window's tokens t, the gradient of W_ij
is sum_t d_it x_jt (d: the gradient at the output). With the Kronecker
(K-FAC) diagonal of the curvature, sum_t d_it^2 * sum_t x_jt^2, the loss
drop of a Newton step on W_ij alone is proportional to

    (sum_t d_it x_jt)^2 / (sum_t d_it^2 * sum_t x_jt^2),

the squared correlation of output gradient i with input feature j. It does
not grow with the scale of either, where |g|, |g w| and the Fisher ranking
pile onto the columns of the few large input features
(docs/selection.md). This script ranks by it: the same run as ``siftune
bench --task TASK --methods sift-fixed:matched --sift selection_batches=16
select_first=1`` (16 micro-batches before training, LoRA r=8's count), with
the window's per-column sum of x^2 and per-row sum of d^2 gathered by
forward hooks on every nn.Linear and the engine's ranking of the window's
summed gradient (``siftune.core.budget.rank_score``, where the default
score multiplies it by the weight) replaced by the correlation. Not a SiftConfig option: the sweep
(docs/selection.md) measured it, and it does not beat random components.
Records merge into bench/results/correlation_score/<task>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from siftune.bench import runner
from siftune.core import budget

OUT = Path(__file__).parent / "results" / "correlation_score"


class WindowStats:
    """Per-column sum of x^2 and per-row sum of d^2 of every nn.Linear, gathered until the first ranking."""

    def __init__(self):
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.name_of: dict[int, str] = {}
        self.gathering = True

    def hook(self, model: torch.nn.Module) -> None:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                self.name_of[id(module.weight)] = name
                self.sums[name] = [torch.zeros(module.in_features), torch.zeros(module.out_features)]
                module.register_forward_hook(self._forward(name))

    def _forward(self, name: str):
        def hook(module, args, output):
            if not self.gathering or not torch.is_grad_enabled():
                return
            x = args[0].detach().float()
            self.sums[name][0] += (x * x).reshape(-1, x.shape[-1]).sum(0)
            if output.requires_grad:
                def backward(grad):
                    d = grad.detach().float()
                    self.sums[name][1] += (d * d).reshape(-1, d.shape[-1]).sum(0)
                output.register_hook(backward)
        return hook

    def rank(self, kind: str, score: torch.Tensor, store) -> torch.Tensor:
        """|sum_t d_i x_j| / sqrt(sum_t d_i^2 sum_t x_j^2) for the window's summed gradient ``score``."""
        # With score="grad" or "grad_weight" the engine hands over the window's summed gradient.
        if kind not in ("grad", "grad_weight"):
            raise SystemExit(f"the correlation ranks the window's summed gradient, not a {kind} score")
        columns, rows = self.sums[self.name_of[id(store.trainable)]]
        self.gathering = False  # every micro-batch of the window has been through its backward
        return score.float().abs() / (rows[:, None] * columns[None, :]).sqrt().clamp_min(1e-30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=["classification", "causal_lm"])
    p.add_argument("lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="default: bench/results/correlation_score/<task>.json")
    ns = p.parse_args(argv)
    stats = WindowStats()
    load = runner._load

    def hooked_load(spec):
        loaded = load(spec)
        stats.hook(loaded[3])
        return loaded

    runner._load, budget.rank_score = hooked_load, stats.rank
    steps = 300 if ns.task == "classification" else 40
    spec = runner.plan(ns.task, ["sift-fixed:matched"], [ns.seed], steps=steps, threads=1,
                       lr=[f"sift-fixed={ns.lr}"], sift=["selection_batches=16", "select_first=1"])[0]
    record = runner.run_one(spec)
    record["score"] = "correlation (K-FAC diagonal Newton gain)"
    record["command"] = f"python bench/correlation_score.py {ns.task} {ns.lr:g} --seed {ns.seed}"
    out = ns.output or OUT / f"{ns.task}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    runner.merge_records(out, [record])
    print(json.dumps({k: record[k] for k in ("task", "lr", "seed", "val_value", "value")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
