"""Which weights SIFT targets by default and by name, on the architectures users bring."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import siftune
from siftune import SiftConfig, TargetError
from siftune.core.select import find_targets

from _models import tiny_bert_classifier


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2, n_head=2))


def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        tie_word_embeddings=tied))


class _Twice(nn.Module):
    """One Linear applied twice in the forward, and registered under a second name."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(6, 6)
        self.alias = self.inner
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def _step(model, engine, lr=1e-2):
    optimizer = engine.optimizer(lr=lr)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_default_targets_every_gpt2_conv1d_but_not_the_tied_head(targets):
    model = _gpt2()
    targeted, _ = find_targets(model, targets)
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    assert len(conv1d) == 8
    assert set(targeted) == conv1d


def test_gpt2_trains_its_blocks_and_leaves_the_embedding_alone():
    model = _gpt2()
    wte = model.transformer.wte.weight.detach().clone()
    attn = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    _step(model, siftune.attach(model, density=0.1))
    assert torch.equal(model.transformer.wte.weight, wte)
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, attn)


@pytest.mark.parametrize("tied", [True, False])
def test_default_targets_every_llama_projection_but_not_lm_head_or_embeddings(tied):
    model = _llama(tied)
    targeted, _ = find_targets(model, None)
    projections = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert len(projections) == 14
    assert set(targeted) == projections


def test_default_targets_leave_out_the_bert_classifier_and_keep_the_pooler():
    model = tiny_bert_classifier()
    targeted, _ = find_targets(model, None)
    assert "classifier.weight" not in targeted
    assert "bert.pooler.dense.weight" in targeted
    assert "bert.encoder.layer.0.attention.self.query.weight" in targeted
    assert not any("embeddings" in n for n in targeted)


def test_embeddings_are_targeted_when_named():
    targeted, _ = find_targets(_llama(tied=False), ["embed_tokens"])
    assert list(targeted) == ["model.embed_tokens.weight"]


def test_both_names_of_a_tied_weight_give_one_selection_and_train():
    model = _llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    engine = siftune.attach(model, density=0.05, target_modules=["embed_tokens", "lm_head", "q_proj"])
    names = [s.name for s in engine.slots]
    assert names.count("model.embed_tokens.weight") == 1 and "lm_head.weight" not in names
    before = model.lm_head.weight.detach().clone()
    _step(model, engine)
    changed = (model.lm_head.weight != before).sum().item()
    assert 0 < changed <= engine.slots[names.index("model.embed_tokens.weight")].k
    assert engine.increment().tensors.keys() == set(names)


def test_lm_head_alone_on_a_tied_model_trains_the_shared_weight_once():
    model = _llama(tied=True)
    engine = siftune.attach(model, density=0.05, target_modules=["lm_head"])
    assert [s.name for s in engine.slots] == ["model.embed_tokens.weight"]
    _step(model, engine)


def test_a_tied_weight_targeted_under_one_name_and_dense_under_the_other_is_a_target_error():
    model = _llama(tied=True)
    with pytest.raises(TargetError, match="also trained densely"):
        siftune.attach(model, density=0.05, target_modules=["lm_head"], dense_modules=["embed_tokens"])
    assert all(p.requires_grad for p in model.parameters())


def test_a_linear_used_twice_and_registered_twice_has_one_selection_and_matches_the_reference():
    batches = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def train(use_reference):
        model = _Twice()
        config = SiftConfig(density=0.25, target_modules=["alias", "inner"], dense_modules=["out"])
        sift = siftune.ReferenceSift(model, config, lr=1e-2) if use_reference else siftune.attach(model, config)
        optimizer = None if use_reference else sift.optimizer(lr=1e-2)
        for x in batches:
            model(x).square().mean().backward()
            if use_reference:
                sift.after_backward()
                sift.step()
            else:
                optimizer.step()
                optimizer.zero_grad()
        return model, sift

    model, engine = train(use_reference=False)
    reference, _ = train(use_reference=True)
    assert [s.name for s in engine.slots] == ["inner.weight"]
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert not torch.equal(model.inner.weight, _Twice().inner.weight)
