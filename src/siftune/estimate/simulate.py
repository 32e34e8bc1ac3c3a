"""A training step on fake tensors: what it allocates on the device, op by op, and a roofline of its time.

The model is built from its config on ``meta`` and made of fake tensors
(``FakeTensorMode``: shapes, dtypes and devices, no data, no compute); the
method is set up as a user would (:mod:`.methods`) and trained for a few
steps. torch's ``MemTracker`` records each allocation and sorts it into
parameters, gradients, activations, temporaries and optimizer state; the peak
of each phase of each step (forward, backward, optimizer step) is kept. The
first step is SIFT's selection step (the selection's copies); the last is a steady one,
and a roofline of it gives a step time.

What stands in for a CUDA device, and why:

* the device is fake ``meta``: a CPU-only torch cannot run autograd on fake
  ``cuda`` tensors (no CUDA device guard), and ``meta`` keeps device tensors
  apart from host ones, so SIFT's ledger (host memory) is not counted;
* attention runs CUDA's flash kernel (``aten._scaled_dot_product_flash_attention``,
  output + logsumexp), the kernel CUDA's SDPA picks for a 16-bit, causal,
  unmasked step; on ``meta`` SDPA would take the math path and keep seq x seq
  scores per head, and transformers, taking fake tensors for a trace, would
  build the causal mask it skips for real data;
* torch AdamW is fused, as on a GPU (its device check is told ``meta`` is
  supported; the fused kernel's shape function is what runs);
* host reads of device values (the gradient norm, a finiteness check) answer
  1: they steer control flow only, and 1 is the branch ordinary training takes.
* SIFT's balanced selection, whose rounds' sizes depend on the data, allocates
  its first round's tensors and takes the top-k's indices (:func:`balanced_as_allocated`).

nf4 bases: the targeted Linears become bitsandbytes ``Linear4bit`` layers
(nf4, blocksize 64, no double quantization); bitsandbytes' quantize needs
data, so each layer gets what it would leave (:func:`fake_nf4_weight`), and
the 4-bit matmul runs as ``dequantize_4bit`` then ``F.linear``, what
bitsandbytes' CUDA ``gemm_4bit`` does past 1536 rows, so the dequantized
transient is counted.

int8 bases: the targeted Linears become bitsandbytes ``Linear8bitLt`` layers as
transformers loads them, and their matmul runs as bitsandbytes' CUDA
``MatMul8bitLt`` runs it, op by op, with an assumed share of outlier columns
(:mod:`.int8`).

Not simulated: the CUDA allocator's rounding (512 B a block) and caching, the
cuBLAS workspaces, and memory kernels allocate inside themselves (flash
attention backward's fp32 dq accumulator). :func:`measure_cpu` runs the same
steps for real on a CPU, and ``tests/test_simulate.py`` holds the two equal.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..errors import ConfigError, SiftError
from . import int8
from .methods import Setup, density_of, logical_params, set_up, shira_entries, targeted, targeted_entries

DEVICE = torch.device("meta")
PARTS = {_MemRefType.PARAM: "parameters", _MemRefType.BUFFER: "other", _MemRefType.GRAD: "gradients",
         _MemRefType.ACT: "activations", _MemRefType.TEMP: "temporaries", _MemRefType.OPT: "optimizer_state",
         _MemRefType.OTH: "other"}
PHASES = ("forward", "backward", "optimizer")


class DeviceMemory(MemTracker):
    """torch's MemTracker, fitted to fine-tuning loops and to per-phase peaks.

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

    def _update_peak_stats(self, peak_state):
        device_peak_only(self)


@contextlib.contextmanager
def module_tracking_quiet():
    """torch's module tracker (under MemTracker) warns "The module hierarchy tracking maybe be messed up"
    when a module runs again inside its own forward (recomputed checkpoints do), and sets the process's
    ``warnings.formatwarning`` to its own. Nothing here reads per-module figures, only the totals that
    ``tests/test_simulate.py`` holds to real runs: the warning is dropped and the format put back."""
    formatwarning = warnings.formatwarning
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The module hierarchy tracking maybe be messed up")
        try:
            yield
        finally:
            warnings.formatwarning = formatwarning


def device_peak_only(tracker: MemTracker) -> None:
    """MemTracker's peak update without its per-module peaks, which nothing here reads: it walks
    every module's record at every op (a third of a 7B-shaped step's simulation time)."""
    for device, snap in tracker._curr_mem_snap.items():
        if tracker._peak_mem.get(device, 0) < snap["Total"]:
            tracker._peak_mem[device] = snap["Total"]
            tracker._peak_mem_snap[device] = dict(snap)


def phase_peak(tracker: MemTracker, device: torch.device, names: dict) -> dict[str, int]:
    """The peak since the last call, in bytes by part (``names`` maps the tracker's kinds) and
    ``total``; the tracker's peak starts again from what is held now."""
    snap = tracker.get_tracker_snapshot("peak").get(device, {})
    out: dict[str, int] = defaultdict(int)
    for kind, value in snap.items():
        if kind != "Total" and value:
            out[names.get(kind, "other")] += value
    out["total"] = snap.get("Total", 0)
    now = tracker.get_tracker_snapshot("current")
    tracker._peak_mem_snap = now
    tracker._peak_mem = {dev: s.get("Total", 0) for dev, s in now.items()}
    return dict(out)


def held_bytes(tracker: MemTracker, device: torch.device) -> int:
    return tracker.get_tracker_snapshot("current").get(device, {}).get("Total", 0)


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
                raise Untraceable("a step's shapes depend on the data (aten.nonzero), which fake tensors "
                                  "cannot size (mixture-of-experts routing does this)")
            t = args[0]
            return torch.empty((self.nonzero_count(t), t.dim()), dtype=torch.int64, device=t.device)
        if func is torch.ops.aten.bincount.default:
            # Sized by its largest value; siftune's packed indices count per block, with
            # minlength = the block count, which no block number reaches.
            t, weights, minlength = (list(args) + [kwargs.get("weights"), kwargs.get("minlength", 0)])[:3]
            if not minlength:
                raise Untraceable("aten.bincount without minlength has a size only data can tell")
            dtype = torch.int64 if weights is None else weights.dtype
            return torch.zeros(minlength, dtype=dtype, device=t.device)
        return func(*args, **kwargs)


class Untraceable(ConfigError):
    """A training step of this model cannot run on fake tensors; the message says why."""


class Roofline(TorchDispatchMode):
    """Roofline time of every op: max(FLOPs / peak FLOP/s, bytes read and written / bandwidth).

    FLOPs come from torch's flop counter formulas (matmuls and attention; a
    causal attention kernel is charged half the seq x seq square); every other
    op is bandwidth-bound. The peak rates are an H200's (:mod:`.calibration`).
    """

    def __init__(self, flops_per_s: float, bytes_per_s: float):
        super().__init__()
        self.flops_per_s, self.bytes_per_s = flops_per_s, bytes_per_s
        self.by_op: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0])  # calls, flops, bytes, s

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
            flops /= 2
        entry = self.by_op[str(packet)]
        entry[0] += 1
        entry[1] += flops
        entry[2] += nbytes
        entry[3] += max(flops / self.flops_per_s, nbytes / self.bytes_per_s)
        return out

    def totals(self) -> dict:
        return dict(kernels=sum(e[0] for e in self.by_op.values()), flops=sum(e[1] for e in self.by_op.values()),
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
    """Run the kernels a CUDA device would pick for this step, on the fake ``device`` (``meta``;
    ``cpu`` under FSDP2, :mod:`.fsdp`).

    SDPA calls become flash attention (what CUDA picks for 16 bits, no mask,
    no dropout; it takes grouped-query key/value heads as they are); with a
    mask, memory-efficient attention. torch AdamW's fused path accepts the
    device. bitsandbytes' 4-bit matmul dequantizes and calls ``F.linear``, as
    its CUDA kernel does for this many rows; its int8 matmul runs the CUDA
    path op by op (:func:`.int8.matmul_forward`).
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

    from ..core import storage

    plain_dequantized = storage.dequantized_weight

    def dequantized_weight(module):
        # siftune dequantizes a quantized base (score="grad_weight") by the weight's type, which a fake
        # Parameter does not have: the same ops, on the fake packed weight, or int8 weight and scales.
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        scales = getattr(getattr(module, "state", None), "SCB", None)
        if isinstance(weight, FakeTensor) and state is None and scales is not None:
            return int8.dequantized(weight, scales)
        if state is None or not isinstance(weight, FakeTensor):
            return plain_dequantized(module)
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            weight.view(-1, 1), state.absmax, state.blocksize, state.quant_type, list(state.shape), state.dtype)

    from ..core import engine

    plain_balanced = engine.balanced_indices

    def balanced(ranking, k, shape, cap):
        return balanced_as_allocated(ranking, k, shape, cap) if isinstance(ranking, FakeTensor) else \
            plain_balanced(ranking, k, shape, cap)

    kernels = torch.library.Library("aten", "IMPL")
    kernels.impl("sparse_mask", sparse_mask, "SparseMeta")
    matmul4, matmul8 = _bnb_matmuls()
    plain_forward = matmul4.forward if matmul4 else None
    plain_forward8 = matmul8.forward if matmul8 else None
    if matmul4:
        matmul4.forward = staticmethod(_dequantize_then_linear)
        matmul8.forward = staticmethod(int8.matmul_forward)
    F.scaled_dot_product_attention = sdpa
    adam._device_dtype_check_for_fused = fused_check
    masking.is_tracing = tracing_but_not_fake
    storage.dequantized_weight = dequantized_weight
    engine.balanced_indices = balanced
    try:
        yield
    finally:
        engine.balanced_indices = plain_balanced
        storage.dequantized_weight = plain_dequantized
        F.scaled_dot_product_attention = plain_sdpa
        adam._device_dtype_check_for_fused = check
        masking.is_tracing = tracing
        kernels._destroy()
        if matmul4:
            matmul4.forward = staticmethod(plain_forward)
            matmul8.forward = staticmethod(plain_forward8)


def balanced_as_allocated(ranking: torch.Tensor, k: int, shape: tuple, cap: float) -> torch.Tensor:
    """What :func:`siftune.core.select.balanced_indices` holds at its peak, on fake tensors, which cannot
    run its rounds (their sizes depend on the data): its first round's tensors, on the whole weight (the
    scores' fp32 copy, the chosen and open masks, the open scores, each row's best, the masks above and
    at each row's threshold), then the top-k's indices in place of its choice. Later rounds hold the
    same on the lines with room left, fewer. Chains of swaps, which the rounds rarely need at the
    densities where ``"auto"`` is balanced (<= 10%), are not modelled: each holds about 16 bytes an
    entry for a moment. ``tests/test_simulate.py`` holds this to the real function's peak."""
    from ..core.select import line_caps, top_k_indices

    score = ranking.detach().reshape(shape[0], -1).abs().float()
    rows, columns = score.shape
    chosen = torch.zeros(rows, columns, dtype=torch.bool, device=score.device)
    open_ = ~chosen
    masked = torch.where(open_, score, -1.0)
    most = min(line_caps(shape, k, cap)[0], columns)
    best = torch.topk(masked, min(most + 1, columns), dim=1).values
    threshold = best[:, most - 1:most]
    above = masked > threshold
    at = masked == threshold
    del masked, above, at, best, threshold, open_, chosen, score
    return top_k_indices(ranking, k)


def _bnb_matmuls():
    try:
        from bitsandbytes.autograd._functions import MatMul4Bit, MatMul8bitLt
    except ImportError:
        return None, None
    return MatMul4Bit, MatMul8bitLt


def _dequantize_then_linear(ctx, A, B, out=None, bias=None, quant_state=None):
    """bitsandbytes' ``MatMul4Bit.forward`` as its CUDA kernel runs it for more than 1536 rows.

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
    # The functional op allocates the same transient as the fallback's ``dequantize_4bit.out``,
    # whose fake implementation in bnb 0.50 rejects every call (it compares a torch.Size with a list).
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


def fake_nf4_weight(layer, dtype: torch.dtype = torch.bfloat16, device: torch.device = DEVICE):
    """``layer``'s nf4 weight as bitsandbytes leaves it after quantization, made of fake tensors.

    The packed weight (two 4-bit codes a byte, ``[out x in / 2, 1]`` uint8) and its
    ``QuantState`` (fp32 absmax per 64-entry block, the 16-entry nf4 code, the
    shape, the dtype it dequantizes to, blocksize 64, no double quantization).
    torch makes no ``Params4bit`` of a fake tensor, so the weight is a fake Parameter
    carrying its attributes; ``Linear4bit.forward``, peft's 4-bit LoRA layer and
    siftune's delta read ``weight.quant_state``.
    """
    from bitsandbytes.functional import QuantState

    shape = torch.Size([layer.out_features, layer.in_features])
    numel = shape.numel()
    weight = torch.nn.Parameter(torch.empty(((numel + 1) // 2, 1), dtype=torch.uint8, device=device),
                                requires_grad=False)
    weight.quant_state = QuantState(absmax=torch.empty(-(numel // -64), dtype=torch.float32, device=device),
                                    shape=shape, code=torch.empty(16, dtype=torch.float32, device=device),
                                    blocksize=64, quant_type="nf4", dtype=dtype)
    weight.blocksize, weight.quant_type, weight.compress_statistics = 64, "nf4", False
    weight.quant_storage, weight.bnb_quantized, weight.module = torch.uint8, True, layer
    return weight


def quantize_nf4(model, compute_dtype: torch.dtype):
    """Swap each targeted Linear for a bitsandbytes nf4 ``Linear4bit`` (blocksize 64, no double
    quantization), built on ``meta``; its weight becomes a fake packed one under fake mode."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("--quantize nf4 needs bitsandbytes: pip install 'siftune[quant]'") from None
    for name, module in targeted(model):
        if type(module) is not torch.nn.Linear:
            continue
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=False, quant_type="nf4",
                                  device="meta")
        if module.bias is not None:
            layer.bias = module.bias
        model.set_submodule(name, layer)
    return model


def outside_modules(model) -> list[torch.Tensor]:
    """Device tensors a model keeps in plain attributes, out of MemTracker's sight:
    peft SHiRA's indices (2 x int32 per trained entry), held in a dict per layer, and a
    4-bit weight's quantization state (absmax, code), an int8 layer's row scales and last outlier columns."""
    outside = [t for m in model.modules() for t in getattr(m, "shira_indices", {}).values()]
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:
            outside += [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
        state = getattr(m, "state", None)
        if type(state).__name__ == "MatmulLtState":
            outside += [t for t in (state.SCB, state.idx) if isinstance(t, torch.Tensor)]
    return outside


def engine_tensors(engine) -> list[torch.Tensor]:
    """Device tensors a SIFT engine keeps beside the model and the optimizer: the scaled steps' window sums
    and factors, one fp32 a feature of each targeted layer (:mod:`siftune.core.stepscale`)."""
    if engine is None:
        return []
    inputs = [slot.input for slot in engine.slots if slot.input is not None]
    return [t for scale in inputs for t in (scale.sum_sq, scale.scale, scale.before) if isinstance(t, torch.Tensor)]


# Encoders: estimated as sequence classifiers (transformers also maps some of them to a causal LM head).
ENCODERS = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta", "mpnet",
            "modernbert"}
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def task_of(config) -> str:
    """``"causal_lm"`` or ``"classification"`` (an encoder); Untraceable, naming why, for anything else."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise Untraceable(f"a {kind} model is an encoder-decoder: estimate traces decoder-only causal language "
                          "models and encoders (sequence classification)")
    if any((getattr(config, name, None) or 0) > 1 for name in EXPERT_COUNTS):
        raise Untraceable(f"a {kind} model is a mixture of experts: how many tokens each expert gets depends on "
                          "the data, which fake tensors do not have")
    if kind in ENCODERS and kind in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return "classification"
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal_lm"
    if kind in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return "classification"
    raise Untraceable(f"a {kind} model is neither a causal language model nor a sequence classifier "
                      "in transformers: estimate has no training step to trace for it")


def build_model(config, setup: Setup, device: str | torch.device = "meta"):
    """The model of ``config`` on ``device`` in the set-up's dtype (nf4 or int8 layers when asked).

    Attention is SDPA's where transformers has it for the architecture (what it picks on a
    GPU), else its eager implementation.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..recipes.models import _dtype_kwargs

    task = task_of(config)
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    if task == "classification" and getattr(config, "num_labels", 2) < 2:
        config = copy.deepcopy(config)
        config.num_labels = 2
    dtype = setup.torch_dtype if str(device) == "meta" else torch.float32
    model = None
    for attention in ("sdpa", "eager"):
        try:
            with torch.device(device):
                model = auto.from_config(config, attn_implementation=attention, **_dtype_kwargs(dtype))
            break
        except Exception as exc:  # noqa: BLE001  (transformers raises several kinds for a config it cannot build)
            if attention == "eager":
                raise Untraceable(f"transformers cannot build a {config.model_type} model from this config: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    if setup.quantize == "nf4":
        quantize_nf4(model, dtype)
    elif setup.quantize == "int8":
        int8.quantize_int8(model, setup.int8_outliers)
    return model


def inputs(config, setup: Setup, device) -> dict:
    """A batch of token ids (and labels) of the set-up's shape on ``device``."""
    vocab = getattr(config, "vocab_size", 32000)
    ids = torch.randint(0, vocab, (setup.batch_size, setup.seq_len), device=device)
    if task_of(config) == "classification":
        return dict(input_ids=ids, labels=torch.zeros(setup.batch_size, dtype=torch.long, device=device))
    return dict(input_ids=ids, labels=ids)


def check_length(config, setup: Setup) -> None:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and setup.seq_len > limit and getattr(config, "rope_scaling", None) is None and \
            config.model_type in ("bert", "gpt2", "opt", "roberta", "distilbert"):
        raise ConfigError(f"seq-len {setup.seq_len} is past the {limit} positions a {config.model_type} "
                          "model has")


def trace(config, setup: Setup, warmup: int = 1, roofline: tuple[float, float] | None = None,
          world: int = 1) -> dict:
    """``warmup`` steps plus one of ``setup`` on a fake ``config`` model, counted.

    Returns the peak of every phase of every step, by part (bytes), what each
    step leaves held, the parameter, trainable and selected counts, and (with
    ``roofline = (FLOP/s, bytes/s)``) the roofline of the first and last steps.
    With ``world`` > 1, one GPU of a data-parallel job of that many
    (:func:`data_parallel_bytes`): SIFT runs on a fake process group and
    exchanges what it exchanges; the other methods add DDP's buckets.
    """
    check_length(config, setup)
    model = build_model(config, setup)  # real meta tensors: no init kernels to run
    entries = targeted_entries(model)
    base = logical_params(model)
    density = density_of(setup, entries)
    reads = HostReads(shira_entries(setup.rank) if setup.method == "shira" else None)
    nf4 = setup.quantize == "nf4"
    first = last = None
    group = fake_process_group(world) if world > 1 else contextlib.nullcontext()
    with group, FakeTensorMode(allow_non_fake_inputs=True), reads, cuda_kernels():
        model.to_empty(device=DEVICE)  # now fake
        model.tie_weights()  # to_empty makes a new tensor for each module's reference to a tied weight
        if nf4:
            import bitsandbytes as bnb

            for layer in model.modules():
                if isinstance(layer, bnb.nn.Linear4bit):
                    layer.weight = fake_nf4_weight(layer, setup.torch_dtype)
        if setup.quantize == "int8":
            import bitsandbytes as bnb

            for layer in model.modules():
                if isinstance(layer, bnb.nn.Linear8bitLt):
                    layer.weight = int8.fake_int8_weight(layer, DEVICE)
        if setup.gradient_checkpointing:
            from ..recipes.models import checkpoint_activations
            checkpoint_activations(model)
        model.config.use_cache = False
        with torch.device(DEVICE):  # peft makes its adapters on the default device, then moves them
            model, opt, engine = set_up(setup, model, density, distributed=world > 1)
        buckets = data_parallel_bytes(model, engine) if world > 1 else 0
        params = sum(p.numel() for p in model.parameters())
        if engine is not None:
            trainable = engine.num_trainable
        else:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        batch = inputs(config, setup, DEVICE)
        steps = []
        for step in range(warmup + 1):
            # A tracker per step: MemTracker's module tracking keeps a step's input
            # gradients alive until the tracker goes (2 x seq x hidden more per step).
            # What outlives a step is reachable from the model, the optimizer (the
            # engine's indices are in its state), the batch, the outside tensors and the engine's factors.
            tracker = DeviceMemory()
            tracker.track_external(model, *([opt] if opt is not None else []), *batch.values(),
                                   *outside_modules(model), *engine_tensors(engine))
            timer = Roofline(*roofline) if roofline and step in (0, warmup) else contextlib.nullcontext()
            phases = {}
            with module_tracking_quiet(), tracker, timer:
                try:
                    loss = model(**batch).loss
                    phases["forward"] = with_buckets(phase_peak(tracker, DEVICE, PARTS), buckets)
                    loss.backward()
                    phases["backward"] = with_buckets(phase_peak(tracker, DEVICE, PARTS), buckets)
                    del loss
                    int8.release_graph()
                    if opt is not None:
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    phases["optimizer"] = with_buckets(phase_peak(tracker, DEVICE, PARTS), buckets)
                except SiftError:
                    raise
                except Exception as exc:  # noqa: BLE001  (a model whose step fake tensors cannot run)
                    raise Untraceable(f"a {config.model_type} training step does not run on fake tensors: "
                                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
            steps.append(dict(phases=phases, held=held_bytes(tracker, DEVICE) + buckets))
            if roofline and step == 0:
                first = timer.totals()
            if roofline and step == warmup:
                last = timer.totals()
            del tracker
        selected = engine.num_selected if engine is not None else None
    return dict(base_params=base, params=params, trainable=trainable, selected=selected, targeted=entries,
                density=density if engine is not None else None, steps=steps,
                roofline=last, first_step_roofline=first, host_reads=reads.reads, ddp_bucket_bytes=buckets)


@contextlib.contextmanager
def fake_process_group(world: int):
    """Rank 0 of ``world`` on torch's fake backend (no peers, no data moved), for the block only."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise ConfigError("a process group is already set up in this process; estimate several GPUs in a "
                          "fresh one")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def data_parallel_bytes(model, engine) -> int:
    """What data parallelism adds to one GPU beyond what the step allocates, held from wrapping to the end.

    SIFT (``engine``) is not wrapped in DDP: siftune all-reduces the selected
    gradient entries itself, in a flat fp32 buffer at ``optimizer.step()``, and
    at a selection an fp32 copy of each dense gradient; the trace runs those on
    the fake process group, so they are counted where they happen and nothing
    is added here. Every other method trains under torch's
    ``DistributedDataParallel`` with its defaults (``bucket_cap_mb=25``,
    ``gradient_as_bucket_view=False``): its reducer allocates, when it wraps
    the model, flat buckets that hold every trainable parameter's gradient
    once, in the parameter's dtype (the gradients are copied in, all-reduced
    in place and copied back to ``.grad``); the cap only sets how the buckets
    split them. A model with nothing to train is not wrapped.
    """
    if engine is not None:
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def with_buckets(snap: dict, buckets: int) -> dict:
    """A phase's peak with DDP's buckets (held throughout) added as communication."""
    if buckets:
        snap = dict(snap)
        snap["communication"] = snap.get("communication", 0) + buckets
        snap["total"] += buckets
    return snap


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


def measure_cpu(config, setup: Setup, warmup: int = 1, held: list | None = None, ddp: bool = False) -> list[int]:
    """The same steps really run on this CPU in fp32: each step's peak bytes as torch's CPU
    allocator counts them (the profiler's allocation events, ``total_allocated``); each step's
    bytes still held at its end are appended to ``held`` when given. With ``ddp`` the model is
    wrapped in torch's ``DistributedDataParallel`` (defaults) on the process group already set up.

    The simulation's twin is ``trace(config, setup.replace(dtype="float32"))``. nf4 and int8
    layers are quantized by bitsandbytes' CPU kernels; int8 layers run the GPU's matmul
    function (:func:`.int8.as_on_a_gpu`) on bitsandbytes' default CPU kernels.
    """
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_model(config, Setup("full", dtype="float32"), "cpu")  # quantized below, for real
        if setup.quantize:
            _quantize_for_real(model, _real_nf4_layer if setup.quantize == "nf4" else int8.real_int8_layer)
        if setup.gradient_checkpointing:
            from ..recipes.models import checkpoint_activations
            checkpoint_activations(model)
        model.config.use_cache = False
        model, opt, _ = set_up(setup, model, density_of(setup, targeted_entries(model)))
        if setup.quantize == "int8":
            int8.as_on_a_gpu(model)
        if ddp:
            model = torch.nn.parallel.DistributedDataParallel(model)
        batch = inputs(config, setup, "cpu")
    # The count also holds what earlier sessions allocated and freed with no session on
    # (an earlier run in this process): what it held before this run's first allocation.
    _, size_first, total_first = allocations(prof)[0]
    before = total_first - size_first
    peaks = []
    for _ in range(warmup + 1):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = model(**batch).loss
            loss.backward()
            del loss
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        events = allocations(prof)
        peaks.append(max(total for _, _, total in events) - before)
        if held is not None:
            held.append(events[-1][2] - before)
    return peaks


def _quantize_for_real(model, quantized) -> None:
    """Replace each targeted Linear of ``model`` by ``quantized(linear)``, keeping its bias."""
    for name, module in targeted(model):
        if type(module) is not torch.nn.Linear:
            continue
        layer = quantized(module)
        if module.bias is not None:
            layer.bias = module.bias
        model.set_submodule(name, layer)


def _real_nf4_layer(module: torch.nn.Linear):
    """``module`` quantized to nf4 with bitsandbytes on this CPU (blocksize 64, fp32 compute)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4",
                              device="meta")
    # Params4bit quantizes as it moves to a device; a module's .to skips what is already there.
    layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, blocksize=64,
                                     compress_statistics=False, quant_type="nf4", module=layer).to("cpu")
    return layer
