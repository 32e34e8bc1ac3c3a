"""SiftEngine + SiftAdamW: what gets trained, when, and that it matches the dense reference."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import siftune  # noqa: E402
from siftune import ConfigError, NonFiniteGradientError, ReferenceSift, SiftConfig, TargetError  # noqa: E402
from _models import MLP_DENSE, MLP_TARGETS, TOPK, mlp, mlp_batches, mlp_loss, params, tiny_llama, token_batches  # noqa: E402

ATOL = 1e-6


def config(**overrides) -> SiftConfig:
    """The top-k with plain steps (this file's mechanics); the default's own tests say SiftConfig()."""
    base = dict(density=0.2, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE, **TOPK)
    return SiftConfig(**{**base, **overrides})


def lockstep(cfg: SiftConfig, steps: int = 8, accum: int = 2, lr: float = 1e-2, weight_decay: float = 0.0):
    """Train two copies of the MLP, one with the engine and one with ReferenceSift, on the same batches.

    Returns one record per optimizer step: the largest parameter difference
    between the two models after that step, the engine's selection and the
    optimizer's unclipped gradient norm.
    """
    base = mlp()
    fast, slow = copy.deepcopy(base), copy.deepcopy(base)
    engine = siftune.attach(fast, cfg)
    opt = engine.optimizer(lr=lr, weight_decay=weight_decay)
    ref = ReferenceSift(slow, cfg, lr=lr, weight_decay=weight_decay)
    batches = iter(mlp_batches(steps * accum))
    records = []
    for _ in range(steps):
        diff = step_both(fast, slow, opt, ref, [next(batches) for _ in range(accum)])
        records.append({"diff": diff, "selected": {n: i.clone() for n, i in engine.selected.items()},
                        "norm": opt.last_grad_norm})
    moved = {n: not torch.equal(p, params(base)[n]) for n, p in params(fast).items()}
    return records, moved


def step_both(fast, slow, opt, ref, micro_batches) -> float:
    """One optimizer step of the engine's model and the reference's on the same micro-batches; the largest
    parameter difference between the two models after it."""
    for batch in micro_batches:
        mlp_loss(fast, batch).backward()
        mlp_loss(slow, batch).backward()
        ref.after_backward()
    opt.step()
    opt.zero_grad()
    ref.step()
    return max(float((a - b).detach().abs().max()) for a, b in zip(fast.parameters(), slow.parameters()))


@pytest.mark.parametrize("mode", ["fixed", "periodic"])
def test_the_default_config_trains_balanced_with_scaled_steps_in_lockstep_with_the_reference(mode):
    cfg = SiftConfig(density=0.1, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE, mode=mode, refresh_every=3)
    assert (cfg.selection, cfg.step_scale, cfg.line_cap) == ("auto", "auto", 1.0)
    engine = siftune.attach(mlp(), cfg)
    assert (engine.config.selection, engine.config.step_scale) == ("balanced", "input")
    assert engine.state_dict()["config"]["selection"] == "balanced"  # saved concrete, never "auto"
    records, moved = lockstep(cfg)
    assert_lockstep(records, moved)
    top_k = lockstep(config(mode=mode, refresh_every=3))[0]
    assert any(not torch.equal(a["selected"][n], b["selected"][n])
               for a, b in zip(records, top_k) for n in a["selected"])  # it is not the top-k


@pytest.mark.parametrize("overrides, selection, step_scale", [
    ({"budget": "global"}, "gradient", "input"),
    ({"mode": "per_step"}, "gradient", None),
    ({"structure": "rows"}, "gradient", None),
    ({"selection": "gradient"}, "gradient", "input"),
    ({"selection": "random"}, "random", "input"),
    ({"step_scale": None}, "balanced", None),
    ({"density": 0.11}, "gradient", "input"),  # above the densities balanced was measured at
])
def test_auto_is_the_top_k_or_plain_steps_where_balanced_or_scaling_cannot_run(overrides, selection, step_scale):
    engine = siftune.attach(mlp(), SiftConfig(**{"density": 0.1, "target_modules": MLP_TARGETS, **overrides}))
    assert (engine.config.selection, engine.config.step_scale) == (selection, step_scale)


def test_auto_keeps_plain_steps_when_a_target_has_no_input_features():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 3))
    engine = siftune.attach(model, density=0.1, target_modules=["0", "1"])
    assert (engine.config.selection, engine.config.step_scale) == ("balanced", None)
    with pytest.raises(ConfigError, match="step_scale='input' scales steps by a Linear layer's input features"):
        siftune.attach(torch.nn.Sequential(torch.nn.Embedding(10, 8)), density=0.2, target_modules=["0"],
                       step_scale="input")


def assert_lockstep(records, moved):
    diffs = [r["diff"] for r in records]
    assert max(diffs) <= ATOL, f"engine and reference differ after steps: {diffs}"
    # The comparison means something only if the targeted tensors were trained.
    assert moved["0.weight"] and moved["2.weight"] and moved["4.weight"]


# -- engine == reference -------------------------------------------------------

def test_engine_matches_reference_in_fixed_mode():
    assert_lockstep(*lockstep(config(mode="fixed")))


def test_engine_matches_reference_in_periodic_mode_across_a_refresh():
    records, moved = lockstep(config(mode="periodic", refresh_every=3), steps=8)
    assert_lockstep(records, moved)
    before, after = records[2]["selected"], records[3]["selected"]  # step 3 ends, step 4 selects anew
    assert any(not torch.equal(before[n], after[n]) for n in before), "no selection changed at the refresh"


def test_engine_matches_reference_in_periodic_mode_with_two_batch_selections():
    records, moved = lockstep(config(mode="periodic", refresh_every=3, selection_batches=2), steps=8, accum=1)
    assert_lockstep(records, moved)
    assert any(not torch.equal(records[2]["selected"][n], records[4]["selected"][n]) for n in records[2]["selected"])


def test_engine_matches_reference_in_per_step_mode():
    records, moved = lockstep(config(mode="per_step"))
    assert_lockstep(records, moved)
    assert any(not torch.equal(records[0]["selected"][n], records[-1]["selected"][n]) for n in records[0]["selected"])


def test_engine_matches_reference_with_gradient_accumulation_of_three():
    assert_lockstep(*lockstep(config(), accum=3))


def test_engine_matches_reference_when_global_norm_clipping_clips():
    max_norm = 0.05
    records, moved = lockstep(config(max_grad_norm=max_norm))
    assert all(r["norm"] > max_norm for r in records), [r["norm"] for r in records]
    assert_lockstep(records, moved)


def test_engine_matches_reference_when_selection_spans_three_micro_batches_over_two_windows():
    records, moved = lockstep(config(selection_batches=3), accum=2)
    assert_lockstep(records, moved)


def test_engine_matches_reference_with_weight_decay():
    assert_lockstep(*lockstep(config(), weight_decay=0.1))


def test_engine_matches_reference_with_bfloat16_optimizer_state():
    assert_lockstep(*lockstep(config(state_dtype="bfloat16")))


def test_engine_matches_reference_with_random_selection():
    assert_lockstep(*lockstep(config(selection="random", seed=7)))


@pytest.mark.parametrize("overrides", [dict(mode="fixed"), dict(mode="periodic", refresh_every=3),
                                       dict(mode="fixed", weight_decay=0.1), dict(state_dtype="bfloat16")])
def test_update_in_backward_matches_reference(overrides):
    weight_decay = overrides.pop("weight_decay", 0.0)
    records, moved = lockstep(config(update_in_backward=True, **overrides), accum=1, weight_decay=weight_decay)
    assert_lockstep(records, moved)


@pytest.mark.parametrize("overrides", [dict(mode="fixed"), dict(mode="periodic", refresh_every=3),
                                       dict(update_in_backward=True, state_dtype="bfloat16")])
def test_compact_indices_match_reference(overrides):
    accum = 1 if overrides.get("update_in_backward") else 2
    records, moved = lockstep(config(compact_indices=True, **overrides), accum=accum)
    assert_lockstep(records, moved)


def test_lean_setup_holds_6_bytes_per_selected_component_on_the_device():
    # The memory-saving set-up: packed indices 2 B + bf16 moments 4 B, no master
    # copies, no gradient buffers (the update is applied in backward).
    model = mlp(dtype=torch.bfloat16, sizes=(300, 400, 16, 3))  # 120k entries: two 65,536 blocks
    cfg = SiftConfig(density=0.05, target_modules=["0"], state_dtype="bfloat16", master_weights=False,
                     compact_indices=True, update_in_backward=True, **TOPK)
    engine = siftune.attach(model, cfg)
    opt = engine.optimizer(lr=1e-3)
    before = model[0].weight.detach().clone()
    x = torch.randn(4, 300, dtype=torch.bfloat16)
    mlp_loss(model, (x, torch.tensor([0, 1, 2, 0]))).backward()
    opt.step()
    used = engine.state_bytes(opt)
    assert used["gradients"] == 0
    assert 6 <= sum(used.values()) / engine.num_selected < 6.01
    changed = (model[0].weight != before).reshape(-1).nonzero().reshape(-1)
    assert torch.isin(changed, engine.selected["0.weight"]).all() and changed.numel() > 0.9 * engine.num_selected


def test_update_in_backward_writes_the_update_during_backward_and_keeps_no_gradient_buffer():
    model = mlp()
    engine = siftune.attach(model, config(update_in_backward=True))
    opt = engine.optimizer(lr=1e-2)
    before = params(model)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    assert not torch.equal(model[0].weight, before["0.weight"])  # targeted: already updated
    assert torch.equal(model[4].weight, before["4.weight"])  # dense head: at step()
    assert engine.state_bytes(opt)["gradients"] == 0
    opt.step()
    assert not torch.equal(model[4].weight, before["4.weight"])


def test_update_in_backward_refuses_gradient_accumulation_and_clipping():
    model = mlp()
    engine = siftune.attach(model, config(update_in_backward=True))
    opt = engine.optimizer(lr=1e-2)
    batches = mlp_batches(2)
    mlp_loss(model, batches[0]).backward()
    with pytest.raises(ConfigError, match="gradient accumulation"):
        mlp_loss(model, batches[1]).backward()
    with pytest.raises(ConfigError, match="max_grad_norm"):
        config(update_in_backward=True, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="max_grad_norm"):
        siftune.attach(mlp(), config(update_in_backward=True)).optimizer(lr=1e-2, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="per_step"):
        config(update_in_backward=True, mode="per_step")


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_update_in_backward_skips_a_non_finite_step_and_keeps_no_selection_from_it(policy):
    base = mlp()
    batches = mlp_batches(2)
    probe = copy.deepcopy(base)
    mlp_loss(probe, batches[1]).backward()
    model = copy.deepcopy(base)
    engine = siftune.attach(model, config(update_in_backward=True, score="grad"))
    opt = engine.optimizer(lr=1e-2, nonfinite=policy)
    if policy == "raise":
        with pytest.raises(NonFiniteGradientError, match="0.weight"):
            _nan_step(model, opt, batches[0])
        opt.zero_grad()
    else:
        _nan_step(model, opt, batches[0])
        assert opt.skipped_steps == 1
    for name, value in params(model).items():
        assert torch.equal(value, params(base)[name]), name
    mlp_loss(model, batches[1]).backward()
    opt.step()
    g = probe.get_parameter("0.weight").grad.reshape(-1)
    expected = torch.sort(torch.topk(g.abs(), round(0.2 * g.numel())).indices).values
    assert torch.equal(engine.selected["0.weight"], expected)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_update_in_backward_with_gradient_checkpointing_gives_the_weights_of_the_plain_engine():
    base = tiny_llama()
    plain, fused = copy.deepcopy(base), copy.deepcopy(base)
    fused.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = _train_llama(plain)
    _train_llama(fused, update_in_backward=True)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
    for slot in engine.slots:  # every targeted tensor trained, or the comparison says little
        assert not torch.equal(plain.get_parameter(slot.name), base.get_parameter(slot.name)), slot.name


# -- when and what is updated ----------------------------------------------------

@pytest.mark.parametrize("zero_grad", ["optimizer", "model"])
def test_first_layer_last_in_backward_order_is_updated_at_every_step(zero_grad):
    model = mlp()
    engine = siftune.attach(model, SiftConfig(density=0.2, target_modules=["0", "2", "4"]))
    opt = engine.optimizer(lr=1e-2)
    for step, batch in enumerate(mlp_batches(5)):
        before = model[0].weight.detach().clone()
        mlp_loss(model, batch).backward()
        opt.step()
        (opt if zero_grad == "optimizer" else model).zero_grad()
        assert not torch.equal(model[0].weight, before), f"first layer not updated at step {step + 1}"


def test_selected_components_change_in_the_step_their_gradient_was_computed():
    lr = 1e-3
    base = mlp()
    batch = mlp_batches(1)[0]
    probe = copy.deepcopy(base)
    mlp_loss(probe, batch).backward()
    model = copy.deepcopy(base)
    engine = siftune.attach(model, config())
    opt = engine.optimizer(lr=lr)
    mlp_loss(model, batch).backward()
    opt.step()
    for name, idx in engine.selected.items():
        module = name.split(".")[0]
        g = probe.get_parameter(name).grad.reshape(-1)
        old = base.get_parameter(name).detach().reshape(-1)
        new = model.get_parameter(name).detach().reshape(-1)
        expected = old[idx] - lr * g[idx] / (g[idx].abs() + 1e-8)  # AdamW's first step
        torch.testing.assert_close(new[idx], expected, atol=1e-7, rtol=0)
        assert torch.allclose((new[idx] - old[idx]).abs(), torch.full_like(new[idx], lr), rtol=1e-3), module
        rest = torch.ones_like(old, dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(new[rest], old[rest]), f"{name} changed outside its selection"


def test_unselected_components_of_targeted_weights_stay_bit_identical():
    base = mlp()
    model = copy.deepcopy(base)
    engine = siftune.attach(model, config())
    opt = engine.optimizer(lr=1e-2)
    for batch in mlp_batches(6):
        mlp_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    for name, idx in engine.selected.items():
        rest = torch.ones(base.get_parameter(name).numel(), dtype=torch.bool)
        rest[idx] = False
        old = base.get_parameter(name).detach().reshape(-1)
        assert torch.equal(model.get_parameter(name).detach().reshape(-1)[rest], old[rest])


def test_untargeted_parameters_stay_bit_identical():
    base = mlp()
    model = copy.deepcopy(base)
    engine = siftune.attach(model, config())
    opt = engine.optimizer(lr=1e-2)
    for batch in mlp_batches(6):
        mlp_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    after = params(model)
    for name in ("0.bias", "2.bias"):
        assert torch.equal(after[name], params(base)[name]), name
    assert not torch.equal(after["0.weight"], params(base)["0.weight"])


def test_attach_freezes_every_parameter_that_is_neither_targeted_nor_dense():
    model = mlp()
    siftune.attach(model, config())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags == {"0.weight": True, "0.bias": False, "2.weight": True, "2.bias": False,
                     "4.weight": True, "4.bias": True}


def test_detach_restores_requires_grad_flags():
    model = mlp()
    model[2].bias.requires_grad_(False)
    model[4].bias.requires_grad_(False)  # dense: attach turns it on, detach must turn it off again
    original = {n: p.requires_grad for n, p in model.named_parameters()}
    engine = siftune.attach(model, config())
    assert {n: p.requires_grad for n, p in model.named_parameters()} != original
    engine.detach()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == original


def test_detach_removes_the_hooks_so_gradients_are_dense_again():
    model = mlp()
    engine = siftune.attach(model, config())
    engine.detach()
    mlp_loss(model, mlp_batches(1)[0]).backward()
    assert model[0].weight.grad is not None and model[2].weight.grad is not None


def test_targeted_parameters_hold_no_dense_gradient_after_backward():
    model = mlp()
    siftune.attach(model, config(mode="fixed", selection_batches=1))
    for batch in mlp_batches(2):  # accumulation: the hook frees each micro-batch's gradient
        mlp_loss(model, batch).backward()
        assert model[0].weight.grad is None and model[2].weight.grad is None
    assert model[4].weight.grad is not None  # dense modules keep ordinary gradients


def test_optimizer_state_exists_only_for_selected_components():
    model = mlp()
    cfg = config(density=0.05)
    engine = siftune.attach(model, cfg)
    opt = engine.optimizer(lr=1e-2)
    for batch in mlp_batches(2):
        mlp_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    for name in ("0.weight", "2.weight"):
        p = model.get_parameter(name)
        k = round(cfg.density * p.numel())
        assert 0 < k and 10 * k < p.numel()
        state = opt.state[p]
        tensors = {key: v for key, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        assert {"exp_avg", "exp_avg_sq"} <= set(tensors)
        assert all(v.numel() == k for v in tensors.values()), {key: v.numel() for key, v in tensors.items()}


@pytest.mark.parametrize("dtype, per_component", [(torch.bfloat16, 18), (torch.float32, 16)])
def test_device_memory_per_selected_component_is_index_gradient_and_adam_state(dtype, per_component):
    # bf16 weights: int32 index 4 + bf16 gradient buffer 2 + fp32 master 4 + fp32 moments 8 = 18 B
    # (the GPU budget); fp32 weights need no master: 4 + 4 + 8 = 16 B.
    model = mlp(dtype=dtype)
    engine = siftune.attach(model, config(dense_modules=()))
    opt = engine.optimizer(lr=1e-3)
    mlp_loss(model, mlp_batches(1, dtype=dtype)[0]).backward()
    during_backward = engine.state_bytes(opt)
    opt.step()
    after_step = engine.state_bytes(opt)
    opt.zero_grad()
    per = lambda n: n / engine.num_selected  # noqa: E731
    assert per(during_backward["indices"]) == 4 and per(during_backward["gradients"]) == dtype.itemsize
    assert per(after_step["optimizer"]) == per_component - 4 - dtype.itemsize
    assert engine.state_bytes(opt)["gradients"] == 0
    assert all(s.ever_idx.device.type == "cpu" and s.base.device.type == "cpu" for s in engine.slots)


def test_selection_is_top_k_of_the_first_batch_gradient_magnitude():
    base = mlp()
    batch = mlp_batches(1)[0]
    probe = copy.deepcopy(base)
    mlp_loss(probe, batch).backward()
    model = copy.deepcopy(base)
    engine = siftune.attach(model, config(score="grad"))
    mlp_loss(model, batch).backward()
    for name in ("0.weight", "2.weight"):
        g = probe.get_parameter(name).grad.reshape(-1)
        k = round(0.2 * g.numel())
        expected = torch.sort(torch.topk(g.abs(), k).indices).values
        assert torch.equal(engine.selected[name], expected), name


# -- precision -----------------------------------------------------------------------

def _bf16_constant_gradient_run(master_weights: bool, lr: float = 1e-3, steps: int = 50):
    """A bf16 Linear with weights 1.0 whose gradient is constant and positive: AdamW moves it by -lr a step."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False)).to(torch.bfloat16)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    x = torch.rand(3, 8).add_(0.5).to(torch.bfloat16)
    engine = siftune.attach(model, SiftConfig(density=0.5, target_modules=["0"], master_weights=master_weights, **TOPK))
    opt = engine.optimizer(lr=lr)
    for _ in range(steps):
        model(x).float().sum().backward()
        opt.step()
        opt.zero_grad()
    return model[0].weight.detach().float().reshape(-1), engine.selected["0.weight"], opt


def test_bf16_weights_accumulate_sub_resolution_updates_in_fp32_master_copies():
    lr, steps = 1e-3, 50  # one update (1e-3) is below half a bf16 ulp at 1.0 (2**-9)
    weight, idx, opt = _bf16_constant_gradient_run(master_weights=True, lr=lr, steps=steps)
    moved = 1.0 - weight[idx]
    assert torch.all((moved - steps * lr).abs() <= 2**-8), moved
    master = opt.master_values()["0.weight"]
    torch.testing.assert_close(master, torch.full_like(master, 1.0 - steps * lr), atol=1e-5, rtol=0)


def test_bf16_weights_without_master_copies_lose_sub_resolution_updates():
    weight, idx, _ = _bf16_constant_gradient_run(master_weights=False)
    assert torch.equal(weight, torch.ones_like(weight))


def test_fp16_model_trains():
    model = mlp(dtype=torch.float16)
    engine = siftune.attach(model, config(target_modules=["0", "2"], dense_modules=["4"]))
    opt = engine.optimizer(lr=1e-2)
    batch = mlp_batches(1, dtype=torch.float16)[0]
    with torch.no_grad():
        before = float(mlp_loss(model, batch))
    for _ in range(30):
        mlp_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = float(mlp_loss(model, batch))
    assert torch.isfinite(torch.tensor(after)) and after < before - 0.1, (before, after)
    assert model[0].weight.dtype == torch.float16


# -- gradient checkpointing, schedulers, non-finite gradients ---------------------------

LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _train_llama(model, steps: int = 3, **overrides):
    model.train()
    engine = siftune.attach(model, SiftConfig(density=0.1, target_modules=LLAMA_TARGETS, **overrides))
    opt = engine.optimizer(lr=1e-2)
    for ids in token_batches(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return engine


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_weights(use_reentrant):
    base = tiny_llama()
    plain, checkpointed = copy.deepcopy(base), copy.deepcopy(base)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        checkpointed.enable_input_require_grads()
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in checkpointed.modules())
    engine = _train_llama(plain)
    _train_llama(checkpointed)
    for slot in engine.slots:  # every targeted tensor trained, or the comparison says little
        assert not torch.equal(plain.get_parameter(slot.name), base.get_parameter(slot.name)), slot.name
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


def test_lr_scheduler_sets_the_step_size():
    lr = 1e-2
    model = mlp()
    engine = siftune.attach(model, config())
    opt = engine.optimizer(lr=lr)
    factors = [0.25, 0.0]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: factors[min(step, len(factors) - 1)])
    batches = mlp_batches(2)
    before = params(model)
    mlp_loss(model, batches[0]).backward()
    opt.step()
    opt.zero_grad()
    scheduler.step()
    after_first = params(model)
    for name, idx in engine.selected.items():  # AdamW's first step is lr * sign(g)
        delta = (after_first[name] - before[name]).reshape(-1)[idx].abs()
        torch.testing.assert_close(delta, torch.full_like(delta, 0.25 * lr), rtol=1e-3, atol=0)
    mlp_loss(model, batches[1]).backward()
    opt.step()
    opt.zero_grad()
    for name, value in params(model).items():  # factor 0: nothing moves, dense head included
        assert torch.equal(value, after_first[name]), name


def _nan_step(model, opt, batch):
    (mlp_loss(model, batch) * float("nan")).backward()
    opt.step()
    opt.zero_grad()


def test_step_with_nan_loss_is_skipped():
    model = mlp()
    engine = siftune.attach(model, config())
    opt = engine.optimizer(lr=1e-2, nonfinite="skip")
    batches = mlp_batches(3)
    mlp_loss(model, batches[0]).backward()
    opt.step()
    opt.zero_grad()
    before = params(model)
    _nan_step(model, opt, batches[1])
    assert opt.skipped_steps == 1
    for name, value in params(model).items():
        assert torch.equal(value, before[name]), name
    mlp_loss(model, batches[2]).backward()  # training goes on with finite weights
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model[0].weight, before["0.weight"])


def test_step_with_nan_loss_raises_when_policy_is_raise():
    model = mlp()
    engine = siftune.attach(model, config())
    opt = engine.optimizer(lr=1e-2, nonfinite="raise")
    mlp_loss(model, mlp_batches(1)[0]).backward()
    opt.step()
    opt.zero_grad()
    with pytest.raises(NonFiniteGradientError):
        _nan_step(model, opt, mlp_batches(1)[0])


def test_skipped_non_finite_first_step_does_not_fix_the_selection():
    # With fp16 loss scaling the first steps often overflow; the selection must
    # come from a finite gradient, not from the skipped one.
    base = mlp()
    batches = mlp_batches(2)
    probe = copy.deepcopy(base)
    mlp_loss(probe, batches[1]).backward()
    model = copy.deepcopy(base)
    engine = siftune.attach(model, config(score="grad"))
    opt = engine.optimizer(lr=1e-2, nonfinite="skip")
    _nan_step(model, opt, batches[0])
    assert opt.skipped_steps == 1
    mlp_loss(model, batches[1]).backward()
    opt.step()
    g = probe.get_parameter("0.weight").grad.reshape(-1)
    expected = torch.sort(torch.topk(g.abs(), round(0.2 * g.numel())).indices).values
    assert torch.equal(engine.selected["0.weight"], expected)


# -- bad inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("density", [0, -0.1, 1.5, "x"])
def test_invalid_density_is_a_config_error_naming_density(density):
    with pytest.raises(ConfigError, match="density"):
        SiftConfig(density=density)


@pytest.mark.parametrize("max_grad_norm", [0, -1.0, float("nan"), "abc"])
def test_invalid_max_grad_norm_is_a_config_error_naming_it(max_grad_norm):
    with pytest.raises(ConfigError, match="max_grad_norm"):
        SiftConfig(max_grad_norm=max_grad_norm)


def test_target_matching_nothing_is_a_target_error_and_leaves_the_model_unchanged():
    model = mlp()
    model[2].bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(TargetError):
        siftune.attach(model, SiftConfig(density=0.2, target_modules=["no_such_layer"]))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    mlp_loss(model, mlp_batches(1)[0]).backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    assert model[0].weight.grad is not None


# -- random selection (the paper's ablation) ---------------------------------------------------

def _random_selection(seed: int):
    model = mlp()
    engine = siftune.attach(model, config(selection="random", seed=seed))
    mlp_loss(model, mlp_batches(1)[0]).backward()
    return engine.selected


def test_random_selection_picks_k_distinct_indices():
    selected = _random_selection(seed=0)
    for name, numel in (("0.weight", 128), ("2.weight", 256)):
        idx = selected[name]
        assert idx.numel() == round(0.2 * numel)
        assert torch.unique(idx).numel() == idx.numel()
        assert int(idx.min()) >= 0 and int(idx.max()) < numel


def test_random_selection_is_determined_by_the_seed():
    a, b, c = _random_selection(seed=3), _random_selection(seed=3), _random_selection(seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
