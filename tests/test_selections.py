"""Selections beyond the top-k (mixed, balanced, grow and drop): each exact against the reference."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from siftune import ConfigError, ReferenceSift, SiftConfig  # noqa: E402
from siftune.core.select import balanced_indices, grow_drop_indices, line_caps, mixed_indices  # noqa: E402
from test_delta import _lockstep as delta_lockstep  # noqa: E402
from test_engine import assert_lockstep, config, lockstep, step_both  # noqa: E402

SHAPES = {"0.weight": (16, 8), "2.weight": (16, 16)}  # the MLP's targeted weights
GROW_DROP = dict(selection="grow_drop", mode="periodic", refresh_every=2, drop_share=0.5)


@pytest.mark.parametrize("overrides", [
    dict(selection="mixed"),
    dict(selection="mixed", score_share=0.25, mode="periodic", refresh_every=3),
    dict(selection="mixed", score_share=1.0),
    dict(selection="balanced", line_cap=1.0),
    dict(selection="balanced", line_cap=1.5, mode="periodic", refresh_every=3, score="grad"),
    dict(selection="balanced", score="grad_squared", selection_batches=3),
    dict(selection="balanced", line_cap=1.0, score="grad_snr", selection_batches=2),
    GROW_DROP,
    dict(GROW_DROP, score="grad", selection_batches=2),
    dict(GROW_DROP, compact_indices=True, state_dtype="bfloat16"),
])
def test_selection_matches_reference_step_for_step(overrides):
    assert_lockstep(*lockstep(config(**overrides), steps=7))


@pytest.mark.parametrize("overrides", [
    dict(selection="mixed", score_share=0.25, mode="periodic", refresh_every=3),
    dict(selection="balanced", line_cap=1.0),
    dict(selection="grow_drop", mode="periodic", refresh_every=2, drop_share=0.5),
])
def test_selection_on_a_delta_matches_in_place_reference(overrides):
    worst, base, _, slow, _, _ = delta_lockstep(overrides, steps=7)
    assert worst < 1e-5
    assert not torch.equal(slow[0].weight, base[0].weight)


def test_balanced_selection_keeps_every_row_and_column_within_its_cap():
    records, _ = lockstep(config(selection="balanced", line_cap=1.0), steps=1)
    for name, idx in records[0]["selected"].items():
        rows, columns = SHAPES[name]
        k = idx.numel()
        row_cap, column_cap = line_caps((rows, columns), k, 1.0)
        assert int(torch.bincount(idx.long() // columns).max()) <= row_cap
        assert int(torch.bincount(idx.long() % columns).max()) <= column_cap


def test_balanced_selection_spreads_a_score_that_one_row_would_take():
    score = torch.zeros(8, 8)
    score[0] = torch.arange(8, 0, -1) + 100.0  # the whole top-8 sits in row 0
    score[1:] = torch.rand(7, 8)
    idx = balanced_indices(score, 8, (8, 8), cap=2.0)
    assert idx.numel() == 8 and int((idx // 8 == 0).sum()) == 2  # row 0's cap: ceil(2 * 8 / 8)
    assert set((idx[idx // 8 == 0]).tolist()) == {0, 1}  # its best two


def test_balanced_selection_keeps_the_caps_when_the_rounds_stall_before_k():
    score = torch.tensor([[0.0959, 0.1133, 0.3090], [0.8292, 0.9408, 0.4558], [0.9288, 0.4410, 0.1845]])
    # caps of 2 a row and 2 a column: the rounds choose 2, 3, 4, 6 and 7; then the only row and column
    # with room left (row 0, column 2) meet at 2, chosen already. The sixth comes by a chain of swaps:
    # row 0 takes 1 in column 1, row 2 gives up 7 there and takes 8 in column 2 (the chain through
    # column 0 would gain less: 0 taken, 3 given up, 5 taken)
    idx = balanced_indices(score, 6, (3, 3), cap=1.0)
    assert idx.tolist() == [1, 2, 3, 4, 6, 8]


def _regular_cases(count: int):
    """Scores where k fills every row to its cap of 1x the fair share: the tightest caps, where the
    rounds stall most often (a quarter of them with ties)."""
    g = torch.Generator().manual_seed(0)
    for case in range(count):
        n = int(torch.randint(3, 8, (1,), generator=g))
        per_row = int(torch.randint(1, n, (1,), generator=g))
        score = torch.rand(n, n + case % 3, generator=g)
        yield (score * 4).round() if case % 4 == 0 else score, n * per_row


def test_balanced_selection_chooses_k_with_no_row_or_column_over_its_cap():
    for score, k in _regular_cases(60):
        rows, columns = score.shape
        idx = balanced_indices(score, k, (rows, columns), cap=1.0)
        row_cap, column_cap = line_caps((rows, columns), k, 1.0)
        assert idx.numel() == k and idx.unique().numel() == k
        assert int(torch.bincount(idx.long() // columns).max()) <= row_cap, (score, k)
        assert int(torch.bincount(idx.long() % columns).max()) <= column_cap, (score, k)


def test_balanced_selection_ranks_a_nan_score_first_and_still_keeps_the_caps():
    # a gradient that overflowed: NaN ranks first, as torch.topk ranks it for the top-k
    score = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    score[0, :2] = score[2, 3] = float("nan")
    idx = balanced_indices(score, 4, (4, 4), cap=1.0)
    assert {0, 11} <= set(idx.tolist()) and 1 not in idx.tolist()  # row 0's cap of 1: one of its NaNs
    g = torch.Generator().manual_seed(1)
    for case in range(40):
        score = torch.rand(6, 5, generator=g)
        score[torch.rand(6, 5, generator=g) < 0.3] = float("nan")
        k = 1 + case % 30
        idx = balanced_indices(score, k, (6, 5), cap=1.0)
        row_cap, column_cap = line_caps((6, 5), k, 1.0)
        assert idx.numel() == k and idx.unique().numel() == k
        assert int(torch.bincount(idx.long() // 5).max()) <= row_cap
        assert int(torch.bincount(idx.long() % 5).max()) <= column_cap


def test_balanced_chains_of_swaps_equal_the_reference_s(monkeypatch):
    from siftune.core import select

    chains = []
    add_by_swaps = select._add_by_swaps
    monkeypatch.setattr(select, "_add_by_swaps", lambda *args: chains.append(add_by_swaps(*args)))
    for score, k in _regular_cases(60):
        rows, columns = score.shape
        reference = ReferenceSift(nn.Sequential(nn.Linear(columns, rows)),
                                  SiftConfig(selection="balanced", line_cap=1.0, target_modules=["0"]), lr=1e-3)
        assert balanced_indices(score, k, (rows, columns), cap=1.0).tolist() == sorted(reference._balanced(score, k))
    assert len(chains) >= 3  # the cases stall, and the chains are compared too


def test_each_selection_chooses_other_components_than_the_top_k():
    top = lockstep(config(), steps=1)[0][0]["selected"]
    for overrides in (dict(selection="mixed"), dict(selection="balanced", line_cap=1.0)):
        chosen = lockstep(config(**overrides), steps=1)[0][0]["selected"]
        assert any(not torch.equal(chosen[n], top[n]) for n in top), overrides


def test_mixed_selection_takes_its_share_by_score_and_the_rest_at_random():
    score = torch.arange(1000.0)
    idx = mixed_indices(score, 100, 0.3, torch.Generator().manual_seed(0))
    assert idx.numel() == 100 and idx.unique().numel() == 100
    assert set(range(970, 1000)) <= set(idx.tolist())  # the top 30
    drawn = idx[idx < 970]
    assert drawn.numel() == 70 and float(drawn.float().mean()) < 700  # spread, not the next best
    again = mixed_indices(score, 100, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)  # seeded


def test_grow_and_drop_replaces_the_least_changed_by_the_best_unselected():
    held = torch.tensor([1, 3, 5, 7])
    change = torch.tensor([0.5, 0.01, 0.2, 0.0])  # 7 then 3 changed least
    ranking = torch.zeros(10)
    ranking[[0, 2, 9]] = torch.tensor([1.0, 3.0, 2.0])
    ranking[5] = 10.0  # held already: not grown again
    assert grow_drop_indices(held, change, ranking, 2).tolist() == [1, 2, 5, 9]


def test_grow_and_drop_keeps_the_count_and_changes_the_drop_share_at_each_refresh():
    records, _ = lockstep(config(**GROW_DROP), steps=7)
    for before, after in ((records[1], records[2]), (records[3], records[4])):  # refreshes after steps 2 and 4
        for name, idx in after["selected"].items():
            old = before["selected"][name]
            assert idx.numel() == old.numel()
            assert idx.numel() - int(torch.isin(idx, old).sum()) == round(0.5 * old.numel())


@pytest.mark.parametrize("overrides, message", [
    (dict(selection="mixed", budget="global"), "budget='per_tensor'"),
    (dict(selection="balanced", mode="per_step"), "mode 'fixed' or 'periodic'"),
    (dict(selection="grow_drop"), "mode='periodic'"),
    (dict(score_share=0.3), "selection='mixed'"),
    (dict(selection="balanced", line_cap=0.5), r"line_cap must be a number in \[1, inf\)"),
    (dict(selection="grow_drop", mode="periodic", drop_share=0.0), r"drop_share must be a number in \(0, 1\]"),
    (dict(selection="top"), "selection must be one of"),
    (dict(structure="rows", selection="balanced"), "chooses whole rows or columns"),
])
def test_a_selection_option_out_of_place_is_a_one_line_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        SiftConfig(density=0.2, **overrides)
    assert "\n" not in str(caught.value)


def test_bench_runs_grow_and_drop_only_as_the_periodic_method():
    from siftune.bench.runner import plan

    runs = plan("classification", ["sift-periodic:0.01"], [0], sift=["selection=grow_drop", "refresh_every=50"])
    assert runs[0].sift == {"selection": "grow_drop", "refresh_every": 50}
    with pytest.raises(ConfigError, match="run it as sift-periodic"):
        plan("classification", ["sift-fixed:0.01"], [0], sift=["selection=grow_drop"])
    with pytest.raises(ConfigError, match="the method chooses it"):
        plan("classification", ["sift-fixed:0.01"], [0], sift=["selection=random"])


# -- a selection made before training (SiftEngine.select) -----------------------

def _select_then_train(cfg: SiftConfig, window: int, steps: int = 4):
    """Both the engine and the reference select on ``window`` batches, then train ``steps`` on others."""
    import copy

    import siftune
    from _models import mlp, mlp_batches, mlp_loss

    base = mlp()
    fast, slow = copy.deepcopy(base), copy.deepcopy(base)
    engine = siftune.attach(fast, cfg)
    opt = engine.optimizer(lr=1e-2)
    ref = ReferenceSift(slow, cfg, lr=1e-2)
    chosen = mlp_batches(window + steps)
    assert engine.select(iter(chosen[:window]), mlp_loss) == window
    assert ref.select(iter(chosen[:window]), mlp_loss) == window
    untouched = all(torch.equal(a, b) for a, b in zip(fast.parameters(), base.parameters()))
    no_grads = all(p.grad is None for p in fast.parameters())
    selected = {n: i.clone() for n, i in engine.selected.items()}
    diff = max(step_both(fast, slow, opt, ref, [batch]) for batch in chosen[window:])
    return engine, base, fast, selected, diff, untouched, no_grads


@pytest.mark.parametrize("overrides", [
    dict(score="grad_squared", selection_batches=3),
    dict(selection_batches=2),
    dict(selection="balanced", line_cap=1.0, score="grad_squared", selection_batches=4),
    dict(mode="periodic", refresh_every=2, selection_batches=2, score="grad"),
    dict(score="grad_snr", selection_batches=3),
])
def test_select_before_training_matches_the_reference_and_trains_nothing(overrides):
    window = overrides["selection_batches"]
    engine, base, fast, selected, diff, untouched, no_grads = _select_then_train(config(**overrides), window)
    assert untouched and no_grads and engine.steps == 4
    assert diff <= 1e-6
    # every training step trained the selection made beforehand (fixed mode: only those components)
    if overrides.get("mode") != "periodic":
        for name, idx in selected.items():
            before = dict(base.named_parameters())[name].detach().reshape(-1)
            after = dict(fast.named_parameters())[name].detach().reshape(-1)
            changed = torch.nonzero(before != after).squeeze(1)
            assert changed.numel() and set(changed.tolist()) <= set(idx.tolist())
    # the increment's untrained values are those from before select()
    inc = engine.increment()
    for name, delta in inc.tensors.items():
        before = dict(base.named_parameters())[name].detach().reshape(-1)
        after = dict(fast.named_parameters())[name].detach().reshape(-1)
        assert torch.allclose(delta.values, (after - before)[delta.indices.long()], atol=1e-7)


def test_select_on_a_grad_squared_window_ranks_by_the_summed_squares():
    import copy

    import siftune
    from _models import mlp, mlp_batches, mlp_loss

    model = mlp()
    dense = copy.deepcopy(model)
    batches = mlp_batches(3)
    engine = siftune.attach(model, config(score="grad_squared", selection_batches=3))
    engine.select(iter(batches), mlp_loss)
    squares = None
    for batch in batches:
        dense.zero_grad()
        mlp_loss(dense, batch).backward()
        g2 = dense[2].weight.grad ** 2
        squares = g2 if squares is None else squares + g2
    k = engine.slots[1].k
    want = torch.sort(torch.topk(squares.reshape(-1), k).indices).values
    assert torch.equal(engine.selected["2.weight"].long(), want)


def test_select_refuses_per_step_mode_a_started_engine_and_too_few_batches():
    import siftune
    from _models import mlp, mlp_batches, mlp_loss

    with pytest.raises(ConfigError, match="per_step"):
        siftune.attach(mlp(), config(mode="per_step")).select(iter(mlp_batches(1)), mlp_loss)
    engine = siftune.attach(mlp(), config())
    mlp_loss(engine.model, mlp_batches(1)[0]).backward()
    with pytest.raises(ConfigError, match="before the first backward"):
        engine.select(iter(mlp_batches(1)), mlp_loss)
    model = mlp()
    engine = siftune.attach(model, config(selection_batches=3))
    with pytest.raises(ConfigError, match="ran out after 2"):
        engine.select(iter(mlp_batches(2)), mlp_loss)
    assert all(p.grad is None for p in model.parameters()) and not engine.selected
    assert engine.select(iter(mlp_batches(3)), mlp_loss) == 3  # a full window then selects
    assert len(engine.selected) == len(engine.slots)
