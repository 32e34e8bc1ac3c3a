"""int8 bases on fake tensors: bitsandbytes' LLM.int8() layer as transformers loads it, and its CUDA matmul.

``BitsAndBytesConfig(load_in_8bit=True)`` makes each targeted Linear a
``Linear8bitLt`` (``has_fp16_weights=False``, ``threshold=6.0``, the
defaults ``siftune train --quantize int8`` takes): the weight is int8
``[out, in]`` with one fp32 scale per row (``SCB``), both moved into the
layer's ``MatmulLtState`` at its first forward. On a GPU, training runs
bitsandbytes' ``MatMul8bitLt`` (its CPU path is another function,
``MatMul8bitFp``), whose forward, with a frozen weight, does:

1. the input cast to fp16 (a copy unless it is fp16), then
   ``int8_vectorwise_quant``: an int8 copy of it and an fp32 scale per row;
   with ``threshold > 0`` first ``|x| >= threshold`` (an fp16 and a bool
   transient of the input's shape) and the input columns holding any such
   value (the *outlier columns*), which are then zeroed in the int8 copy;
2. ``int8_mixed_scaled_mm`` (bitsandbytes' one implementation, on every
   device): the outlier columns of the input in its own dtype (``subA``,
   ``[rows, outliers]``, kept for backward), the same columns of the weight
   dequantized (int8, fp32 times the scales, fp32 again, then the input's
   dtype), the int8 matmul into an int32 ``[rows, out]``, dequantized into
   fp16 and cast to the input's dtype, plus ``subA @ subB`` (``addmm``: a new
   output).

Backward is bitsandbytes' own, run as it is: it dequantizes the whole weight
into the input's dtype for the input gradient (``[out, in]``, one layer at a
time, as QLoRA's does).

Which columns are outliers depends on the data, which fake tensors do not
have: the count is an assumption, ``Setup.int8_outliers`` (a fraction of
each layer's input columns, default ``methods.INT8_OUTLIERS``, 0.01). The LLM.int8()
paper finds a 6.7B model's outliers in about 6 of its 4,096 hidden
dimensions (0.15%); 1% leaves room for layers and models with more. At a 7B
shape their memory is small either way: ``subA`` is rows x outliers.

The C kernels (cuBLASLt's int8 matmul, the row quantization, the int32
dequantization) allocate nothing beyond the outputs their Python wrappers
make, so each is its output here. ``tests/test_simulate.py`` holds what a
layer keeps for backward to a real bitsandbytes ``MatMul8bitLt`` run on this
CPU, the transient peak to a count of the tensors above, and a tiny model's
held memory to a real int8 model trained on this CPU.
"""
from __future__ import annotations

import weakref

import torch

from ..errors import ConfigError
from .methods import INT8_OUTLIERS, targeted

THRESHOLD = 6.0  # transformers' llm_int8_threshold default
SCALE = 7.874015718698502e-3  # 1 / 127, as bitsandbytes writes it
# The graph nodes of the running step (see release_graph).
_NODES: weakref.WeakSet = weakref.WeakSet()


def outlier_columns(columns: int, fraction: float) -> int:
    """How many of a layer's ``columns`` input columns hold an outlier, at the assumed ``fraction``."""
    return min(columns, round(fraction * columns))


def quantize_int8(model, outliers: float, device: str | torch.device = "meta"):
    """Swap each targeted Linear for a bitsandbytes ``Linear8bitLt`` as transformers makes it for
    ``load_in_8bit`` (``has_fp16_weights=False``, ``threshold=6.0``); ``outliers`` is the fraction of
    input columns its simulated matmul takes as outlier columns."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("--quantize int8 needs bitsandbytes: pip install 'siftune[quant]'") from None
    for name, module in targeted(model):
        if type(module) is not torch.nn.Linear:
            continue
        layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                    has_fp16_weights=False, threshold=THRESHOLD, device=device)
        if module.bias is not None:
            layer.bias = module.bias
        layer.state.simulated_outliers = outliers
        model.set_submodule(name, layer)
    return model


def fake_int8_weight(layer, device: torch.device) -> torch.nn.Parameter:
    """``layer``'s int8 weight as its first forward leaves it, made of fake tensors: int8 ``[out, in]``,
    and in the layer's state the same tensor (``CB``) and an fp32 scale per row (``SCB``).

    torch makes no ``Int8Params`` of a fake tensor, so the weight is a fake Parameter
    carrying the attributes ``Linear8bitLt.forward`` reads."""
    weight = torch.nn.Parameter(torch.empty((layer.out_features, layer.in_features), dtype=torch.int8,
                                            device=device), requires_grad=False)
    weight.CB = weight.SCB = None
    layer.state.CB = weight.data
    layer.state.SCB = torch.empty(layer.out_features, dtype=torch.float32, device=device)
    return weight


def real_int8_layer(module: torch.nn.Linear):
    """``module`` quantized with bitsandbytes on this CPU, as transformers' ``load_in_8bit`` does."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                has_fp16_weights=False, threshold=THRESHOLD, device="meta")
    # Int8Params quantizes as it moves to a device; a module's .to skips what is already there.
    layer.weight = bnb.nn.Int8Params(module.weight.data, requires_grad=False, has_fp16_weights=False).to("cpu")
    return layer


def as_on_a_gpu(model) -> None:
    """Make ``model``'s int8 layers run ``MatMul8bitLt``, the function bitsandbytes trains with on a GPU,
    on this CPU: in training mode it takes ``MatMul8bitFp`` on a CPU. The layers go to eval mode, which
    changes nothing else in them (no dropout); their kernels are bitsandbytes' default CPU ones."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            module.eval()


def dequantized(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """siftune's dequantization of an int8 weight (``siftune.core.quantize.dequantized_weight``)."""
    return weight.float() * (scales.float().unsqueeze(1) / 127)


def matmul_forward(ctx, A, B, out=None, bias=None, state=None):
    """bitsandbytes' ``MatMul8bitLt.forward`` with a frozen int8 weight, as CUDA runs it (module docstring)."""
    if ctx.needs_input_grad[1]:
        raise ConfigError("an int8 weight that trains itself (has_fp16_weights=True) is not simulated")
    ctx.is_empty = False
    input_shape = A.shape
    if len(A.shape) == 3:
        A = A.reshape(-1, A.shape[-1])
    CA, SCA, outlier_cols = _vectorwise_quant(A.to(torch.float16), state.threshold,
                                              getattr(state, "simulated_outliers", INT8_OUTLIERS))
    if state.threshold > 0.0:
        state.idx = outlier_cols
        output, subA = _mixed_scaled_mm(A, CA, state.CB, SCA, state.SCB, outlier_cols, bias)
    else:
        output, subA = _scaled_mm(CA, state.CB, SCA, state.SCB, bias, A.dtype), None
    ctx.state = state
    ctx.grad_shape = input_shape
    ctx.dtype_A = A.dtype
    ctx.dtype_bias = None if bias is None else bias.dtype
    if any(ctx.needs_input_grad[:2]):
        ctx.tensors = (None, subA, A)
        ctx.tensor_states = (None, state.idx)
        _NODES.add(ctx)
    else:
        ctx.tensors = [None, None, None]
        ctx.tensor_states = (None, None)
        ctx.save_for_backward(None, None)
    output_shape = (*input_shape[:-1], state.CB.shape[0])
    return output.reshape(output_shape) if len(input_shape) == 3 else output


def release_graph() -> None:
    """Drop what the step's int8 nodes keep, as freeing the graph does (``del loss``).

    bitsandbytes keeps each layer's input and ``subA`` in ``ctx.tensors``, a plain
    attribute, not a saved tensor: backward does not free them, the graph's end
    does (so with gradient checkpointing every int8 layer's input is held from
    the forward through the backward, as on a GPU). MemTracker's module hooks keep
    the graph alive until the tracker goes, so the trace frees them here instead.
    """
    for ctx in list(_NODES):
        ctx.tensors = ctx.tensor_states = None
    _NODES.clear()


def _vectorwise_quant(A, threshold: float, fraction: float):
    """bitsandbytes' CUDA ``int8_vectorwise_quant``: int8 rows and fp32 row scales (the kernel's outputs),
    and with a threshold the outlier columns, sized by ``fraction`` (the ``|A| >= threshold`` mask is held
    until it returns, as there)."""
    rows = A.numel() // A.shape[-1]
    row_stats = torch.empty(rows, device=A.device, dtype=torch.float32)
    out_row = torch.empty(A.shape, device=A.device, dtype=torch.int8)
    outlier_cols = None
    if threshold > 0.0:
        outliers = A.abs() >= threshold
        count = outlier_columns(A.shape[-1], fraction)
        if count:  # torch.argwhere(outliers.any(dim=0)).view(-1)
            any_in_column = outliers.any(dim=0)
            outlier_cols = any_in_column.new_empty((count, 1), dtype=torch.int64).view(-1)
            del any_in_column
        else:
            outlier_cols = torch.empty(0, device=A.device, dtype=torch.int64)
    if rows > 1 and outlier_cols is not None:
        out_row[:, outlier_cols] = 0
    return out_row, row_stats, outlier_cols


def _mixed_scaled_mm(A, CA, CB, SCA, SCB, outlier_cols, bias):
    """bitsandbytes' ``int8_mixed_scaled_mm`` (its default implementation, which CUDA runs too)."""
    subB = None
    if outlier_cols is not None and outlier_cols.numel():
        subA = A[:, outlier_cols].contiguous()
        subB = (CB[:, outlier_cols].contiguous() * SCB.view(-1, 1) * SCALE).to(A.dtype).t()
    else:
        subA = torch.empty(0, device=A.device, dtype=A.dtype)
    output = _scaled_mm(CA, CB, SCA, SCB, bias, A.dtype)
    if subB is not None:
        output = output.addmm(subA, subB)
    return output, subA


def _scaled_mm(CA, CB, SCA, SCB, bias, dtype):
    """``int8_scaled_mm``: cuBLASLt's int8 matmul into int32, then ``int8_mm_dequant`` into fp16, cast."""
    out_i32 = torch.empty((*CA.shape[:-1], CB.shape[0]), device=CA.device, dtype=torch.int32)
    out = torch.empty_like(out_i32, dtype=torch.float16)
    if bias is not None and bias.dtype != torch.float16:
        out.add_(bias)
    return out.to(dtype or torch.float16)
