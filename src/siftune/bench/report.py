"""Tables and the figure of ``siftune bench`` results: read the records, summarise, write.

Records of one experiment (same method, setting, learning rates, steps and
sizes) over several seeds become one row: mean and sample standard deviation
of the held-out metric, medians of the costs. :func:`write_report` writes
``<results>/README.md``, and optionally the same tables into the project
README (between two marker comments) and the quality-vs-trainable figure.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

TASK_TITLES = {
    "classification": "MiniLM-L6 on Rotten Tomatoes: held-out accuracy (2,000 examples; higher is better)",
    "causal_lm": "SmolLM2-135M-Instruct on chatterbot-corpus (English): held-out response-token loss "
                 "(lower is better)",
}
README_START = "<!-- bench-results:start -->"
README_END = "<!-- bench-results:end -->"
FIGURE = "bench_quality_vs_trainable.png"
GRID_FIGURE = "rate_grid.png"  # written into the results folder when runs hold validation scores
PLOTTED = {"sift-fixed": ("SIFT (fixed)", "C0", "o"), "random": ("random-sparse", "C3", "s"),
           "lora": ("LoRA", "C2", "^")}
# Order of rows: references first, then the peers, then SIFT and its ablation.
ORDER = ["base", "head", "full", "dense-backward", "lora", "shira", "random", "sift-fixed", "sift-periodic", "sift-per_step",
         "sift-rows", "sift-columns", "random-rows", "random-columns"]


def load(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text()) if Path(path).is_file() else []


def summarise(records: list[dict]) -> list[dict]:
    """One row per experiment: the records that differ only in seed, aggregated."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r["method"], str(r["setting"]), r["steps"], r["lr"], r["dense_lr"], r["batch_size"], r["max_length"],
               r.get("val_examples", 0), json.dumps(r.get("sift") or {}, sort_keys=True), bool(r.get("packing")))
        groups.setdefault(key, []).append(r)
    rows = []
    for key, runs in groups.items():
        values = [r["value"] for r in runs]
        first = runs[0]
        steps = [r["step_s"] for r in runs if r["step_s"] is not None]
        rows.append({
            "method": first["method"], "setting": first["setting"], "density": first["density"],
            "rank": first["rank"], "trainable": first["trainable"],
            "adapted": first["trainable"] - first["trainable_head"], "metric": first["metric"],
            "mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "seeds": sorted(r["seed"] for r in runs), "values": values,
            "step_s": statistics.median(steps) if steps else None,
            "peak_mib": statistics.median(r["peak_mib"] for r in runs),
            "load_mib": statistics.median(r["load_mib"] for r in runs),
            "increment_bytes": first["increment_bytes"], "steps": first["steps"], "lr": first["lr"],
            "dense_lr": first["dense_lr"], "perplexity": _mean_of(runs, "perplexity"),
            "majority": first.get("majority_accuracy"), "sift": first.get("sift") or {},
            "val": {r["seed"]: r["val_value"] for r in runs if r.get("val_value") is not None},
            "test": {r["seed"]: r["value"] for r in runs},
            "val_examples": first.get("val_examples", 0), "packing": bool(first.get("packing")),
            "experiment": key[:3] + key[5:],  # what a rate grid varies over: everything but lr and head lr
        })
    # The untrained base first, then one block per training length, methods in ORDER within it.
    rows.sort(key=lambda row: (row["steps"] != 0, row["steps"],
                               ORDER.index(row["method"]) if row["method"] in ORDER else len(ORDER),
                               row["adapted"], row["lr"]))
    return rows


def _mean_of(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def setting_label(row: dict) -> str:
    packed = ", packed" if row.get("packing") else ""
    options = "".join(f", {k}={v}" for k, v in sorted(row.get("sift", {}).items())) + packed
    if row["rank"] is not None:
        return f"r={row['rank']}{packed}"
    if row["density"] is not None:
        matched = " (LoRA r=8 count)" if row["setting"] == "matched" else ""
        return f"{row['density']:.3%}{matched}{options}"
    return options[2:]


def markdown_table(task: str, rows: list[dict]) -> str:
    """The task's rows as a markdown table, with its title and the majority-class floor."""
    if not rows:
        return ""
    accuracy = rows[0]["metric"] == "accuracy"
    value_head = "accuracy (mean ± sd)" if accuracy else "loss (mean ± sd) | perplexity"
    lines = [f"**{TASK_TITLES.get(task, task)}**", "",
             f"| method | setting | lr (head lr) | trainable | steps | seeds | {value_head} | step s | peak MiB "
             "(after load) | increment |",
             "|---|---|---|---:|---:|---|---|---:|---:|---:|" + ("" if accuracy else "---:|")]
    for row in rows:
        scale = 100 if accuracy else 1
        spread = f" ± {row['sd'] * scale:.2f}" if row["sd"] is not None else ""
        value = f"{row['mean'] * scale:.2f}{spread}" if accuracy else f"{row['mean']:.3f}{spread}"
        if not accuracy:
            value += f" | {row['perplexity']:.2f}"
        lr = f"{row['lr']:g}" + (f" ({row['dense_lr']:g})" if row["dense_lr"] != row["lr"] else "")
        step = f"{row['step_s']:.3f}" if row["step_s"] is not None else "–"
        lines.append(f"| {row['method']} | {setting_label(row)} | {lr if row['steps'] else '–'} | "
                     f"{row['trainable']:,} | {row['steps']} | {','.join(map(str, row['seeds']))} | {value} | {step} | "
                     f"{row['peak_mib']:.0f} ({row['load_mib']:.0f}) | {_size(row['increment_bytes'])} |")
    notes = ["step s: median over seeds of each run's median step; runs met different loads on shared cores "
             "(load_avg_1min in the records), so compare step times with the paired timings, not down this "
             "column. peak MiB: the run's max RSS at the end of training (in brackets: right after loading)."]
    if accuracy and rows[0]["majority"] is not None:
        notes.insert(0, f"Majority class: {rows[0]['majority'] * 100:.2f}%. Accuracy in points (%).")
    lines += ["", " ".join(notes)]
    return "\n".join(lines)


def ranked(score: float) -> float:
    """``score`` for ranking, higher is better: a run that diverged (a loss of NaN) ranks last, not first."""
    return score if score == score else -math.inf


def chosen_on_validation(rows: list[dict]) -> list[tuple[list[dict], dict, list[int]]]:
    """Per experiment run at several rates with a validation split: ``(candidates, chosen, seeds)``.

    The chosen rate has the best mean validation score over the seeds every
    candidate ran (``seeds``), so a rate run with more seeds has no edge; a
    tie goes to the lower rate.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["val"]:
            groups.setdefault(row["experiment"], []).append(row)
    out = []
    for candidates in groups.values():
        seeds = sorted(set.intersection(*(set(r["val"]) for r in candidates)))
        if not seeds:
            continue
        sign = 1 if candidates[0]["metric"] == "accuracy" else -1
        for r in candidates:
            r["val_mean"] = statistics.fmean(r["val"][s] for s in seeds)
        out.append((candidates, max(candidates, key=lambda r: (ranked(sign * r["val_mean"]), -r["lr"])), seeds))
    return out


def validation_table(task: str, rows: list[dict]) -> str:
    """Rates chosen on the validation split, and the held-out (test) score of the chosen one only."""
    chosen = chosen_on_validation(rows)
    if not chosen:
        return ""
    accuracy = rows[0]["metric"] == "accuracy"
    scale = 100 if accuracy else 1
    lines = ["", f"Rates chosen on validation ({task}; validation drawn from the training pool; test reported for "
             "the chosen rate only):", "",
             "| method | setting | steps | lr (head lr) tried: validation mean | chosen lr | seeds "
             "| test (mean ± sd) |",
             "|---|---|---:|---|---:|---|---|"]
    for candidates, best, seeds in chosen:
        tried = ", ".join(f"{r['lr']:g}" + (f" ({r['dense_lr']:g})" if r["dense_lr"] != r["lr"] else "")
                          + f": {r['val_mean'] * scale:.2f}" for r in sorted(candidates, key=lambda r: r["lr"]))
        spread = f" ± {best['sd'] * scale:.2f}" if best["sd"] is not None else ""
        lines.append(f"| {best['method']} | {setting_label(best)} | {best['steps']} | {tried} (val seeds "
                     f"{','.join(map(str, seeds))}, {best['val_examples']} examples) | {best['lr']:g} | "
                     f"{','.join(map(str, best['seeds']))} | {best['mean'] * scale:.2f}{spread} |")
    return "\n" + "\n".join(lines)  # a blank line after the table above


def timing_table(task: str, entries: list[dict]) -> str:
    """Step times measured in turns in one process (``siftune bench --paired-steps``), as ratios to full."""
    lines = []
    for entry in entries:
        times = entry["step_s"]
        reference = times.get("full")
        lines += ["", f"Step time, {task}, methods timed in turns in one process ({entry['steps']} steps of "
                  f"{entry['batch_size']} x {entry['max_length']}{', packed' if entry.get('packing') else ''}, load {entry['load_avg_1min']}, "
                  f"{entry['machine']}; `{entry['command']}`):", "",
                  "| method | trainable | s/step | x full |", "|---|---:|---:|---:|"]
        for token, seconds in times.items():
            ratio = f"{seconds / reference:.2f}" if reference else "–"
            lines.append(f"| {token} | {entry['trainable'][token]:,} | {seconds:.3f} | {ratio} |")
    return "\n" + "\n".join(lines) if lines else ""  # a blank line after the table above


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def plot_quality(tables: dict[str, list[dict]], path: Path) -> Path:
    """Held-out metric vs trained components (log x) for SIFT, random-sparse and LoRA, one panel per task.

    Full fine-tuning and the head alone are drawn as horizontal references;
    error bars are one standard deviation over seeds. Only runs of the
    longest training among the plotted methods are drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, rows in tables.items() if any(r["method"] in PLOTTED for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        steps = max(r["steps"] for r in tables[task] if r["method"] in PLOTTED)
        rows = [r for r in tables[task] if r["steps"] in (0, steps)]
        scale = 100 if rows[0]["metric"] == "accuracy" else 1
        for method, (label, colour, marker) in PLOTTED.items():
            points = sorted((r for r in rows if r["method"] == method and r["lr"] == _main_lr(rows, method)),
                            key=lambda r: r["adapted"])
            if points:
                ax.errorbar([p["adapted"] for p in points], [p["mean"] * scale for p in points],
                            yerr=[(p["sd"] or 0) * scale for p in points], label=label, color=colour,
                            marker=marker, capsize=3)
        for method, style in (("full", "--"), ("head", ":"), ("base", "-.")):
            for r in (r for r in rows if r["method"] == method):
                ax.axhline(r["mean"] * scale, color="0.4", linestyle=style, linewidth=1,
                           label={"full": "full fine-tuning", "head": "head only",
                                  "base": "untrained"}[method])
                break
        _log_x_axes(ax, f"{TASK_TITLES.get(task, task).split(':')[0]}, {steps} steps",
                    "trained components outside the head (log scale)",
                    "held-out accuracy (%)" if scale == 100 else "held-out response loss", legend_size=8)
    return _save(fig, path, dpi=120)


def _log_x_axes(ax, title: str, xlabel: str, ylabel: str, legend_size: int) -> None:
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save(fig, path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _grid_panel(row: dict) -> str:
    """The panel of the rate-grid figure a row belongs to: its density for sparse methods, the peers' panel
    (LoRA's count) for the others."""
    if row["method"].startswith("sift-") or row["method"].startswith("random"):
        return str(row["setting"])
    return "matched"


def plot_rate_grids(tables: dict[str, list[dict]], path: Path) -> Path | None:
    """Validation score against learning rate (log x) for every experiment run at two rates or more, one
    panel per task and density; the rate validation chose is the filled marker. None if nothing to draw."""
    panels = {}
    for task, rows in tables.items():
        for candidates, best, seeds in chosen_on_validation(rows):
            if len(candidates) > 1:
                panels.setdefault((task, _grid_panel(best)), []).append((candidates, best, seeds))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(panels), 2)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(7 * columns, 5 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, ((task, panel), experiments) in zip(axes.flat, sorted(panels.items())):
        scale = 100 if experiments[0][1]["metric"] == "accuracy" else 1
        for i, (candidates, best, seeds) in enumerate(experiments):
            points = sorted(candidates, key=lambda r: r["lr"])
            label = f"{best['method']} {setting_label(best)}".replace(" (LoRA r=8 count)", "")
            line, = ax.plot([r["lr"] for r in points], [r["val_mean"] * scale for r in points], marker="o",
                            markerfacecolor="none", label=f"{label} (val seeds {','.join(map(str, seeds))})")
            ax.plot([best["lr"]], [best["val_mean"] * scale], marker="o", color=line.get_color(), markersize=8)
        density = "LoRA r=8's count" if panel == "matched" else f"density {float(panel):.1%}"
        _log_x_axes(ax, f"{TASK_TITLES.get(task, task).split(':')[0]}: {density}",
                    "learning rate (log scale); filled: chosen",
                    "validation accuracy (%)" if scale == 100 else "validation response loss", legend_size=7)
    return _save(fig, path, dpi=110)


def _main_lr(rows: list[dict], method: str) -> float | None:
    """The learning rate most of a method's rows use: lr sweeps stay out of the curve."""
    rates = [r["lr"] for r in rows if r["method"] == method]
    return max(set(rates), key=rates.count) if rates else None


def write_report(results_dir: Path, readme: Path | None = None, figure_dir: Path | None = None) -> list[Path]:
    """Write ``results_dir/README.md`` from the records there; also the project README's section and
    the figure when ``readme`` / ``figure_dir`` are given. Returns the paths written."""
    results_dir = Path(results_dir)
    tables = {task: summarise(load(results_dir / f"{task}.json")) for task in TASK_TITLES}
    timings = {task: load(results_dir / f"{task}_paired_timing.json") for task in TASK_TITLES}
    text = "\n\n".join(markdown_table(task, rows) + validation_table(task, rows) + timing_table(task, timings[task])
                       for task, rows in tables.items() if rows)
    if not text:
        return []
    written = [results_dir / "README.md"]
    grids = plot_rate_grids(tables, results_dir / GRID_FIGURE)
    figure = f"\n\n![validation score against learning rate]({GRID_FIGURE})" if grids else ""
    written[0].write_text("# Benchmark results\n\nGenerated by `siftune bench --report` from the JSON records "
                          "in this folder; see docs/bench.md for the settings.\n\n" + text + figure + "\n")
    if grids:
        written.append(grids)
    if readme is not None and readme.is_file():
        content = readme.read_text()
        if README_START in content and README_END in content:
            head, _, rest = content.partition(README_START)
            _, _, tail = rest.partition(README_END)
            readme.write_text(f"{head}{README_START}\n{text}\n{README_END}{tail}")
            written.append(readme)
    if figure_dir is not None and any(r["method"] in PLOTTED for rows in tables.values() for r in rows):
        written.append(plot_quality(tables, Path(figure_dir) / FIGURE))
    return written
