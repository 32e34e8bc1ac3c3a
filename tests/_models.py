"""Tiny models and batches for the engine, increment and trainer tests.

Everything here is deterministic for a given seed and small enough that a
training step takes milliseconds on a CPU.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# The MLP's layers by qualified name: "0", "2", "4" are Linears, "1", "3" are Tanh.
MLP_TARGETS = ["0", "2"]
MLP_DENSE = ["4"]
# The top-k with AdamW's plain steps: what SiftConfig's "auto" gives where balanced and scaled steps cannot run
# (FSDP2 shards), and what the tests of the top-k's own mechanics name.
TOPK = {"selection": "gradient", "step_scale": None}


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32, sizes=(8, 16, 16, 3)) -> nn.Sequential:
    """Linear-Tanh-Linear-Tanh-Linear; with the default sizes 8 -> 16 -> 16 -> 3."""
    torch.manual_seed(seed)
    a, b, c, d = sizes
    model = nn.Sequential(nn.Linear(a, b), nn.Tanh(), nn.Linear(b, c), nn.Tanh(), nn.Linear(c, d))
    return model.to(dtype)


def mlp_batches(count: int, seed: int = 1, batch_size: int = 4, dtype: torch.dtype = torch.float32):
    """``count`` (inputs, labels) pairs for :func:`mlp`, inputs of width 8, labels in 0..2."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 8, generator=g).to(dtype), torch.randint(0, 3, (batch_size,), generator=g))
        for _ in range(count)
    ]


def mlp_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x).float(), y)


def bert_config(num_labels: int = 2):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def tiny_bert_classifier(seed: int = 0, num_labels: int = 2):
    """A random BertForSequenceClassification: hidden 32, 2 layers, vocab 100, no dropout."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config(num_labels))


def tiny_llama(seed: int = 0):
    """A random LlamaForCausalLM: hidden 32, 2 layers, 4 heads (2 kv), vocab 100."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def token_batches(count: int, seed: int = 2, batch_size: int = 2, length: int = 8, vocab: int = 100):
    """``count`` random ``input_ids`` tensors of shape (batch_size, length)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch_size, length), generator=g) for _ in range(count)]


def contains_token_dataset(count: int = 64, length: int = 8, token: int = 5, seed: int = 3):
    """Classification rows whose label says whether ``token`` occurs in ``input_ids`` (half of them do)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        ids = torch.randint(10, 100, (length,), generator=g)
        label = i % 2
        if label:
            ids[int(torch.randint(0, length, (1,), generator=g))] = token
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                     "labels": torch.tensor(label)})
    return rows


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached clones of every parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def whole_and_resumed(config, batches, cut: int, lr: float = 1e-2):
    """Train :func:`mlp` with SIFT on ``batches`` in one run, and again stopped after ``cut`` steps, its
    model, engine and optimizer state restored into a fresh model (another seed's draw) that trains on.

    Returns the whole run's model, the resumed model and the interrupted run's engine as it was saved.
    """
    import copy

    import siftune

    def run(model, opt, chunk):
        for batch in chunk:
            mlp_loss(model, batch).backward()
            opt.step()
            opt.zero_grad()

    whole = mlp()
    engine = siftune.attach(whole, config)
    run(whole, engine.optimizer(lr=lr), batches)
    first = mlp()
    stopped = siftune.attach(first, config)
    opt = stopped.optimizer(lr=lr)
    run(first, opt, batches[:cut])
    saved = copy.deepcopy({"engine": stopped.state_dict(), "opt": opt.state_dict(), "model": first.state_dict()})
    resumed = mlp(seed=3)
    resumed.load_state_dict(saved["model"])
    engine = siftune.attach(resumed, config)
    opt = engine.optimizer(lr=lr)
    engine.load_state_dict(saved["engine"])
    opt.load_state_dict(saved["opt"])
    run(resumed, opt, batches[cut:])
    return whole, resumed, stopped
