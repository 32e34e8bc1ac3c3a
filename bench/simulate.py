"""Device memory and step time of bench/gpu.py's methods, simulated on a CPU without a GPU.

    python bench/simulate.py                  # every method of bench/gpu.py; bench/results/simulated_memory.json
    python bench/simulate.py --size 13b --methods qlora-64-nf4 sift-qlora-nf4 --out runs/nf4.json
    python bench/simulate.py --methods frozen sift-5 --size tiny --out runs/sim.json

The simulation is ``siftune estimate``'s (``siftune.estimate``: fake tensors,
torch's MemTracker, a roofline; its module docstrings list every
substitution). This script names each of ``bench/gpu.py``'s methods as a
``siftune.estimate.Setup`` (Llama shape, bf16, seq 2048, batch 1,
non-reentrant gradient checkpointing, every Linear but the output targeted,
the paper's score ``grad`` with which the GPU figures were measured), and adds
the GPU bench's targets (a)-(c) and the step-time calibration to what the estimate gives.
By default two and three layers are simulated and extrapolated (``--whole``:
every layer). ``bench/estimate_calibration.py`` checks the estimate against
the H200 anchors; ``tests/test_simulate.py`` holds the simulation to a real CPU
run at the tiny shape.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from siftune.estimate import Setup
from siftune.estimate.calibration import ANCHORS
from siftune.estimate.extrapolate import simulate_record
from siftune.estimate.shapes import named_config

RESULTS = Path(__file__).parent / "results" / "simulated_memory.json"
GiB = 2**30
METHODS = ["frozen", "full", "lora", "shira", "sift-5", "sift-5-lean", "sift-lora"]
NF4_METHODS = ["qlora-64-nf4", "sift-5-nf4", "sift-5-lean-nf4", "sift-qlora-nf4", "sift-qlora-nf4-compact"]
SIZES = ["tiny", "1b", "7b", "13b", "70b"]
GRAD = dict(score="grad")  # the paper's score, with which every GPU figure was measured


def setup_of(method: str, config, seq: int, batch: int, gc: bool, rank: int, dtype: str = "bfloat16") -> Setup:
    """``bench/gpu.py``'s ``method`` as an estimate's set-up."""
    common = dict(rank=rank, seq_len=seq, batch_size=batch, gradient_checkpointing=gc, dtype=dtype)
    at_lora = lora_count(config, rank)  # SIFT at LoRA r=rank's trainable count
    return {
        "frozen": Setup("frozen", **common),
        "full": Setup("full", **common),
        "lora": Setup("lora", **common),
        "shira": Setup("shira", **common),
        "sift-5": Setup("sift", density=0.05, sift_options=GRAD, **common),
        "sift-5-lean": Setup("sift-lean", density=0.05, sift_options=GRAD, **common),
        "sift-lora": Setup("sift", trainable=at_lora, sift_options=dict(GRAD, update_in_backward=True), **common),
        "qlora-64-nf4": Setup("qlora", quantize="nf4", **common),
        "sift-5-nf4": Setup("sift", density=0.05, quantize="nf4", sift_options=GRAD, **common),
        "sift-5-lean-nf4": Setup("sift-lean", density=0.05, quantize="nf4", sift_options=GRAD, **common),
        "sift-qlora-nf4": Setup("sift", trainable=at_lora, quantize="nf4", sift_options=GRAD, **common),
        "sift-qlora-nf4-compact": Setup("sift", trainable=at_lora, quantize="nf4",
                                        sift_options=dict(GRAD, compact_indices=True), **common),
    }[method]


def lora_count(config, rank: int) -> int:
    """Trainable entries of a rank-``rank`` LoRA on every Linear but the output layer: r x (in + out) each."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = hidden // config.num_attention_heads * config.num_key_value_heads
    per_layer = 2 * (hidden + hidden) + 2 * (hidden + kv) + 2 * (hidden + inter) + (inter + hidden)
    return rank * per_layer * config.num_hidden_layers


def simulate(method: str, size: str = "7b", seq: int = 2048, batch: int = 1, gc_layers: bool = True,
             warmup: int = 1, rank: int = 64, whole: bool = False) -> dict:
    """One method on the simulation: per-step device peaks and their parts, and a roofline."""
    started = time.time()
    config = named_config(f"llama-{size}")
    record, setup, how = simulate_record(config, setup_of(method, config, seq, batch, gc_layers, rank),
                                         whole=whole, warmup=warmup)
    steps = []
    for i, step in enumerate(record["steps"]):
        phase = max(step["phases"].values(), key=lambda snap: snap["total"])
        steps.append(dict(step=i, peak_gib=phase["total"] / GiB, after_gib=step["held"] / GiB,
                          parts_gib={k: v / GiB for k, v in phase.items() if k != "total" and v}))
    import peft
    import transformers

    out = dict(method=method, size=size, seq=seq, batch=batch, gc=int(gc_layers), warmup=warmup, simulated=how,
               params=record["base_params"], trainable=record["trainable"],
               device="simulated: fake meta device, CUDA kernels", peak_gib=max(s["peak_gib"] for s in steps),
               steps=steps, roofline=record["roofline"], first_step_roofline=record["first_step_roofline"],
               sim_s=round(time.time() - started, 1), torch=torch.__version__,
               transformers=transformers.__version__, peft=peft.__version__)
    if record.get("selected") is not None:
        out.update(selected=record["selected"], density=setup.density)
    anchor = ANCHORS.get((f"llama-{size}", method, gc_layers))
    if anchor and (seq, batch, rank) == (2048, 1, 64):
        out["anchor_gib"], out["anchor_step_s"] = anchor
    return out


def summarize(records: list[dict]) -> dict:
    """Calibration against the H200 anchors, the GPU bench's targets (a)-(c), and the step-time estimate."""
    by = {r["method"]: r for r in records if "peak_gib" in r}
    anchored = {m: r for m, r in by.items() if "anchor_gib" in r}  # the H200's shape and settings only
    calibration = {m: dict(simulated_gib=r["peak_gib"], anchor_gib=r["anchor_gib"],
                           off=r["peak_gib"] / r["anchor_gib"] - 1) for m, r in anchored.items()}
    # The rule: the floor, full fine-tuning and LoRA each within 5% of the H200 at 7B.
    out = dict(calibration=calibration,
               memory_is_measurement=all(m in calibration and abs(calibration[m]["off"]) <= 0.05
                                         for m in ("frozen", "full", "lora")))
    targets = {}
    if "frozen" in by and "sift-5" in by:
        budget = by["frozen"]["peak_gib"] + 18 * by["sift-5"]["selected"] / GiB
        targets["a"] = dict(method="sift-5", peak_gib=by["sift-5"]["peak_gib"], limit_gib=budget,
                            rule="floor + 18 B x selected")
    if "sift-5-lean" in by:
        targets["b"] = dict(method="sift-5-lean", peak_gib=by["sift-5-lean"]["peak_gib"], limit_gib=16.1,
                            rule="16.1 GiB")
    if "lora" in by and "sift-lora" in by:
        targets["c"] = dict(method="sift-lora", peak_gib=by["sift-lora"]["peak_gib"],
                            limit_gib=1.05 * by["lora"]["peak_gib"], rule="1.05 x LoRA r=64")
    for name, method in (("c-nf4", "sift-qlora-nf4"), ("c-nf4-compact", "sift-qlora-nf4-compact")):
        if "qlora-64-nf4" in by and method in by:  # the same, on an nf4 base
            targets[name] = dict(method=method, peak_gib=by[method]["peak_gib"],
                                 limit_gib=1.05 * by["qlora-64-nf4"]["peak_gib"], rule="1.05 x QLoRA r=64 (nf4)")
    for t in targets.values():
        t["met"] = t["peak_gib"] <= t["limit_gib"]
    out["targets"] = targets
    if "frozen" in anchored:
        # One factor, fitted on the floor only: the peers are then a check, not a fit.
        scale = anchored["frozen"]["anchor_step_s"] / by["frozen"]["roofline"]["roofline_s"]
        estimate = {m: r["roofline"]["roofline_s"] * scale for m, r in by.items()}
        off = {m: estimate[m] / r["anchor_step_s"] - 1 for m, r in anchored.items()}
        peers = {"full", "lora"}
        usable = all(abs(off[m]) <= 0.25 for m in peers) if peers <= set(off) else None
        floor_ops = by["frozen"]["roofline"]["by_op"]
        added = {}
        for m, r in by.items():
            if m.startswith("sift"):
                diff = {op: (v["roofline_s"] - floor_ops.get(op, {}).get("roofline_s", 0.0)) * scale
                        for op, v in r["roofline"]["by_op"].items()}
                added[m] = {op: d for op, d in sorted(diff.items(), key=lambda kv: -kv[1]) if d >= 5e-4}
        selection = {m: r["first_step_roofline"]["roofline_s"] * scale for m, r in by.items() if m.startswith("sift")}
        out["step_time"] = dict(scale_fitted_on_floor=scale, off_on_anchors=off, within_25pct=usable,
                                estimate_s=estimate if usable else None,
                                sift_over_floor_s=added if usable else None,
                                sift_selection_step_s=selection if usable else None)
        if usable and "lora" in anchored:
            # The roofline charges nothing per kernel; LoRA (many small kernels) is where it
            # misses most. A cost per kernel beyond the floor's, fitted on LoRA, with full
            # fine-tuning as the check: how much the estimates move if that is the cause.
            kernels = {m: r["roofline"]["kernels"] for m, r in by.items()}
            first = {m: r["first_step_roofline"]["kernels"] for m, r in by.items()}
            per_kernel = (anchored["lora"]["anchor_step_s"] - estimate["lora"]) / (kernels["lora"] - kernels["frozen"])
            with_kernels = {m: t + per_kernel * (kernels[m] - kernels["frozen"]) for m, t in estimate.items()}
            out["step_time"]["with_kernel_cost"] = dict(
                per_kernel_s=per_kernel, estimate_s=with_kernels,
                off_on_full=with_kernels["full"] / anchored["full"]["anchor_step_s"] - 1 if "full" in anchored else None,
                sift_selection_step_s={m: t + per_kernel * (first[m] - kernels["frozen"]) for m, t in selection.items()})
    return out


def table(records: list[dict], summary: dict) -> list[str]:
    lines = ["| method | simulated peak GiB | selection step | steady step | parts at the peak (GiB) | H200 anchor |",
             "|---|---:|---:|---:|---|---:|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['method']} | not simulated: {r['error'][:80]} | | | | |")
            continue
        peak_step = max(r["steps"], key=lambda st: st["peak_gib"])
        parts = ", ".join(f"{k} {v:.2f}" for k, v in peak_step["parts_gib"].items() if v >= 0.005)
        anchor = f"{r['anchor_gib']:.2f}" if "anchor_gib" in r else ""
        lines.append(f"| {r['method']} | {r['peak_gib']:.2f} | {r['steps'][0]['peak_gib']:.2f} | "
                     f"{r['steps'][-1]['peak_gib']:.2f} | {parts} | {anchor} |")
    for m, c in summary["calibration"].items():
        lines.append(f"calibration {m}: {c['simulated_gib']:.2f} vs {c['anchor_gib']:.2f} GiB ({c['off']:+.1%})")
    for key, t in summary["targets"].items():
        lines.append(f"({key}) {t['method']}: {t['peak_gib']:.2f} GiB, limit {t['limit_gib']:.2f} ({t['rule']}): "
                     f"{'met' if t['met'] else 'MISSED'}")
    if "step_time" in summary:
        st = summary["step_time"]
        lines.append("roofline x " + f"{st['scale_fitted_on_floor']:.2f} (fitted on the floor): " + ", ".join(
            f"{m} {v:+.0%}" for m, v in st["off_on_anchors"].items()) + {
            True: "", None: " (peers not simulated)",
            False: " -> off by more than 25% on a peer: no step time is stated"}[st["within_25pct"]])
        if st["within_25pct"]:
            for m, t in st["estimate_s"].items():
                extra = st["sift_over_floor_s"].get(m)
                lines.append(f"step estimate {m}: {t:.3f} s" + ("" if extra is None else " (over the floor: " + ", ".join(
                    f"{op.replace('aten.', '')} {d * 1e3:.1f} ms" for op, d in list(extra.items())[:6])
                    + f"; selection step {st['sift_selection_step_s'][m]:.3f} s)"))
            kc = st.get("with_kernel_cost")
            if kc:
                lines.append(f"with {kc['per_kernel_s'] * 1e6:.1f} us per kernel beyond the floor's (fitted on LoRA; "
                             f"full {kc['off_on_full']:+.0%}): " + ", ".join(
                                 f"{m} {t:.3f} s" for m, t in kc["estimate_s"].items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS + NF4_METHODS, default=METHODS)
    parser.add_argument("--size", default="7b", choices=SIZES)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gc", type=int, default=1, help="gradient checkpointing (1/0)")
    parser.add_argument("--warmup", type=int, default=1, help="steps before the last one (the first selects)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--whole", action="store_true", help="simulate every layer, not two and three extrapolated")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--summary-only", action="store_true",
                        help="simulate nothing: recompute the summary of the records already in --out")
    args = parser.parse_args()
    if args.summary_only:
        saved = json.loads(args.out.read_text())
        records = saved["methods"]
        args.out.write_text(json.dumps(dict(saved, **summarize(records), methods=records), indent=1) + "\n")
        print("\n".join(table(records, summarize(records))))
        return
    command = " ".join(["python", "bench/simulate.py", *sys.argv[1:]])
    records = []
    for method in args.methods:
        try:
            record = simulate(method, args.size, args.seq, args.batch, bool(args.gc), args.warmup, args.rank,
                              args.whole)
        except Exception as error:  # a method fake tensors cannot run is reported, not dropped
            record = dict(method=method, size=args.size, error=f"{type(error).__name__}: {str(error)[:300]}")
        records.append(record)
        print(json.dumps({k: v for k, v in record.items() if "roofline" not in k and k != "steps"}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(command=command, **summarize(records), methods=records), indent=1)
                            + "\n")  # after every method: a crash loses nothing
    print("\n".join(table(records, summarize(records))))


if __name__ == "__main__":
    main()
