"""siftune.estimate's simulation: the simulated device memory is what the code really allocates.

The simulation runs the step on fake tensors and counts allocations at the
dispatcher; the twin runs the same steps for real on this CPU and reads
torch's CPU allocator count. At the tiny shape the two must agree, so what
the simulation states at 7B is a count of real allocations, not of a model
of them.
"""
import pytest
import torch

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


@pytest.mark.parametrize("setup", [
    Setup("full"),
    Setup("sift", density=0.05),
    Setup("sift", density=0.05, sift_options=dict(selection="gradient", step_scale=None)),
], ids=["full", "sift-5", "sift-5-top-k"])
def test_simulated_step_peaks_match_a_real_cpu_run_of_the_same_steps(setup):
    # Two steps: the first is SIFT's selection step (SiftConfig's default: balanced over each dense
    # gradient, steps scaled by input; or the top-k), the second a steady one with optimizer state.
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


@pytest.mark.parametrize("setup", [
    Setup("qlora", quantize="int8"),
    Setup("sift", quantize="int8", **AT_LORA),
], ids=["qlora-int8", "sift-int8"])
def test_simulated_int8_step_peaks_match_a_real_cpu_run_of_the_same_steps(setup, monkeypatch):
    # The int8 base: bitsandbytes quantizes for real on this CPU and its layers run the GPU's
    # function (MatMul8bitLt: each layer's input kept from the forward to the end of the backward,
    # checkpointing or not). At this shape the step peaks at the loss over the 32,000-token
    # vocabulary, so this holds what the step keeps; the matmul's own transients are held to
    # bitsandbytes below. The random model's activations stay under the threshold: no outliers.
    pytest.importorskip("bitsandbytes")
    from siftune.core.storage import Delta

    monkeypatch.setattr(Delta, "sparse_kernels", lambda self, dtype: False)
    simulated, real, selected = simulated_and_real(setup.replace(dtype="float32", seq_len=64, int8_outliers=0.0,
                                                                 gradient_checkpointing=True))
    allowed = 16 * 1024 + 8 * selected
    for step, (r, s) in enumerate(zip(real, simulated)):
        assert abs(r - s) <= allowed, f"step {step}: real {r / MiB:.3f} MiB, simulated {s / MiB:.3f} MiB"


# -- int8 bases ----------------------------------------------------------------------------------
def int8_layer(rows: int, columns: int, outliers: int, real: bool):
    """A bitsandbytes ``Linear8bitLt`` as transformers loads it (threshold 6) and a bf16 input of
    ``rows`` tokens whose first ``outliers`` columns hold a value past the threshold: quantized for
    real on this CPU and run by bitsandbytes' GPU function (``MatMul8bitLt``), or simulated."""
    import bitsandbytes as bnb
    import torch

    from siftune.estimate import int8

    torch.manual_seed(0)
    dense = torch.nn.Linear(columns, 2 * columns + 16, bias=False)
    layer = bnb.nn.Linear8bitLt(columns, dense.out_features, bias=False, has_fp16_weights=False,
                                threshold=int8.THRESHOLD, device="meta")
    layer.state.simulated_outliers = outliers / columns
    x = torch.randn(2, rows // 2, columns, dtype=torch.bfloat16)
    x[1, 3, :outliers] = 8.0
    if real:
        layer.weight = bnb.nn.Int8Params(dense.weight.data, requires_grad=False, has_fp16_weights=False).to("cpu")
        int8.as_on_a_gpu(layer)
    return layer, x.requires_grad_(True)


def real_int8_forward(rows, columns, outliers):
    """What a real int8 layer's forward leaves: ``(kept for backward, outlier count, bytes held after it)``."""
    from torch.profiler import ProfilerActivity, profile

    from siftune.estimate.simulate import allocations

    layer, x = int8_layer(rows, columns, outliers, real=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = layer(x)
    events = allocations(prof)
    held = events[-1][2] - (events[0][2] - events[0][1])
    kept = [None if t is None else (tuple(t.shape), t.dtype) for t in out.grad_fn.tensors]
    out.float().sum().backward()
    return kept, layer.state.idx.numel(), held, x.grad.shape


def simulated_int8_forward(rows, columns, outliers):
    """The same forward simulated: ``(kept, outlier count, bytes held after it, forward peak above its start)``."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from siftune.estimate import int8
    from siftune.estimate.simulate import DEVICE, DeviceMemory, cuda_kernels, held_bytes

    layer, x = int8_layer(rows, columns, outliers, real=False)
    with FakeTensorMode(allow_non_fake_inputs=True), cuda_kernels():
        layer.to_empty(device=DEVICE)
        layer.weight = int8.fake_int8_weight(layer, DEVICE)
        x = torch.empty(x.shape, dtype=x.dtype, device=DEVICE, requires_grad=True)
        tracker = DeviceMemory()
        tracker.track_external(layer, x, layer.state.SCB)
        with tracker:
            before = held_bytes(tracker, DEVICE)
            out = layer(x)
            peak = tracker.get_tracker_snapshot("peak")[DEVICE]["Total"] - before
            held = held_bytes(tracker, DEVICE) - before
            kept = [None if t is None else (tuple(t.shape), t.dtype) for t in out.grad_fn.tensors]
            out.float().sum().backward()
            assert x.grad.shape == x.shape
        return kept, layer.state.idx.numel(), held, peak


@pytest.mark.parametrize("outliers", [0, 5])
def test_a_simulated_int8_layer_keeps_what_bitsandbytes_keeps(outliers):
    # Real: bitsandbytes quantizes the weight and finds the outlier columns in the data;
    # simulated: the outlier count is the assumed fraction, here the data's.
    pytest.importorskip("bitsandbytes")
    kept, found, held, _ = real_int8_forward(64, 256, outliers)
    kept_sim, found_sim, held_sim, _ = simulated_int8_forward(64, 256, outliers)
    assert found == found_sim == outliers
    assert kept == kept_sim  # the outlier columns (subA) and the layer's input, for backward
    assert held == held_sim, f"held after the forward: real {held} B, simulated {held_sim} B"


def test_a_simulated_int8_forward_peaks_at_the_cuda_path_tensors_counted_by_hand():
    # bitsandbytes 0.50's MatMul8bitLt.forward on CUDA, tensor by tensor (bf16 input, 2 B):
    # the fp16 copy, the int8 rows and fp32 row scales, |x| and |x| >= 6, the outlier columns;
    # then the outlier columns of the input and of the weight (int8, fp32 x2, bf16), the int32
    # product, its fp16 dequantization and bf16 cast; then addmm's output.
    pytest.importorskip("bitsandbytes")
    M, K, n = 64, 256, 5
    N = 2 * K + 16
    quantized = M * K + 4 * M + 8 * n  # int8 rows, row scales, outlier column ids: held until the end
    instants = [
        2 * M * K + M * K + 4 * M + 2 * M * K + M * K,  # fp16 copy, int8 rows, scales, |x|, mask
        quantized + 2 * M * n + N * n + 4 * N * n,  # subA, the weight's columns, x scales (fp32)
        quantized + 2 * M * n + 4 * N * n + 4 * N * n,  # x 1/127 (fp32)
        quantized + 2 * M * n + 2 * N * n + 4 * M * N + 2 * M * N + 2 * M * N,  # int32, fp16, bf16 products
        quantized + 2 * M * n + 2 * N * n + 2 * M * N + 2 * M * N,  # addmm
    ]
    _, found, held, peak = simulated_int8_forward(M, K, n)
    assert found == n
    assert peak == max(instants)
    assert held == 2 * M * N + 2 * M * n + 8 * n  # the output, subA, the outlier column ids


@pytest.mark.parametrize("shape, density", [((256, 688), 0.001), ((256, 688), 0.05), ((688, 256), 0.01)])
def test_the_simulation_holds_what_balanced_holds_at_its_peak(shape, density):
    # Fake tensors cannot run balanced's rounds (their sizes depend on the data); the simulation
    # allocates its first round's tensors instead. Both measured here by torch's CPU allocator.
    from torch.profiler import ProfilerActivity, profile

    from siftune.core.select import balanced_indices, count_selected
    from siftune.estimate.simulate import allocations, balanced_as_allocated

    def peak(fn) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = allocations(prof)
        return max(total for _, _, total in events) - (events[0][2] - events[0][1])

    g = torch.Generator().manual_seed(0)
    score = torch.randn(shape[0], 8, generator=g) @ torch.randn(8, shape[1], generator=g)
    score += 0.3 * torch.randn(shape, generator=g)  # rank 8 plus noise, as a few batches' gradient
    k, entries = count_selected(score.numel(), density), score.numel()
    real = peak(lambda: balanced_indices(score, k, shape, 1.0))
    simulated = peak(lambda: balanced_as_allocated(score, k, shape, 1.0))
    assert 11 * entries < real < 13 * entries  # an fp32 copy of the scores, another of the open ones, 4 booleans
    assert real - entries // 2 <= simulated <= real, (real / entries, simulated / entries)
