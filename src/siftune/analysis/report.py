"""Written forms of the results: JSON-safe values and short markdown reports."""
from __future__ import annotations

import math

from .stats import NORM_SHARES, TOP_FRACTIONS


def json_ready(value):
    """``value`` with every NaN or infinity replaced by None, which JSON can hold."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def _percent(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    # Small fractions need more digits to be told apart.
    return f"{value:.3%}" if value < 0.01 else f"{value:.1%}"


def _number(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _heading(result: dict, what: str) -> list[str]:
    setup = result["setup"]
    return [
        f"# {what}: {setup['model']} on {setup['dataset']}",
        "",
        f"Task {setup['task']}, {setup['batches']} batches of {setup['batch_size']} examples "
        f"(at most {setup['max_length']} tokens each), seed {setup['seed']}; took {result['seconds']} s.",
        "",
    ]


def gradients_markdown(result: dict) -> str:
    """The gradient analysis as a short markdown report (whole model, then per module type)."""
    inits = result["inits"]
    names = list(inits)
    target = result["setup"]["target_share"]
    first = inits[names[0]]
    lines = _heading(result, "Gradient concentration")
    lines += [
        f"The gradient of the task loss summed over the batches, on {len(first['tensors'])} targeted "
        f"tensors ({first['whole_model']['numel']:,} components). Shares are of the squared norm.",
        "",
    ]
    rows = [["loss at the weights"] + [_number(inits[n]["loss"]) for n in names]]
    rows += [[f"top {f:.1%} of components hold"] + [_percent(inits[n]["whole_model"]["top_share"][str(f)])
                                                     for n in names] for f in TOP_FRACTIONS]
    rows += [[f"fraction holding {s:.0%}"] + [_percent(inits[n]["whole_model"]["fraction_for_share"][str(s)])
                                              for n in names] for s in NORM_SHARES]
    rows += [["SIFT at density 1% keeps"] + [_percent(inits[n]["sift_selection"]["top_share"]["0.01"])
                                             for n in names]]
    rows += [[f"suggested density (SIFT keeps {target:.0%})"] + [_percent(inits[n]["suggested_density"])
                                                                  for n in names]]
    rows += [[f"global top-k fraction for {target:.0%}"] + [_percent(inits[n]["pooled_fraction_for_target"])
                                                             for n in names]]
    lines += _table(["whole model"] + names, rows)
    lines += ["", "## Per module type", "",
              "Pooled over the tensors of each type: top-1% share / fraction holding 90%.", ""]
    type_rows = []
    for module_type, pooled in first["module_types"].items():
        cells = [module_type, str(pooled["tensors"])]
        for name in names:
            row = inits[name]["module_types"][module_type]
            cells.append(f"{_percent(row['top_share']['0.01'])} / {_percent(row['fraction_for_share']['0.9'])}")
        type_rows.append(cells)
    lines += _table(["module type", "tensors"] + names, type_rows)
    lines += [
        "",
        "Figures: `gradients_cumulative.png` (cumulative share against fraction of components, log x), "
        "`gradients_layers.png` (each tensor's top-1% share by layer and module type).",
        "",
        "*Top f* is the count SIFT selects at density f; *SIFT keeps* is the share its per-tensor "
        "selection (the same density in every tensor) keeps of the whole gradient; the *suggested "
        "density* is the smallest density at which that share reaches the target.",
        "",
    ]
    return "\n".join(lines)


def landscape_markdown(result: dict) -> str:
    """The landscape analysis as a short markdown report: amplitude statistics per slice."""
    inits = result["inits"]
    names = list(inits)
    setup = result["setup"]
    first = inits[names[0]]
    lines = _heading(result, "Loss landscape")
    lines += [
        f"Random directions with filter-wise normalisation over {first['perturbed_tensors']} weight tensors "
        f"({first['perturbed_numel']:,} components; 1-D parameters are not moved), steps in "
        f"[-{setup['span']}, {setup['span']}].",
        "",
    ]
    rows = [["loss at the weights"] + [_number(inits[n]["origin_loss"]) for n in names]]
    slices = [(key, label) for key, label in (("line", f"1-D ({setup['line_points']} points)"),
                                              ("surface", f"2-D ({setup['grid']}x{setup['grid']})"))
              if key in first]
    for key, label in slices:
        for stat, text in (("range", "loss range"), ("std", "loss std"), ("local_minima", "local minima"),
                           ("mean_abs_second_difference", "mean abs. second difference")):
            rows.append([f"{label}: {text}"] + [_number(inits[n][key]["stats"][stat]) for n in names])
    lines += _table(["statistic"] + names, rows)
    figures = []
    if "line" in first:
        figures.append("`landscape_1d.png`")
    if "surface" in first:
        figures += ["`landscape_2d_contour.png`", "`landscape_2d_surface.png`"]
    lines += [
        "",
        f"Figures: {', '.join(figures)}.",
        "",
        "A local minimum is a grid point strictly below all its neighbours (2 on a line, 8 on a "
        "surface); second differences are per grid step, along each axis.",
        "",
    ]
    return "\n".join(lines)


def gradients_summary(result: dict) -> str:
    """A few lines for the terminal: the headline numbers per init."""
    target = result["setup"]["target_share"]
    lines = []
    for init, stats in result["inits"].items():
        whole = stats["whole_model"]
        lines.append(
            f"{init:>10}: top 1% holds {_percent(whole['top_share']['0.01'])} of the squared norm; "
            f"90% / 99% of it sit in {_percent(whole['fraction_for_share']['0.9'])} / "
            f"{_percent(whole['fraction_for_share']['0.99'])} of components; "
            f"suggested density for {target:.0%}: {_percent(stats['suggested_density'])}")
    return "\n".join(lines)


def landscape_summary(result: dict) -> str:
    """A few lines for the terminal: loss at the weights and each slice's range and minima per init."""
    lines = []
    for init, stats in result["inits"].items():
        parts = [f"loss {_number(stats['origin_loss'])}"]
        for key, label in (("line", "1-D"), ("surface", "2-D")):
            if key in stats:
                s = stats[key]["stats"]
                parts.append(f"{label} range {_number(s['range'])}, std {_number(s['std'])}, "
                             f"{s['local_minima']} local minima")
        lines.append(f"{init:>10}: " + "; ".join(parts))
    return "\n".join(lines)
