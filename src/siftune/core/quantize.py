"""Quantized bases: load a model's Linear layers in 4 or 8 bits with bitsandbytes.

SIFT then trains a ``storage="delta"`` increment beside the frozen quantized
weights (:mod:`siftune.core.storage`), as QLoRA trains LoRA adapters beside them.
bitsandbytes is an optional dependency: ``pip install siftune[quant]``.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

QUANTIZATIONS = {
    "nf4": "4-bit NormalFloat (QLoRA's default)",
    "fp4": "4-bit float",
    "int8": "8-bit integers (LLM.int8())",
}
# Layers left in full precision: the output layer (transformers' default) and a new
# classification head, which SIFT trains densely.
KEEP_FULL_PRECISION = ["lm_head", "classifier", "score"]


def quantization_config(kind: str, compute_dtype: torch.dtype = torch.float32):
    """The transformers ``BitsAndBytesConfig`` for ``kind`` (one of :data:`QUANTIZATIONS`)."""
    if kind not in QUANTIZATIONS:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {kind!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"quantize={kind} needs bitsandbytes, which is not installed: "
                          "pip install 'siftune[quant]'") from None
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP_FULL_PRECISION)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=KEEP_FULL_PRECISION)


def keep_training_layout(module: torch.nn.Module) -> None:
    """Keep a bitsandbytes 4-bit layer on its trainable CPU path.

    In eval mode without gradients, bitsandbytes (0.50) repacks a 4-bit
    weight for a bf16 CPU kernel (``gemv_4bit``) that has no backward: once
    repacked, gradients through the layer are silently wrong, and the layer
    computes in bf16 instead of its compute dtype. An evaluation before
    training would do that, so targeted and loaded layers are kept off that
    kernel, and a weight already repacked is unpacked again, as bitsandbytes
    does itself before saving.
    """
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes import functional

        weight.data, weight.quant_state = functional._convert_weight_packed_for_cpu_inverse(weight.data, state)


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The float weight a (possibly quantized) Linear layer computes with, as a new tensor."""
    weight = module.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        from bitsandbytes import functional

        keep_training_layout(module)
        return functional.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "Int8Params":
        scale = getattr(weight, "SCB", None)
        if scale is None:  # after a forward, bitsandbytes keeps the scales in the layer's state
            scale = getattr(getattr(module, "state", None), "SCB", None)
        if scale is None:
            raise ConfigError("this int8 layer holds no scales (SCB); was it moved to its device?")
        return weight.data.float() * (scale.float().unsqueeze(1) / 127)
    if type(weight.data) is not torch.Tensor and hasattr(weight.data, "dequantize"):
        return weight.data.dequantize()
    return weight.detach().clone()
