"""Selection options: the score, the window and the budget (per tensor or global), each exact against the reference."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import siftune  # noqa: E402
from siftune import CheckpointError, ConfigError, SiftConfig  # noqa: E402
from siftune.core.budget import top_set  # noqa: E402
from _models import mlp, mlp_batches, mlp_loss  # noqa: E402
from test_engine import assert_lockstep, config, lockstep  # noqa: E402

GLOBAL = dict(budget="global")
SHARES = {"0.weight": round(0.2 * 128), "2.weight": round(0.2 * 256)}  # config()'s per-tensor counts


def _selected_counts(records, step=0):
    return {n: i.numel() for n, i in records[step]["selected"].items()}


# -- engine == reference -------------------------------------------------------

def test_squared_gradient_score_over_a_window_of_three_micro_batches_matches_reference():
    # The window spans two optimizer steps (2 micro-batches each): the second step both ends
    # the window and trains on its own gradient.
    assert_lockstep(*lockstep(config(score="grad_squared", selection_batches=3), accum=2))


def test_signal_to_noise_score_over_a_window_spanning_two_steps_matches_reference():
    assert_lockstep(*lockstep(config(score="grad_snr", selection_batches=3), accum=2))


def test_signal_to_noise_score_matches_reference_across_periodic_refreshes_and_a_global_budget():
    assert_lockstep(*lockstep(config(score="grad_snr", selection_batches=2, mode="periodic", refresh_every=3),
                              steps=8))
    assert_lockstep(*lockstep(config(**GLOBAL, score="grad_snr", selection_batches=2)))


def test_gradient_times_weight_score_matches_reference():
    assert_lockstep(*lockstep(config(score="grad_weight")))


def test_gradient_times_weight_score_matches_reference_in_per_step_mode():
    assert_lockstep(*lockstep(config(score="grad_weight", mode="per_step")))


def test_global_budget_matches_reference_and_shares_the_total_unevenly():
    records, moved = lockstep(config(**GLOBAL))
    assert_lockstep(records, moved)
    counts = _selected_counts(records)
    assert sum(counts.values()) == sum(SHARES.values())
    assert counts != SHARES, "a global ranking that happens to give every tensor its share tests nothing"


def test_global_budget_with_a_floor_matches_reference_and_keeps_the_floor():
    records, moved = lockstep(config(**GLOBAL, min_density=0.15))
    assert_lockstep(records, moved)
    counts = _selected_counts(records)
    assert counts["0.weight"] >= round(0.15 * 128) and counts["2.weight"] >= round(0.15 * 256)
    assert sum(counts.values()) == sum(SHARES.values())


def test_global_budget_matches_reference_across_periodic_refreshes():
    records, moved = lockstep(config(**GLOBAL, mode="periodic", refresh_every=3), steps=8)
    assert_lockstep(records, moved)
    assert records[2]["selected"]["2.weight"].numel() != records[3]["selected"]["2.weight"].numel() or any(
        not torch.equal(records[2]["selected"][n], records[3]["selected"][n]) for n in SHARES)


def test_global_budget_with_squared_score_over_a_window_spanning_two_steps_matches_reference():
    assert_lockstep(*lockstep(config(**GLOBAL, score="grad_squared", selection_batches=3), accum=2))


def test_global_budget_with_packed_indices_and_bfloat16_state_matches_reference():
    assert_lockstep(*lockstep(config(**GLOBAL, compact_indices=True, state_dtype="bfloat16")))


def test_global_budget_matches_reference_when_clipping_clips():
    records, moved = lockstep(config(**GLOBAL, max_grad_norm=0.05))
    assert all(r["norm"] > 0.05 for r in records)
    assert_lockstep(records, moved)


# -- what the options select ---------------------------------------------------

def _first_gradients(batches):
    probe = mlp()
    for batch in batches:
        mlp_loss(probe, batch).backward()
    return {n: probe.get_parameter(n).grad.clone() for n in SHARES}, probe


def test_global_budget_selects_the_largest_gradient_magnitudes_over_all_targeted_tensors():
    batch = mlp_batches(1)[0]
    grads, _ = _first_gradients([batch])
    model = mlp()
    engine = siftune.attach(model, config(**GLOBAL, score="grad"))
    mlp_loss(model, batch).backward()
    everything = torch.cat([grads[n].reshape(-1).abs() for n in SHARES])
    threshold = torch.sort(everything, descending=True).values[sum(SHARES.values()) - 1]
    for name in SHARES:
        expected = (grads[name].reshape(-1).abs() >= threshold).nonzero().squeeze(1)
        assert torch.equal(engine.selected[name].long(), expected), name


def test_squared_score_sums_each_micro_batch_square_not_the_square_of_the_sum():
    batches = mlp_batches(2)
    squares = []
    for batch in batches:
        grads, _ = _first_gradients([batch])
        squares.append(grads["0.weight"].reshape(-1) ** 2)
    k = SHARES["0.weight"]
    expected = torch.sort(torch.topk(squares[0] + squares[1], k).indices).values
    model = mlp()
    engine = siftune.attach(model, config(score="grad_squared", selection_batches=2))
    for batch in batches:
        mlp_loss(model, batch).backward()
    assert torch.equal(engine.selected["0.weight"].long(), expected)


def test_signal_to_noise_score_ranks_by_the_summed_gradient_over_the_root_of_the_summed_squares():
    batches = mlp_batches(3)
    grads = [_first_gradients([batch])[0]["2.weight"].reshape(-1) for batch in batches]
    ratio = sum(grads).abs() / sum(g ** 2 for g in grads).sqrt()
    k = SHARES["2.weight"]
    expected = torch.sort(torch.topk(ratio, k).indices).values
    model = mlp()
    engine = siftune.attach(model, config(score="grad_snr", selection_batches=3))
    for batch in batches:
        mlp_loss(model, batch).backward()
    assert torch.equal(engine.selected["2.weight"].long(), expected)
    # scale-free: not the components with the largest gradients (the summed-|g| choice differs)
    by_size = torch.sort(torch.topk(sum(grads).abs(), k).indices).values
    assert not torch.equal(by_size, expected)


def test_gradient_times_weight_score_ranks_by_the_product():
    batch = mlp_batches(1)[0]
    grads, probe = _first_gradients([batch])
    product = (grads["0.weight"] * probe.get_parameter("0.weight").detach()).reshape(-1).abs()
    expected = torch.sort(torch.topk(product, SHARES["0.weight"]).indices).values
    model = mlp()
    engine = siftune.attach(model, config(score="grad_weight"))
    mlp_loss(model, batch).backward()
    assert torch.equal(engine.selected["0.weight"].long(), expected)


def test_top_set_takes_the_lower_indices_among_ties_at_the_boundary():
    score = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0])
    assert sorted(top_set(score, 4).tolist()) == [1, 2, 3, 4]
    assert sorted(top_set(score, 4, at_least=torch.tensor(3.0)).tolist()) == [1, 3]


def test_global_pool_breaks_ties_by_model_order_then_index_whatever_the_arrival_order():
    # Equal scores everywhere: the total goes to the first positions in model order,
    # although the tensors arrive last layer first, as in backward.
    engine = siftune.attach(mlp(), config(**GLOBAL))
    pool = engine.selector.pool
    first, second = engine.slots
    assert pool.offer(second, torch.ones(second.shape), torch.zeros(second.shape)) is None
    chosen = pool.offer(first, torch.ones(first.shape), torch.zeros(first.shape))
    total = sum(SHARES.values())
    assert chosen[0][0].tolist() == list(range(total)) and chosen[1][0].numel() == 0


# -- counts, memory, increments -----------------------------------------------

def test_global_budget_counts_state_bytes_and_increment_follow_each_tensors_own_count():
    model = mlp()
    engine = siftune.attach(model, config(**GLOBAL))
    opt = engine.optimizer(lr=1e-2)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    opt.step()
    opt.zero_grad()
    counts = {s.name: s.k for s in engine.slots}
    assert counts == {n: i.numel() for n, i in engine.selected.items()}
    assert engine.num_selected == sum(SHARES.values())
    assert engine.state_bytes(opt)["indices"] == 4 * engine.num_selected
    assert engine.state_bytes(opt)["optimizer"] == 8 * engine.num_selected
    increment = engine.increment()
    assert {n: t.indices.numel() for n, t in increment.tensors.items()} == counts


def test_global_selection_keeps_no_dense_gradient_of_a_targeted_weight_after_backward():
    model = mlp()
    engine = siftune.attach(model, config(**GLOBAL))
    mlp_loss(model, mlp_batches(1)[0]).backward()
    assert all(model.get_parameter(n).grad is None for n in SHARES)
    assert engine.selector.pool.parts == []  # the pool lives during the selecting backward only


def test_global_budget_resumes_from_engine_state_with_uneven_counts():
    batches = mlp_batches(3)
    model = mlp()
    engine = siftune.attach(model, config(**GLOBAL))
    opt = engine.optimizer(lr=1e-2)
    mlp_loss(model, batches[0]).backward()
    opt.step()
    opt.zero_grad()
    state, opt_state = copy.deepcopy(engine.state_dict()), copy.deepcopy(opt.state_dict())
    resumed_model = copy.deepcopy(model)
    resumed = siftune.attach(resumed_model, config(**GLOBAL))
    resumed.load_state_dict(state)
    resumed_opt = resumed.optimizer(lr=1e-2)
    resumed_opt.load_state_dict(opt_state)
    for m, o in ((model, opt), (resumed_model, resumed_opt)):
        mlp_loss(m, batches[1]).backward()
        o.step()
        o.zero_grad()
    assert {s.name: s.k for s in resumed.slots} == {s.name: s.k for s in engine.slots}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_skipped_non_finite_step_undoes_a_global_selection_and_its_counts():
    model = mlp()
    engine = siftune.attach(model, config(**GLOBAL))
    opt = engine.optimizer(lr=1e-2, nonfinite="skip")
    batch = mlp_batches(1)[0]
    (mlp_loss(model, batch) * float("nan")).backward()
    opt.step()
    opt.zero_grad()
    assert opt.skipped_steps == 1 and engine.selected == {}
    assert {s.name: s.k for s in engine.slots} == SHARES
    mlp_loss(model, batch).backward()
    opt.step()
    assert engine.num_selected == sum(SHARES.values())


# -- refused ---------------------------------------------------------------------

def test_global_budget_with_a_targeted_weight_the_loss_does_not_use_is_a_config_error():
    model = mlp()
    engine = siftune.attach(model, config(**GLOBAL, target_modules=["0", "2"], dense_modules=()))
    opt = engine.optimizer(lr=1e-2)
    x, _ = mlp_batches(1)[0]
    model[0](x).sum().backward()  # layer 2 gets no gradient
    with pytest.raises(ConfigError, match="2.weight got no gradient"):
        opt.step()


@pytest.mark.parametrize("overrides, message", [
    (dict(score="abs"), "score must be one of"),
    (dict(budget="layer"), "budget must be one of"),
    (dict(budget="global", min_density=0.5), "min_density must be a number in"),
    (dict(min_density=0.01), "min_density is the floor of budget='global'"),
    (dict(budget="global", selection="random"), "selection='random'"),
    (dict(budget="global", mode="per_step"), "mode='per_step'"),
    (dict(score="grad_squared", mode="per_step"), "mode='per_step'"),
    (dict(score="grad_snr"), "selection_batches to 2 or more"),
    (dict(score="grad_snr", selection_batches=2, mode="per_step"), "mode='per_step'"),
    (dict(budget="global", update_in_backward=True), "update_in_backward"),
])
def test_unsupported_selection_options_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        SiftConfig(density=0.2, **overrides)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("overrides", [GLOBAL, dict(score="grad_weight"), dict(score="grad_squared"),
                                       dict(score="grad_snr", selection_batches=2)])
def test_every_selection_option_attaches_under_torch_distributed(overrides, monkeypatch):
    import siftune.core.engine

    monkeypatch.setattr(siftune.core.engine, "_distributed", lambda: True)
    engine = siftune.attach(mlp(), config(**overrides))
    assert engine.selector.over_ranks is siftune.core.engine._summed_over_ranks  # ranks by the combined batch


# -- siftune train -----------------------------------------------------------------

def _reviews(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f"{'a warm film' if i % 2 else 'a cold mess'} {i},{i % 2}\n"
                                             for i in range(40)))
    return str(path)


def test_siftune_train_takes_the_selection_options_and_the_increment_records_them(tmp_path, tiny_bert_dir):
    from siftune import SparseIncrement
    from siftune.cli import main
    from siftune.core.select import count_selected

    out = tmp_path / "run"
    assert main(["train", "--model", tiny_bert_dir, "--dataset", _reviews(tmp_path), "--output-dir", str(out),
                 "--steps", "2", "--batch-size", "8", "--max-length", "16", "--eval-size", "0", "--density", "0.05",
                 "--budget", "global", "--min-density", "0.01", "--score", "grad_weight", "--quiet"]) == 0
    increment = SparseIncrement.load(out)
    assert (increment.config["budget"], increment.config["score"], increment.config["min_density"]) == (
        "global", "grad_weight", 0.01)
    numels = {n: t.shape[0] * t.shape[1] for n, t in increment.tensors.items()}
    counts = {n: t.indices.numel() for n, t in increment.tensors.items()}
    assert sum(counts.values()) == sum(count_selected(n, 0.05) for n in numels.values())
    assert all(counts[n] >= round(0.01 * numels[n]) for n in numels)


def test_siftune_train_with_an_unknown_budget_is_a_one_line_error_and_exit_2(tmp_path, tiny_bert_dir, capsys):
    from siftune.cli import main

    assert main(["train", "--model", tiny_bert_dir, "--dataset", _reviews(tmp_path), "--budget", "layer",
                 "--output-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "budget must be one of per_tensor, global" in err and err.count("\n") == 1


def test_engine_state_saved_before_the_selection_options_existed_loads_as_the_paper_s_selection_it_ran():
    model = mlp()
    engine = siftune.attach(model, config(score="grad"))
    opt = engine.optimizer(lr=1e-2)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    opt.step()
    opt.zero_grad()
    state = engine.state_dict()
    for name in ("score", "budget", "min_density"):
        del state["config"][name]
    resumed = siftune.attach(copy.deepcopy(model), config(score="grad"))
    resumed.load_state_dict(state)
    assert {n: i.tolist() for n, i in resumed.selected.items()} == {n: i.tolist() for n, i in engine.selected.items()}
    # Saved without a score, it ran |g|: resuming under today's default would rank otherwise.
    with pytest.raises(CheckpointError, match=r"other SIFT settings \(score\)"):
        siftune.attach(copy.deepcopy(model), config()).load_state_dict(state)

def test_engine_state_saved_when_line_cap_defaulted_to_2_loads_where_no_run_reads_it():
    model = mlp()
    engine = siftune.attach(model, config())  # the top-k: line_cap is not read
    opt = engine.optimizer(lr=1e-2)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    opt.step()
    opt.zero_grad()
    state = engine.state_dict()
    state["config"]["line_cap"] = 2.0  # as saved before line_cap's default became 1
    siftune.attach(copy.deepcopy(model), config()).load_state_dict(state)
    for name in ("selection", "line_cap", "step_scale"):  # saved before they existed: the top-k, cap 2, plain steps
        del state["config"][name]
    siftune.attach(copy.deepcopy(model), config()).load_state_dict(state)
    with pytest.raises(CheckpointError, match=r"other SIFT settings \(line_cap, selection\)"):
        siftune.attach(copy.deepcopy(model), config(selection="balanced")).load_state_dict(state)


def test_resume_ignores_an_option_of_a_selection_neither_run_reads():
    from siftune.recipes.train import TrainArgs, _check_resumable, _resume_settings

    top_k = TrainArgs(selection="gradient", step_scale=None, lr=1e-3)
    saved = {**_resume_settings(top_k), "line_cap": 2.0}  # an older siftune recorded its default cap
    _check_resumable({"progress": {"settings": saved}, "path": "checkpoint-00000002.pt"}, top_k)
    balanced = TrainArgs(selection="balanced", step_scale=None, lr=1e-3)
    with pytest.raises(CheckpointError, match="line_cap: "):
        _check_resumable({"progress": {"settings": saved}, "path": "checkpoint-00000002.pt"}, balanced)
