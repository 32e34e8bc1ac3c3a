"""SparseIncrement: the trained increment as files, and its application to base models."""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import siftune  # noqa: E402
from siftune import IncrementError, SiftConfig, SparseIncrement  # noqa: E402
from _models import (  # noqa: E402
    MLP_DENSE, MLP_TARGETS, mlp, mlp_batches, mlp_loss, params, tiny_bert_classifier, token_batches,
)

WEIGHTS, HEADER = "increment.safetensors", "increment_config.json"
DENSITY = 0.2


def train_mlp(dtype=torch.float32, lr=1e-2, steps=5, dense=True):
    """(base, trained, engine, optimizer) for a few steps of SIFT on the MLP."""
    base = mlp(dtype=dtype)
    trained = copy.deepcopy(base)
    engine = siftune.attach(trained, SiftConfig(density=DENSITY, target_modules=MLP_TARGETS,
                                                dense_modules=MLP_DENSE if dense else ()))
    opt = engine.optimizer(lr=lr)
    for batch in mlp_batches(steps, dtype=dtype):
        mlp_loss(trained, batch).backward()
        opt.step()
        opt.zero_grad()
    return base, trained, engine, opt


@pytest.fixture(scope="module")
def trained():
    return train_mlp()


@pytest.fixture
def increment(trained):
    _, _, engine, opt = trained
    return engine.increment(base_model="tiny-mlp", values=opt.master_values())


@pytest.fixture
def saved(increment, tmp_path):
    return increment.save(tmp_path / "inc")


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- files ---------------------------------------------------------------------------

def test_save_then_load_gives_identical_indices_values_and_dense_tensors(increment, saved):
    loaded = SparseIncrement.load(saved)
    assert loaded.tensors.keys() == increment.tensors.keys() == {"0.weight", "2.weight"}
    for name, t in increment.tensors.items():
        u = loaded.tensors[name]
        assert torch.equal(u.indices.long(), t.indices.long())
        assert torch.equal(u.values, t.values)
        assert (u.shape, u.dtype) == (t.shape, t.dtype)
    assert_same_state(loaded.dense, increment.dense)
    assert loaded.base_model == "tiny-mlp"


def test_saved_header_records_format_version_base_model_shapes_and_dtypes(saved):
    header = json.loads((saved / HEADER).read_text())
    assert header["format_version"] == 1
    assert header["base_model"] == "tiny-mlp"
    assert header["tensors"]["0.weight"] == {"shape": [16, 8], "dtype": "float32"}
    assert header["tensors"]["2.weight"] == {"shape": [16, 16], "dtype": "float32"}
    assert header["dense"]["4.weight"] == {"shape": [3, 16], "dtype": "float32"}
    assert header["dense"]["4.bias"] == {"shape": [3], "dtype": "float32"}


def test_summary_counts_selected_components_at_the_configured_density(increment):
    summary = increment.summary()
    k = round(DENSITY * 128) + round(DENSITY * 256)
    assert summary["selected_components"] == k
    assert summary["targeted_components"] == 128 + 256
    assert summary["density"] == pytest.approx(DENSITY, abs=0.01)
    assert summary["targeted_tensors"] == 2 and summary["dense_tensors"] == 2
    assert summary["dense_components"] == 3 * 16 + 3


def test_nbytes_counts_int32_indices_fp32_values_and_dense_tensors(increment):
    k = round(DENSITY * 128) + round(DENSITY * 256)
    assert increment.nbytes == k * 4 + k * 4 + (3 * 16 + 3) * 4


# -- apply / remove ---------------------------------------------------------------------

def test_apply_to_a_fresh_base_reproduces_the_trained_model(trained, increment):
    base, model, _, _ = trained
    fresh = copy.deepcopy(base)
    increment.apply(fresh)
    x = torch.randn(10, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=1e-6, rtol=0)
    for name, value in params(model).items():
        torch.testing.assert_close(fresh.get_parameter(name).detach(), value, atol=1e-6, rtol=0, msg=name)


def test_remove_after_apply_restores_the_base_exactly(trained, increment):
    base = trained[0]
    model = copy.deepcopy(base)
    increment.apply(model)
    assert not torch.equal(model[0].weight, base[0].weight)
    increment.remove(model)
    assert_same_state(params(model), params(base))


def test_remove_from_another_model_object_subtracts_the_increment(trained, increment):
    base = trained[0]
    sparse_only = SparseIncrement(increment.tensors)
    applied = sparse_only.apply(copy.deepcopy(base))
    other = copy.deepcopy(base)
    other.load_state_dict(applied.state_dict())  # as a merged model loads: apply() never ran on it
    sparse_only.remove(other)
    for name, value in params(base).items():
        torch.testing.assert_close(other.get_parameter(name).detach(), value, atol=1e-6, rtol=0, msg=name)


def test_remove_of_dense_tensors_from_a_model_it_was_not_applied_to_is_an_increment_error(trained, increment):
    applied = increment.apply(copy.deepcopy(trained[0]))
    other = copy.deepcopy(trained[0])
    other.load_state_dict(applied.state_dict())  # the values, but not the record of what apply() overwrote
    with pytest.raises(IncrementError, match="dense tensors"):
        increment.remove(other)


def test_a_copy_of_a_model_the_increment_is_applied_to_is_restored_exactly_by_remove(trained, increment):
    applied = increment.apply(copy.deepcopy(trained[0]))
    other = increment.remove(copy.deepcopy(applied))
    assert_same_state(params(other), params(trained[0]))


def test_bf16_increment_holds_fp32_values_that_rebuild_the_trained_bf16_weights_exactly():
    base, model, engine, opt = train_mlp(dtype=torch.bfloat16, lr=1e-3)
    increment = engine.increment(values=opt.master_values())
    for t in increment.tensors.values():
        assert t.values.dtype == torch.float32 and t.dtype == "bfloat16"
    values = torch.cat([t.values for t in increment.tensors.values()])
    assert not torch.equal(values, values.bfloat16().float()), "values carry no more than bf16 precision"
    fresh = increment.apply(copy.deepcopy(base))
    assert_same_state(params(fresh), params(model))


# -- a transformers model, merged into a plain model folder -------------------------------------

def test_merged_folder_loads_with_from_pretrained_and_gives_the_trained_logits(tmp_path):
    from transformers import AutoModelForSequenceClassification

    base_dir, out_dir = tmp_path / "base", tmp_path / "merged"
    tiny_bert_classifier().save_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir)
    engine = siftune.attach(model, SiftConfig(density=0.1, target_modules=["query", "value"],
                                              dense_modules=["classifier"]))
    opt = engine.optimizer(lr=1e-2)
    labels = torch.tensor([0, 1])
    for ids in token_batches(3):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    increment = engine.increment(base_model=str(base_dir))
    increment.merge(out_dir, model=AutoModelForSequenceClassification.from_pretrained(base_dir))
    merged = AutoModelForSequenceClassification.from_pretrained(out_dir).eval()
    untouched = AutoModelForSequenceClassification.from_pretrained(base_dir).eval()
    model.eval()
    ids = token_batches(1, seed=9, batch_size=4)[0]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(untouched(input_ids=ids).logits, expected, atol=1e-4)


# -- the model card ------------------------------------------------------------------------------

def card_code(folder: Path) -> str:
    """The Python block of the README.md in ``folder``."""
    text = (folder / "README.md").read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_saved_folder_has_a_model_card_naming_base_model_task_density_trained_count_and_metrics(increment, tmp_path):
    increment.metadata.update(task="classification", labels=["a", "b", "c"],
                              metrics={"before": {"accuracy": 0.3125}, "after": {"accuracy": 0.875}})
    card = (increment.save(tmp_path / "inc") / "README.md").read_text()
    assert "base_model: \"tiny-mlp\"" in card and "| base model | `tiny-mlp` |" in card
    assert "| task | classification |" in card
    assert "20% configured" in card
    assert f"| trained components | {increment.num_components:,}:" in card
    assert "| metric | before | after |" in card and "| accuracy | 0.3125 | 0.875 |" in card


def test_model_card_without_recorded_metrics_has_no_metrics_section(saved):
    assert "## Metrics" not in (saved / "README.md").read_text()


def test_model_card_code_loads_applies_and_merges_the_increment(tiny_llama_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    engine = siftune.attach(model, SiftConfig(density=0.1))
    opt = engine.optimizer(lr=1e-2)
    for ids in token_batches(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    increment = engine.increment(base_model=tiny_llama_dir, values=opt.master_values())
    increment.metadata["task"] = "causal_lm"
    folder = increment.save(tmp_path / "inc")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(card_code(folder), namespace)
    for name, value in params(model).items():
        torch.testing.assert_close(namespace["model"].get_parameter(name).detach(), value, atol=1e-6, rtol=0,
                                   msg=name)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "inc-merged")
    for name, value in params(model).items():
        torch.testing.assert_close(merged.get_parameter(name).detach(), value, atol=1e-6, rtol=0, msg=name)


def test_load_base_of_an_increment_without_a_recorded_base_model_is_an_increment_error(increment):
    with pytest.raises(IncrementError, match="base_model="):
        SparseIncrement(increment.tensors).load_base()


# -- wrong base models ---------------------------------------------------------------------------

def _state(model):
    return {n: v.clone() for n, v in model.state_dict().items()}


def test_base_with_a_differently_shaped_tensor_is_an_increment_error_naming_it_and_left_untouched(increment):
    wrong = mlp(sizes=(8, 16, 12, 3))  # "0.weight" fits, "2.weight" is 12x16
    wrong[4] = nn.Linear(16, 3)  # the dense head fits again
    before = _state(wrong)
    with pytest.raises(IncrementError, match=r"2\.weight"):
        increment.apply(wrong)
    assert_same_state(_state(wrong), before)


def test_base_missing_a_tensor_is_an_increment_error_naming_it_and_left_untouched(increment):
    torch.manual_seed(0)
    wrong = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Tanh(), nn.Tanh(), nn.Linear(16, 3))  # no "2.weight"
    before = _state(wrong)
    with pytest.raises(IncrementError, match=r"2\.weight"):
        increment.apply(wrong)
    assert_same_state(_state(wrong), before)


# -- damaged folders ----------------------------------------------------------------------------------

def _truncate_weights(d: Path):
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])


def _garbage_weights(d: Path):
    (d / WEIGHTS).write_bytes(bytes(range(256)) * 8)


def _edit_header(edit):
    def damage(d: Path):
        header = json.loads((d / HEADER).read_text())
        edit(header)
        (d / HEADER).write_text(json.dumps(header))
    return damage


def _edit_tensor(key, edit):
    def damage(d: Path):
        tensors = load_file(str(d / WEIGHTS))
        tensors[key] = edit(tensors[key])
        save_file(tensors, str(d / WEIGHTS))
    return damage


def _set(index, value):
    def edit(t):
        t = t.clone()
        t[index] = value
        return t
    return edit


DAMAGE = {
    "truncated weights file": _truncate_weights,
    "garbage weights file": _garbage_weights,
    "empty weights file": lambda d: (d / WEIGHTS).write_bytes(b""),
    "header not JSON": lambda d: (d / HEADER).write_text("{not json"),
    "header not UTF-8": lambda d: (d / HEADER).write_bytes(b"\xff\xfe\x00garbage"),
    "header a JSON list": lambda d: (d / HEADER).write_text("[]"),
    "wrong format_version": _edit_header(lambda h: h.update(format_version=2)),
    "no format_version": _edit_header(lambda h: h.pop("format_version")),
    "tensor entry not an object": _edit_header(lambda h: h["tensors"].update({"0.weight": [16, 8]})),
    "dense entry not an object": _edit_header(lambda h: h["dense"].update({"4.bias": [3]})),
    "bad shape in header": _edit_header(lambda h: h["tensors"]["0.weight"].update(shape=[16, -8])),
    "unknown dtype in header": _edit_header(lambda h: h["tensors"]["0.weight"].update(dtype="int8")),
    "header lists a tensor the file lacks": _edit_header(lambda h: h["tensors"].update(
        {"9.weight": {"shape": [4, 4], "dtype": "float32"}})),
    "index out of range": _edit_tensor("0.weight::indices", _set(-1, 128)),
    "negative index": _edit_tensor("0.weight::indices", _set(0, -1)),
    "duplicate indices": _edit_tensor("0.weight::indices", lambda t: torch.cat([t[:1], t[:-1]])),
    "NaN value": _edit_tensor("2.weight::values", _set(3, float("nan"))),
    "values shorter than indices": _edit_tensor("2.weight::values", lambda t: t[:-1].clone()),
    "dense tensor of the wrong shape": _edit_tensor("4.weight::dense", lambda t: t[:2].clone()),
    "missing weights file": lambda d: (d / WEIGHTS).unlink(),
    "missing header file": lambda d: (d / HEADER).unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_loading_a_damaged_folder_is_an_increment_error(saved, damage):
    DAMAGE[damage](saved)
    with pytest.raises(IncrementError):
        SparseIncrement.load(saved)


def test_loading_a_folder_that_does_not_exist_is_an_increment_error(tmp_path):
    with pytest.raises(IncrementError):
        SparseIncrement.load(tmp_path / "nowhere")


def test_apply_writes_into_a_tensor_the_base_holds_as_a_buffer(trained, increment):
    # check() accepts buffers as well as parameters, so apply() must write them too.
    base, model = trained[0], trained[1]
    holder = copy.deepcopy(base)
    weight = holder[2].weight.detach().clone()
    del holder[2].weight
    holder[2].register_buffer("weight", weight)
    increment.apply(holder)
    torch.testing.assert_close(holder[2].weight, model[2].weight.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(holder[0].weight, model[0].weight.detach(), atol=1e-6, rtol=0)


def test_a_save_interrupted_between_its_two_files_loads_the_new_increment_with_a_warning(increment, saved,
                                                                                          monkeypatch):
    import siftune.artifacts.increment as module

    newer = SparseIncrement({n: dataclasses.replace(t, values=t.values * 2) for n, t in increment.tensors.items()},
                            dense=increment.dense, base_model="tiny-mlp-2", config=increment.config)

    def die(*args, **kwargs):
        raise OSError("killed after the weights file was replaced")

    monkeypatch.setattr(module, "atomic_write_text", die)
    with pytest.raises(OSError):
        newer.save(saved)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="another save"):
        loaded = SparseIncrement.load(saved)
    assert loaded.base_model == "tiny-mlp-2"
    for name, t in newer.tensors.items():
        assert torch.equal(loaded.tensors[name].values, t.values)


def test_a_hand_edited_header_of_the_same_save_is_what_loads(saved):
    header = json.loads((saved / HEADER).read_text())
    header["base_model"] = "/moved/base"
    (saved / HEADER).write_text(json.dumps(header))
    assert SparseIncrement.load(saved).base_model == "/moved/base"
