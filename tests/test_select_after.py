"""select_after: the dense modules train alone for some steps, then the first selection window opens; exact
against the reference (storage="delta" in tests/test_delta.py), with the selection checked against a hand computation at the step it is made."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import siftune  # noqa: E402
from siftune import ConfigError, SiftConfig  # noqa: E402
from _models import MLP_DENSE, MLP_TARGETS, TOPK, mlp, mlp_batches, mlp_loss, whole_and_resumed  # noqa: E402
from test_engine import ATOL, lockstep  # noqa: E402
from test_cli import sentiment_csv, train  # noqa: E402,F401  (a fixture)


def config(**overrides) -> SiftConfig:
    return SiftConfig(**{**dict(density=0.25, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE,
                                select_after=3, **TOPK), **overrides})


@pytest.mark.parametrize("overrides, accum", [
    ({}, 2),
    ({"mode": "periodic", "refresh_every": 2}, 1),
    ({"selection_batches": 2, "score": "grad_squared"}, 1),
    ({"selection": "balanced", "line_cap": 1.0}, 1),
    ({"selection": "random"}, 1),
    ({"step_scale": "input", "selection": "balanced", "line_cap": 1.0}, 2),
    ({"structure": "rows"}, 1),
])
def test_a_delayed_selection_matches_the_reference_step_for_step(overrides, accum):
    records, moved = lockstep(config(**overrides), steps=7, accum=accum, weight_decay=0.1)
    assert max(r["diff"] for r in records) <= ATOL, [r["diff"] for r in records]
    assert moved["0.weight"] and moved["2.weight"]  # the body trained once its selection was made
    assert all(r["selected"] == {} for r in records[:3])  # and not before


def test_the_body_waits_and_then_selects_from_the_gradient_through_the_trained_head():
    model = mlp()
    base = copy.deepcopy(model)
    engine = siftune.attach(model, config(select_after=3))
    opt = engine.optimizer(lr=1e-2)
    data = mlp_batches(4)
    for batch in data[:3]:
        mlp_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
        assert engine.selected == {}  # no window has opened
    assert torch.equal(model[0].weight, base[0].weight) and torch.equal(model[2].weight, base[2].weight)
    assert not torch.equal(model[4].weight, base[4].weight)  # the head trained
    # The selection at the fourth step: the top quarter of |g w| of that step's gradient, through the
    # head as it is now.
    twin = copy.deepcopy(model)
    mlp_loss(twin, data[3]).backward()
    mlp_loss(model, data[3]).backward()
    for name in ("0", "2"):
        layer = twin.get_submodule(name)
        score = (layer.weight.grad * layer.weight.detach()).abs().reshape(-1)
        expected = torch.topk(score, engine.selected[f"{name}.weight"].numel()).indices.sort().values
        assert torch.equal(engine.selected[f"{name}.weight"].long(), expected)
    # ... which differs from the choice made at the first step, through the random head.
    first = siftune.attach(copy.deepcopy(base), config(select_after=0))
    probe = first.model
    mlp_loss(probe, data[0]).backward()
    assert not torch.equal(first.selected["0.weight"], engine.selected["0.weight"])


def test_a_checkpoint_taken_while_the_body_waits_resumes_bit_exact():
    whole, resumed, stopped = whole_and_resumed(config(select_after=3), mlp_batches(6), cut=2)
    assert stopped.steps == 2 and stopped.selected == {}
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_select_after_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="select_after must be an integer >= 0"):
        config(select_after=-1)
    with pytest.raises(ConfigError, match="select_after must be an integer"):
        config(select_after=True)
    with pytest.raises(ConfigError, match="mode='per_step'"):
        config(mode="per_step")
    model = mlp()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="names none \\(dense_modules\\)"):
        siftune.attach(model, config(dense_modules=()))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # left as it was
    mlp_loss(model, mlp_batches(1)[0]).backward()  # and no hook of the engine is left on it
    assert model[0].weight.grad is not None
    engine = siftune.attach(mlp(), config())
    with pytest.raises(ConfigError, match="use one of them"):
        engine.select(mlp_batches(2), loss_of=mlp_loss)


def test_train_args_refuse_select_first_with_select_after():
    from siftune.recipes.train import TrainArgs
    with pytest.raises(ConfigError, match="pass one of them"):
        TrainArgs(select_first=True, select_after=10).validate()
    with pytest.raises(ConfigError, match="a causal_lm run has no head"):
        TrainArgs(task="causal_lm", select_after=10).validate()
    assert TrainArgs(select_after=10).sift_config().select_after == 10


def test_siftune_train_select_after_trains_the_head_first_then_the_selection(tmp_path, tiny_bert_dir, sentiment_csv):
    from siftune import SparseIncrement

    out = train(tmp_path, tiny_bert_dir, sentiment_csv, "--select-after", "3")
    increment = SparseIncrement.load(out)
    assert increment.config["select_after"] == 3
    # selected at the fourth step and trained for the last three: changed values in every targeted tensor
    assert increment.tensors and all(bool((t.values != 0).any()) for t in increment.tensors.values())
