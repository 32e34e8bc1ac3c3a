"""step_scale="input": each selected component's step scaled by its input feature's size, exact against the
reference, with the factors checked against a hand computation."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import siftune  # noqa: E402
from siftune import CheckpointError, ConfigError, ReferenceSift, SiftConfig  # noqa: E402
from siftune.core.stepscale import LIMIT, factors  # noqa: E402
from _models import MLP_DENSE, MLP_TARGETS, mlp, mlp_loss, params, whole_and_resumed  # noqa: E402
from test_engine import ATOL, step_both  # noqa: E402

# Input features over three decades: the first layer's factors span the clamp on both sides.
FEATURE_SIZE = torch.logspace(-2, 1.5, 8)


def batches(count: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 8, generator=g) * FEATURE_SIZE, torch.randint(0, 3, (4,), generator=g))
            for _ in range(count)]


def config(**overrides) -> SiftConfig:
    return SiftConfig(**{**dict(density=0.25, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE,
                                selection="gradient", step_scale="input"), **overrides})


def lockstep(cfg, steps=6, accum=2, lr=1e-2, weight_decay=0.0):
    base = mlp()
    fast, slow = copy.deepcopy(base), copy.deepcopy(base)
    engine = siftune.attach(fast, cfg)
    opt = engine.optimizer(lr=lr, weight_decay=weight_decay)
    ref = ReferenceSift(slow, cfg, lr=lr, weight_decay=weight_decay)
    data = iter(batches(steps * accum))
    diffs = [step_both(fast, slow, opt, ref, [next(data) for _ in range(accum)]) for _ in range(steps)]
    return diffs, base, fast, engine


@pytest.mark.parametrize("overrides, accum", [
    ({}, 2),
    ({"mode": "periodic", "refresh_every": 2}, 1),
    ({"mode": "periodic", "refresh_every": 3, "selection_batches": 2}, 1),
    ({"selection": "balanced", "line_cap": 1.0}, 2),
    ({"selection": "random"}, 1),
    ({"selection": "mixed"}, 1),
    ({"selection": "grow_drop", "mode": "periodic", "refresh_every": 2}, 1),
    ({"score": "grad_snr", "selection_batches": 2}, 1),
    ({"structure": "rows"}, 1),
    ({"compact_indices": True, "state_dtype": "bfloat16"}, 1),
])
def test_scaled_steps_match_the_reference_step_for_step(overrides, accum):
    diffs, base, fast, _ = lockstep(config(**overrides), accum=accum, weight_decay=0.1)
    assert max(diffs) <= ATOL, diffs
    assert not torch.equal(params(fast)["0.weight"], params(base)["0.weight"])


def test_the_first_step_moves_each_component_by_the_rate_times_its_features_factor():
    # Adam's first step moves a component by lr * g / (|g| + eps): the rate, up to eps. With the
    # factors it is lr * median(r) / r_j, r_j the root mean square of input feature j in the window.
    model = mlp()
    before = model[0].weight.detach().clone()
    engine = siftune.attach(model, config())
    opt = engine.optimizer(lr=1e-2)
    x, y = batches(1)[0]
    mlp_loss(model, (x, y)).backward()
    opt.step()
    rms = x.pow(2).mean(0).sqrt()
    expected = (rms.median() / rms).clamp(1 / LIMIT, LIMIT)
    assert expected.max() == LIMIT and expected.min() == 1 / LIMIT  # both ends of the clamp are in play
    moved = (model[0].weight.detach() - before).abs()
    idx = engine.selected["0.weight"].long()
    got = moved.reshape(-1)[idx] / 1e-2  # to float32 rounding of the weights and Adam's eps
    torch.testing.assert_close(got, expected[idx % 8], rtol=1e-3, atol=1e-5)
    assert (moved.reshape(-1) != 0).sum() == idx.numel()  # nothing else moved


def test_without_the_option_the_same_run_trains_otherwise():
    scaled = lockstep(config(), steps=3)[2]
    plain = lockstep(config(step_scale=None), steps=3)[2]
    assert not torch.allclose(params(scaled)["0.weight"], params(plain)["0.weight"])


def test_factors_are_the_median_over_each_features_rms_within_the_limit():
    sum_sq = torch.tensor([4.0, 1.0, 1e-6, 400.0, 0.0]) * 2
    got = factors(sum_sq, 2)  # rms 2, 1, 1e-3, 20, 0; median 1
    torch.testing.assert_close(got, torch.tensor([0.5, 1.0, LIMIT, 1 / LIMIT, LIMIT]))
    assert torch.equal(factors(torch.zeros(3), 0), torch.ones(3))  # no tokens: no scaling


def test_scaled_steps_on_a_delta_match_the_in_place_reference():
    from test_delta import _lockstep as delta_lockstep

    worst, base, _, slow, _, _ = delta_lockstep({"step_scale": "input", "mode": "periodic", "refresh_every": 3},
                                                steps=7)
    assert worst < 1e-5
    assert not torch.equal(slow[0].weight, base[0].weight)


def test_a_checkpoint_mid_window_resumes_to_the_uninterrupted_run():
    cfg = config(mode="periodic", refresh_every=2, selection_batches=2)
    # step 5 is inside the window that began after step 4's refresh
    whole, resumed, stopped = whole_and_resumed(cfg, batches(12), cut=5)
    assert stopped.slots[0].input.count > 0 and stopped.slots[0].input.scale is not None
    for name, p in params(whole).items():
        torch.testing.assert_close(params(resumed)[name], p, rtol=0, atol=0)


def test_a_skipped_step_keeps_the_factors_of_the_selection_in_force():
    model = mlp()
    engine = siftune.attach(model, config(mode="periodic", refresh_every=1))
    opt = engine.optimizer(lr=1e-2)
    data = batches(3)
    mlp_loss(model, data[0]).backward()
    opt.step()
    opt.zero_grad()
    kept = engine.slots[0].input.scale.clone()
    x, y = data[1]
    mlp_loss(model, (x * 1e3, y)).backward()  # a refresh from other inputs ...
    for p in model.parameters():
        if p.grad is not None:
            p.grad.fill_(float("nan"))
    for slot in engine.slots:
        if slot.grad is not None:
            slot.grad.fill_(float("nan"))
    opt.step()  # ... whose step is skipped: the selection and its factors go back
    opt.zero_grad()
    assert opt.skipped_steps == 1
    assert torch.equal(engine.slots[0].input.scale, kept)
    assert engine.slots[0].input.count == 0  # the window starts again


@pytest.mark.parametrize("overrides, message", [
    (dict(step_scale="output"), "step_scale must be None, 'input' or 'auto'"),
    (dict(step_scale="input", mode="per_step"), "mode='per_step' selects anew each step"),
])
def test_a_step_scale_out_of_place_is_a_one_line_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(**overrides)


def test_a_target_without_input_features_is_refused_and_the_model_left_as_it_was():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="0.weight is a Embedding: target Linear layers only"):
        siftune.attach(model, step_scale="input", target_modules=["0", "1"])
    assert not model[0]._forward_hooks and not model[1]._forward_hooks
    assert all(p.requires_grad for p in model.parameters())


def test_a_checkpoint_with_factors_of_another_size_is_refused():
    model = mlp()
    engine = siftune.attach(model, config())
    opt = engine.optimizer(lr=1e-2)
    mlp_loss(model, batches(1)[0]).backward()
    opt.step()
    opt.zero_grad()
    state = engine.state_dict()
    state["slots"]["0.weight"]["step_scale"] = torch.ones(5)
    with pytest.raises(CheckpointError, match="step_scale must be a float32 tensor of 8 values"):
        siftune.attach(mlp(), config()).load_state_dict(state)


def test_scaled_steps_on_a_gpt2_conv1d_match_the_reference():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    fast, slow = copy.deepcopy(base), copy.deepcopy(base)
    cfg = SiftConfig(density=0.2, step_scale="input", target_modules=["c_attn", "c_fc"])
    engine = siftune.attach(fast, cfg)
    opt = engine.optimizer(lr=1e-2)
    ref = ReferenceSift(slow, cfg, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 50, (2, 8), generator=g)
        fast(input_ids=ids, labels=ids).loss.backward()
        slow(input_ids=ids, labels=ids).loss.backward()
        ref.after_backward()
        opt.step()
        opt.zero_grad()
        ref.step()
    for (name, a), b in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    weight = engine.slots[0]
    assert weight.input.scale.numel() == 16  # c_attn's weight is (in 16, out 48): factors by its rows
    assert not torch.equal(fast.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)
