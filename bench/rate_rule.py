"""How far `siftune train`'s default rate (``siftune.recipes.train.default_lr``) lands from the rates the
density sweep chose on validation (bench/results/sweep/, seed 0).

    python bench/rate_rule.py [--results-dir bench/results/sweep] [--fit]

For every grid of two or more rates (one method and selection at one density, the task's own length) the
rule's rate is taken to the nearest rate that ran (on a log scale), and the validation score there is set
beside the grid's best: the shortfall is in accuracy points on (a) and in response loss x 100 on (b), so
0 means the rule lands on the chosen rate or on one as good. ``--fit`` searches a rate at 1% and an
exponent per selection (``rate * (0.01 / density) ** exponent``, held below 0.01%, the top-k capped at
3.2e-2 where (a) falls to the majority class above it) for the least mean shortfall, with the rule's rate
within a factor of 2 of a rate that ran on every grid.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from siftune.recipes.train import LOWEST_DENSITY, REFERENCE_DENSITY, default_lr  # noqa: E402

STEPS = {"classification": 300, "causal_lm": 40}
TASK = {"classification": "(a)", "causal_lm": "(b)"}


def family(record: dict) -> tuple[str, str | None, str, str | None, bool] | None:
    """(selection, structure, label, step_scale, select_from) of a sweep record, or None for LoRA, full
    fine-tuning and variants (another score, window or cap) that the rule does not cover."""
    sift = {k: v for k, v in (record.get("sift") or {}).items() if (k, v) != ("score", "grad_weight")}
    scale = sift.pop("step_scale", None)
    earlier = sift.pop("select_from", None) is not None
    steps = ", scaled steps" if scale == "input" else ""
    method = record["method"]
    if method == "random" and not sift:
        return "random", None, f"random components{steps}", scale, False
    if method in ("random-rows", "random-columns") and not sift and not scale:
        return "random", method[7:], f"random {method[7:]}", None, False
    if method in ("sift-rows", "sift-columns") and not sift and not scale:
        return "gradient", method[5:], method[5:], None, False
    selection = sift.pop("selection", "gradient")
    sift.pop("refresh_every", None)
    if method not in ("sift-fixed", "sift-periodic"):
        return None
    if sift == {"line_cap": 1} and selection == "balanced":
        default = " (SiftConfig's default)" if scale == "input" and not earlier else ""
        return "balanced", None, f"balanced, line_cap=1{steps}{', select_from' if earlier else ''}{default}", \
            scale, earlier
    if sift or earlier:
        return None
    return selection, None, {"gradient": "|g w|"}.get(selection, selection.replace("_", " ")) + steps, scale, False


def grids(folder: Path) -> dict[tuple, dict[float, float]]:
    """(task, selection, structure, label, density, density's name, step_scale, select_from) -> {rate:
    validation, higher is better}; the head at the task's default rate for the method."""
    from siftune.bench.runner import TASKS

    out: dict[tuple, dict[float, float]] = defaultdict(dict)
    for task, steps in STEPS.items():
        path = folder / f"{task}.json"
        for record in json.loads(path.read_text()) if path.is_file() else []:
            kind = family(record)
            if kind is None or record["seed"] != 0 or record["steps"] != steps or not record.get("val_examples"):
                continue
            default_head = TASKS[task].head_lr(record["method"], record["lr"])
            if abs(record.get("dense_lr", default_head) - default_head) > 1e-9 * record["lr"]:
                continue  # a head-rate grid's cell
            value = record["val_value"] * (100 if record["metric"] != "loss" else -100)
            where = "LoRA's count" if record["setting"] == "matched" else f"{float(record['setting']) * 100:g}%"
            selection, structure, label, scale, earlier = kind
            out[(task, selection, structure, label, round(record["density"], 6), where, scale, earlier)][
                record["lr"]] = value
    return {key: grid for key, grid in out.items() if len(grid) >= 2}


def shortfalls(rule, cells: dict[tuple, dict[float, float]]) -> list[tuple]:
    """(cell, rule's rate, nearest rate run, shortfall, log2 distance) for each grid."""
    rows = []
    for key, grid in sorted(cells.items(), key=lambda kv: (kv[0][3], kv[0][0], kv[0][4])):
        lr = rule(key)
        near = min(grid, key=lambda x: abs(math.log(x / lr)))
        rows.append((key, lr, near, max(grid.values()) - grid[near], abs(math.log2(near / lr))))
    return rows


def fit(cells: dict[tuple, dict[float, float]]) -> None:
    for selection, cap in (("gradient", 3.2e-2), ("random", None), ("balanced", None)):
        own = {k: g for k, g in cells.items() if k[1] == selection and k[2] is None and k[6] is None and not k[7]}
        results = []
        for i in range(41):
            rate = 5e-4 * (40 ** (i / 40))  # 5e-4 to 2e-2
            for exponent in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
                def rule(key, rate=rate, exponent=exponent):
                    lr = rate * (REFERENCE_DENSITY / max(key[4], LOWEST_DENSITY)) ** exponent
                    return min(cap, lr) if cap else lr
                rows = shortfalls(rule, own)
                if rows and max(r[4] for r in rows) <= 1.0001:
                    results.append((sum(r[3] for r in rows) / len(rows), max(r[3] for r in rows), rate, exponent))
        for mean, worst, rate, exponent in sorted(results)[:3]:
            print(f"{selection}: {rate:.2e} x (0.01 / density)^{exponent}: mean shortfall {mean:.2f}, worst {worst:.2f}"
                  f" over {len(own)} grids")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results" / "sweep")
    parser.add_argument("--fit", action="store_true", help="search each selection's rate and exponent")
    args = parser.parse_args(argv)
    cells = grids(args.results_dir)
    if not cells:
        print(f"no sweep records with two or more rates in {args.results_dir}", file=sys.stderr)
        return 1
    rows = shortfalls(lambda key: default_lr(key[4], key[1], key[2], key[6], key[7]), cells)
    print("| task, density | method | rule's rate | nearest run | chosen | shortfall |")
    print("|---|---|---:|---:|---:|---:|")
    for key, lr, near, short, _ in rows:
        task, label, where, grid = key[0], key[3], key[5], cells[key]
        chosen = min(r for r in grid if grid[r] == max(grid.values()))
        name = label.replace("|", "\\|")  # a markdown table's cell
        print(f"| {TASK[task]} {where} | {name} | {lr:.2g} | {near:.2g} | {chosen:.2g} | {short:.1f} |")
    by_label: dict[str, list[float]] = defaultdict(list)
    for key, _, _, short, _ in rows:
        by_label[key[3]].append(short)
    print()
    for label, values in sorted(by_label.items()):
        print(f"{label}: mean shortfall {sum(values) / len(values):.2f}, worst {max(values):.1f} over {len(values)} grids")
    if args.fit:
        print()
        fit(cells)
    return 0


if __name__ == "__main__":
    sys.exit(main())
