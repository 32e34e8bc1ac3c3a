"""What the selection options cost: the selecting step's time and the global ranking's memory.

    python bench/selection_cost.py [--density 0.01] [--rounds 3]

On MiniLM-L6 (task (a)'s model, batch and targets) every variant takes its
selecting step (forward, backward with selection, update) and then one
ordinary step, in turns in one process on the same batches, so that they
meet the same load; medians over ``--rounds`` fresh attachments. For a
global budget it also records the most the pool held between two tensors
(score, position and gradient value of the candidates, plus the floors
kept), measured on the tensors themselves, and the bound the code
guarantees (3R candidates: it is trimmed back to R whenever it passes 2R).
Appends to bench/results/selection_cost.json.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from siftune import attach  # noqa: E402
from siftune.bench.runner import _load, _machine, append_json, plan  # noqa: E402
from siftune.bench.methods import HEADS, TARGETS, resolve_density  # noqa: E402
from siftune.core.budget import GlobalPool  # noqa: E402

VARIANTS = {
    "per_tensor, grad (the paper's)": {},
    "global, grad": {"budget": "global"},
    "global, grad, floor 10% of the share": {"budget": "global", "min_density": "tenth"},
    "per_tensor, grad_weight": {"score": "grad_weight"},
    "per_tensor, grad_squared, window 4": {"score": "grad_squared", "selection_batches": 4},
}


def pool_bytes(pool: GlobalPool) -> int:
    held = [t for part in pool.parts for t in part] + [t for pair in pool.kept.values() for t in pair]
    return sum(t.numel() * t.element_size() for t in held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--density", default="0.01", help="a density or 'matched' (default 0.01)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = plan("classification", [f"sift-fixed:{args.density}"], [0], threads=args.threads)[0]
    train_set, _, _, base, batches = _load(spec)
    density = resolve_density(base, "classification", spec.setting)
    stream = batches.train_forever(train_set)
    peak_pool = {}
    original_offer = GlobalPool.offer

    def offer(self, *a, **kw):  # measure the pool after each tensor's offer
        out = original_offer(self, *a, **kw)
        if out is None:
            peak_pool[id(self)] = max(peak_pool.get(id(self), 0), pool_bytes(self))
        return out

    GlobalPool.offer = offer
    seconds = {name: {"select": [], "step": []} for name in VARIANTS}
    pools = {}
    for round_ in range(args.rounds):
        window = [next(stream) for _ in range(4)]
        order = list(VARIANTS)[::1 if round_ % 2 == 0 else -1]
        for name in order:
            options = dict(VARIANTS[name])
            if options.get("min_density") == "tenth":
                options["min_density"] = density / 10
            model = copy.deepcopy(base).train()
            engine = attach(model, density=density, target_modules=TARGETS["classification"],
                            dense_modules=HEADS["classification"], max_grad_norm=1.0, **options)
            optimizer = engine.optimizer(lr=2e-3)
            steps = [window[i] for i in range(engine.config.selection_batches)] + [window[0]]
            for i, batch in enumerate(steps):
                started = time.perf_counter()
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                took = time.perf_counter() - started
                kind = "step" if i == len(steps) - 1 else "select"
                if kind == "select" and i == len(steps) - 2:
                    seconds[name]["select"].append(took)
                elif kind == "step":
                    seconds[name]["step"].append(took)
            if engine.selector.pool is not None:
                pool = engine.selector.pool
                pools[name] = {"pool_peak_bytes": peak_pool.pop(id(pool), 0),
                               "pool_bound_bytes": 16 * 3 * pool.rest + 12 * sum(pool.floors),
                               "per_tensor_counts": {s.name: s.k for s in engine.slots}}
            del model, engine, optimizer
    record = {"model": spec.model, "batch_size": spec.batch_size, "max_length": spec.max_length,
              "density": density, "rounds": args.rounds, "machine": _machine(args.threads),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "variants": {name: {"selecting_step_s": statistics.median(s["select"]),
                                  "next_step_s": statistics.median(s["step"]), **pools.get(name, {})}
                           for name, s in seconds.items()}}
    for name, v in record["variants"].items():
        extra = f", pool peak {v['pool_peak_bytes'] / 1e6:.2f} MB" if "pool_peak_bytes" in v else ""
        print(f"{name}: selecting step {v['selecting_step_s']:.2f} s, next step {v['next_step_s']:.2f} s{extra}")
    append_json(Path("bench/results/selection_cost.json"), record)


if __name__ == "__main__":
    main()
