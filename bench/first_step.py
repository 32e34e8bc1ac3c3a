"""Seconds of SIFT's first training step (its selection) and two steady ones on SmolLM2-135M, batch 8 x 128.

    python bench/first_step.py 0.01                                        # SiftConfig's default
    python bench/first_step.py 0.01 selection=gradient step_scale=none     # the top-k with plain steps

One torch thread; further arguments are SiftConfig fields. Prints the resolved selection and the three times.
"""
import sys
import time

import torch

import siftune
from siftune.bench.methods import TARGETS
from siftune.recipes.data import causal_lm_batches, load_examples
from siftune.recipes.models import load_model


def _value(key: str, text: str):
    if text == "none":
        return None
    return float(text) if key in ("line_cap", "score_share", "drop_share") else text


def main() -> int:
    torch.set_num_threads(1)
    density = float(sys.argv[1])
    options = {key: _value(key, text) for key, text in (arg.split("=", 1) for arg in sys.argv[2:])}
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2", "causal_lm")
    engine = siftune.attach(model, density=density, target_modules=TARGETS["causal_lm"], **options)
    optimizer = engine.optimizer(lr=1e-3)
    batches = causal_lm_batches(load_examples("chatterbot", "causal_lm"), tokenizer, 8, 128, shuffle=True, seed=0)
    times = []
    for _, batch in zip(range(3), batches):
        started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    chosen = engine.config
    print(f"density {density:g}, selection {chosen.selection}, step_scale {chosen.step_scale}: "
          f"first step {times[0]:.1f} s, then {times[1]:.1f} s and {times[2]:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
