"""Which kernels the delta storage should use: a dense transient per layer, or sparse products.

    python bench/delta_kernels.py            # bench/results/delta_kernels.json

For one Linear layer of SmolLM2-135M's MLP width class (2048 x 2048, 512
tokens), fp32 on this CPU, at 1% and 5% density: the milliseconds of each
of the three products a delta adds to a training step, done both ways.

* forward ``x @ delta^T``: scatter the values into a dense zero matrix and
  one matmul, or a CSR matrix times ``x^T``;
* input gradient ``g @ delta``: dense again, or a CSR matrix of ``delta^T``;
* the values' gradient ``(g^T x)[indices]``: the dense weight gradient then a
  gather, or ``torch.sparse.sampled_addmm`` on the values' CSR layout.

Median of 7 calls after 2 warm-up calls; torch threads as set by --threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "delta_kernels.json"


def _ms(fn) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(7):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 2)


def measure(out: int, inp: int, tokens: int, density: float) -> dict:
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(tokens, inp, generator=g), torch.randn(tokens, out, generator=g)
    k = round(out * inp * density)
    idx = torch.sort(torch.randperm(out * inp, generator=g)[:k]).values
    values = torch.randn(k, generator=g)
    rows, cols = idx // inp, idx % inp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (out, inp)).to_sparse_csr()
        csr_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), values, (inp, out)).to_sparse_csr()

    def dense_delta():
        flat = torch.zeros(out * inp)
        flat[idx] = values
        return flat.view(out, inp)

    return {
        "out": out, "in": inp, "tokens": tokens, "density": density, "selected": k,
        "forward_dense_ms": _ms(lambda: x @ dense_delta().t()),
        "forward_sparse_ms": _ms(lambda: (csr @ x.t()).t()),
        "grad_input_dense_ms": _ms(lambda: grad @ dense_delta()),
        "grad_input_sparse_ms": _ms(lambda: (csr_t @ grad.t()).t()),
        "grad_values_dense_ms": _ms(lambda: (grad.t() @ x).reshape(-1)[idx]),
        "grad_values_sparse_ms": _ms(lambda: torch.sparse.sampled_addmm(csr, grad.t().contiguous(), x, beta=0.0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(2048, 2048, 512, density) for density in (0.01, 0.05)]
    for row in rows:
        print(json.dumps(row))
    record = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} torch threads",
              "load_avg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
