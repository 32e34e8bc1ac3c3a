"""Device memory and step time of bench/gpu.py's 7B step, simulated on a CPU without a GPU.

    python bench/simulate.py                  # every method of bench/gpu.py; bench/results/simulated_memory.json
    python bench/simulate.py --methods frozen sift-5 --size tiny --out runs/sim.json

Each method is set up exactly as ``bench/gpu.py`` does it (its ``build`` and
``setup``: Llama shape, bf16, seq 2048, batch 1, non-reentrant gradient
checkpointing, q/k/v/o/gate/up/down targeted) and trained for ``--warmup``
steps plus one, with every tensor a fake one (``FakeTensorMode``: shapes,
dtypes and devices, no data, no compute). torch's ``MemTracker`` records each
allocation the code makes and sorts it into parameters, gradients,
activations, temporaries and optimizer state; the peak of every step and its
parts go to ``--out``. The first step is SIFT's selection step (top-k's
copies); the last is a steady one, and a roofline of it gives a step time.

What stands in for the H200, and why (docs/bench.md, "Simulated"):

* the device is fake ``meta``: a CPU-only torch cannot run autograd on fake
  ``cuda`` tensors (no CUDA device guard), and ``meta`` keeps device tensors
  apart from host ones, so the engine's ledger (host memory) is not counted;
* attention runs CUDA's flash kernel (``aten._scaled_dot_product_flash_attention``,
  output + logsumexp), the kernel CUDA's SDPA picks for this bf16, causal,
  unmasked, head-dim-128 case; on ``meta`` SDPA would fall back to the math
  path and keep seq x seq scores per head;
* torch AdamW is fused, as on the H200 (its device check is told ``meta`` is
  supported; the fused kernel's shape function is what runs);
* host reads of device values (the gradient norm, a finiteness check) answer
  1: they steer control flow only, and 1 is the branch ordinary training takes.

Not simulated: the CUDA allocator's rounding (512 B a tensor) and caching, the
cuBLAS workspace, and memory that kernels allocate inside themselves (flash
attention backward's fp32 dq accumulator, 32 MiB at 7B).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).parent))
import gpu  # noqa: E402  (the GPU bench's model builder and method set-up: one definition of each method)

RESULTS = Path(__file__).parent / "results" / "simulated_memory.json"
GiB = 2**30
# H200 SXM datasheet: dense bf16 tensor-core FLOP/s, HBM3e bytes/s.
H200_FLOPS = 989e12
H200_BYTES_PER_S = 4.8e12
# Measured on one H200 (shared/ANCHORS.md): peak GiB and median step s, the same step as here.
ANCHORS = {"frozen": (14.02, 0.193), "full": (50.41, 0.272), "lora": (15.83, 0.394)}
PARTS = {_MemRefType.PARAM: "parameters", _MemRefType.BUFFER: "buffers", _MemRefType.GRAD: "gradients",
         _MemRefType.ACT: "activations", _MemRefType.TEMP: "temporaries", _MemRefType.OPT: "optimizer_state",
         _MemRefType.OTH: "other"}
DEVICE = torch.device("meta")


class DeviceMemory(MemTracker):
    """torch's MemTracker, fitted to fine-tuning loops and to per-step peaks.

    MemTracker hooks every parameter's gradient; frozen weights cannot take a
    hook, and SIFT's own post-accumulate hook frees the dense gradient before
    MemTracker's sees it, so only trainable parameters are hooked and a
    gradient already gone is skipped. peft's SHiRA builds sparse tensors,
    whose memory is their indices and values (tracked when made).
    """

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        def as_gradient(grad):
            if grad is not None:
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        param_bytes = buffer_bytes = 0
        for p in module.parameters():
            param_bytes += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(p, _MemRefType.PARAM))
            if p.grad is not None:
                as_gradient(p.grad)
            if install_grad_hooks and p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                self._param_to_grad_hook_handles[p] = (
                    p.register_hook(as_gradient), p.register_post_accumulate_grad_hook(lambda q: as_gradient(q.grad)))
        for b in module.buffers():
            buffer_bytes += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(b, _MemRefType.BUFFER))
        return param_bytes, buffer_bytes

    def _track(self, reftype, t):
        if t.layout != torch.strided:
            return
        super()._track(reftype, t)

    def device_bytes(self, kind: str = "current") -> dict[str, int]:
        snap = self.get_tracker_snapshot(kind).get(DEVICE, {})
        out = {name: snap.get(ref, 0) for ref, name in PARTS.items()}
        out["total"] = snap.get("Total", 0)
        return out



class HostReads(TorchDispatchMode):
    """Answers what fake tensors cannot: host reads of device values, and data-dependent sizes.

    A host read answers 1 (a finite gradient norm, "all finite"). ``nonzero_count(t)``
    gives the number of nonzero entries of ``t`` where the set-up knows it
    (SHiRA's mask holds r x (in + out) ones); ``bincount`` is sized by its
    ``minlength``. Anything else data-dependent is an error rather than a guess.
    """

    def __init__(self, nonzero_count=None):
        super().__init__()
        self.nonzero_count = nonzero_count
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
            dtype = args[0].dtype
            return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)
        if func is torch.ops.aten.nonzero.default:
            if self.nonzero_count is None:
                raise RuntimeError("nonzero on a fake tensor has no known size; pass nonzero_count")
            t = args[0]
            return torch.empty((self.nonzero_count(t), t.dim()), dtype=torch.int64, device=t.device)
        if func is torch.ops.aten.bincount.default:
            # Sized by its largest value; siftune's packed indices count per block, with
            # minlength = the block count, which no block number reaches.
            t, weights, minlength = (list(args) + [kwargs.get("weights"), kwargs.get("minlength", 0)])[:3]
            if not minlength:
                raise RuntimeError("bincount on a fake tensor without minlength has no known size")
            dtype = torch.int64 if weights is None else weights.dtype
            return torch.zeros(minlength, dtype=dtype, device=t.device)
        return func(*args, **kwargs)


class Roofline(TorchDispatchMode):
    """Roofline time of every op: max(FLOPs / peak FLOP/s, bytes read and written / bandwidth).

    FLOPs come from torch's flop counter formulas (matmuls and attention; the
    flash formula counts the full seq x seq square, where a causal kernel
    skips half); every other op is bandwidth-bound.
    """

    def __init__(self, flops_per_s: float = H200_FLOPS, bytes_per_s: float = H200_BYTES_PER_S):
        super().__init__()
        self.flops_per_s, self.bytes_per_s = flops_per_s, bytes_per_s
        self.by_op: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0])  # calls, flops, bytes, kernel s

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if torch.Tag.view_copy in func.tags or _is_view(func):
            return out
        tensors_in = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        tensors_out = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        nbytes = sum(_nbytes(t) for t in tensors_in + tensors_out)
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        seconds = max(flops / self.flops_per_s, nbytes / self.bytes_per_s)
        entry = self.by_op[str(packet)]
        entry[0] += 1
        entry[1] += flops
        entry[2] += nbytes
        entry[3] += seconds
        return out

    def totals(self) -> dict:
        ops = sum(e[0] for e in self.by_op.values())
        return dict(kernels=ops, flops=sum(e[1] for e in self.by_op.values()),
                    bytes=sum(e[2] for e in self.by_op.values()),
                    roofline_s=sum(e[3] for e in self.by_op.values()),
                    by_op={k: dict(calls=e[0], flops=e[1], bytes=e[2], roofline_s=e[3])
                           for k, e in sorted(self.by_op.items(), key=lambda kv: -kv[1][3])})


def _is_view(func) -> bool:
    return func.is_view or func._overloadpacket in (torch.ops.aten.detach, torch.ops.aten.lift_fresh)


def _nbytes(t: torch.Tensor) -> int:
    if t.layout != torch.strided:
        return 0
    numel = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:  # a broadcast dimension is read once
            numel *= size
    return numel * t.element_size()


@contextlib.contextmanager
def cuda_kernels():
    """Run the kernels a CUDA device would pick for this step, on the fake ``meta`` device.

    SDPA calls become flash attention (what CUDA picks for bf16, no mask,
    no dropout); with a mask, memory-efficient attention. torch AdamW's
    fused path accepts ``meta``; siftune takes fake weights for the plain ones they stand for.
    """
    plain_sdpa = F.scaled_dot_product_attention
    adam = sys.modules["torch.optim.adam"]  # AdamW's fused path lives there
    check = adam._device_dtype_check_for_fused

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device != DEVICE or enable_gqa:
            return plain_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)
        if attn_mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, False, dropout_p, is_causal, scale=scale)[0]

    def fused_check(p, cuda_unsupported=False):
        if p.device != DEVICE:
            check(p, cuda_unsupported)

    import siftune.storage

    quantized_kind = siftune.storage.quantized_kind

    def plain_when_fake(weight):
        # A fake tensor stands for a plain one; the engine refuses tensor subclasses as quantized.
        if isinstance(weight, FakeTensor) and type(weight.data) is FakeTensor and weight.is_floating_point():
            return None
        return quantized_kind(weight)

    F.scaled_dot_product_attention = sdpa
    adam._device_dtype_check_for_fused = fused_check
    siftune.storage.quantized_kind = plain_when_fake
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain_sdpa
        adam._device_dtype_check_for_fused = check
        siftune.storage.quantized_kind = quantized_kind


def simulate(method: str, size: str = "7b", seq: int = 2048, batch: int = 1, gc_layers: bool = True,
             warmup: int = 2, rank: int = 64, dtype: torch.dtype = torch.bfloat16) -> dict:
    """One method of bench/gpu.py on fake tensors: per-step device peaks and their parts, and a roofline."""
    started = time.time()
    shira_count = None
    if method == "shira":
        # peft's random mask holds exactly r x (in + out) ones; SHiRA's set-up asks for their positions.
        def shira_count(mask):
            return rank * sum(mask.shape)
    reads = HostReads(shira_count)
    model = gpu.build(size, "meta").to(dtype)  # real meta tensors: no init kernels to run
    with FakeTensorMode(allow_non_fake_inputs=True), reads, cuda_kernels():
        model.to_empty(device=DEVICE)  # now fake
        if gc_layers:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        with torch.device(DEVICE):  # peft makes its adapters on the default device, then moves them
            model, opt, engine = gpu.setup(method, model, rank, fused=True)
        params = sum(p.numel() for p in model.parameters())
        trainable = engine.num_trainable if engine else sum(p.numel() for g in opt.param_groups for p in g["params"])
        ids = torch.randint(0, 32000, (batch, seq), device=DEVICE)
        steps, roofline = [], Roofline()
        for step in range(warmup + 1):
            # A tracker per step: MemTracker's module tracking keeps a step's input
            # gradients alive until the tracker goes (seen as 2 x seq x hidden more per step).
            # What outlives a step is reachable from the model, the optimizer (the
            # engine's indices are in its state) and the batch.
            tracker = DeviceMemory()
            tracker.track_external(model, opt, ids)
            timed = roofline if step == warmup else contextlib.nullcontext()
            with tracker, timed:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del loss
            peak = tracker.device_bytes("peak")
            steps.append(dict(step=step, peak_gib=peak["total"] / GiB,
                              parts_gib={k: v / GiB for k, v in peak.items() if k != "total" and v},
                              after_gib=tracker.device_bytes()["total"] / GiB))
            del tracker
            gc.collect()
    import peft
    import transformers

    record = dict(method=method, size=size, seq=seq, batch=batch, gc=int(gc_layers), warmup=warmup,
                  params=params, trainable=trainable, device="simulated: fake meta device, CUDA kernels",
                  peak_gib=max(s["peak_gib"] for s in steps), steps=steps, roofline=roofline.totals(),
                  host_reads_answered=reads.reads, sim_s=round(time.time() - started, 1),
                  torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    if engine is not None:
        record.update(selected=engine.num_selected, density=engine.config.density)
    if method in ANCHORS:
        record["anchor_gib"], record["anchor_step_s"] = ANCHORS[method]
    return record


def measure_cpu(method: str, size: str = "tiny", seq: int = 128, batch: int = 1, gc_layers: bool = True,
                warmup: int = 1, rank: int = 64) -> list[int]:
    """The same steps really run on this CPU (fp32, as bench/gpu.py builds on a CPU): each step's peak
    bytes as torch's CPU allocator counts them (the profiler's allocation events, ``total_allocated``).

    The allocator's count covers what was allocated while some profiler session was on,
    so one session covers the set-up and one each step; the simulation's twin is
    ``simulate(..., dtype=torch.float32)``.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    def allocations(prof):
        events, nodes = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while nodes:
            node = nodes.pop()
            nodes.extend(node.children)
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        return sorted(events)

    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = gpu.build(size, "cpu")
        if gc_layers:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model, opt, engine = gpu.setup(method, model, rank, fused=True)
        ids = torch.randint(0, 32000, (batch, seq))
    # The count also holds what earlier sessions allocated and freed with no session on
    # (an earlier run in this process): what it held before this run's first allocation.
    _, size_first, total_first = allocations(prof)[0]
    before = total_first - size_first
    peaks = []
    for _ in range(warmup + 1):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
        peaks.append(max(total for _, _, total in allocations(prof)) - before)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=gpu.METHODS, default=gpu.METHODS)
    parser.add_argument("--size", default="7b", choices=sorted(gpu.SIZES))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gc", type=int, default=1, help="gradient checkpointing (1/0)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    records = []
    for method in args.methods:
        try:
            record = simulate(method, args.size, args.seq, args.batch, bool(args.gc), args.warmup, args.rank)
        except Exception as error:  # a method fake tensors cannot run is reported, not dropped
            record = dict(method=method, size=args.size, error=f"{type(error).__name__}: {str(error)[:300]}")
        record["command"] = " ".join(["python", "bench/simulate.py", *sys.argv[1:]])
        records.append(record)
        print(json.dumps({k: v for k, v in record.items() if k not in ("steps", "roofline")}), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
