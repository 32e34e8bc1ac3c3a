"""Selections ranked by a trained change: ``shrink_after`` (a wider selection trained for a few steps, then
narrowed to the components that changed most) and ``select_from`` (an earlier run's increment ranks the choice)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import siftune  # noqa: E402
from siftune import ConfigError, SiftConfig  # noqa: E402
from siftune.artifacts import checkpoint  # noqa: E402
from _models import MLP_DENSE, MLP_TARGETS, mlp, mlp_batches, mlp_loss  # noqa: E402
from test_delta import _lockstep as delta_lockstep  # noqa: E402
from test_engine import assert_lockstep, config, lockstep  # noqa: E402
from test_cli import sentiment_csv  # noqa: E402,F401  (a fixture)

SHRINK = dict(shrink_after=3, shrink_from=2.0)  # density 0.2: 0.4 of each weight for three steps, then 0.2


@pytest.mark.parametrize("overrides", [
    dict(SHRINK),
    dict(SHRINK, selection="balanced", line_cap=1.0, step_scale="input"),
    dict(SHRINK, selection="balanced", line_cap=1.5, score="grad", shrink_from=3.0, selection_batches=2),
    dict(SHRINK, compact_indices=True, state_dtype="bfloat16"),
    dict(SHRINK, select_after=1, shrink_after=4),
])
def test_shrink_matches_reference_step_for_step(overrides):
    records, moved = lockstep(config(**overrides), steps=7)
    assert_lockstep(records, moved)
    wide, narrow = records[overrides["shrink_after"] - 2]["selected"], records[-1]["selected"]
    for name, idx in narrow.items():
        assert idx.numel() * overrides["shrink_from"] == pytest.approx(wide[name].numel(), abs=overrides["shrink_from"])
        inside = torch.isin(idx, wide[name])
        if overrides.get("selection") != "balanced":
            assert bool(inside.all())  # the top-k narrows within the wider selection
        assert int(inside.sum()) >= 0.75 * idx.numel()  # balanced's caps may bring in a few from outside it


def test_after_the_shrink_only_the_kept_components_differ_from_the_base_and_the_increment_holds_them():
    base = mlp()
    model = copy.deepcopy(base)
    engine = siftune.attach(model, config(**SHRINK, selection="balanced", line_cap=1.0))
    optimizer = engine.optimizer(lr=1e-2)
    for batch in mlp_batches(6):
        mlp_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    increment = engine.increment(values=optimizer.master_values())
    for slot in engine.slots:
        assert slot.k == slot.final_k == round(0.2 * slot.numel)
        changed = (slot.param.detach() != base.get_parameter(slot.name)).reshape(-1).nonzero().squeeze(1)
        assert changed.numel() > 0 and bool(torch.isin(changed, slot.flat()).all())
        assert torch.equal(increment.tensors[slot.name].indices.long(), slot.flat().long())
    assert engine.num_trainable == sum(s.final_k for s in engine.slots) + sum(p.numel() for p in engine.dense.values())


@pytest.mark.parametrize("overrides", [dict(SHRINK), dict(SHRINK, selection="balanced", line_cap=1.0)])
def test_shrink_on_a_delta_matches_the_in_place_reference(overrides):
    worst, base, fast, slow, engine, _ = delta_lockstep(overrides, steps=6)
    assert worst < 1e-5
    assert not torch.equal(slow[0].weight, base[0].weight)
    for slot in engine.slots:
        assert slot.param.numel() == slot.final_k  # the delta holds the kept values only


@pytest.mark.parametrize("stop", [2, 4], ids=["before the shrink", "after it"])
def test_resuming_across_the_shrink_gives_the_same_weights_as_never_stopping(stop, tmp_path):
    def sift(model):
        engine = siftune.attach(model, SiftConfig(density=0.2, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE,
                                                  **SHRINK))
        optimizer = engine.optimizer(lr=1e-2)
        return engine, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))

    def train(model, optimizer, scheduler, batches):
        for batch in batches:
            mlp_loss(model, batch).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

    base, batches = mlp(), mlp_batches(7)
    straight = copy.deepcopy(base)
    engine, optimizer, scheduler = sift(straight)
    train(straight, optimizer, scheduler, batches[:stop])
    checkpoint.Checkpoints(tmp_path).save(checkpoint.capture(stop, engine, optimizer, scheduler, {}))
    train(straight, optimizer, scheduler, batches[stop:])

    resumed = copy.deepcopy(base)
    engine2, optimizer2, scheduler2 = sift(resumed)
    checkpoint.restore(checkpoint.Checkpoints(tmp_path).load_latest(), engine2, optimizer2, scheduler2)
    train(resumed, optimizer2, scheduler2, batches[stop:])
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert [s.k for s in engine2.slots] == [s.final_k for s in engine2.slots]


@pytest.mark.parametrize("overrides, message", [
    (dict(shrink_from=4.0), "set shrink_after too"),
    (dict(density=0.2, shrink_after=2, shrink_from=6.0), "at most 1"),
    (dict(shrink_after=2, shrink_from=1.0), "shrink_from must be a number > 1"),
    (dict(shrink_after=-1), "shrink_after must be an integer >= 0"),
    (dict(shrink_after=2, mode="periodic"), "mode 'fixed'"),
    (dict(shrink_after=2, selection="mixed"), "selection 'gradient', 'balanced' or 'auto'"),
    (dict(shrink_after=2, structure="rows"), "single components"),
    (dict(shrink_after=2, budget="global"), "budget='per_tensor'"),
    (dict(shrink_after=2, select_after=2), "shrink_after > select_after"),
])
def test_a_shrink_out_of_place_is_a_one_line_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        SiftConfig(**{"density": 0.05, **overrides})
    assert "\n" not in str(caught.value)


def test_auto_resolves_by_the_wider_density():
    engine = siftune.attach(mlp(), SiftConfig(density=0.02, target_modules=MLP_TARGETS, shrink_after=2,
                                              shrink_from=10))
    assert engine.config.selection == "gradient"  # 20% before the shrink: above where balanced runs
    engine = siftune.attach(mlp(), SiftConfig(density=0.01, target_modules=MLP_TARGETS, shrink_after=2))
    assert engine.config.selection == "balanced"


def test_the_bench_takes_shrink_options_and_counts_the_final_selection():
    from siftune.bench.runner import plan

    (run,) = plan("classification", ["sift-fixed:0.001"], [0], sift=["shrink_after=30", "shrink_from=10"])
    assert run.sift == {"shrink_after": 30, "shrink_from": 10}


# -- select_from ----------------------------------------------------------------------------------------------


def earlier_run(folder: Path, density: float = 0.4, steps: int = 3) -> Path:
    """A wider run on the MLP whose increment select_from reads."""
    model = mlp()
    engine = siftune.attach(model, config(density=density))
    optimizer = engine.optimizer(lr=1e-2)
    for batch in mlp_batches(steps, seed=11):
        mlp_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    engine.increment(values=optimizer.master_values()).save(folder)
    return folder


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(selection="balanced", line_cap=1.0, step_scale="input"),
    dict(compact_indices=True, state_dtype="bfloat16", selection_batches=2),
])
def test_select_from_matches_reference_step_for_step(overrides, tmp_path):
    folder = earlier_run(tmp_path / "wide")
    records, moved = lockstep(config(select_from=str(folder), **overrides), steps=5)
    assert_lockstep(records, moved)
    earlier = siftune.SparseIncrement.load(folder)
    for name, idx in records[-1]["selected"].items():
        changed = earlier.tensors[name].indices[earlier.tensors[name].values != 0]
        inside = torch.isin(idx.long(), changed)
        if overrides.get("selection") != "balanced":
            assert bool(inside.all())  # the top-k of the earlier run's change
        else:
            assert int(inside.sum()) >= 0.75 * idx.numel()  # balanced's caps may bring in a few others
    plain = lockstep(config(**overrides), steps=1)[0]
    assert any(not torch.equal(a, plain[0]["selected"][n]) for n, a in records[0]["selected"].items())


@pytest.mark.parametrize("overrides", [dict(), dict(selection="balanced", line_cap=1.0)])
def test_select_from_on_a_delta_matches_the_in_place_reference(overrides, tmp_path):
    folder = earlier_run(tmp_path / "wide")
    worst, base, _, slow, _, _ = delta_lockstep(dict(overrides, select_from=str(folder)), steps=4)
    assert worst < 1e-5
    assert not torch.equal(slow[0].weight, base[0].weight)


def test_select_from_an_increment_of_other_targets_or_no_increment_is_a_one_line_config_error(tmp_path):
    folder = tmp_path / "narrow"
    model = mlp()
    engine = siftune.attach(model, config(target_modules=MLP_TARGETS[:1]))
    optimizer = engine.optimizer(lr=1e-2)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    optimizer.step()
    engine.increment(values=optimizer.master_values()).save(folder)
    for path, says in ((folder, "holds no change of"), (tmp_path / "missing", "not found")):
        with pytest.raises(ConfigError, match=says) as caught:
            siftune.attach(mlp(), config(select_from=str(path)))
        assert "\n" not in str(caught.value)


@pytest.mark.parametrize("overrides, message", [
    (dict(mode="periodic"), "mode 'fixed'"),
    (dict(shrink_after=2, shrink_from=2.0), "no shrink_after"),
    (dict(selection="random"), "selection 'gradient', 'balanced' or 'auto'"),
    (dict(select_from=""), "path of an increment folder"),
])
def test_select_from_out_of_place_is_a_one_line_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as caught:
        SiftConfig(**{"density": 0.05, "select_from": "some/run", **overrides})
    assert "\n" not in str(caught.value)


def test_siftune_train_select_from_trains_the_components_an_earlier_run_changed_most(tmp_path, tiny_bert_dir,
                                                                                      sentiment_csv):
    from siftune import SparseIncrement
    from test_cli import main

    def train(out, *extra):
        code = main(["train", "--model", str(tiny_bert_dir), "--dataset", str(sentiment_csv), "--output-dir",
                     str(out), "--steps", "4", "--batch-size", "8", "--max-length", "16", "--eval-size", "32",
                     "--warmup-steps", "1", "--lr", "0.01", "--quiet", *extra])
        assert code == 0
        return SparseIncrement.load(out)

    wide = train(tmp_path / "wide", "--density", "0.2")
    narrow = train(tmp_path / "narrow", "--density", "0.02", "--select-from", str(tmp_path / "wide"))
    assert narrow.config["select_from"] == str(tmp_path / "wide")
    for name, delta in narrow.tensors.items():
        earlier = wide.tensors[name]
        changed = earlier.indices[earlier.values != 0]
        assert int(torch.isin(delta.indices, changed).sum()) >= 0.75 * delta.indices.numel()


def test_select_from_keeps_the_earlier_change_only_until_each_tensor_has_selected(tmp_path):
    folder = earlier_run(tmp_path / "wide")
    model = mlp()
    engine = siftune.attach(model, config(select_from=str(folder)))
    assert set(engine.changes) == {s.name for s in engine.slots}
    optimizer = engine.optimizer(lr=1e-2)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    optimizer.step()
    optimizer.zero_grad()
    assert engine.changes == {}
    state = engine.state_dict()
    resumed = siftune.attach(mlp(), config(select_from=str(folder)))
    resumed.load_state_dict(state)
    assert resumed.changes == {}
