"""``siftune estimate``: will a fine-tuning step fit, and what does it cost.

    siftune estimate llama-7b --methods sift lora full --gradient-checkpointing
    siftune estimate llama-7b --methods sift qlora --quantize nf4 --fit 24GiB --for seq-len
    siftune estimate llama-70b --gpus 8 --fsdp --methods sift full lora --json
    siftune estimate llama-7b --gpus 4 --methods sift lora full --gradient-checkpointing
    siftune estimate llama-7b --methods sift qlora --quantize int8 --int8-outliers 0.01
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from ..errors import ConfigError
from .fit import FIT_FOR, parse_size
from .methods import DTYPES, METHODS, QUANTIZE, Setup

GiB = 2**30
COLUMNS = ("parameters", "gradients", "optimizer_state", "activations", "temporaries", "communication", "other")


def add_parser(sub) -> None:
    """Add ``estimate`` to the ``siftune`` subcommands."""
    parser = sub.add_parser(
        "estimate", help="simulate a training step's peak GPU memory and time, without a GPU",
        description="Peak device memory per GPU of a training step, by part, and its step time on an "
                    "H200, simulated on fake tensors on this CPU. MODEL: a named shape (llama-1b, llama-7b, "
                    "llama-13b, llama-70b), a built-in model (smollm2, minilm), or a transformers folder "
                    "or config.json.")
    parser.add_argument("model", help="named shape, built-in model, or folder / config.json")
    parser.add_argument("--methods", nargs="+", default=["sift", "lora", "full"], metavar="METHOD",
                        help="any of: " + "; ".join(f"{k}: {v}" for k, v in METHODS.items())
                        + " (default: sift lora full)")
    parser.add_argument("--density", type=float, help="SIFT's trained fraction of each weight, in (0, 1] "
                        "(default 0.01)")
    parser.add_argument("--trainable", type=_count, help="SIFT's trained count instead of --density "
                        "(e.g. 160M)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA/QLoRA/SHiRA rank (default 64)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="the weights' dtype (default bfloat16)")
    parser.add_argument("--quantize", choices=QUANTIZE, help="the base's Linear layers in bitsandbytes nf4 or "
                        "int8 (LLM.int8(), as transformers' load_in_8bit loads them); qlora: nf4 unless told; "
                        "SIFT trains a delta beside them")
    parser.add_argument("--int8-outliers", type=float, metavar="FRACTION",
                        help="with --quantize int8: the share of each layer's input columns LLM.int8() takes "
                             "as outlier columns, which only the data can tell (default 0.01; the LLM.int8() "
                             "paper finds about 0.0015 at 6.7B)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step per GPU (default 1)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="recompute activations in backward (default off)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (default 1); above 1 without --fsdp, data "
                        "parallel: every GPU holds the whole model, plus DDP's gradient buckets (lora, qlora, "
                        "full, shira) or SIFT's own exchange of its selected entries")
    parser.add_argument("--fsdp", action="store_true", help="shard over the --gpus with FSDP2 (fully_shard per "
                        "layer)")
    parser.add_argument("--fit", metavar="SIZE", help="find the largest --for value whose peak fits SIZE "
                        "(e.g. 24GiB, 80GiB, 40GB)")
    parser.add_argument("--for", dest="fit_for", choices=list(FIT_FOR), default="density",
                        help="what --fit searches (default density)")
    parser.add_argument("--whole", action="store_true", help="simulate every layer, not two and three "
                        "extrapolated (slower; the same answer for a model whose layers are alike)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _count(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 160000000, 160M or 1.2B")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def run(ns: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .extrapolate import SHORT, SHORT_FSDP, estimate
    from .fit import fit
    from .shapes import load_config

    config = load_config(ns.model)
    if ns.gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {ns.gpus}")
    if ns.fsdp and ns.gpus == 1:
        raise ConfigError("--fsdp shards over several GPUs: give --gpus N with N >= 2")
    budget = parse_size(ns.fit) if ns.fit else None
    setups = [Setup(method, density=ns.density, trainable=ns.trainable, rank=ns.rank, dtype=ns.dtype,
                    quantize=ns.quantize, int8_outliers=ns.int8_outliers,
                    batch_size=ns.batch_size, seq_len=ns.seq_len, gradient_checkpointing=ns.gradient_checkpointing)
              for method in dict.fromkeys(ns.methods)]
    for setup in setups:
        if setup.quantize and setup.method in ("full", "shira"):
            raise ConfigError(f"{setup.method} trains the weights themselves: it cannot run on a base quantized "
                              f"to {setup.quantize}; leave it out or drop --quantize")
        if ns.fsdp:
            from .fsdp import check

            check(setup)  # before the progress bar: a refusal is one line
    per_estimate = len(SHORT_FSDP if ns.fsdp else SHORT)
    bar = tqdm(total=per_estimate * len(setups), unit="simulation", disable=ns.quiet or None, file=sys.stderr,
               desc="estimate")
    results = []
    with bar:
        for setup in setups:
            bar.set_postfix_str(setup.method)
            if budget is None:
                results.append(estimate(config, setup, ns.gpus, ns.fsdp, whole=ns.whole, progress=bar))
            else:
                results.append(fit(config, setup, ns.fit_for, budget, ns.gpus, ns.fsdp, progress=_Growing(bar)))
    if ns.json:
        print(json.dumps(dict(model=ns.model, results=results), indent=1, default=str))
    elif budget is None:
        print("\n".join(table(results, ns.model)))
    else:
        print("\n".join(fit_table(results, ns.model, ns.fit)))
    return 0


class _Growing:
    """A progress bar whose total grows as a search probes (its probe count is not known ahead)."""

    def __init__(self, bar):
        self.bar = bar

    def update(self, n: int) -> None:
        if self.bar.n + n > (self.bar.total or 0):
            self.bar.total = self.bar.n + n
        self.bar.update(n)


def _gib(n) -> str:
    return "" if not n or n < 0.005 * GiB else f"{n / GiB:.2f}"


def _what(result: dict, searched: str | None = None) -> str:
    s = result["setup"]
    where = "one GPU"
    if result["gpus"] > 1:
        where = f"{result['gpus']} GPUs, " + ("FSDP2" if result["fsdp"] else "data parallel") + ", per GPU"
    batch = "searched" if searched == "batch-size" else s["batch_size"]
    tokens = "searched" if searched == "seq-len" else s["seq_len"]
    return (f"{result['params'] / 1e9:.2f}B parameters, {result['layers']} layers; {s['dtype']}"
            + (f" base in {s['quantize']}" if s.get("quantize") else "")
            + f", batch {batch} x {tokens} tokens, gradient checkpointing "
            + ("on" if s["gradient_checkpointing"] else "off") + f"; {where}")


def table(results: list[dict], model: str) -> list[str]:
    """The estimate as a Markdown table: one row per method, the parts at its peak, then notes."""
    used = [c for c in COLUMNS if any(r["parts"].get(c, 0) >= 0.005 * GiB for r in results)]
    lines = [f"{model}: {_what(results[0])}", "",
             "| method | trainable | peak GiB | " + " | ".join(c.replace("_", " ") for c in used)
             + " | step s (H200) |",
             "|---|---:|---:|" + "---:|" * len(used) + "---:|"]
    for r in results:
        trainable = _human(r["trainable"]) + (f" ({r['density']:.2%})" if r.get("density") else "")
        step = f"{r['step_s']:.3f}" if r["step_s"] else "-"
        lines.append(f"| {r['method']} | {trainable} | {_gib(r['peak_bytes'])} | "
                     + " | ".join(_gib(r["parts"].get(c)) for c in used) + f" | {step} |")
    lines.append("")
    lines.append("Parts are at the peak (" + "; ".join(
        f"{r['method']}: {r['peak_at']['step']} step, {r['peak_at']['phase']}" for r in results) + ").")
    lines.append(f"Simulated on fake tensors ({results[0]['simulated']}); the CUDA allocator's rounding, "
                 "cuBLAS workspaces and the CUDA context are not counted: leave ~1 GiB of headroom.")
    lines += _notes(results)
    left_out: dict[str, list[str]] = {}
    for r in results:
        if r["step_s_left_out"]:
            left_out.setdefault(r["step_s_left_out"], []).append(r["method"])
    for why, names in sorted(left_out.items()):
        lines.append(f"Step time: {why}." if len(names) == len(results) else f"Step time, {', '.join(names)}: {why}.")
    if any(r["step_s"] for r in results):
        lines.append("Step time: roofline x 1.67, fitted on the 7B floor measured on an H200 "
                     "(full fine-tuning -5%, LoRA -20% there).")
    return lines


def _notes(results: list[dict]) -> list[str]:
    """Each note once, naming its methods when not every method has it."""
    methods: dict[str, list[str]] = {}
    for r in results:
        for note in r.get("notes", ()):
            methods.setdefault(note, []).append(r["method"])
    return [(note[0].upper() + note[1:] if len(names) == len(results) else f"{', '.join(names)}: {note}") + "."
            for note, names in methods.items()]


def fit_table(results: list[dict], model: str, size: str) -> list[str]:
    what = results[0]["fit_for"]
    first = next((r["estimate"] for r in results if r.get("estimate")), None)
    lines = ([f"{model}: {_what(first, what)}", ""] if first else []) + [
        f"| method | largest {what} within {size} | peak GiB there | next probe up (GiB) |", "|---|---:|---:|---|"]
    for r in results:
        if r["largest"] is None:
            lines.append(f"| {r['method']} | - | | {r.get('note', '')} |")
            continue
        value = f"{r['largest']:.4g}" if what == "density" else str(r["largest"])
        if what == "density":
            value += f" ({_human(r['estimate']['trainable'])} trainable)"
        over = r.get("first_over")
        over_text = f"{what} {over['value']:.4g}: {_gib(over['peak_bytes'])}" if over else r.get("note", "")
        lines.append(f"| {r['method']} | {value} | {_gib(r['estimate']['peak_bytes'])} | {over_text} |")
    lines.append("")
    lines.append(f"Found by bracketing on the simulation ({sum(r.get('probes', 0) for r in results)} probes); "
                 "not counted: the CUDA allocator's rounding, workspaces and context (~1 GiB).")
    lines += _notes([dict(r["estimate"], method=r["method"]) for r in results if r.get("estimate")])
    return lines


def _human(n) -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)
