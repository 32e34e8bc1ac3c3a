"""siftune.analysis: gradient concentration statistics, loss landscapes, their files and commands."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from siftune import cli
from siftune.analysis import (
    Concentration,
    GradientArgs,
    LandscapeArgs,
    accumulated_gradient,
    amplitude_1d,
    amplitude_2d,
    analyze_gradients,
    analyze_landscape,
    concentration_report,
    density_for_share,
    filter_normalized_direction,
    loss_slice,
    perturbed_weights,
    selection_share,
    targeted_weights,
)
from siftune.analysis.gradients import analyze_model, layer_and_type
from siftune.analysis.inputs import mean_loss, pretrained_and_batches, random_twin
from siftune.analysis.landscape import axis
from siftune.errors import ConfigError, DataError, TargetError

FRACTIONS = (0.001, 0.01, 0.05, 0.1, 0.5)
SHARES = (0.5, 0.9, 0.99)
REVIEWS = [("a fine film", "fresh"), ("dull and long", "rotten"), ("great cast", "fresh"),
           ("a mess", "rotten"), ("moving story", "fresh"), ("boring plot", "rotten")]


def heavy_tailed(shape, seed=0, spread=3.0) -> torch.Tensor:
    """A tensor whose squares span many orders of magnitude, like a gradient's."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(spread * torch.randn(shape, generator=g))


def numpy_squares(tensor) -> np.ndarray:
    """Squares in float64, largest first."""
    return np.sort(tensor.numpy().astype(np.float64).ravel() ** 2)[::-1]


def numpy_top_share(tensor, fraction) -> float:
    squares = numpy_squares(tensor)
    k = max(1, min(squares.size, round(squares.size * fraction)))
    return squares[:k].sum() / squares.sum()


def numpy_fraction_for_share(tensor, share) -> float:
    squares = numpy_squares(tensor)
    cumulative = np.cumsum(squares)
    return (int(np.argmax(cumulative >= share * squares.sum())) + 1) / squares.size


def state(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_state(model, saved) -> None:
    current = model.state_dict()
    assert current.keys() == saved.keys()
    assert all(torch.equal(current[name], saved[name]) for name in saved)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread; on a busy machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reviews_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in REVIEWS), encoding="utf-8")
    return str(path)


@pytest.fixture
def chats_jsonl(tmp_path):
    path = tmp_path / "chats.jsonl"
    rows = [{"prompt": f"Hi {i}", "response": f"Hello {i}!"} for i in range(6)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def bert_batches(tiny_bert, tiny_tokenizer):
    from siftune.recipes.data import classification_batches

    examples = [{"text": t, "label": label} for t, label in REVIEWS]
    return list(classification_batches(examples, tiny_tokenizer, ["fresh", "rotten"], 3, 16,
                                       shuffle=False, seed=0))


# ---------------------------------------------------------------- concentration statistics


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_top_share_equals_numpy(fraction):
    tensor = heavy_tailed((37, 53))
    assert Concentration(tensor).top_share(fraction) == pytest.approx(numpy_top_share(tensor, fraction), rel=1e-6)


@pytest.mark.parametrize("share", SHARES)
def test_fraction_for_share_equals_numpy(share):
    tensor = heavy_tailed((37, 53), seed=1)
    assert Concentration(tensor).fraction_for_share(share) == numpy_fraction_for_share(tensor, share)


def test_curve_points_are_cumulative_shares_of_the_largest_components():
    tensor = heavy_tailed((20, 30), seed=2)
    curve = Concentration(tensor).curve(points=50)
    squares = numpy_squares(tensor)
    expected = [squares[:round(f * squares.size)].sum() / squares.sum() for f in curve["fraction"]]
    assert curve["fraction"][0] == 1 / squares.size and curve["fraction"][-1] == 1.0
    assert curve["share"] == pytest.approx(expected, rel=1e-6)


def test_all_zero_tensor_has_undefined_shares():
    zeros = Concentration(torch.zeros(4, 5))
    assert math.isnan(zeros.top_share(0.01)) and math.isnan(zeros.fraction_for_share(0.9))


def test_selection_share_is_the_per_tensor_top_k_share_of_the_pooled_norm():
    tensors = [heavy_tailed((10, 40), seed=3), 10 * heavy_tailed((30, 7), seed=4)]
    parts = [Concentration(t) for t in tensors]
    kept = sum(numpy_squares(t)[:max(1, round(t.numel() * 0.05))].sum() for t in tensors)
    total = sum(numpy_squares(t).sum() for t in tensors)
    assert selection_share(parts, 0.05) == pytest.approx(kept / total, rel=1e-6)


def test_density_for_share_is_the_smallest_density_keeping_the_share():
    parts = [Concentration(heavy_tailed((10, 40), seed=5, spread=1.0)),
             Concentration(heavy_tailed((30, 7), seed=6, spread=1.0))]
    density = density_for_share(parts, 0.9)
    assert 0 < density < 1
    assert selection_share(parts, density) >= 0.9
    assert selection_share(parts, density * (1 - 1e-9)) < 0.9


def test_density_for_share_is_zero_when_one_component_per_tensor_keeps_the_share():
    spikes = [torch.tensor([0.0, 10.0, 0.1]), torch.tensor([5.0, 0.0, 0.0, 0.1])]
    assert density_for_share([Concentration(t) for t in spikes], 0.99) == 0.0


def test_concentration_report_pools_every_tensor_into_the_whole_model():
    gradients = {"a.0.q.weight": heavy_tailed((8, 9), seed=7), "a.1.q.weight": heavy_tailed((8, 9), seed=8),
                 "head.weight": heavy_tailed((3, 9), seed=9)}
    pooled = torch.cat([g.reshape(-1) for g in gradients.values()])
    result = concentration_report(gradients, target_share=0.9)
    assert result["whole_model"]["numel"] == pooled.numel()
    assert result["whole_model"]["top_share"]["0.01"] == pytest.approx(numpy_top_share(pooled, 0.01), rel=1e-6)
    assert result["module_types"]["q"]["tensors"] == 2


def test_layer_and_type_split_the_layer_index_from_the_module_name():
    assert layer_and_type("bert.encoder.layer.3.attention.self.query.weight") == (3, "attention.self.query")
    assert layer_and_type("lm_head.weight") == (None, "lm_head")


# ---------------------------------------------------------------- gradients of a model


def test_targeted_weights_are_every_linear_but_the_classification_head(tiny_bert):
    names = set(targeted_weights(tiny_bert, "classification"))
    assert "classifier.weight" not in names
    assert names == {f"{n}.weight" for n, m in tiny_bert.named_modules()
                     if isinstance(m, torch.nn.Linear) and n != "classifier"}


def test_accumulated_gradient_is_the_sum_of_the_batch_gradients(tiny_bert, bert_batches):
    tiny_bert.eval()
    params = targeted_weights(tiny_bert, "classification")
    gradients, _ = accumulated_gradient(tiny_bert, bert_batches, params)
    reference = copy.deepcopy(tiny_bert)
    for batch in bert_batches:
        reference(**batch).loss.backward()
    expected = dict(reference.named_parameters())
    assert all(torch.allclose(gradients[n], expected[n].grad, atol=1e-6) for n in params)


def test_accumulated_gradient_leaves_the_models_grad_fields_alone(tiny_bert, bert_batches):
    accumulated_gradient(tiny_bert, bert_batches, targeted_weights(tiny_bert, "classification"))
    assert all(p.grad is None for p in tiny_bert.parameters())


# ---------------------------------------------------------------- landscape


def test_axis_is_symmetric_and_has_an_exact_zero():
    coords = axis(7, 0.5)
    assert coords[3] == 0.0 and coords[0] == -0.5 and coords[-1] == 0.5
    assert np.allclose(np.diff(coords), 1 / 6)


def test_perturbed_weights_leave_out_one_dimensional_parameters(tiny_llama):
    weights = perturbed_weights(tiny_llama)
    assert weights and all(p.dim() >= 2 for p in weights.values())
    assert "model.norm.weight" not in weights


def test_directions_are_filter_normalised(tiny_bert):
    weights = perturbed_weights(tiny_bert)
    direction = filter_normalized_direction(weights, torch.Generator().manual_seed(0))
    for name, weight in weights.items():
        rows = weight.detach().reshape(weight.shape[0], -1).norm(dim=1)
        assert torch.allclose(direction[name].reshape(weight.shape[0], -1).norm(dim=1), rows, rtol=1e-5)


def test_directions_depend_only_on_the_seed(tiny_bert):
    weights = perturbed_weights(tiny_bert)
    first = filter_normalized_direction(weights, torch.Generator().manual_seed(3))
    second = filter_normalized_direction(weights, torch.Generator().manual_seed(3))
    assert all(torch.equal(first[name], second[name]) for name in weights)


def test_landscape_at_the_origin_equals_the_models_loss(tiny_bert, bert_batches):
    weights = perturbed_weights(tiny_bert)
    direction = filter_normalized_direction(weights, torch.Generator().manual_seed(0))
    losses = loss_slice(tiny_bert, bert_batches, weights, [direction], [axis(5, 1.0)])
    assert losses[2] == mean_loss(tiny_bert.eval(), bert_batches)


def test_surface_point_is_the_loss_at_the_moved_weights(tiny_bert, bert_batches):
    weights = perturbed_weights(tiny_bert)
    generator = torch.Generator().manual_seed(0)
    d1, d2 = (filter_normalized_direction(weights, generator) for _ in range(2))
    coords = axis(3, 0.5)
    losses = loss_slice(tiny_bert, bert_batches, weights, [d1, d2], [coords, coords])
    moved = copy.deepcopy(tiny_bert)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if name in weights:
                p.add_(d1[name], alpha=0.5).add_(d2[name], alpha=-0.5)
    assert losses[2, 0] == pytest.approx(mean_loss(moved.eval(), bert_batches), rel=1e-5)


def test_weights_are_restored_exactly_after_a_slice(tiny_bert, bert_batches):
    saved = state(tiny_bert)
    weights = perturbed_weights(tiny_bert)
    direction = filter_normalized_direction(weights, torch.Generator().manual_seed(0))
    loss_slice(tiny_bert, bert_batches, weights, [direction, direction], [axis(3, 1.0), axis(3, 1.0)])
    assert_same_state(tiny_bert, saved)


def test_weights_are_restored_exactly_when_a_slice_is_interrupted(tiny_bert, bert_batches, monkeypatch):
    saved = state(tiny_bert)
    weights = perturbed_weights(tiny_bert)
    direction = filter_normalized_direction(weights, torch.Generator().manual_seed(0))
    forward, calls = tiny_bert.forward, []

    def interrupted_at_the_second_point(**batch):
        # The second point is a step away from the weights, so they are moved when this fires.
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return forward(**batch)

    monkeypatch.setattr(tiny_bert, "forward", interrupted_at_the_second_point)
    with pytest.raises(KeyboardInterrupt):
        loss_slice(tiny_bert, bert_batches[:1], weights, [direction], [axis(5, 1.0)])
    assert_same_state(tiny_bert, saved)


# ---------------------------------------------------------------- amplitude statistics


def test_amplitude_1d_equals_numpy():
    losses = np.array([3.0, 1.0, 2.0, 0.5, 0.7, 0.2, 4.0])
    stats = amplitude_1d(losses)
    assert stats["range"] == 3.8 and stats["std"] == pytest.approx(losses.std())
    assert stats["local_minima"] == 3  # 1.0, 0.5 and 0.2
    assert stats["mean_abs_second_difference"] == pytest.approx(np.abs(np.diff(losses, 2)).mean())


def test_amplitude_2d_counts_points_below_all_eight_neighbours():
    losses = np.full((5, 5), 2.0)
    losses[1, 1] = 1.0  # a minimum
    losses[3, 2] = losses[3, 3] = 1.0  # a flat pair: neither is strictly below the other
    stats = amplitude_2d(losses)
    assert stats["local_minima"] == 1
    second = np.concatenate([np.diff(losses, 2, axis=0).ravel(), np.diff(losses, 2, axis=1).ravel()])
    assert stats["mean_abs_second_difference"] == pytest.approx(np.abs(second).mean())
    assert stats["range"] == 1.0


def test_amplitude_of_a_too_short_slice_raises():
    with pytest.raises(ConfigError, match="at least 3"):
        amplitude_1d([1.0, 2.0])


# ---------------------------------------------------------------- whole runs and their files


def test_gradient_analysis_writes_json_figures_and_report(tiny_bert_dir, reviews_csv, tmp_path):
    out = tmp_path / "gradients"
    analyze_gradients(GradientArgs(model=tiny_bert_dir, dataset=reviews_csv, batches=2, batch_size=3,
                                   max_length=16, output_dir=str(out)), progress=False)
    for name in ("gradients.json", "gradients.md", "gradients_cumulative.png", "gradients_layers.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "gradients.json").read_text())
    assert set(saved["inits"]) == {"pretrained", "random"}
    assert 0 < saved["inits"]["pretrained"]["suggested_density"] <= 1


def test_gradient_statistics_of_both_inits_are_deterministic_with_a_seed(tiny_bert_dir, reviews_csv):
    args = GradientArgs(model=tiny_bert_dir, dataset=reviews_csv, batches=2, batch_size=2, max_length=16, seed=5)

    def run():
        model, batches = pretrained_and_batches(args)
        twin = random_twin(model, args.task, args.seed)
        return [analyze_model(m, batches, args, init) for m, init in ((model, "pretrained"), (twin, "random"))]

    assert run() == run()


def test_landscape_analysis_of_a_causal_lm_writes_json_figures_and_report(tiny_llama_dir, chats_jsonl, tmp_path):
    out = tmp_path / "landscape"
    result = analyze_landscape(LandscapeArgs(model=tiny_llama_dir, dataset=chats_jsonl, task="causal_lm",
                                             batch_size=3, max_length=24, grid=3, line_points=5,
                                             output_dir=str(out)), progress=False)
    for name in ("landscape.json", "landscape.md", "landscape_1d.png", "landscape_2d_contour.png",
                 "landscape_2d_surface.png"):
        assert (out / name).stat().st_size > 0, name
    pretrained = result["inits"]["pretrained"]
    assert pretrained["line"]["loss"][2] == pretrained["origin_loss"]
    assert np.asarray(result["inits"]["random"]["surface"]["loss"]).shape == (3, 3)


def test_landscape_with_one_dimension_writes_only_the_line(tiny_bert_dir, reviews_csv, tmp_path):
    out = tmp_path / "line"
    analyze_landscape(LandscapeArgs(model=tiny_bert_dir, dataset=reviews_csv, batch_size=3, max_length=16,
                                    line_points=3, dims="1", random_init=False, output_dir=str(out)),
                      progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["landscape.json", "landscape.md", "landscape_1d.png"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("changes, message", [
    ({"grid": 4}, "grid must be an odd number"),
    ({"line_points": 1}, "line_points must be an odd number"),
    ({"span": 0}, "span must be a positive number"),
    ({"dims": "3"}, "dims must be one of"),
    ({"batches": 0}, "batches must be a whole number"),
    ({"task": "regression"}, "task must be one of"),
])
def test_bad_landscape_arguments_raise_config_errors_naming_them(changes, message):
    with pytest.raises(ConfigError, match=message):
        LandscapeArgs(**changes).validate()


@pytest.mark.parametrize("share", [0, 1.5, True])
def test_target_share_outside_zero_to_one_raises(share):
    with pytest.raises(ConfigError, match="target_share"):
        GradientArgs(target_share=share).validate()


def test_target_modules_matching_nothing_raise_target_error(tiny_bert_dir, reviews_csv, tmp_path):
    args = GradientArgs(model=tiny_bert_dir, dataset=reviews_csv, batch_size=3, max_length=16,
                        target_modules=["no_such_module"], output_dir=str(tmp_path))
    with pytest.raises(TargetError, match="matched no"):
        analyze_gradients(args, progress=False)


def test_missing_dataset_raises_data_error(tiny_bert_dir, tmp_path):
    args = LandscapeArgs(model=tiny_bert_dir, dataset=str(tmp_path / "none.csv"), output_dir=str(tmp_path))
    with pytest.raises(DataError, match="not found"):
        analyze_landscape(args, progress=False)


def test_single_target_module_with_regex_characters_is_a_regex():
    assert GradientArgs(target_modules=[".*query"]).target_modules == ".*query"
    assert GradientArgs(target_modules=["query"]).target_modules == ["query"]


def test_task_defaults_to_the_builtin_datasets_task():
    assert GradientArgs(dataset="chatterbot").task == "causal_lm"
    assert GradientArgs(dataset="data.csv").task == "classification"


# ---------------------------------------------------------------- command line


def test_cli_analyze_gradients_prints_the_headline_and_writes_files(tiny_bert_dir, reviews_csv, tmp_path, capsys):
    code = cli.main(["analyze", "gradients", "--model", tiny_bert_dir, "--dataset", reviews_csv, "--batches", "1",
                     "--batch-size", "3", "--max-length", "16", "--no-random-init", "--target-share", "0.5",
                     "--output-dir", str(tmp_path), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "pretrained: top 1% holds" in printed and "random" not in printed
    assert (tmp_path / "gradients.json").is_file()


def test_cli_analyze_bad_flag_value_is_one_line_and_exit_2(capsys):
    assert cli.main(["analyze", "landscape", "--grid", "4", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "grid must be an odd number" in error
