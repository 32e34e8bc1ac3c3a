"""siftune.estimate's simulation: the simulated device memory is what the code really allocates.

The simulation runs the step on fake tensors and counts allocations at the
dispatcher; the twin runs the same steps for real on this CPU and reads
torch's CPU allocator count. At the tiny shape the two must agree, so what
the simulation states at 7B is a count of real allocations, not of a model
of them.
"""
import pytest

from siftune.estimate import Setup
from siftune.estimate.shapes import named_config
from siftune.estimate.simulate import measure_cpu, trace

MiB = 2**20
TINY = named_config("llama-tiny")
# SIFT at LoRA r=64's trainable count on the tiny shape: 64 x (in + out) over the targeted entries.
AT_LORA = dict(trainable=64 * 2 * (4 * (256 + 256) + 2 * (256 + 688) + (688 + 256)))


def simulated_and_real(setup: Setup) -> tuple[list[int], list[int], int]:
    """Each step's peak bytes, simulated (fp32, as the real run on a CPU) and real, and the selected count."""
    real = measure_cpu(TINY, setup, warmup=1)
    record = trace(TINY, setup, warmup=1)
    simulated = [max(phase["total"] for phase in step["phases"].values()) for step in record["steps"]]
    return simulated, real, record["selected"] or 0


@pytest.mark.parametrize("setup", [Setup("full"), Setup("sift", density=0.05)], ids=["full", "sift-5"])
def test_simulated_step_peaks_match_a_real_cpu_run_of_the_same_steps(setup):
    # Two steps: the first is SIFT's selection step (top-k over each dense gradient),
    # the second a steady one with optimizer state.
    simulated, real, selected = simulated_and_real(setup.replace(dtype="float32", seq_len=64,
                                                                 gradient_checkpointing=True))
    assert len(real) == len(simulated) == 2
    # The real count also holds SIFT's ledger (host memory on a GPU, the same allocator
    # here): at most an int32 index and an fp32 value per selected component.
    allowed = 16 * 1024 + 8 * selected
    for step, (r, s) in enumerate(zip(real, simulated)):
        assert abs(r - s) <= allowed, f"step {step}: real {r / MiB:.3f} MiB, simulated {s / MiB:.3f} MiB"


@pytest.mark.parametrize("setup", [
    Setup("qlora", quantize="nf4"),
    Setup("sift", quantize="nf4", **AT_LORA),
    Setup("sift", quantize="nf4", sift_options=dict(compact_indices=True), **AT_LORA),
], ids=["qlora", "sift-qlora-nf4", "sift-qlora-nf4-compact"])
def test_simulated_nf4_step_peaks_match_a_real_cpu_run_of_the_same_steps(setup, monkeypatch):
    # The nf4 base: bitsandbytes quantizes for real on this CPU; the simulation builds the
    # packed weights and quantization state as fakes. The delta takes its dense-transient
    # path in both (the GPU's; on a CPU in fp32 it would use CSR kernels).
    pytest.importorskip("bitsandbytes")
    from siftune.core.storage import Delta

    monkeypatch.setattr(Delta, "sparse_kernels", lambda self, dtype: False)
    simulated, real, selected = simulated_and_real(setup.replace(dtype="float32", seq_len=64,
                                                                 gradient_checkpointing=True))
    allowed = 16 * 1024 + 8 * selected
    for step, (r, s) in enumerate(zip(real, simulated)):
        assert abs(r - s) <= allowed, f"step {step}: real {r / MiB:.3f} MiB, simulated {s / MiB:.3f} MiB"
