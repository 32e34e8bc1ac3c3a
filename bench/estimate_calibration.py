"""`siftune estimate` against the H200 anchors: peak memory within 5%, and the step-time factor.

    python bench/estimate_calibration.py      # ~2-4 min here; bench/results/estimate_calibration.json

Each anchor of ``siftune.estimate.calibration.ANCHORS`` (shared/ANCHORS.md:
measured on one H200, Llama shapes, bf16, seq 2048, batch 1, rank 64) is
estimated as a user's ``siftune estimate`` would (two and three layers,
extrapolated). The memory rule: the floor, full fine-tuning and LoRA r=64 each
within 5% of the H200 at 7B. The step time: the roofline's one factor is
fitted on the 7B floor and checked on the others; the package states a step
time only where each kernel does at least half the 7B floor's work, and the
1B rows show why (they come out far too fast). The script fails (exit 1) when
the memory rule is broken or the fitted factor is not the package's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from siftune.estimate import Setup, estimate
from siftune.estimate import calibration as cal
from siftune.estimate.shapes import named_config

RESULTS = Path(__file__).parent / "results" / "estimate_calibration.json"
GiB = 2**30
MEMORY_RULE = (("llama-7b", "frozen", True), ("llama-7b", "full", True), ("llama-7b", "lora", True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    for (shape, method, checkpointing), (anchor_gib, anchor_s) in tqdm(cal.ANCHORS.items(), desc="anchors"):
        result = estimate(named_config(shape), Setup(method, rank=64, gradient_checkpointing=checkpointing))
        rows.append(dict(shape=shape, method=method, gradient_checkpointing=checkpointing,
                         simulated_gib=result["peak_bytes"] / GiB, anchor_gib=anchor_gib,
                         memory_off=result["peak_bytes"] / GiB / anchor_gib - 1,
                         roofline_s=result["roofline"]["roofline_s"], kernels=result["roofline"]["kernels"],
                         anchor_step_s=anchor_s, step_s_stated=result["step_s"],
                         step_s_left_out=result["step_s_left_out"]))
    floor = next(r for r in rows if (r["shape"], r["method"], r["gradient_checkpointing"]) == MEMORY_RULE[0])
    scale = floor["anchor_step_s"] / floor["roofline_s"]
    for row in rows:
        row["step_s_at_fitted_scale"] = row["roofline_s"] * scale
        row["step_off"] = row["step_s_at_fitted_scale"] / row["anchor_step_s"] - 1
        row["work_per_kernel_vs_floor"] = (row["roofline_s"] / row["kernels"]) / (floor["roofline_s"] / floor["kernels"])
    memory_ok = all(abs(r["memory_off"]) <= 0.05 for r in rows
                    if (r["shape"], r["method"], r["gradient_checkpointing"]) in MEMORY_RULE)
    scale_ok = abs(scale / cal.STEP_SCALE - 1) <= 0.01
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(command="python bench/estimate_calibration.py", fitted_scale=scale,
                                        package_scale=cal.STEP_SCALE, memory_within_5pct=memory_ok,
                                        floor_s_per_kernel=floor["roofline_s"] / floor["kernels"], rows=rows),
                                   indent=1) + "\n")
    print("| shape | method | grad. ckpt | simulated GiB | H200 GiB | off | roofline x scale | H200 s | off | "
          "work a kernel (7B floor = 1) | step time stated |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        stated = f"{r['step_s_stated']:.3f} s" if r["step_s_stated"] else "no (launch-bound)"
        print(f"| {r['shape']} | {r['method']} | {'yes' if r['gradient_checkpointing'] else 'no'} | "
              f"{r['simulated_gib']:.2f} | {r['anchor_gib']:.2f} | {r['memory_off']:+.1%} | "
              f"{r['step_s_at_fitted_scale']:.3f} | {r['anchor_step_s']:.3f} | {r['step_off']:+.0%} | "
              f"{r['work_per_kernel_vs_floor']:.2f} | {stated} |")
    print(f"scale fitted on the 7B floor: {scale:.4f} (package: {cal.STEP_SCALE}); memory rule "
          f"(floor, full, LoRA within 5% at 7B): {'met' if memory_ok else 'BROKEN'}")
    return 0 if memory_ok and scale_ok else 1


if __name__ == "__main__":
    sys.exit(main())
