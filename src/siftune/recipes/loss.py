"""A batch's loss, with a causal LM's output layer run only where the loss looks.

A chat or instruction batch labels its responses only (prompts and padding
are -100), yet ``model(**batch).loss`` runs the output layer, a
49,152-way product on SmolLM2, and its log-softmax at every position. Here
the decoder's hidden states are gathered at the labelled positions first:
the same loss (the mean cross-entropy over labelled tokens, as
transformers computes it) and the same gradients, to float rounding, with
that work cut by the share of unlabelled positions (on the chatterbot
batches about three quarters).

The gathered path is taken for the plain decoder architectures in
:data:`GATHERED_MODEL_TYPES` (their logits are ``lm_head(hidden)`` and
nothing more), also inside a peft wrapper; any other model, a
classification batch, or a model whose forward a wrapper must run (FSDP2,
DistributedDataParallel) takes ``model(**batch).loss``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .data import IGNORE_INDEX

# Causal LMs whose logits are lm_head(decoder(...).last_hidden_state): no soft-capping or scaling.
GATHERED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def check_packing(model: nn.Module) -> None:
    """ConfigError unless ``model`` keeps packed examples apart: a causal LM of
    :data:`GATHERED_MODEL_TYPES`, whose transformers causal mask follows the position ids when no attention
    mask is given (``masking_utils.find_packed_sequence_indices``)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type not in GATHERED_MODEL_TYPES or not type(inner).__name__.endswith("ForCausalLM"):
        raise ConfigError(f"packing needs a causal LM whose attention keeps packed examples apart "
                          f"({', '.join(sorted(GATHERED_MODEL_TYPES))}); this model is {model_type or type(inner).__name__}: "
                          "drop --packing")


def _gatherable(model: nn.Module):
    """The transformers causal LM under ``model`` (a peft wrapper unwrapped), or None when the
    gathered path does not apply to it."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if (getattr(config, "model_type", None) not in GATHERED_MODEL_TYPES
            or not type(inner).__name__.endswith("ForCausalLM")
            or getattr(config, "final_logit_softcapping", None) is not None
            or not hasattr(inner, "get_decoder") or not hasattr(inner, "get_output_embeddings")):
        return None
    if any(type(p).__name__ == "DTensor" for p in inner.parameters()):
        return None  # FSDP2: the root module's forward gathers its shards
    return inner


def labelled_logits(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(fp32 logits at the positions that predict a label, those labels), or None where the gathered
    path does not apply (a classification batch, another architecture: see the module docstring)."""
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2:
        return None
    inner = _gatherable(model)
    if inner is None:
        return None
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # No key/value cache: a loss needs none, and with one transformers does not keep packed examples apart.
    hidden = inner.get_decoder()(**inputs, use_cache=False).last_hidden_state
    target = labels[:, 1:].to(hidden.device)
    keep = target != IGNORE_INDEX
    logits = inner.get_output_embeddings()(hidden[:, :-1][keep])
    return logits.float(), target[keep]


def batch_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The batch's mean training loss: ``model(**batch).loss``, a causal LM's computed on its
    labelled positions only (the same value)."""
    gathered = labelled_logits(model, batch)
    if gathered is None:
        if "position_ids" in batch:  # packed (siftune.recipes.data): no cache, or the examples see each other
            return model(**batch, use_cache=False).loss
        return model(**batch).loss
    logits, target = gathered
    return nn.functional.cross_entropy(logits, target)
