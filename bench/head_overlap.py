"""How stable the gradient's choice is: overlaps of the choices under another head and from other batches.

    python bench/head_overlap.py             # MiniLM-L6 on Rotten Tomatoes, one thread, about a minute
    python bench/head_overlap.py causal_lm   # SmolLM2-135M on chatterbot (no new head), about 5 minutes

A classifier starts from a seeded random head, so the body's gradient at the
selection is taken through a random readout. For each score (|g w|, the
default; the signal-to-noise ratio) this takes each weight's top components
at LoRA r=8's count (3.125% on MiniLM-L6, 2.3% on SmolLM2-135M's
q/k/v/o/gate/up/down) from the gradient of 16 batches (16 examples of at
most 64 tokens on (a), 8 of at most 128 on (b)), three ways: head A on
batches 1-16, head B (another seed) on the same batches, head A on batches
17-32 (the causal LM has no new head: the last only). Overlap: the share of
the first choice that the other also chose, over all targeted weights (two
uniformly random choices overlap by the density). Writes
bench/results/head_overlap_<task>.json.
"""
import json
import sys
from pathlib import Path

import torch

from siftune.analysis import inputs
from siftune.analysis.gradients import accumulated_gradient, targeted_weights
from siftune.analysis.selection import SelectionArgs
from siftune.core.budget import signal_to_noise
from siftune.core.select import count_selected, top_k_indices

TASKS = {"classification": dict(model="minilm", dataset="rotten_tomatoes", density=0.03125, batch_size=16,
                                 max_length=64, target_modules=None),
         "causal_lm": dict(model="smollm2", dataset="chatterbot", density=0.023, batch_size=8, max_length=128,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"])}
WINDOW = 16


def choices(model, batches, weights, density) -> dict:
    squares = {}
    grads, _ = accumulated_gradient(model, batches, weights, squares=squares)
    scores = {"|g w|": {n: g * weights[n].detach().float() for n, g in grads.items()},
              "signal-to-noise": {n: signal_to_noise(g, squares[n]) for n, g in grads.items()}}
    return {score: {n: set(top_k_indices(r, count_selected(r.numel(), density)).tolist()) for n, r in ranked.items()}
            for score, ranked in scores.items()}


def overlap(a: dict, b: dict) -> float:
    return sum(len(a[n] & b[n]) for n in a) / sum(len(a[n]) for n in a)


def main() -> int:
    task = sys.argv[1] if len(sys.argv) > 1 else "classification"
    setup = TASKS[task]
    args = SelectionArgs(batches=2 * WINDOW, threads=1, task=task, **setup)
    model, stream = inputs.pretrained_and_batches(args)
    weights = targeted_weights(model, task, args.target_modules)
    first, second = stream[:WINDOW], stream[WINDOW:2 * WINDOW]
    head_a = choices(model, first, weights, args.density)
    later = choices(model, second, weights, args.density)
    overlaps = {score: {"same head, other batches": overlap(head_a[score], later[score])} for score in head_a}
    if task == "classification":
        torch.manual_seed(args.seed + 1)  # head B: the head's own initialisation, another seed
        model.classifier.weight.data.normal_(0.0, model.config.initializer_range)
        model.classifier.bias.data.zero_()
        head_b = choices(model, first, weights, args.density)
        for score in head_a:
            overlaps[score]["another head, same batches"] = overlap(head_a[score], head_b[score])
    result = {**setup, "batches": WINDOW, "random_overlap": args.density, "overlap": overlaps}
    out = Path(__file__).parent / "results" / f"head_overlap_{task}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for score, row in result["overlap"].items():
        print(f"{score}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
