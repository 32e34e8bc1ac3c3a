"""Step times of structured SIFT against LoRA r=8 on two kinds of batch: the task's and full-length ones.

    python bench/rows_timing.py                # bench/results/structured/rows_timing.json (about 6 minutes)
    python bench/rows_timing.py --quick        # a tiny random Llama, 2 rounds: a smoke test; writes nothing

``siftune bench --paired-steps`` times the task's batches: chatterbot pairs
padded to the batch's longest, 51 to 128 tokens. This script times the same
methods, loaded once and stepped in turns in one process (the order
reversed every other round), on those batches and on full 8 x 128 batches
of random tokens (every position a label), and splits each step into
forward, backward and optimizer step, with the minor page faults a step
causes (``ru_minflt``): the allocator maps and faults in the step's large
tensors (the 49,152-way logits and their gradient) anew, and their cost is
the same for every method. Round 0 (SIFT selects there) is not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from siftune.bench.methods import MethodRun, prepare
from siftune.recipes.loss import batch_loss
from siftune.bench.runner import _load, _machine, _versions, in_turns, parse_method, plan

METHODS = ["lora:8", "sift-rows:matched", "sift-rows:0.0001", "sift-fixed:matched", "dense-backward"]
OUT = Path(__file__).parent / "results" / "structured" / "rows_timing.json"


def _timed_step(model, optimizer, batch) -> dict:
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    loss = batch_loss(model, batch)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad()
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0,
            "kfaults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 1000}


def time_methods(prepared: dict, batches, rounds: int) -> dict:
    """Median seconds (and thousands of page faults) of each phase of each method's step, stepped in turns."""
    names = list(prepared)
    seen = in_turns([lambda batch, p=p: _timed_step(p.model, p.optimizer, batch) for p in prepared.values()],
                    batches, rounds)
    result = {}
    for name, steps in zip(names, seen):
        result[name] = {key: round(statistics.median(s[key] for s in steps), 4) for key in steps[0]}
        result[name]["steps"] = [round(s["step"], 4) for s in steps]
    reference = result[names[0]]["step"]
    for name in names:
        result[name]["x_" + names[0]] = round(result[name]["step"] / reference, 3)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a tiny random Llama, 2 rounds; writes nothing")
    p.add_argument("--output", type=Path, default=OUT)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    load_avg = os.getloadavg()[0]
    if ns.quick:
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
        prepared = {}
        for token in METHODS:
            torch.manual_seed(0)
            method, setting = parse_method(token)
            prepared[token] = prepare(LlamaForCausalLM(config), MethodRun(method, "causal_lm", setting, 1e-4, 1e-4, 0))
            prepared[token].model.train()
        vocab, batch_size, length, rounds, task_batches = 512, 2, 16, 2, None
    else:
        prepared, task_batches = {}, None
        for spec in plan("causal_lm", METHODS, [0], threads=ns.threads):
            train_set, _, _, model, batches = _load(spec)
            prepared[spec.token] = prepare(model, MethodRun(spec.method, spec.task, spec.setting, spec.lr,
                                                            spec.dense_lr, spec.seed, sift=spec.sift))
            prepared[spec.token].model.train()
            task_batches = task_batches or batches.train_forever(train_set)
        vocab, batch_size, length, rounds = prepared[METHODS[0]].model.config.vocab_size, 8, 128, ns.rounds

    def full_length():
        generator = torch.Generator().manual_seed(0)
        while True:
            ids = torch.randint(0, vocab, (batch_size, length), generator=generator)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    results = {"full_length": time_methods(prepared, full_length(), rounds)}
    if task_batches is not None:
        results["task_batches"] = time_methods(prepared, task_batches, rounds)
    for kind, table in results.items():
        print(kind)
        for name, row in table.items():
            print(f"  {name:20s} step {row['step']:.3f} s ({row['x_' + METHODS[0]]:.3f}x): "
                  f"forward {row['forward']:.3f}, backward {row['backward']:.3f}, optimizer {row['optimizer']:.3f}, "
                  f"{row['kfaults']:.1f}k page faults")
    if ns.quick:
        return 0
    record = {"model": "smollm2", "batch_size": batch_size, "max_length": length, "rounds": rounds,
              "results": results, "machine": _machine(ns.threads), "load_avg_1min": round(load_avg, 2),
              "versions": _versions(), "command": "python bench/rows_timing.py " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    ns.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = ns.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(ns.output)
    print(f"wrote {ns.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
