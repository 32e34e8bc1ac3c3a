"""How much a better choice of components could give at a density: SIFT on the components a whole training run moved most.

    python bench/selection_ceiling.py source --method full --lr 5e-5 --out DIR        # train, keep each weight's change
    python bench/selection_ceiling.py train --changes DIR/changes.pt --density 0.001 --lr 3.2e-2 --dense-lr 4e-3 \
        [--sift selection=balanced line_cap=1 step_scale=input] [--seed 0] --out DIR

Task (a) (MiniLM-L6 on Rotten Tomatoes, 300 steps, the sweep's split and validation set).
``source`` runs one method (``full``, or ``sift-fixed:D`` with ``--sift``) as ``siftune bench`` does and
saves each targeted weight's change over the run (``changes.pt``) beside its record. ``train`` then runs
SIFT at ``--density`` with the components ranked by the size of that change instead of by the first
batch's gradient (the selection rule, balanced or top-k, is the config's): an oracle that has seen a
whole training run, not a method, since it needs that run first (the lottery-ticket recipe of
Ansell et al., 2022). Its record, with ``"ranking": "change of <source>"``, is appended to
``DIR/classification.json``. If it does no better than the first batch's gradient, no selection rule
from the gradient can: the count, not the choice, limits the quality.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from siftune.bench import runner
from siftune.bench.methods import TARGETS
from siftune.core import budget
from siftune.core.select import find_targets

TASK = "classification"


def _spec(method: str, lr: float, dense_lr: float, seed: int, sift: list[str], steps: int | None = None) -> runner.RunSpec:
    (spec,) = runner.plan(TASK, [method], [seed], lr=[f"{method.split(':')[0]}={lr}"],
                          dense_lr=[f"{method.split(':')[0]}={dense_lr}"], threads=1, sift=sift, steps=steps)
    return spec


def _save(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    runner.append_json(out / f"{TASK}.json", record)
    print(json.dumps({k: record[k] for k in ("method", "setting", "sift", "lr", "dense_lr", "seed", "val_value",
                                             "value")}))


def source(ns) -> None:
    """Train one method and keep each targeted weight's change."""
    changes, original = {}, runner.train_steps

    def kept(model, optimizer, stream, steps):
        names = find_targets(model, TARGETS[TASK])[0]
        before = {n: p.detach().clone() for n, p in names.items()}
        out = original(model, optimizer, stream, steps)
        for n, p in names.items():
            changes[n] = (p.detach().float() - before[n].float()).cpu()
        return out

    runner.train_steps = kept
    record = runner.run_one(_spec(ns.method, ns.lr, ns.dense_lr, ns.seed, ns.sift, ns.steps))
    ns.out.mkdir(parents=True, exist_ok=True)
    torch.save(changes, ns.out / "changes.pt")
    record["role"] = "source"
    _save(ns.out, record)


def train(ns) -> None:
    """SIFT at a density on the components the source run changed most."""
    changes = torch.load(ns.changes)
    missing = []

    def ranked(self, slot, score):
        if slot.name not in changes:
            missing.append(slot.name)
            return score
        return changes[slot.name].abs().to(score.device).reshape(score.shape)

    budget.Selector.ranked = ranked
    spec = _spec(f"sift-fixed:{ns.density}", ns.lr, ns.dense_lr, ns.seed, ns.sift)
    record = runner.run_one(spec)
    if missing:
        sys.exit(f"no change saved for {missing[:3]}...: the source run targeted other weights")
    record["ranking"] = f"change of {ns.changes}"
    _save(ns.out, record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("source", "train"):
        p = sub.add_parser(name)
        p.add_argument("--lr", type=float, required=True)
        p.add_argument("--dense-lr", type=float, default=2e-3)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--sift", nargs="*", default=[])
        p.add_argument("--out", type=Path, required=True)
    sub.choices["source"].add_argument("--method", default="full")
    sub.choices["source"].add_argument("--steps", type=int, default=None, help="the task's 300 unless given")
    sub.choices["train"].add_argument("--changes", type=Path, required=True)
    sub.choices["train"].add_argument("--density", type=float, required=True)
    ns = parser.parse_args()
    (source if ns.command == "source" else train)(ns)


if __name__ == "__main__":
    main()
