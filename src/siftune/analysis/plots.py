"""PNG figures of the gradient and landscape results (the dicts the analyses return)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# Pretrained is drawn solid in blue, random dashed in orange, in every figure.
_STYLE = {"pretrained": {"color": "C0", "linestyle": "-"}, "random": {"color": "C1", "linestyle": "--"}}
_DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(result: dict, what: str) -> str:
    setup = result["setup"]
    return f"{what}: {setup['model']} on {setup['dataset']} ({setup['task']}, {setup['batches']} batches)"


def _save(fig, path: Path) -> None:
    # Figures are made with layout="constrained", which also places colour bars and titles.
    fig.savefig(path, dpi=_DPI)
    _pyplot().close(fig)


def plot_cumulative(result: dict, path: Path) -> None:
    """Cumulative share of the squared gradient norm against the fraction of components (log x).

    Left: pooled over the whole model (and what SIFT's per-tensor
    selection keeps), pretrained vs random. Right: pooled per module type.
    """
    plt = _pyplot()
    fig, (whole, types) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True, layout="constrained")
    for init, stats in result["inits"].items():
        style = _STYLE[init]
        curve = stats["whole_model"]["curve"]
        whole.plot(curve["fraction"], curve["share"], label=f"{init}: global top-k", **style)
        sift = stats["sift_selection"]["curve"]
        whole.plot(sift["fraction"], sift["share"], color=style["color"], linestyle=":",
                   label=f"{init}: SIFT per-tensor top-k")
        for index, (module_type, pooled) in enumerate(stats["module_types"].items()):
            types.plot(pooled["curve"]["fraction"], pooled["curve"]["share"], color=f"C{index % 10}",
                       linestyle=style["linestyle"], linewidth=1.2,
                       label=module_type if init == "pretrained" else None)
    for share in (0.9, 0.99):
        whole.axhline(share, color="0.7", linewidth=0.7)
    whole.axvline(0.01, color="0.7", linewidth=0.7)
    whole.set_ylabel("share of squared gradient norm")
    whole.set_title("whole model (targeted weights)", fontsize=10)
    types.set_title("per module type (solid: pretrained, dashed: random)", fontsize=10)
    types.legend(fontsize=6, ncol=2, loc="upper left")
    whole.legend(fontsize=8, loc="upper left")
    for ax in (whole, types):
        ax.set_xscale("log")
        ax.set_xlabel("fraction of components (largest first)")
        ax.set_ylim(0, 1.01)
        ax.grid(True, which="major", linewidth=0.3)
    fig.suptitle(_title(result, "gradient concentration"), fontsize=10)
    _save(fig, path)


def _layer_grid(stats: dict, key: str, fraction: str):
    """(matrix layers x module types of tensors' top-``fraction`` share, layers, types)."""
    rows = [row for row in stats["tensors"].values() if row["layer"] is not None]
    layers = sorted({row["layer"] for row in rows})
    types = list(dict.fromkeys(row["module_type"] for row in rows))
    grid = np.full((len(layers), len(types)), np.nan)
    for row in rows:
        value = row[key][fraction]
        grid[layers.index(row["layer"]), types.index(row["module_type"])] = np.nan if value is None else value
    return grid, layers, types


def plot_layers(result: dict, path: Path, fraction: str = "0.01") -> None:
    """Heat maps (layer x module type) of each tensor's top-1% share, one panel per init."""
    plt = _pyplot()
    inits = list(result["inits"])
    fig, axes = plt.subplots(1, len(inits), figsize=(5.5 * len(inits), 5), squeeze=False,
                             layout="constrained")
    image = None
    for ax, init in zip(axes[0], inits):
        grid, layers, types = _layer_grid(result["inits"][init], "top_share", fraction)
        if not layers:
            ax.set_axis_off()
            ax.set_title(f"{init}: no numbered layers", fontsize=10)
            continue
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(init, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label=f"share of squared norm in top {float(fraction):.1%}")
    fig.suptitle(_title(result, f"per-tensor top-{float(fraction):.1%} share"), fontsize=10)
    _save(fig, path)


def _stats_label(init: str, stats: dict) -> str:
    return f"{init}: range {stats['range']:.3g}, std {stats['std']:.3g}, {stats['local_minima']} local minima"


def plot_line(result: dict, path: Path) -> None:
    """Loss along the 1-D slice, pretrained vs random on one axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for init, stats in result["inits"].items():
        line = stats["line"]
        ax.plot(line["coords"], line["loss"], marker=".", markersize=3,
                label=_stats_label(init, line["stats"]), **_STYLE[init])
    ax.axvline(0, color="0.7", linewidth=0.7)
    ax.set_xlabel("step along a filter-normalised random direction")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.set_title(_title(result, "1-D loss slice"), fontsize=9)
    _save(fig, path)


def plot_contours(result: dict, path: Path) -> None:
    """Contour maps of the 2-D slice, one panel per init, each with its own colour scale."""
    plt = _pyplot()
    inits = list(result["inits"])
    fig, axes = plt.subplots(1, len(inits), figsize=(5.6 * len(inits), 4.6), squeeze=False,
                             layout="constrained")
    for ax, init in zip(axes[0], inits):
        surface = result["inits"][init]["surface"]
        coords = np.asarray(surface["coords"])
        filled = ax.contourf(coords, coords, np.asarray(surface["loss"]).T, levels=20, cmap="viridis")
        ax.contour(coords, coords, np.asarray(surface["loss"]).T, levels=20, colors="k", linewidths=0.3)
        ax.plot([0], [0], marker="+", color="red")
        fig.colorbar(filled, ax=ax, label="loss")
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
        ax.set_title(_stats_label(init, surface["stats"]), fontsize=8)
    fig.suptitle(_title(result, "2-D loss slice"), fontsize=10)
    _save(fig, path)


def plot_surfaces(result: dict, path: Path) -> None:
    """3-D surfaces of the 2-D slice, one panel per init, on a shared loss axis."""
    plt = _pyplot()
    inits = list(result["inits"])
    fig = plt.figure(figsize=(5.6 * len(inits), 4.8), layout="constrained")
    low = min(result["inits"][i]["surface"]["stats"]["min"] for i in inits)
    high = max(result["inits"][i]["surface"]["stats"]["max"] for i in inits)
    for index, init in enumerate(inits, start=1):
        surface = result["inits"][init]["surface"]
        a, b = np.meshgrid(surface["coords"], surface["coords"], indexing="ij")
        ax = fig.add_subplot(1, len(inits), index, projection="3d")
        # One colour scale for both panels, like the z axis, so colours compare across panels.
        ax.plot_surface(a, b, np.asarray(surface["loss"]), cmap="viridis", vmin=low, vmax=high, linewidth=0,
                        antialiased=True)
        ax.set_zlim(low, high)
        ax.set_xlabel("direction 1", fontsize=8)
        ax.set_ylabel("direction 2", fontsize=8)
        ax.set_zlabel("loss", fontsize=8)
        ax.set_title(init, fontsize=10)
    fig.suptitle(_title(result, "2-D loss slice (same loss axis)"), fontsize=10)
    _save(fig, path)
