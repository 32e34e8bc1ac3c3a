"""Seconds to choose a tensor's components, top-k against balanced, at the shapes of a 7B model's weights.

    python bench/balanced_cost.py            # one torch thread, about half a minute

Each score is rank 8 plus noise (as the gradient of a few batches is: docs/selection.md), density 1%
(2.3% for SmolLM2's 576 x 1536), balanced at SiftConfig's default cap 1 and at a cap of 2.
"""
import sys
import time

import torch

from siftune.core.select import balanced_indices, count_selected, top_k_indices

SHAPES = [((576, 1536), 0.023), ((4096, 4096), 0.01), ((4096, 11008), 0.01)]


def main() -> int:
    torch.set_num_threads(1)
    for shape, density in SHAPES[:1] if "--quick" in sys.argv else SHAPES:
        torch.manual_seed(0)
        score = (torch.randn(shape[0], 8) @ torch.randn(8, shape[1]) + 0.3 * torch.randn(shape)).abs()
        k = count_selected(score.numel(), density)
        started = time.perf_counter()
        top_k_indices(score.reshape(-1), k)
        top_k = time.perf_counter() - started
        balanced = []
        for cap in (1.0, 2.0):
            started = time.perf_counter()
            balanced_indices(score, k, shape, cap)
            balanced.append(f"balanced (cap {cap:g}) {time.perf_counter() - started:.2f} s")
        print(f"{shape[0]} x {shape[1]}, k {k}: top-k {top_k:.2f} s, {', '.join(balanced)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
