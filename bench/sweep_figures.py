"""The density sweep's figures and summary, from the records in bench/results/sweep/ (bench/sweep.sh).

    python bench/sweep_figures.py [--results-dir bench/results/sweep] [--docs-figures docs/figures]

Per task, every experiment (method, setting, selection options) is taken at
the rate with the best validation score (``siftune.bench.report``'s rule:
the mean over the seeds every rate ran); its test score is the mean over
the seeds run at that rate. Writes into the folder:

* ``<task>_quality_vs_trainable.png``: test quality against trained
  components outside the head (log x), one line per method, seed spread
  as error bars (sample sd) where a rate ran on several seeds;
* ``<task>_quality_vs_memory.png``: the same points against peak RSS;
* ``<task>_rate_forgiveness.png``: at LoRA r=8's count, each method's seed-0 test
  quality at every rate that ran, against the rate as a multiple of its
  chosen one;
* ``<task>_off_rate.png``: SiftConfig's default, select_from, random
  components, LoRA and full fine-tuning at every count, seed 0's test
  quality at the chosen rate, a quarter of it and four times it;
* ``summary.md``: the table behind the figures, with each method's test
  score at a quarter and at four times its chosen rate where those ran,
  and a table of its own for runs of another length than the task's
  (the 160-step check on (b)).
"""
from __future__ import annotations

import argparse
import shutil
from collections import Counter
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from siftune.bench.report import chosen_on_validation, load, summarise  # noqa: E402
from siftune.bench.runner import TASKS  # noqa: E402

TITLES = {"classification": ("(a) MiniLM-L6 on Rotten Tomatoes", "test accuracy (%)"),
          "causal_lm": ("(b) SmolLM2-135M on chatterbot", "test response loss")}


def title(task: str, steps: int) -> str:
    name, metric = TITLES.get(task, (task, "test score"))
    return f"{name}, {steps} steps: {metric}"


def family(row: dict) -> str:
    """The line a record belongs to: its method, and for SIFT its selection (with how often it is
    refreshed), score and other options."""
    sift = row.get("sift") or {}
    if row["method"] == "full":
        return "full fine-tuning"
    if row["method"] == "lora":
        return "LoRA"
    if row["method"].startswith("random"):  # with its options (random components rank nothing: no score)
        return "random " + {"random-rows": "rows", "random-columns": "columns"}.get(row["method"], "components") + (
            "".join(f", {k}={v}" for k, v in sorted(sift.items()) if k != "score"))
    if row["method"] == "shira":
        return "SHiRA"
    selection = sift.get("selection", "gradient")
    others = {k: v for k, v in sift.items() if k not in ("selection", "score", "refresh_every")}
    name = {"gradient": "SIFT", "balanced": "SIFT balanced", "mixed": "SIFT mixed",
            "grow_drop": "SIFT grow and drop"}.get(selection, selection)
    name += {"sift-rows": " rows", "sift-columns": " columns"}.get(row["method"], "")
    if "refresh_every" in sift:
        name += f" every {sift['refresh_every']} steps"
    score = {"grad_weight": "|g w|", "grad": "|g|", "grad_squared": "g^2", "grad_snr": "signal-to-noise"}.get(
        sift.get("score"), "")
    if "select_from" in others:  # an increment a seed: named by how many times the count its run trained
        source = Path(others["select_from"]).name.split("-lr")[0]  # <method>-<setting>, as --save-increments names
        try:
            ratio = float(source.rsplit("-", 1)[1]) / float(row["setting"])
            others["select_from"] = f"a run at {ratio:.3g}x the count"
        except (IndexError, ValueError, TypeError, ZeroDivisionError):
            others["select_from"] = source
    extra = "".join(f", {k}={v}" for k, v in sorted(others.items()))
    default = (row["method"] == "sift-fixed" and selection == "balanced" and sift.get("score") == "grad_weight"
               and others == {"line_cap": 1, "step_scale": "input"})  # SiftConfig's "auto" where it can run
    return f"{name}, {score}{extra}" + (" (SiftConfig's default)" if default else "")


def chosen_points(records: list[dict], task: str) -> list[dict]:
    """One point per experiment at its validation-chosen rate, with the sensitivity at 1/4x and 4x."""
    points = []
    for candidates, best, seeds in chosen_on_validation(summarise(records)):
        def own_head(r):  # the head at the task's default rate for the method (its rate where it has none)
            return r["dense_lr"] == TASKS[task].head_lr(r["method"], r["lr"])

        # Off the chosen rate, the head stays at the chosen head rate where the grid ran other rates with it, else
        # at the default (a head grid run at the chosen rate only)
        at_chosen = not own_head(best) and any(r["dense_lr"] == best["dense_lr"] and r["lr"] != best["lr"]
                                               for r in candidates)

        def chosen_head(r):
            return r["dense_lr"] == best["dense_lr"] if at_chosen else own_head(r)

        def at(factor):
            for r in candidates:
                if abs(r["lr"] - best["lr"] * factor) <= 1e-6 * best["lr"] * factor and chosen_head(r):
                    return r
            return None

        # Where the grid also varied the head's rate, a rate tried off the default head rate names it.
        def label(r):
            return f"{r['lr']:g}" + ("" if own_head(r) else f" (head {r['dense_lr']:g})")

        points.append({**best, "family": family(best), "val_seeds": seeds, "quarter": at(0.25), "four": at(4.0),
                       "tried": [label(r) for r in sorted(candidates, key=lambda r: (r["lr"], r["dense_lr"]))],
                       "chosen": label(best), "curve": sorted((r["lr"] / best["lr"], r["test"][0]) for r in candidates
                                                              if 0 in r["test"] and chosen_head(r))})
    return points


def styles(names: list[str]) -> list[tuple[str, str]]:
    """A colour and a marker for each line: the comparators keep their colours in every figure; SIFT's options
    take the others, each with its own marker (more methods than a colour cycle holds)."""
    fixed = {"LoRA": "black", "random components": "tab:blue", "random rows": "deepskyblue",
             "full fine-tuning": "tab:gray"}
    others = iter(["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
                   "tab:cyan", "gold", "navy", "lime", "teal", "maroon", "magenta", "darkgreen", "sienna",
                   "slateblue", "darkorange"] * 2)
    markers = "osD^vP*Xhp<>"
    return [(fixed.get(name) or next(others), markers[index % len(markers)]) for index, name in enumerate(names)]


def plot(points: list[dict], task: str, x_key: str, xlabel: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100 if task == "classification" else 1
    fig, ax = plt.subplots(figsize=(10, 5), layout="constrained")
    names = sorted({p["family"] for p in points})
    for name, (colour, marker) in zip(names, styles(names)):
        mine = sorted((p for p in points if p["family"] == name), key=lambda p: p[x_key])
        xs = [p[x_key] for p in mine]
        ys = [p["mean"] * scale for p in mine]
        errors = [(p["sd"] or 0) * scale for p in mine]
        ax.errorbar(xs, ys, yerr=errors, marker=marker, markersize=5, capsize=3,
                    color=colour, label=name, linewidth=1.2)
        if name == "full fine-tuning" and len(mine) == 1:  # a reference level for every count
            ax.axhline(ys[0], color=colour, linestyle="--", linewidth=0.8)
    if x_key == "adapted":
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)" if task == "classification" else "test response loss (lower is better)")
    ax.set_title(title(task, points[0]["steps"]) + "\nrate chosen on validation; bars: sd over seeds where several ran",
                 fontsize=9)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def at_loras_count(point: dict) -> bool:
    """LoRA r=8, full fine-tuning, and every sparse method at LoRA r=8's count."""
    return point["setting"] == "matched" or point["family"] == "full fine-tuning" or (
        point["family"] == "LoRA" and point["rank"] == 8)


def plot_forgiveness(points: list[dict], task: str, path: Path) -> bool:
    """Test quality against the rate as a multiple of each method's chosen rate, at LoRA's count: how much a
    method loses off its best rate (every rate that ran; the chosen one is 1). False when no method ran off it."""
    mine = sorted((p for p in points if at_loras_count(p) and len(p["curve"]) > 1), key=lambda p: p["family"])
    if not mine:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100 if task == "classification" else 1
    fig, ax = plt.subplots(figsize=(10, 5), layout="constrained")
    for p, (colour, marker) in zip(mine, styles([p["family"] for p in mine])):
        xs, ys = zip(*p["curve"])
        ax.plot(xs, [y * scale for y in ys], marker=marker, markersize=5, linewidth=1.2, color=colour,
                label=f"{p['family']} (chosen {p['chosen']})")
    for x in (0.25, 4.0):
        ax.axvline(x, color="0.6", linestyle=":", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("learning rate / the method's rate chosen on validation (log scale)")
    ax.set_ylabel("test accuracy (%)" if task == "classification" else "test response loss (lower is better)")
    if task != "classification":  # a rate far off can diverge: keep the scale on the methods' working range
        best = min(y for p in mine for _, y in p["curve"] if y == y)
        ax.set_ylim(best - 0.05, best + 0.6)
    ax.set_title(title(task, mine[0]["steps"]) + "\nat LoRA r=8's count, seed 0; dotted: a quarter and four times "
                 "the chosen rate;\nthe head at its default rate where only the chosen rate ran at the chosen head's",
                 fontsize=9)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


HEADLINE = {"SIFT balanced, |g w|, line_cap=1, step_scale=input (SiftConfig's default)": "SiftConfig's default",
            "SIFT balanced, |g w|, line_cap=1, select_from=a run at 10x the count, step_scale=input":
                "select_from (the default at 10x the count)",
            "random components": "random components", "LoRA": "LoRA",
            "full fine-tuning": "full fine-tuning"}


def plot_off_rate(points: list[dict], task: str, path: Path) -> bool:
    """The headline methods' seed-0 test quality against trained components (log x) at the chosen rate (solid),
    a quarter of it (dashed) and four times it (dotted): how much each loses off its rate at every count. False
    when none ran off its rate."""
    mine = [p for p in points if p["family"] in HEADLINE and 0 in p["test"]]
    if not any(p["quarter"] or p["four"] for p in mine):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100 if task == "classification" else 1
    fig, ax = plt.subplots(figsize=(10, 5), layout="constrained")
    names = [name for name in HEADLINE if any(p["family"] == name for p in mine)]
    shown = []
    for name, (colour, marker) in zip(names, styles(names)):
        line = sorted((p for p in mine if p["family"] == name), key=lambda p: p["adapted"])
        for key, style, fill in (("chosen", "-", colour), ("quarter", "--", "white"), ("four", ":", "white")):
            xy = [(p["adapted"], (p["test"][0] if key == "chosen" else p[key]["test"][0]) * scale) for p in line
                  if key == "chosen" or (p[key] and 0 in p[key]["test"])]
            if not xy:
                continue
            xs, ys = zip(*xy)
            shown += [y for y in ys if y == y]
            ax.plot(xs, ys, linestyle=style, marker=marker, markersize=5, markerfacecolor=fill, color=colour,
                    linewidth=1.2, label=HEADLINE[name] if key == "chosen" else None)
    ax.set_xscale("log")
    ax.set_xlabel("trained components outside the head (log scale)")
    ax.set_ylabel("test accuracy (%)" if task == "classification" else "test response loss (lower is better)")
    if task != "classification" and shown:  # a rate far off can diverge: keep the scale on the working range
        ax.set_ylim(min(shown) - 0.05, min(max(shown), min(shown) + 1.0) + 0.05)
    ax.set_title(title(task, mine[0]["steps"]) + "\nseed 0 at the rate chosen on validation (solid), a quarter of "
                 "it (dashed) and four times it (dotted)", fontsize=9)
    ax.grid(True, which="both", linewidth=0.3)
    from matplotlib.lines import Line2D

    rates = [Line2D([], [], color="0.4", linestyle=style, marker="o", markerfacecolor=fill, label=what)
             for style, fill, what in (("-", "0.4", "the chosen rate"), ("--", "white", "a quarter of it"),
                                       (":", "white", "four times it"))]
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], *rates], fontsize=7, loc="center left",
              bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def off_rate_table(points: list[dict], task: str) -> list[str]:
    """The headline methods at every count, seed 0's test at a quarter of the chosen rate, at it and at four
    times it, and the most it loses off it."""
    scale, digits = (100, 2) if task == "classification" else (1, 3)
    sign = 1 if task == "classification" else -1  # a loss: the drop is a rise

    def at(row):
        if row is None or 0 not in row["test"]:
            return None
        return row["test"][0] * scale

    def cell(value):
        return "–" if value is None else ("diverged" if value != value else f"{value:.{digits}f}")

    lines = [f"### {title(task, points[0]['steps'])}, off the chosen rate (seed 0)", "",
             "| method | setting | chosen lr | lr/4 | chosen | 4 lr | most lost |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, short in HEADLINE.items():
        for p in sorted((p for p in points if p["family"] == name and 0 in p["test"]), key=lambda p: p["adapted"]):
            setting = f"r={p['rank']}" if p["rank"] is not None else (
                "" if p["density"] is None else "LoRA r=8's count" if p["setting"] == "matched"
                else f"{float(p['setting']):.2%}")
            chosen, quarter, four = at(p), at(p["quarter"]), at(p["four"])
            off = [v for v in (quarter, four) if v is not None]
            lost = max(sign * (chosen - v) if v == v else float("inf") for v in off) if off else None
            lines.append(f"| {short} | {setting} | {p['chosen']} | {cell(quarter)} | {cell(chosen)} | {cell(four)} | "
                         f"{'–' if lost is None else 'all' if lost == float('inf') else f'{lost:.{digits}f}'} |")
    return lines + [""]


def summary(points: list[dict], task: str, steps: int) -> list[str]:
    """The table of ``points``, runs of ``steps`` steps."""
    scale, digits = (100, 2) if task == "classification" else (1, 3)

    def score(row):
        if row is None:
            return "–"
        if row["mean"] != row["mean"]:  # a loss of NaN
            return f"diverged ({','.join(map(str, row['seeds']))})"
        spread = f" ± {row['sd'] * scale:.{digits}f}" if row["sd"] is not None else ""
        return f"{row['mean'] * scale:.{digits}f}{spread} ({','.join(map(str, row['seeds']))})"

    lines = [f"## {title(task, steps)}", "",
             "| method | setting | trained (outside head) | rates tried | chosen lr | validation (seeds) | test at chosen "
             "(seeds) | test at lr/4 | test at 4 lr | peak MiB |", "|---|---|---:|---|---:|---|---|---|---|---:|"]
    for p in sorted(points, key=lambda p: (p["family"], p["adapted"])):
        setting = f"r={p['rank']}" if p["rank"] is not None else (
            "" if p["density"] is None else f"{p['density']:.3%}" + (" (LoRA r=8's count)"
                                                                     if p["setting"] == "matched" else ""))
        lines.append(f"| {p['family'].replace('|', chr(92) + '|')} | {setting} | {p['adapted']:,} | {', '.join(p['tried'])} "
                     f"| {p['chosen']} | {p['val_mean'] * scale:.{digits}f} ({','.join(map(str, p['val_seeds']))}) "
                     f"| {score(p)} | {score(p['quarter'])} | {score(p['four'])} | {p['peak_mib']:.0f} |")
    if any("head" in p["chosen"] for p in points):
        lines += ["", "A rate tried with (head R) trained the head at R, the others at the task's default head rate. "
                  "Off the chosen rate (lr/4, 4 lr) the head stays at the chosen head rate where the grid ran other "
                  "rates with it, else at the default."]
    return lines + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default="bench/results/sweep", type=Path)
    parser.add_argument("--docs-figures", default=None, type=Path,
                        help="also copy the figures here as sweep_<name>.png (the docs site's copies: docs/figures)")
    args = parser.parse_args(argv)
    lines = ["# Density sweep: rates chosen on validation", "",
             "Generated by `python bench/sweep_figures.py` from the records in this folder (`bash bench/sweep.sh`). "
             "Each row: one method and setting at the rate with the best validation score; test scores in "
             "brackets name their seeds.", ""]
    for task in ("classification", "causal_lm"):
        points = chosen_points(load(args.results_dir / f"{task}.json"), task)
        if not points:
            continue
        # The task's own run length (the most common) gets the figures; a longer or shorter run, a check of
        # whether the ranking holds, gets a table of its own.
        steps = Counter(p["steps"] for p in points).most_common(1)[0][0]
        others = [p for p in points if p["steps"] != steps]
        points = [p for p in points if p["steps"] == steps]
        plot(points, task, "adapted", "trained components outside the head (log scale)",
             args.results_dir / f"{task}_quality_vs_trainable.png")
        plot(points, task, "peak_mib", "peak RSS of the run (MiB)", args.results_dir / f"{task}_quality_vs_memory.png")
        lines += summary(points, task, steps)
        lines += [f"![quality vs trainable]({task}_quality_vs_trainable.png)",
                  f"![quality vs memory]({task}_quality_vs_memory.png)", ""]
        if plot_forgiveness(points, task, args.results_dir / f"{task}_rate_forgiveness.png"):
            lines += [f"![quality off the chosen rate]({task}_rate_forgiveness.png)", ""]
        if plot_off_rate(points, task, args.results_dir / f"{task}_off_rate.png"):
            lines += off_rate_table(points, task)
            lines += [f"![the headline methods off their chosen rate]({task}_off_rate.png)", ""]
        for n in sorted({p["steps"] for p in others}):
            lines += summary([p for p in others if p["steps"] == n], task, n)
    (args.results_dir / "summary.md").write_text("\n".join(lines))
    if args.docs_figures:
        for figure in sorted([*args.results_dir.glob("*_quality_vs_*.png"), *args.results_dir.glob("*_rate_forgiveness.png"),
                                 *args.results_dir.glob("*_off_rate.png")]):
            shutil.copyfile(figure, args.docs_figures / f"sweep_{figure.name}")
    print(f"wrote {args.results_dir}/summary.md and the figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
