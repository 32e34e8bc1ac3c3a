"""Per-GPU device memory of fine-tuning under FSDP2 at Llama 7B, 13B and 70B, simulated on a CPU.

    python bench/simulate_fsdp.py                       # 7b 13b 70b on 8 GPUs; bench/results/simulated_fsdp.json
    python bench/simulate_fsdp.py --sizes 70b --methods sift-5 full
    python bench/simulate_fsdp.py --sizes tiny --world 4 --out runs/fsdp.json

One rank of a ``--world``-GPU job, as ``siftune estimate --gpus N --fsdp``
simulates it (``siftune.estimate.fsdp``: ``fully_shard`` per decoder layer and
at the root on a fake process group, fake tensors, torch's FSDPMemTracker; its
docstring lists every substitution), with bench/gpu.py's set-ups: bf16, seq
2048, batch 1 per GPU, non-reentrant gradient checkpointing, every Linear but
the output targeted, the paper's score ``grad``:

* ``full``: torch AdamW (fused) on every sharded weight (bf16 moments);
* ``lora``: peft LoRA of rank ``--rank`` (64), added before sharding (as torchtune does);
* ``sift-5``: SIFT at 5% with the defaults (fp32 masters and moments), each rank
  selecting, storing and updating its own rows' components;
* ``sift-5-lean``: 5% with bf16 moments, no masters and 16-bit indices; the
  update runs in ``optimizer.step()`` (``update_in_backward`` needs one process);
* ``frozen``: backward through every layer, no weight gradient (the floor).

By default three and four layers are simulated and extrapolated (``--whole``: every layer).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from siftune.estimate import Setup
from siftune.estimate.extrapolate import simulate_record
from siftune.estimate.shapes import named_config

RESULTS = Path(__file__).parent / "results" / "simulated_fsdp.json"
GiB = 2**30
METHODS = ["frozen", "full", "lora", "sift-5", "sift-5-lean"]
SIZES = ["tiny", "1b", "7b", "13b", "70b"]


def setup_of(method: str, seq: int = 2048, batch: int = 1, rank: int = 64, dtype: str = "bfloat16") -> Setup:
    """``method`` as an estimate's set-up."""
    common = dict(rank=rank, seq_len=seq, batch_size=batch, gradient_checkpointing=True, dtype=dtype)
    if method.startswith("sift"):
        return Setup("sift-lean" if method.endswith("lean") else "sift", density=0.05,
                     sift_options=dict(score="grad"), **common)
    return Setup(method, **common)


def simulate(method: str, size: str = "7b", world: int = 8, seq: int = 2048, batch: int = 1, warmup: int = 1,
             rank: int = 64, dtype: str = "bfloat16", whole: bool = False) -> dict:
    """One rank of ``method`` under FSDP2 on ``world`` GPUs: per-step device peaks and their parts."""
    started = time.time()
    record, setup, how = simulate_record(named_config(f"llama-{size}"), setup_of(method, seq, batch, rank, dtype),
                                         gpus=world, fsdp=True, whole=whole, warmup=warmup)
    steps = []
    for i, step in enumerate(record["steps"]):
        phase = max(step["phases"].values(), key=lambda snap: snap["total"])
        steps.append(dict(step=i, peak_gib=phase["total"] / GiB, after_gib=step["held"] / GiB,
                          parts_gib={k: v / GiB for k, v in phase.items() if k != "total" and v}))
    out = dict(method=method, size=size, world=world, seq=seq, batch=batch, gc=1, warmup=warmup, simulated=how,
               rank=rank if method == "lora" else None, params=record["base_params"], trainable=record["trainable"],
               dtype=dtype, device=f"simulated: rank 0 of {world} (fake process group), fake tensors, CUDA kernels",
               peak_gib=max(s["peak_gib"] for s in steps), steps=steps, sim_s=round(time.time() - started, 1),
               torch=torch.__version__)
    if record.get("selected") is not None:
        out.update(density=setup.density, selected=record["selected"], selected_rank0=record["selected_rank0"],
                   state_bytes_rank0=record["state_bytes_rank0"])
    return out


def table(records: list[dict]) -> list[str]:
    """docs/guides/distributed.md's table: per-GPU peak GiB, one row per method, one column per size."""
    sizes = sorted({r["size"] for r in records}, key=lambda s: (len(s), s))
    world = records[0]["world"] if records else 8
    lines = ["| method | " + " | ".join(f"{s.upper()} (GiB per GPU, {world} GPUs)" for s in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for method in METHODS:
        row = {r["size"]: r for r in records if r["method"] == method}
        if row:
            cells = [f"{row[s]['peak_gib']:.2f}" if "peak_gib" in row.get(s, {}) else row.get(s, {}).get("error", "-")
                     for s in sizes]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["sift-5", "sift-5-lean", "full", "lora"])
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=["7b", "13b", "70b"])
    parser.add_argument("--world", type=int, default=8, help="GPUs the model is sharded over")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1, help="sequences per GPU")
    parser.add_argument("--warmup", type=int, default=1, help="steps before the last one (the first selects)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA's rank")
    parser.add_argument("--whole", action="store_true", help="simulate every layer, not three and four extrapolated")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    command = " ".join(["python", "bench/simulate_fsdp.py", *sys.argv[1:]])
    saved = json.loads(args.out.read_text())["records"] if args.out.exists() else []
    for size in args.sizes:
        for method in args.methods:
            try:
                record = simulate(method, size, args.world, args.seq, args.batch, args.warmup, args.rank,
                                  whole=args.whole)
            except Exception as error:  # a method fake tensors cannot run is reported, not dropped
                record = dict(method=method, size=size, world=args.world, error=f"{type(error).__name__}: {str(error)[:300]}")
            record["command"] = command
            saved = [r for r in saved if (r["method"], r["size"], r["world"]) != (method, size, args.world)] + [record]
            print(json.dumps({k: v for k, v in record.items() if k not in ("steps", "command")}), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(dict(records=saved), indent=1) + "\n")
            tmp.replace(args.out)  # after every method: a crash loses nothing
    print("\n".join(table([r for r in saved if r["world"] == args.world])))


if __name__ == "__main__":
    main()
