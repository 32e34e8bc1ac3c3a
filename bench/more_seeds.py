"""Task (a) over every seed that ran: the gradient's best choices against random components and LoRA r=8.

    python bench/more_seeds.py [--sweep bench/results/sweep] [--more bench/results/sweep_more_seeds]
                               [--docs-figures docs/figures]

Two densities: LoRA r=8's count and 0.1%. Seeds 0-2 come from the sweep's
records, seeds 3 and up from ``--more`` (``bench/sweep.sh a-more-seeds-N``,
``a-low-more-seeds-N``, ``a-head-more-seeds-N``, ``a-head-low-more-seeds-N``, ``a-from-more-seeds-N``
and ``a-head-low-random-more-seeds-N``, kept apart from the sweep's
three-seed tables). Each method runs at the rate seed 0's validation chose
in the sweep, and also with the head at the rate seed 0 chose for it (8e-3
at LoRA's count, 4e-3 at 0.1%).
Prints a table a density (each seed's test accuracy, mean ± sd, and the
difference to random components at the same head rate and to LoRA r=8 seed
by seed: mean ± standard error)
and writes them with a figure a density into ``--more``: ``summary.md``,
``classification_seeds.png`` and ``classification_seeds_0.1.png`` (each
seed's accuracy by method, seeds joined across methods, with each method's
mean). A density none of whose methods ran is left out. Also tells how far
validation ranks test at LoRA's count: over the sweep's runs there whose
validation reaches a floor, the correlation of validation and test accuracy.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import textwrap
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from sweep_records import best_rate, matching  # noqa: E402

RANDOM, LORA = "random components", "LoRA r=8"  # the rows every other row is compared with, seed by seed
RANDOM_4, RANDOM_8 = "random components, head 4e-3", "random components, head 8e-3"  # for rows with such heads
SCALED = ["selection=balanced", "line_cap=1", "step_scale=input"]
FROM_LABEL = "the same, chosen by its seed's 1% run (select_from), head 4e-3"
OPTIONAL = {FROM_LABEL}  # rows left out of their table where none of their records ran (added after the others)
# SiftConfig.select_from: each seed's 1% run of the default at its chosen rate (bench/sweep.sh a-from-source-N)
FROM_1PCT = "bench/results/sweep_increments/sift-fixed-0.01-lr0.004-seed{seed}"
# (density's name, figure's name, [(label, method[:setting], SIFT options and head rate as the sweep passes them,
# the random row it is compared with)]); the first group must have all of its records, the others are left out
# when none of theirs ran
GROUPS = [
    ("LoRA r=8's count", "classification_seeds.png", [
        (RANDOM, "random:matched", [], None),
        ("balanced at line_cap=1, scaled", "sift-fixed:matched", SCALED, RANDOM),
        ("balanced at line_cap=1", "sift-fixed:matched", ["selection=balanced", "line_cap=1"], RANDOM),
        (RANDOM_8, "random:matched", ["dense_lr=8e-3"], None),
        ("balanced at line_cap=1, scaled, head 8e-3", "sift-fixed:matched", [*SCALED, "dense_lr=8e-3"], RANDOM_8),
        (LORA, "lora:8", [], RANDOM),
    ]),
    ("0.1%", "classification_seeds_0.1.png", [
        (RANDOM, "random:0.001", [], None),
        ("balanced at line_cap=1, scaled", "sift-fixed:0.001", SCALED, RANDOM),
        (RANDOM_4, "random:0.001", ["dense_lr=4e-3"], None),
        ("balanced at line_cap=1, scaled, head 4e-3", "sift-fixed:0.001", [*SCALED, "dense_lr=4e-3"], RANDOM_4),
        (FROM_LABEL, "sift-fixed:0.001",
         [*SCALED, f"select_from={FROM_1PCT}", "dense_lr=4e-3"], RANDOM_4),
        (LORA, "lora:8", [], RANDOM),
    ]),
]
TASK, STEPS = "classification", 300


def seeds_of(sweep: Path, more: Path, token: str, fields: list[str]) -> tuple[float, dict[int, float]]:
    """The rate seed 0's validation chose in the sweep, and each seed's test accuracy (%) at it."""
    lr = best_rate([r for r in matching(str(sweep), TASK, str(STEPS), token, fields) if r["seed"] == 0])
    if lr is None:
        raise SystemExit(f"no seed-0 record of {token} {' '.join(fields)} in {sweep}: run bench/sweep.sh first")
    at_rate = [r for folder in (sweep, more) for r in matching(str(folder), TASK, str(STEPS), token, fields)
               if abs(r["lr"] - lr) <= 1e-12 * lr]
    return lr, {r["seed"]: 100 * r["value"] for r in sorted(at_rate, key=lambda r: r["seed"])}


def difference(by_seed: dict[int, float], reference: dict[int, float] | None) -> str:
    """Mean ± standard error of by_seed minus reference over the seeds both have (two or more)."""
    common = [seed for seed in by_seed if reference and seed in reference]
    if len(common) < 2:
        return ""
    differences = [by_seed[seed] - reference[seed] for seed in common]
    return (f"{statistics.mean(differences):+.2f} ± "
            f"{statistics.stdev(differences) / len(differences) ** 0.5:.2f} ({len(common)} seeds)")


def table(rows: list[tuple[str, float, dict[int, float], str | None]]) -> list[str]:
    by_label = {label: by_seed for label, _, by_seed, _ in rows}
    lines = ["| method | rate | seeds | test accuracy by seed | mean ± sd | median | minus random components (at the "
             "same head rate), seed by seed (mean ± standard error) | minus LoRA r=8, the same |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for label, lr, by_seed, against in rows:
        values = list(by_seed.values())
        spread = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else \
            f"{values[0]:.2f}"
        gaps = [difference(by_seed, by_label.get(name)) if name and label != name else "" for name in (against, LORA)]
        seeds = sorted(by_seed)
        named = f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else \
            ", ".join(map(str, seeds))
        lines.append(f"| {label} | {lr:g} | {named} | "
                     f"{', '.join(f'{v:.2f}' for v in values)} | {spread} | {statistics.median(values):.2f} | "
                     f"{gaps[0]} | {gaps[1]} |")
    return lines


def agreement(sweep: Path, floors=(75, 78, 79, 80)) -> list[str]:
    """Validation against test over every run of the sweep at LoRA's count (any method, rate and seed) whose
    validation accuracy (%) reaches each floor."""
    records = json.loads((sweep / f"{TASK}.json").read_text())
    runs = [(100 * r["val_value"], 100 * r["value"]) for r in records
            if (str(r["setting"]) == "matched" or (r["method"], str(r["setting"])) == ("lora", "8"))
            and r["steps"] == STEPS and r.get("val_examples")]
    lines = ["| validation at least | runs | correlation of validation and test | sd of validation | sd of test |",
             "|---:|---:|---:|---:|---:|"]
    for floor in floors:
        kept = [run for run in runs if run[0] >= floor]
        if len(kept) < 3:
            continue
        val, test = zip(*kept)
        try:
            correlation = f"{statistics.correlation(val, test):.2f}"
        except statistics.StatisticsError:  # one of them constant
            correlation = "–"
        lines.append(f"| {floor} | {len(kept)} | {correlation} | "
                     f"{statistics.stdev(val):.2f} | {statistics.stdev(test):.2f} |")
    return lines


def figure(rows: list[tuple[str, float, dict[int, float], str | None]], density: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    seeds = sorted({seed for _, _, by_seed, _ in rows for seed in by_seed})
    for seed in seeds:
        xs = [i for i, (_, _, by_seed, _) in enumerate(rows) if seed in by_seed]
        ax.plot(xs, [rows[i][2][seed] for i in xs], color="0.75", linewidth=0.8, marker="o", markersize=4,
                zorder=1)
    for i, (_, _, by_seed, _) in enumerate(rows):
        ax.hlines(statistics.mean(by_seed.values()), i - 0.25, i + 0.25, color="tab:red", linewidth=2, zorder=2)
        ax.hlines(statistics.median(by_seed.values()), i - 0.15, i + 0.15, color="black", linewidth=1.5, zorder=3)
    ax.set_xticks(range(len(rows)), [f"{textwrap.fill(label, 22)}\n{lr:g}" for label, lr, _, _ in rows], fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"(a) MiniLM-L6 on Rotten Tomatoes at {density}, seeds {seeds[0]}-{seeds[-1]}\n"
                 "grey: one seed across methods; red: the mean; black: the median", fontsize=9)
    ax.grid(True, axis="y", linewidth=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=Path, default=BENCH / "results" / "sweep")
    parser.add_argument("--more", type=Path, default=BENCH / "results" / "sweep_more_seeds")
    parser.add_argument("--docs-figures", type=Path,
                        help="also copy the figures here as more_seeds_classification.png and "
                             "more_seeds_classification_0.1.png (the docs site's copies)")
    args = parser.parse_args(argv)
    printed, summary, figures = [], [], []  # the summary has the figures between the tables
    for number, (density, name, methods) in enumerate(GROUPS):
        if number and not any(matching(str(args.sweep), TASK, str(STEPS), token, fields)
                              for label, token, fields, _ in methods if label != LORA):
            continue  # a density that never ran
        rows = [(label, *seeds_of(args.sweep, args.more, token, fields), against)
                for label, token, fields, against in methods
                if label not in OPTIONAL or matching(str(args.sweep), TASK, str(STEPS), token, fields)]
        block = [f"At {density}:", "", *table(rows), ""]
        printed += block
        summary += [*block, f"![each seed by method at {density}]({name})", ""]
        figure(rows, density, args.more / name)
        figures.append(name)
    block = ["How far validation ranks test at LoRA's count (every run of the sweep, seeds 0-2):", "",
             *agreement(args.sweep)]
    print("\n".join(printed + block))
    (args.more / "summary.md").write_text(
        "# Task (a), every seed\n\nWritten by `python bench/more_seeds.py`; seeds 0-2 from "
        "`bench/results/sweep/`, the rest from this folder, each method at the rate seed 0's validation chose.\n\n"
        + "\n".join(summary + block) + "\n")
    print(f"wrote {args.more / 'summary.md'} and {', '.join(str(args.more / name) for name in figures)}")
    if args.docs_figures:
        for name in figures:
            shutil.copyfile(args.more / name, args.docs_figures / name.replace("classification_seeds",
                                                                                "more_seeds_classification"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
