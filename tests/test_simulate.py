"""bench/simulate.py: the simulated device memory is what the code really allocates.

The simulation runs the step on fake tensors and counts allocations at the
dispatcher; the twin runs the same step for real on this CPU and reads
torch's CPU allocator count. At the tiny shape the two must agree, so what
the simulation states at 7B is a count of real allocations, not of a model
of them.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import simulate  # noqa: E402

MiB = 2**20


@pytest.mark.parametrize("method", ["full", "sift-5"])
def test_simulated_step_peaks_match_a_real_cpu_run_of_the_same_steps(method):
    # Two steps: the first is SIFT's selection step (top-k over each dense gradient),
    # the second a steady one with optimizer state; fp32, as the real run on a CPU.
    real = simulate.measure_cpu(method, "tiny", seq=64, warmup=1)
    simulated = simulate.simulate(method, "tiny", seq=64, warmup=1, dtype=torch.float32)
    simulated_peaks = [round(s["peak_gib"] * 2**30) for s in simulated["steps"]]
    assert len(real) == len(simulated_peaks) == 2
    # The real count also holds SIFT's ledger (host memory on a GPU, the same allocator
    # here): at most an int32 index and an fp32 value per selected component.
    allowed = 16 * 1024 + 8 * simulated.get("selected", 0)
    for step, (r, s) in enumerate(zip(real, simulated_peaks)):
        assert abs(r - s) <= allowed, f"step {step}: real {r / MiB:.3f} MiB, simulated {s / MiB:.3f} MiB"


@pytest.mark.parametrize("method", ["qlora-64-nf4", "sift-qlora-nf4", "sift-qlora-nf4-compact"])
def test_simulated_nf4_step_peaks_match_a_real_cpu_run_of_the_same_steps(method, monkeypatch):
    # The nf4 base: bitsandbytes quantizes for real on this CPU; the simulation builds the
    # packed weights and quantization state as fakes. The delta takes its dense-transient
    # path in both (the GPU's; on a CPU in fp32 it would use CSR kernels).
    from siftune.core.storage import Delta

    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(Delta, "sparse_kernels", lambda self, dtype: False)
    real = simulate.measure_cpu(method, "tiny", seq=64, warmup=1)
    simulated = simulate.simulate(method, "tiny", seq=64, warmup=1, dtype=torch.float32)
    simulated_peaks = [round(s["peak_gib"] * 2**30) for s in simulated["steps"]]
    allowed = 16 * 1024 + 8 * simulated.get("selected", 0)
    for step, (r, s) in enumerate(zip(real, simulated_peaks)):
        assert abs(r - s) <= allowed, f"step {step}: real {r / MiB:.3f} MiB, simulated {s / MiB:.3f} MiB"
