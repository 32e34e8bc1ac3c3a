"""Device memory and step time of bench/gpu.py's 7B step, simulated on a CPU without a GPU.

    python bench/simulate.py                  # every method of bench/gpu.py; bench/results/simulated_memory.json
    python bench/simulate.py --size 13b --warmup 1 --methods qlora-64-nf4 sift-qlora-nf4 --out runs/nf4.json
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
  unmasked, head-dim-128 case; on ``meta`` SDPA would take the math path
  and keep seq x seq scores per head, and transformers, taking fake tensors
  for a trace, would build the causal mask it skips for real data;
* torch AdamW is fused, as on the H200 (its device check is told ``meta`` is
  supported; the fused kernel's shape function is what runs);
* host reads of device values (the gradient norm, a finiteness check) answer
  1: they steer control flow only, and 1 is the branch ordinary training takes.

nf4 bases (``--methods qlora-64-nf4 sift-5-nf4 sift-5-lean-nf4
sift-qlora-nf4``, ``--size 7b`` or ``13b``): ``gpu.quantize_nf4`` swaps the
targeted Linears for bitsandbytes ``Linear4bit`` layers (nf4, blocksize 64, no
double quantization, bf16 compute); on fake tensors:

* bitsandbytes' quantize needs data, so each layer gets what it would leave
  (``fake_nf4_weight``): the packed uint8 weight and a ``QuantState`` with an
  fp32 absmax per 64 entries and the 16-entry code. torch makes no
  ``Params4bit`` of a fake tensor, so the weight is a fake Parameter carrying
  Params4bit's attributes; absmax and code are tracked as device tensors
  kept outside the modules;
* ``MatMul4Bit.forward`` runs as ``dequantize_4bit`` then ``F.linear``: what
  bitsandbytes' CUDA ``gemm_4bit`` does past 1536 rows (a 2048-token step),
  so the per-layer dequantized transient is counted; its backward is
  bitsandbytes' own (it dequantizes again for the input gradient).

Not simulated: the CUDA allocator's rounding (512 B a block) and caching, the
cuBLAS workspaces, memory that kernels allocate inside themselves (flash
attention backward's fp32 dq accumulator), and what CUDA's sparse kernels
allocate inside (SHiRA adds a sparse delta to each weight in every forward).
``tests/test_simulate.py`` holds the simulated peaks
to torch's CPU allocator count of the same steps really run (``measure_cpu``).
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
# Measured on one H200 (shared/ANCHORS.md): peak GiB and median step s of the same step
# (seq 2048, batch 1, gradient checkpointing, rank 64), per shape.
ANCHORS = {"7b": {"frozen": (14.02, 0.193), "full": (50.41, 0.272), "lora": (15.83, 0.394)},
           "1b": {"lora": (4.09, 0.287), "shira": (4.52, 0.246)}}
PARTS = {_MemRefType.PARAM: "parameters", _MemRefType.BUFFER: "buffers", _MemRefType.GRAD: "gradients",
         _MemRefType.ACT: "activations", _MemRefType.TEMP: "temporaries", _MemRefType.OPT: "optimizer_state",
         _MemRefType.OTH: "other"}
DEVICE = torch.device("meta")


class DeviceMemory(MemTracker):
    """torch's MemTracker, fitted to fine-tuning loops and to per-step peaks.

    MemTracker hooks every parameter's gradient; frozen weights cannot take a
    hook, and SIFT's own post-accumulate hook frees the dense gradient before
    MemTracker's sees it, so only trainable parameters are hooked and a
    gradient already gone is skipped. A sparse tensor's memory is its indices
    and values, tracked when they were made.
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
        tensors_out = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if (not tensors_out and not func._schema.is_mutable) or func.is_view or func._overloadpacket in _NO_KERNEL:
            return out  # metadata queries and views launch no kernel (in-place ops such as fused AdamW do)
        tensors_in = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        nbytes = sum(_nbytes(t) for t in tensors_in + tensors_out)
        packet = func._overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        if packet in _ATTENTION and _causal(func, args, kwargs):
            flops /= 2  # the formula counts the whole seq x seq square; a causal kernel skips the upper half
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


# Not views by their schema, but no kernel runs for them in eager mode.
_NO_KERNEL = {torch.ops.aten.detach, torch.ops.aten.lift_fresh, torch.ops.aten._unsafe_view}
_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention,
              torch.ops.aten._scaled_dot_product_flash_attention_backward,
              torch.ops.aten._scaled_dot_product_efficient_attention,
              torch.ops.aten._scaled_dot_product_efficient_attention_backward}


def _causal(func, args, kwargs) -> bool:
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "is_causal":
            return bool(kwargs["is_causal"] if "is_causal" in kwargs else (args[i] if i < len(args) else False))
    return False


def _nbytes(t: torch.Tensor) -> int:
    if t.layout != torch.strided:
        return 0
    numel = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:  # a broadcast dimension is read once
            numel *= size
    return numel * t.element_size()


@contextlib.contextmanager
def cuda_kernels(device: torch.device = DEVICE):
    """Run the kernels a CUDA device would pick for this step, on the fake ``device`` (``meta`` here;
    ``cpu`` under FSDP2 in bench/simulate_fsdp.py).

    SDPA calls become flash attention (what CUDA picks for bf16, no mask,
    no dropout; it takes grouped-query key/value heads as they are); with a
    mask, memory-efficient attention. torch AdamW's
    fused path accepts ``meta``. bitsandbytes' 4-bit matmul dequantizes and calls
    ``F.linear``, as its CUDA kernel does for this many rows.
    """
    plain_sdpa = F.scaled_dot_product_attention
    adam = sys.modules["torch.optim.adam"]  # AdamW's fused path lives there
    check = adam._device_dtype_check_for_fused

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device != device or (enable_gqa and attn_mask is not None):
            return plain_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)
        if attn_mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, False, dropout_p, is_causal, scale=scale)[0]

    def fused_check(p, cuda_unsupported=False):
        if p.device != device:
            check(p, cuda_unsupported)

    import transformers.masking_utils as masking

    tracing = masking.is_tracing

    def tracing_but_not_fake(tensor=None):
        # transformers takes fake tensors for a trace and then builds a seq x seq causal
        # mask it would skip for real data (one unpadded sequence): with the mask, SDPA
        # cannot use flash attention. Its data checks get HostReads' answers instead.
        return tracing(None if isinstance(tensor, FakeTensor) else tensor)

    # peft's SHiRA adds a sparse delta to the weight in every forward; the backward of that
    # add takes the gradient at the delta's entries (sparse_mask), which has no kernel for
    # sparse meta tensors. Its result is the mask's indices with values of the gradient's dtype.
    def sparse_mask(self, mask):
        values = torch.empty((mask._nnz(), *self.shape[mask.sparse_dim():]), dtype=self.dtype, device=self.device)
        return torch.sparse_coo_tensor(mask._indices(), values, self.shape, is_coalesced=mask.is_coalesced())

    kernels = torch.library.Library("aten", "IMPL")
    kernels.impl("sparse_mask", sparse_mask, "SparseMeta")
    matmul4 = _bnb_matmul4bit()
    plain_forward = matmul4.forward if matmul4 else None
    if matmul4:
        matmul4.forward = staticmethod(_dequantize_then_linear)
    F.scaled_dot_product_attention = sdpa
    adam._device_dtype_check_for_fused = fused_check
    masking.is_tracing = tracing_but_not_fake
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain_sdpa
        adam._device_dtype_check_for_fused = check
        masking.is_tracing = tracing
        kernels._destroy()
        if matmul4:
            matmul4.forward = staticmethod(plain_forward)


def _bnb_matmul4bit():
    try:
        from bitsandbytes.autograd._functions import MatMul4Bit
    except ImportError:
        return None
    return MatMul4Bit


def _dequantize_then_linear(ctx, A, B, out=None, bias=None, quant_state=None):
    """bitsandbytes' ``MatMul4Bit.forward`` as its CUDA kernel runs it for 2048 tokens.

    bitsandbytes 0.50 calls one op, ``gemm_4bit``; on CUDA that op dequantizes the
    weight into a transient of the compute dtype and calls ``F.linear`` whenever the
    rows exceed 1536 (``_dequant_linear_fallback``). Its fake implementation
    allocates the output only, and the transient would be made below MemTracker,
    out of its sight; so here the two steps run as two ops. What is saved for
    backward is bnb's own (the packed weight); bnb's backward is unchanged
    (it dequantizes again for the input gradient).
    """
    ctx.is_empty = False
    B = B.view(-1, 1)
    # The fallback dequantizes into a preallocated transient (``dequantize_4bit.out``), whose
    # fake implementation in bnb 0.50 rejects every call (it compares a torch.Size with a
    # list); the functional op allocates the same transient.
    weight = torch.ops.bitsandbytes.dequantize_4bit.default(
        B, quant_state.absmax, quant_state.blocksize, quant_state.quant_type, list(quant_state.shape), A.dtype)
    output = F.linear(A, weight, bias)
    del weight
    if out is not None:
        out.copy_(output)
        output = out
    ctx.state = quant_state
    ctx.dtype_A, ctx.dtype_B, ctx.dtype_bias = A.dtype, B.dtype, None if bias is None else bias.dtype
    ctx.tensors = (None, B) if any(ctx.needs_input_grad[:2]) else (None, None)
    return output


def fake_nf4_weight(layer, dtype: torch.dtype = torch.bfloat16):
    """``layer``'s nf4 weight as bitsandbytes leaves it after quantization, made of fake tensors.

    bitsandbytes' quantize needs data; what it leaves is built directly instead:
    the packed weight (two 4-bit codes a byte, ``[out x in / 2, 1]`` uint8) and its
    ``QuantState`` (fp32 absmax per 64-entry block, the 16-entry nf4 code, the
    shape, the dtype it dequantizes to (bf16), blocksize 64, no double quantization). torch cannot make a
    ``Params4bit`` (a Parameter subclass) of a fake tensor, so the weight is a
    fake Parameter carrying Params4bit's attributes; ``Linear4bit.forward`` and
    peft's 4-bit LoRA layer read ``weight.quant_state``, the rest is for show.
    """
    from bitsandbytes.functional import QuantState

    shape = torch.Size([layer.out_features, layer.in_features])
    numel = shape.numel()
    weight = torch.nn.Parameter(torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=DEVICE),
                                requires_grad=False)
    weight.quant_state = QuantState(absmax=torch.empty(-(numel // -64), dtype=torch.float32, device=DEVICE),
                                    shape=shape, code=torch.empty(16, dtype=torch.float32, device=DEVICE),
                                    blocksize=64, quant_type="nf4", dtype=dtype)
    weight.blocksize, weight.quant_type, weight.compress_statistics = 64, "nf4", False
    weight.quant_storage, weight.bnb_quantized, weight.module = torch.uint8, True, layer
    return weight


def _outside_modules(model) -> list[torch.Tensor]:
    """Device tensors a model keeps in plain attributes, out of MemTracker's sight:
    peft SHiRA's indices (2 x int32 per trained entry), held in a dict per layer, and a
    4-bit weight's quantization state (absmax, code), held by its ``Params4bit``."""
    outside = [t for m in model.modules() for t in getattr(m, "shira_indices", {}).values()]
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            outside += [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
    return outside


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
    nf4 = method in gpu.NF4_METHODS
    if nf4:  # bitsandbytes layers are made on real meta tensors; their weights become packed fakes below
        gpu.quantize_nf4(model, dtype)
    with FakeTensorMode(allow_non_fake_inputs=True), reads, cuda_kernels():
        model.to_empty(device=DEVICE)  # now fake
        if nf4:
            import bitsandbytes as bnb

            for layer in model.modules():
                if isinstance(layer, bnb.nn.Linear4bit):
                    layer.weight = fake_nf4_weight(layer, dtype)
        if gc_layers:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        with torch.device(DEVICE):  # peft makes its adapters on the default device, then moves them
            model, opt, engine = gpu.setup(method, model, rank, fused=True)
        params = sum(p.numel() for p in model.parameters())
        trainable = engine.num_trainable if engine else sum(p.numel() for g in opt.param_groups for p in g["params"])
        ids = torch.randint(0, 32000, (batch, seq), device=DEVICE)
        steps, roofline, first = [], Roofline(), Roofline()
        for step in range(warmup + 1):
            # A tracker per step: MemTracker's module tracking keeps a step's input
            # gradients alive until the tracker goes (seen as 2 x seq x hidden more per step).
            # What outlives a step is reachable from the model, the optimizer (the
            # engine's indices are in its state), the batch, and SHiRA's indices.
            tracker = DeviceMemory()
            tracker.track_external(model, opt, ids, *_outside_modules(model))
            timed = roofline if step == warmup else first if step == 0 else contextlib.nullcontext()
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
                  first_step_roofline=first.totals(),
                  host_reads_answered=reads.reads, sim_s=round(time.time() - started, 1),
                  torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    if nf4:
        import bitsandbytes

        record["bitsandbytes"] = bitsandbytes.__version__
    if engine is not None:
        record.update(selected=engine.num_selected, density=engine.config.density)
    if method in ANCHORS.get(size, {}) and (seq, batch, gc_layers, rank) == (2048, 1, True, 64):
        record["anchor_gib"], record["anchor_step_s"] = ANCHORS[size][method]
    return record


def allocations(prof) -> list[tuple[int, int, int]]:
    """A finished ``torch.profiler.profile(profile_memory=True)``'s allocation events, in time order:
    ``(start ns, bytes, the allocator's total after it)``."""
    from torch._C._profiler import _EventType

    events, nodes = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
    return sorted(events)


def measure_cpu(method: str, size: str = "tiny", seq: int = 128, batch: int = 1, gc_layers: bool = True,
                warmup: int = 1, rank: int = 64) -> list[int]:
    """The same steps really run on this CPU (fp32, as bench/gpu.py builds on a CPU): each step's peak
    bytes as torch's CPU allocator counts them (the profiler's allocation events, ``total_allocated``).

    The allocator's count covers what was allocated while some profiler session was on,
    so one session covers the set-up and one each step; the simulation's twin is
    ``simulate(..., dtype=torch.float32)``.
    """
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = gpu.build(size, "cpu")
        if method in gpu.NF4_METHODS:  # quantized here by bitsandbytes' CPU kernels
            model = gpu.quantize_nf4(model, torch.float32).to("cpu")
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


def summarize(records: list[dict]) -> dict:
    """Calibration against the H200 anchors, the targets (a)-(c), and the step-time estimate."""
    by = {r["method"]: r for r in records if "peak_gib" in r}
    anchored = {m: r for m, r in by.items() if "anchor_gib" in r}  # the H200's shape and settings only
    calibration = {m: dict(simulated_gib=r["peak_gib"], anchor_gib=r["anchor_gib"],
                           off=r["peak_gib"] / r["anchor_gib"] - 1) for m, r in anchored.items()}
    # The rule: the floor, full fine-tuning and LoRA each within 5% of the H200 at 7B.
    out = dict(calibration=calibration,
               memory_is_measurement=all(m in calibration and abs(calibration[m]["off"]) <= 0.05
                                         for m in ("frozen", "full", "lora")))
    targets = {}
    if "frozen" in by and "sift-5" in by:
        budget = by["frozen"]["peak_gib"] + 18 * by["sift-5"]["selected"] / GiB
        targets["a"] = dict(method="sift-5", peak_gib=by["sift-5"]["peak_gib"], limit_gib=budget,
                            rule="floor + 18 B x selected")
    if "sift-5-lean" in by:
        targets["b"] = dict(method="sift-5-lean", peak_gib=by["sift-5-lean"]["peak_gib"], limit_gib=16.1,
                            rule="16.1 GiB")
    if "lora" in by and "sift-lora" in by:
        targets["c"] = dict(method="sift-lora", peak_gib=by["sift-lora"]["peak_gib"],
                            limit_gib=1.05 * by["lora"]["peak_gib"], rule="1.05 x LoRA r=64")
    for name, method in (("c-nf4", "sift-qlora-nf4"), ("c-nf4-compact", "sift-qlora-nf4-compact")):
        if "qlora-64-nf4" in by and method in by:  # the same, on an nf4 base
            targets[name] = dict(method=method, peak_gib=by[method]["peak_gib"],
                                 limit_gib=1.05 * by["qlora-64-nf4"]["peak_gib"], rule="1.05 x QLoRA r=64 (nf4)")
    for t in targets.values():
        t["met"] = t["peak_gib"] <= t["limit_gib"]
    out["targets"] = targets
    if "frozen" in anchored:
        # One factor, fitted on the floor only: the peers are then a check, not a fit.
        scale = anchored["frozen"]["anchor_step_s"] / by["frozen"]["roofline"]["roofline_s"]
        estimate = {m: r["roofline"]["roofline_s"] * scale for m, r in by.items()}
        off = {m: estimate[m] / r["anchor_step_s"] - 1 for m, r in anchored.items()}
        peers = {"full", "lora"}
        usable = all(abs(off[m]) <= 0.25 for m in peers) if peers <= set(off) else None
        floor_ops = by["frozen"]["roofline"]["by_op"]
        added = {}
        for m, r in by.items():
            if m.startswith("sift"):
                diff = {op: (v["roofline_s"] - floor_ops.get(op, {}).get("roofline_s", 0.0)) * scale
                        for op, v in r["roofline"]["by_op"].items()}
                added[m] = {op: d for op, d in sorted(diff.items(), key=lambda kv: -kv[1]) if d >= 5e-4}
        selection = {m: r["first_step_roofline"]["roofline_s"] * scale for m, r in by.items() if m.startswith("sift")}
        out["step_time"] = dict(scale_fitted_on_floor=scale, off_on_anchors=off, within_25pct=usable,
                                estimate_s=estimate if usable else None,
                                sift_over_floor_s=added if usable else None,
                                sift_selection_step_s=selection if usable else None)
        if usable and "lora" in anchored:
            # The roofline charges nothing per kernel; LoRA (many small kernels) is where it
            # misses most. A cost per kernel beyond the floor's, fitted on LoRA, with full
            # fine-tuning as the check: how much the estimates move if that is the cause.
            kernels = {m: r["roofline"]["kernels"] for m, r in by.items()}
            first = {m: r["first_step_roofline"]["kernels"] for m, r in by.items()}
            per_kernel = (anchored["lora"]["anchor_step_s"] - estimate["lora"]) / (kernels["lora"] - kernels["frozen"])
            with_kernels = {m: t + per_kernel * (kernels[m] - kernels["frozen"]) for m, t in estimate.items()}
            out["step_time"]["with_kernel_cost"] = dict(
                per_kernel_s=per_kernel, estimate_s=with_kernels,
                off_on_full=with_kernels["full"] / anchored["full"]["anchor_step_s"] - 1 if "full" in anchored else None,
                sift_selection_step_s={m: t + per_kernel * (first[m] - kernels["frozen"]) for m, t in selection.items()})
    return out


def table(records: list[dict], summary: dict) -> list[str]:
    lines = ["| method | simulated peak GiB | selection step | steady step | parts at the peak (GiB) | H200 anchor |",
             "|---|---:|---:|---:|---|---:|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['method']} | not simulated: {r['error'][:80]} | | | | |")
            continue
        peak_step = max(r["steps"], key=lambda st: st["peak_gib"])
        parts = ", ".join(f"{k} {v:.2f}" for k, v in peak_step["parts_gib"].items() if v >= 0.005)
        anchor = f"{r['anchor_gib']:.2f}" if "anchor_gib" in r else ""
        lines.append(f"| {r['method']} | {r['peak_gib']:.2f} | {r['steps'][0]['peak_gib']:.2f} | "
                     f"{r['steps'][-1]['peak_gib']:.2f} | {parts} | {anchor} |")
    for m, c in summary["calibration"].items():
        lines.append(f"calibration {m}: {c['simulated_gib']:.2f} vs {c['anchor_gib']:.2f} GiB ({c['off']:+.1%})")
    for key, t in summary["targets"].items():
        lines.append(f"({key}) {t['method']}: {t['peak_gib']:.2f} GiB, limit {t['limit_gib']:.2f} ({t['rule']}): "
                     f"{'met' if t['met'] else 'MISSED'}")
    if "step_time" in summary:
        st = summary["step_time"]
        lines.append("roofline x " + f"{st['scale_fitted_on_floor']:.2f} (fitted on the floor): " + ", ".join(
            f"{m} {v:+.0%}" for m, v in st["off_on_anchors"].items()) + {
            True: "", None: " (peers not simulated)",
            False: " -> off by more than 25% on a peer: no step time is stated"}[st["within_25pct"]])
        if st["within_25pct"]:
            for m, t in st["estimate_s"].items():
                extra = st["sift_over_floor_s"].get(m)
                lines.append(f"step estimate {m}: {t:.3f} s" + ("" if extra is None else " (over the floor: " + ", ".join(
                    f"{op.replace('aten.', '')} {d * 1e3:.1f} ms" for op, d in list(extra.items())[:6])
                    + f"; selection step {st['sift_selection_step_s'][m]:.3f} s)"))
            kc = st.get("with_kernel_cost")
            if kc:
                lines.append(f"with {kc['per_kernel_s'] * 1e6:.1f} us per kernel beyond the floor's (fitted on LoRA; "
                             f"full {kc['off_on_full']:+.0%}): " + ", ".join(
                                 f"{m} {t:.3f} s" for m, t in kc["estimate_s"].items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=gpu.METHODS + gpu.NF4_METHODS, default=gpu.METHODS)
    parser.add_argument("--size", default="7b", choices=sorted(gpu.SIZES))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gc", type=int, default=1, help="gradient checkpointing (1/0)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--summary-only", action="store_true",
                        help="simulate nothing: recompute the summary of the records already in --out")
    args = parser.parse_args()
    import transformers

    if args.summary_only:
        saved = json.loads(args.out.read_text())
        records = saved["methods"]
        args.out.write_text(json.dumps(dict(saved, **summarize(records), methods=records), indent=1) + "\n")
        for line in table(records, summarize(records)):
            print(line)
        return

    command = " ".join(["python", "bench/simulate.py", *sys.argv[1:]])
    records = []
    for method in args.methods:
        try:
            record = simulate(method, args.size, args.seq, args.batch, bool(args.gc), args.warmup, args.rank)
        except Exception as error:  # a method fake tensors cannot run is reported, not dropped
            record = dict(method=method, size=args.size, error=f"{type(error).__name__}: {str(error)[:300]}")
        records.append(record)
        print(json.dumps({k: v for k, v in record.items() if "roofline" not in k and k != "steps"}), flush=True)
        summary = summarize(records)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        versions = dict(torch=torch.__version__, transformers=transformers.__version__)
        if any(r.get("bitsandbytes") for r in records):
            versions["bitsandbytes"] = next(r["bitsandbytes"] for r in records if r.get("bitsandbytes"))
        args.out.write_text(json.dumps(dict(command=command, **versions, **summary, methods=records),
                                       indent=1) + "\n")  # after every method: a crash loses nothing
    for line in table(records, summarize(records)):
        print(line)


if __name__ == "__main__":
    main()
