"""How a selection spreads over the weights, and what rank its trained change takes.

For each selection (``--selections``) at one density, from the task
gradient summed over the batches (the window SIFT selects from), per
targeted weight: the share of its rows and of its columns that hold at
least one chosen component, and the share of the chosen components held by
its busiest 1% of rows and of columns; pooled by layer depth and by module
type (q/k/v/o/gate/up/down), beside the share of the whole count each group
gets. With ``train_steps``, each selection, LoRA and full fine-tuning are
then trained that many steps from the same start, and the stable rank of
each weight's trained change, ||dW||_F^2 / ||dW||_2^2, is reported: 1 for a
rank-one change, min(rows, columns) at most.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..core.budget import change_ranking, signal_to_noise
from ..artifacts.increment import SparseIncrement
from ..core.engine import earlier_changes
from ..recipes.loss import batch_loss
from ..core.select import (balanced_indices, count_selected, mixed_indices, random_indices, tensor_generator,
                      top_k_indices)
from . import inputs, plots, report
from .gradients import accumulated_gradient, layer_and_type, targeted_weights

# name -> (SiftConfig fields, what it is)
SELECTIONS = {
    "default": ({"score": "grad_weight"}, "top-k of |g w| per tensor (selection='gradient')"),
    "paper": ({"score": "grad"}, "top-k of |g| per tensor (the paper's)"),
    "global": ({"score": "grad_weight", "budget": "global"}, "top-K of |g w| over all tensors"),
    "random": ({"selection": "random"}, "k uniformly random components per tensor"),
    "mixed": ({"selection": "mixed"}, "half of k by |g w|, half uniformly random"),
    "balanced": ({"selection": "balanced", "line_cap": 2.0},
                 "top-k of |g w|, no row or column over twice its fair share"),
    "auto": ({"selection": "balanced", "line_cap": 1.0},
             "top-k of |g w|, no row or column over its fair share (SiftConfig's default selection)"),
    "from": ({"selection": "balanced", "line_cap": 1.0},
             "the earlier run's largest |change| (--select-from), no row or column over its fair share "
             "(SiftConfig.select_from)"),
    "snr": ({"score": "grad_snr"}, "top-k of |sum g| / sqrt(sum g^2) over the batches (the gradient's "
                                   "signal-to-noise ratio; two batches or more)"),
    "grow_drop": ({"selection": "grow_drop", "mode": "periodic"},
                  "top-k of |g w|, a quarter dropped and regrown at each refresh (trained only)"),
}
BUSIEST = 0.01  # the busiest 1% of rows (columns)


@dataclass
class SelectionArgs(inputs.AnalysisArgs):
    """:class:`AnalysisArgs` plus the selections, their density and the training after them.

    Args:
        density: fraction of each targeted weight's components selected (LoRA r=8 holds
            r(m+n)/mn of an m x n weight: 3.1% on MiniLM-L6, 2.3% on SmolLM2-135M).
        selections: which to compare: default (the top-k by |g w|), paper, global, random, mixed, balanced
            (at a line cap of 2), auto (SiftConfig's default selection: balanced at a cap of 1), from (ranked by
            ``select_from``'s change), snr, grow_drop (the last only trained: its first selection is default's).
        select_from: an increment folder (``siftune train``'s output, ``siftune bench --save-increments``)
            of a run on the same model; the ``from`` selection ranks each weight's components by its |change|,
            as ``SiftConfig.select_from`` does. Giving it adds ``from``; without ``target_modules`` the analysis
            takes the weights the increment holds.
        train_steps: optimizer steps each selection, LoRA and full fine-tuning train
            after the spread is measured, to compare their trained changes' stable
            ranks; 0 for none.
        lr: learning rate of the sparse and LoRA training (full fine-tuning: lr / 20).
        lora_rank: LoRA's rank in the trained comparison.
    """

    target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "modules whose weights are analysed, names or one regex (default: every Linear but the head)"})
    density: float = 0.01
    selections: list[str] = ("default", "paper", "global", "random", "mixed", "balanced")
    select_from: str | None = field(default=None, metadata={
        "help": "an earlier run's increment folder: the 'from' selection ranks by its |change| (adds 'from')"})
    train_steps: int = 0
    lr: float = 1e-3
    lora_rank: int = 8
    random_init: bool = field(default=False, metadata={"help": "not used by this analysis"})

    def validate(self) -> None:
        super().validate()
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) or not 0 < self.density <= 1:
            raise ConfigError(f"density must be a number in (0, 1], got {self.density!r}")
        unknown = [s for s in self.selections if s not in SELECTIONS]
        if unknown or not self.selections:
            raise ConfigError(f"selections must name some of {', '.join(SELECTIONS)}, got {list(self.selections)}")
        if "from" in self.selections and not self.select_from:
            raise ConfigError("selection 'from' ranks by an earlier run's change: give --select-from FOLDER (an "
                              "increment of a run on the same model and targets)")
        if self.select_from is not None and not (Path(self.select_from) / "increment.safetensors").is_file():
            raise ConfigError(f"select_from: {self.select_from} holds no increment.safetensors; give the folder "
                              "a run saved its increment into (siftune train's --output-dir, siftune bench --save-increments)")
        if "snr" in self.selections and self.batches < 2:
            raise ConfigError("selection snr compares the batches' gradients: give --batches 2 or more")
        for name in ("train_steps", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "train_steps" else 1):
                raise ConfigError(f"{name} must be a whole number >= {0 if name == 'train_steps' else 1}, "
                                  f"got {value!r}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise ConfigError(f"lr must be a number > 0, got {self.lr!r}")


def chosen_indices(selection: str, gradients: dict, weights: dict, density: float, seed: int = 0,
                   squares: dict | None = None, changes: dict | None = None) -> dict:
    """Each weight's chosen flat indices under ``selection`` (a key of :data:`SELECTIONS`), as the engine
    would choose them from these window gradients (for ``snr``, the window's summed squares; for ``from``, the
    earlier run's ``changes``, :func:`siftune.core.engine.earlier_changes`' dict)."""
    options, _ = SELECTIONS[selection]
    score = options.get("score", "grad_weight")
    if selection == "from":
        ranked = {n: change_ranking(changes[n], tuple(g.shape), "cpu") for n, g in gradients.items()}
    elif score == "grad_snr":
        ranked = {n: signal_to_noise(g, squares[n]) for n, g in gradients.items()}
    else:
        ranked = {n: (g * weights[n].detach().float()) if score == "grad_weight" else g for n, g in gradients.items()}
    counts = {n: count_selected(g.numel(), density) for n, g in gradients.items()}
    if options.get("budget") == "global":
        scores = torch.cat([r.reshape(-1).abs() for r in ranked.values()])
        top = torch.sort(top_k_indices(scores, sum(counts.values())).long()).values
        out, offset = {}, 0
        for name, r in ranked.items():
            mine = top[(top >= offset) & (top < offset + r.numel())] - offset
            out[name], offset = mine, offset + r.numel()
        return out
    out = {}
    for position, (name, r) in enumerate(ranked.items()):
        generator, k = tensor_generator(seed, position), counts[name]
        if selection == "random":
            out[name] = random_indices(r.numel(), k, generator, "cpu")
        elif selection == "mixed":
            out[name] = mixed_indices(r, k, 0.5, generator)
        elif options.get("selection") == "balanced":
            out[name] = balanced_indices(r, k, tuple(r.shape), options["line_cap"])
        else:
            out[name] = top_k_indices(r, k)
    return out


def spread(idx: torch.Tensor, shape: tuple) -> dict:
    """How the chosen flat indices ``idx`` of a weight of ``shape`` spread over its rows and columns."""
    rows, columns = shape[0], int(np.prod(shape[1:])) if len(shape) > 1 else 1
    idx = idx.long()
    out = {"chosen": idx.numel()}
    for axis, count, lines in (("rows", rows, idx // columns), ("columns", columns, idx % columns)):
        per_line = torch.bincount(lines, minlength=count)
        busiest = max(1, math.ceil(BUSIEST * count))
        out[f"{axis}_touched"] = float((per_line > 0).float().mean())
        out[f"busiest_{axis}_share"] = float(torch.sort(per_line, descending=True).values[:busiest].sum()
                                             / max(1, idx.numel()))
    return out


def stable_rank(change: torch.Tensor) -> float:
    """||change||_F^2 / ||change||_2^2 of a weight's change seen as rows x the rest; nan when zero."""
    matrix = change.detach().float().reshape(change.shape[0], -1)
    top = float(torch.linalg.matrix_norm(matrix, ord=2))
    return float(matrix.pow(2).sum()) / top ** 2 if top > 0 else float("nan")


def _grouped(tensors: dict, key: str) -> dict:
    """The tensors' rows pooled by ``key`` ("layer" or "module_type"): mean of each statistic, count share."""
    groups: dict = {}
    for row in tensors.values():
        groups.setdefault(str(row[key]), []).append(row)
    total = sum(row["chosen"] for row in tensors.values())
    out = {}
    for group, rows in groups.items():
        stats = {stat: float(np.mean([r[stat] for r in rows])) for stat in
                 ("rows_touched", "columns_touched", "busiest_rows_share", "busiest_columns_share")}
        out[group] = {"tensors": len(rows), "count_share": sum(r["chosen"] for r in rows) / max(1, total), **stats}
    return out


def spread_report(chosen: dict, shapes: dict) -> dict:
    """Per tensor, per layer, per module type and over the whole model (means over tensors)."""
    tensors = {}
    for name, idx in chosen.items():
        layer, module_type = layer_and_type(name)
        tensors[name] = {"layer": layer, "module_type": module_type, **spread(idx, shapes[name])}
    whole = {stat: float(np.mean([row[stat] for row in tensors.values()])) for stat in
             ("rows_touched", "columns_touched", "busiest_rows_share", "busiest_columns_share")}
    return {"whole_model": whole, "layers": _grouped(tensors, "layer"), "module_types": _grouped(tensors, "module_type"),
            "tensors": tensors}


def overlap(chosen: dict[str, dict], other: dict[str, dict]) -> float:
    """The share of ``chosen``'s components (over every weight) that ``other`` chose too."""
    common = sum(int(torch.isin(idx.long(), other[name].long()).sum()) for name, idx in chosen.items())
    return common / max(1, sum(idx.numel() for idx in chosen.values()))


def _train(model, batches, args: SelectionArgs, method: str, head: list[str], names: list[str],
           window=()) -> dict:
    """Train a copy of ``model`` by ``method``; each targeted weight's trained change (fp32, host).
    ``snr`` selects from the analysis' batches (``window``) before training."""
    from ..core.engine import attach

    model = copy.deepcopy(model)
    before = {n: model.get_parameter(n).detach().float().clone() for n in names}
    modules = [n.rpartition(".")[0] for n in names]
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                                 target_modules=modules, modules_to_save=head or None))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                      weight_decay=0.0)
    elif method == "full":
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr / 20, weight_decay=0.0)
    else:
        # each as named, with AdamW's plain steps (SiftConfig's "auto" would choose balanced and scale them)
        options = {"selection": "gradient", "step_scale": None, **SELECTIONS[method][0]}
        if options.get("mode") == "periodic":
            options["refresh_every"] = max(1, args.train_steps // 4)
        if options.get("score") == "grad_snr":
            options["selection_batches"] = len(window)
        if method == "from":
            options["select_from"] = args.select_from
        engine = attach(model, density=args.density, target_modules=modules, dense_modules=head, seed=args.seed,
                        **options)
        if options.get("score") == "grad_snr":
            engine.select(window, loss_of=batch_loss)
        optimizer = engine.optimizer(lr=args.lr)
    for batch in batches:
        batch_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    if method == "lora":
        model = model.merge_and_unload()
    return {n: model.get_parameter(n).detach().float() - before[n] for n in names}


def analyze_selection(args: SelectionArgs, progress: bool = True) -> dict:
    """Run the selection analysis as ``args`` says; writes and returns ``selection.json``'s content.

    Also writes ``selection_spread.png``, ``selection.md`` and, with
    ``train_steps``, ``selection_rank.png`` to ``args.output_dir``.
    """
    from tqdm.auto import tqdm

    if args.select_from is not None and "from" not in args.selections:
        args = dataclasses.replace(args, selections=[*args.selections, "from"])
    args.validate()
    started = time.perf_counter()
    # One seeded stream: the analysis takes its first batches, the training its first train_steps.
    model, stream = inputs.pretrained_and_batches(dataclasses.replace(args, batches=max(args.batches,
                                                                                        args.train_steps)))
    batches = stream[:args.batches]
    weights = targeted_weights(model, args.task, args.target_modules)
    earlier = SparseIncrement.load(args.select_from) if args.select_from is not None else None
    if earlier is not None and args.target_modules is None:  # the weights the earlier run trained
        weights = {n: w for n, w in weights.items() if n in earlier.tensors}
        if not weights:
            raise ConfigError(f"select_from: the increment at {args.select_from} holds no weight of this model; it "
                              "must come from a run on the same model")
    squares = {} if "snr" in args.selections else None
    gradients, loss = accumulated_gradient(model, batches, weights, progress, squares=squares)
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    changes = earlier_changes(args.select_from, shapes, earlier) if earlier is not None else None
    del earlier
    static = [s for s in args.selections if s != "grow_drop"]
    chosen = {s: chosen_indices(s, gradients, weights, args.density, args.seed, squares, changes)
              for s in tqdm(static, desc="selections", disable=not progress, dynamic_ncols=True)}
    spreads = {s: spread_report(c, shapes) for s, c in chosen.items()}
    shared = {s: {t: overlap(chosen[s], chosen[t]) for t in static if t != s} for s in static}
    del changes, chosen
    del gradients, squares
    result = {
        "setup": {**args.setup(), "batches": len(batches), "density": args.density, "train_steps": args.train_steps,
                  "lr": args.lr, "lora_rank": args.lora_rank,
                  **({"select_from": str(args.select_from)} if args.select_from else {})},
        "loss": loss,
        "selections": {s: SELECTIONS[s][1] for s in args.selections},
        "spread": spreads,
        "overlap": shared,  # selection -> other -> the share of its components the other chose too
    }
    if args.train_steps:
        children = {name for name, _ in model.named_children()}
        head = [n for n in ("classifier", "score") if n in children] if args.task == "classification" else []
        stream = stream[:args.train_steps]
        methods = [*args.selections, "lora", "full"]
        ranks = {}
        for method in tqdm(methods, desc="training", disable=not progress, dynamic_ncols=True):
            changes = _train(model, stream, args, method, head, list(weights), batches)
            ranks[method] = {n: {"stable_rank": stable_rank(c), "layer": layer_and_type(n)[0],
                                 "module_type": layer_and_type(n)[1]} for n, c in changes.items()}
        result["stable_rank"] = {m: _rank_summary(r) for m, r in ranks.items()}
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection.json").write_text(json.dumps(report.json_ready(result), indent=1))
    plot_spread(result, out / "selection_spread.png")
    if args.train_steps:
        plot_rank(result, out / "selection_rank.png")
    (out / "selection.md").write_text(markdown(result))
    return result


def _rank_summary(per_tensor: dict) -> dict:
    values = [r["stable_rank"] for r in per_tensor.values() if math.isfinite(r["stable_rank"])]
    types: dict = {}
    for row in per_tensor.values():
        if math.isfinite(row["stable_rank"]):
            types.setdefault(row["module_type"], []).append(row["stable_rank"])
    return {"mean": float(np.mean(values)) if values else float("nan"),
            "median": float(np.median(values)) if values else float("nan"),
            "module_types": {t: float(np.mean(v)) for t, v in types.items()}, "tensors": per_tensor}


# -- figures and report ------------------------------------------------------------------------------

def plot_spread(result: dict, path: Path) -> None:
    """Rows and columns touched by layer depth; the busiest 1%'s share by module type; one line per selection."""
    plt = plots._pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), layout="constrained")
    spreads = result["spread"]
    for index, (selection, stats) in enumerate(spreads.items()):
        style = {"color": f"C{index}", "marker": "o", "markersize": 3, "label": selection}
        layers = sorted((k for k in stats["layers"] if k != "None"), key=int)
        for ax, stat in ((axes[0][0], "rows_touched"), (axes[0][1], "columns_touched")):
            ax.plot([int(k) for k in layers], [stats["layers"][k][stat] for k in layers], **style)
        types = list(stats["module_types"])
        width = 0.8 / len(spreads)
        for ax, stat in ((axes[1][0], "busiest_rows_share"), (axes[1][1], "busiest_columns_share")):
            ax.bar(np.arange(len(types)) + index * width, [stats["module_types"][t][stat] for t in types], width,
                   color=f"C{index}", label=selection)
            ax.set_xticks(np.arange(len(types)) + 0.4 - width / 2, types, rotation=30, ha="right", fontsize=7)
    for ax, label in ((axes[0][0], "share of rows holding >= 1 chosen"),
                      (axes[0][1], "share of columns holding >= 1 chosen"),
                      (axes[1][0], "share of chosen in the busiest 1% of rows"),
                      (axes[1][1], "share of chosen in the busiest 1% of columns")):
        ax.set_ylabel(label, fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(True, linewidth=0.3)
    for ax in axes[0]:
        ax.set_xlabel("layer")
    axes[0][0].legend(fontsize=8)
    setup = result["setup"]
    fig.suptitle(f"where the chosen {setup['density']:.3%} sit: {setup['model']} on {setup['dataset']}", fontsize=10)
    plots._save(fig, path)


def plot_rank(result: dict, path: Path) -> None:
    """Mean stable rank of the trained change by module type, one bar per method (log y)."""
    plt = plots._pyplot()
    ranks = result["stable_rank"]
    types = list(next(iter(ranks.values()))["module_types"])
    fig, ax = plt.subplots(figsize=(10, 4.5), layout="constrained")
    width = 0.8 / len(ranks)
    for index, (method, summary) in enumerate(ranks.items()):
        ax.bar(np.arange(len(types)) + index * width, [summary["module_types"].get(t, np.nan) for t in types], width,
               color=f"C{index}", label=method)
    ax.set_xticks(np.arange(len(types)) + 0.4 - width / 2, types, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("stable rank of the trained change (mean)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, which="both", linewidth=0.3)
    setup = result["setup"]
    ax.set_title(f"{setup['train_steps']} steps at lr {setup['lr']:g}, density {setup['density']:.3%}, "
                 f"LoRA r={setup['lora_rank']}: {setup['model']} on {setup['dataset']}", fontsize=9)
    plots._save(fig, path)


def markdown(result: dict) -> str:
    """The analysis as a short markdown report."""
    setup, spreads = result["setup"], result["spread"]
    lines = [f"# Where the chosen components sit: {setup['model']} on {setup['dataset']}", "",
             f"Task {setup['task']}, density {setup['density']:.3%}, the gradient summed over {setup['batches']} "
             f"batches of {setup['batch_size']} (at most {setup['max_length']} tokens), seed {setup['seed']}; "
             f"took {result['seconds']} s. Means over the targeted weights."
             + (f" The earlier run (from): {setup['select_from']}." if setup.get("select_from") else ""), ""]
    lines += report._table(["selection", "rows touched", "columns touched", "busiest 1% rows hold",
                            "busiest 1% columns hold", "what"],
                           [[s, *(report._percent(stats["whole_model"][k]) for k in
                                  ("rows_touched", "columns_touched", "busiest_rows_share",
                                   "busiest_columns_share")), result["selections"][s].replace("|", "\\|")]
                            for s, stats in spreads.items()])
    if len(result.get("overlap", {})) > 1:
        shared = result["overlap"]
        lines += ["", "## Shared components", "", "The share of the row's components (over every weight) that the "
                  "column's selection chose too.", ""]
        lines += report._table(["selection", *shared], [
            [s, *("–" if t == s else report._percent(shared[s][t]) for t in shared)] for s in shared])
    types = list(next(iter(spreads.values()))["module_types"])
    lines += ["", "## By module type", "", "Rows touched / columns touched / share of the count.", ""]
    lines += report._table(["module type", *spreads], [
        [t, *(" / ".join(report._percent(spreads[s]["module_types"][t][k])
                         for k in ("rows_touched", "columns_touched", "count_share")) for s in spreads)]
        for t in types])
    layers = sorted((k for k in next(iter(spreads.values()))["layers"] if k != "None"), key=int)
    lines += ["", "## By layer", "", "Rows touched / columns touched / share of the count.", ""]
    lines += report._table(["layer", *spreads], [
        [k, *(" / ".join(report._percent(spreads[s]["layers"][k][stat])
                         for stat in ("rows_touched", "columns_touched", "count_share")) for s in spreads)]
        for k in layers])
    if "stable_rank" in result:
        ranks = result["stable_rank"]
        lines += ["", f"## Stable rank of the trained change ({setup['train_steps']} steps, lr {setup['lr']:g}; "
                      f"full fine-tuning lr {setup['lr'] / 20:g})", ""]
        lines += report._table(["method", "mean", "median", *types], [
            [m, report._number(r["mean"]), report._number(r["median"]),
             *(report._number(r["module_types"].get(t)) for t in types)] for m, r in ranks.items()])
    lines += ["", "Figures: `selection_spread.png`" + (", `selection_rank.png`." if "stable_rank" in result else "."),
              ""]
    return "\n".join(lines)


def summary(result: dict) -> str:
    """A few lines for the terminal."""
    lines = []
    for selection, stats in result["spread"].items():
        whole = stats["whole_model"]
        lines.append(f"{selection:>10}: rows touched {report._percent(whole['rows_touched'])}, columns "
                     f"{report._percent(whole['columns_touched'])}; busiest 1% of rows hold "
                     f"{report._percent(whole['busiest_rows_share'])}, of columns "
                     f"{report._percent(whole['busiest_columns_share'])}")
    for selection, others in result.get("overlap", {}).items():
        if others:
            lines.append(f"{selection:>10}: shares " + ", ".join(f"{report._percent(v)} with {t}"
                                                               for t, v in others.items()))
    for method, ranks in result.get("stable_rank", {}).items():
        lines.append(f"{method:>10}: stable rank of the trained change, mean {report._number(ranks['mean'])}")
    return "\n".join(lines)
