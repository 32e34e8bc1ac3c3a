"""Hostile input: every bad flag, config value, dataset row and non-finite step gets a clear answer.

Bad input is refused with a one-line SiftError naming the file and the
field or row; a NaN/Inf step is skipped and counted and never reaches the
weights, the optimizer state or the selection.
"""
from __future__ import annotations

import dataclasses
import gzip
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import siftune  # noqa: E402
from siftune import ConfigError, DataError, NonFiniteGradientError, cli  # noqa: E402
from siftune.recipes import data  # noqa: E402
from siftune.recipes.train import TrainArgs  # noqa: E402
from _models import MLP_DENSE, MLP_TARGETS, mlp, mlp_batches, mlp_loss  # noqa: E402


def parse(argv: list[str]) -> TrainArgs:
    return cli.train_args_from(cli.build_parser().parse_args(["train", *argv]))


def yaml_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


# -- config values and flags ---------------------------------------------------------------------------

WRONG_TYPE = {"str": 5, "int": "x", "float": "abc", "bool": "yes", "list": 3}


def _kind(field: dataclasses.Field) -> str:
    hint = str(field.type)
    return next(k for k in ("list", "bool", "float", "int", "str") if hint.startswith(k))


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TrainArgs)])
def test_every_config_field_given_a_value_of_the_wrong_type_is_an_error_naming_the_file_and_field(field, tmp_path):
    kind = _kind(next(f for f in dataclasses.fields(TrainArgs) if f.name == field))
    config = yaml_file(tmp_path, f"{field}: {WRONG_TYPE[kind]!r}\n")
    with pytest.raises(ConfigError) as error:
        parse(["--config", str(config)])
    assert str(error.value).startswith(f"{config}: {field} must be"), error.value


NEGATIVE = {"steps": -1, "epochs": -0.5, "batch_size": 0, "grad_accum": 0, "max_length": -4, "warmup_steps": -1,
            "weight_decay": -0.1, "max_grad_norm": -1, "eval_size": -3, "eval_batch_size": 0, "lr": 0,
            "dense_lr": -1e-3, "checkpoint_every": -2, "seed": -1, "density": 0, "selection_batches": 0,
            "refresh_every": 0}


@pytest.mark.parametrize("field", list(NEGATIVE))
def test_a_zero_or_negative_number_where_none_makes_sense_is_an_error_naming_the_field(field):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"^{field} "):
        parse([flag, str(NEGATIVE[field])])


@pytest.mark.parametrize("field,value", [("task", "regression"), ("dtype", "float8"), ("mode", "sometimes"),
                                         ("selection", "best"), ("state_dtype", "int8"), ("nonfinite", "ignore")])
def test_a_choice_outside_the_allowed_ones_is_an_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field} "):
        parse(["--" + field.replace("_", "-"), value])


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_a_non_finite_number_in_yaml_is_an_error(value, tmp_path):
    with pytest.raises(ConfigError, match="lr must be a finite number"):
        parse(["--config", str(yaml_file(tmp_path, f"lr: {value}\n"))])


def test_an_invalid_target_regex_is_an_error_naming_the_field():
    with pytest.raises(ConfigError, match="^target_modules is not a valid regular expression"):
        parse(["--target-modules", "(query"])


def test_an_unknown_yaml_key_is_an_error_naming_the_file_and_the_key(tmp_path):
    config = yaml_file(tmp_path, "lr: 0.001\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=rf"^{config}: unknown key\(s\) \['learning_rate'\]"):
        parse(["--config", str(config)])


def test_a_flag_overrides_a_bad_yaml_value(tmp_path):
    config = yaml_file(tmp_path, "density: abc\n")
    assert parse(["--config", str(config), "--density", "0.05"]).density == 0.05


def test_an_error_in_a_flag_does_not_blame_the_yaml_file(tmp_path):
    config = yaml_file(tmp_path, "lr: 0.001\n")
    with pytest.raises(ConfigError) as error:
        parse(["--config", str(config), "--steps", "-5"])
    assert str(config) not in str(error.value)


def test_a_yaml_file_that_is_not_a_mapping_is_an_error_naming_it(tmp_path):
    config = yaml_file(tmp_path, "- lr\n- 0.1\n")
    with pytest.raises(ConfigError, match=f"^{config} must hold a mapping"):
        parse(["--config", str(config)])


def test_a_bad_config_value_ends_the_command_with_one_line_and_exit_status_2(tmp_path, capsys):
    config = yaml_file(tmp_path, "density: abc\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "density" in err and str(config) in err


def test_a_flag_value_of_the_wrong_type_is_refused_by_the_parser_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(["--steps", "many"])
    assert exit_.value.code == 2 and "--steps" in capsys.readouterr().err


def test_valid_flags_and_yaml_give_the_values_asked_for(tmp_path):
    config = yaml_file(tmp_path, "lr: 1\nepochs: 2\nsteps: 0\ntarget_modules: [query, value]\nresume: true\n")
    args = parse(["--config", str(config), "--checkpoint-every", "5", "--dense-modules", "classifier.*"])
    assert (args.lr, args.epochs, args.target_modules, args.resume, args.checkpoint_every, args.dense_modules) == (
        1, 2, ["query", "value"], True, 5, "classifier.*")


# -- datasets ------------------------------------------------------------------------------------------

def dataset(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


BAD_DATASETS = {
    "decimal label": ("d.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": 0.5}\n', "line 2"),
    "nan label": ("d.jsonl", b'{"text": "a", "label": NaN}\n', "line 1"),
    "label that is an object": ("d.jsonl", b'{"text": "a", "label": {"x": 1}}\n', "line 1"),
    "text that is a list": ("d.jsonl", b'{"text": ["a"], "label": "x"}\n', "line 1"),
    "lone surrogate": ("d.jsonl", b'{"text": "a\\ud800", "label": "x"}\n', "line 1"),
    "JSON nested too deeply": ("d.jsonl", b'{"text": "a", "label": "x"}\n' + b"[" * 50000 + b"\n", "line 2"),
    "integer too long": ("d.jsonl", b'{"text": "a", "label": ' + b"9" * 5000 + b"}\n", "line 1"),
    "duplicate column": ("d.csv", b"text,label,text\na,b,c\n", "line 1"),
    "missing label column": ("d.csv", b"text,stars\na,1\n", "'label'"),
    "short row": ("d.csv", b"text,label\na,b\nc\n", "line 3"),
    "non-UTF-8 byte": ("d.csv", b"text,label\na,b\n\xff\xfe,c\n", "line 3"),
    "empty file": ("d.csv", b"", "empty"),
    "damaged gzip stream": ("d.csv.gz", gzip.compress(b"text,label\n" + b"a,b\n" * 50)[:12] + b"\xff" * 40, "d.csv.gz"),
}


@pytest.mark.parametrize("case", list(BAD_DATASETS), ids=list(BAD_DATASETS))
def test_a_bad_dataset_is_a_one_line_data_error_naming_the_file_and_the_row_or_field(case, tmp_path):
    name, content, where = BAD_DATASETS[case]
    path = dataset(tmp_path, name, content)
    with pytest.raises(DataError) as error:
        data.load_examples(path, "classification")
    message = str(error.value)
    assert message.startswith(path) and where in message and "\n" not in message, message


def test_an_integer_label_in_jsonl_is_used_by_its_text(tmp_path):
    path = dataset(tmp_path, "d.jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": "1"}\n')
    assert [e["label"] for e in data.load_examples(path, "classification")] == ["1", "1"]


def test_a_held_out_label_never_seen_in_training_is_an_error_naming_the_dataset_file(tmp_path, tiny_bert_dir, capsys):
    rows = [f"text {i},{'a' if i % 2 else 'b'}" for i in range(20)]
    # split_examples shuffles positions by the seed alone: put the lone label where the held-out part begins.
    order = list(range(20))
    random.Random(0).shuffle(order)
    rows[order[0]] = "lonely text,c"
    path = dataset(tmp_path, "d.csv", ("text,label\n" + "\n".join(rows) + "\n").encode())
    status = cli.main(["train", "--model", tiny_bert_dir, "--dataset", path, "--eval-size", "4", "--steps", "1",
                       "--output-dir", str(tmp_path / "out"), "--quiet"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar
    assert status == 2 and last.startswith("siftune train: error:") and '"c"' in last
    assert f"held-out part of {path}" in last


# -- non-finite steps ----------------------------------------------------------------------------------

def setup(mode="fixed", selection_batches=1, nonfinite="skip", dtype=torch.float32):
    model = mlp(dtype=dtype)
    engine = siftune.attach(model, density=0.2, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE, mode=mode,
                            refresh_every=2, selection_batches=selection_batches)
    return model, engine, engine.optimizer(lr=1e-2, nonfinite=nonfinite)


def step(model, optimizer, batches, poison=None, poisoned_batch=-1):
    """One optimizer step over ``batches``; ``poison`` (nan/inf) multiplies the loss of one of them."""
    for i, batch in enumerate(batches):
        loss = mlp_loss(model, batch)
        if poison is not None and i == poisoned_batch % len(batches):
            loss = loss * poison
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def snapshot(model, optimizer) -> dict:
    out = {f"param {n}": p.detach().clone() for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"state {id(p)} {key}"] = value.clone()
    return out


def assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def assert_all_finite(model, optimizer) -> None:
    for name, value in snapshot(model, optimizer).items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name


NAN, INF = float("nan"), float("inf")
POISONED = {  # mode, selection_batches, clean steps before, poison, poisoned micro-batch of the step
    "nan in the selection batch": ("fixed", 1, 0, NAN, 0),
    "inf in the selection batch": ("fixed", 1, 0, INF, 0),
    "nan in the second micro-batch after the selection": ("fixed", 1, 2, NAN, 1),
    "nan right after a periodic refresh": ("periodic", 1, 2, NAN, 0),
    "nan in per_step mode": ("per_step", 1, 2, NAN, 1),
    "nan in the first window of a three-batch selection": ("fixed", 3, 0, NAN, 0),
}


@pytest.mark.parametrize("case", list(POISONED), ids=list(POISONED))
def test_a_non_finite_step_is_skipped_counted_and_touches_no_weight_or_optimizer_state(case):
    mode, selection_batches, clean_steps, poison, poisoned_batch = POISONED[case]
    model, engine, optimizer = setup(mode, selection_batches)
    batches = mlp_batches(2 * (clean_steps + 4))
    pairs = [batches[i:i + 2] for i in range(0, len(batches), 2)]
    for pair in pairs[:clean_steps]:
        step(model, optimizer, pair)
    before = snapshot(model, optimizer)
    step(model, optimizer, pairs[clean_steps], poison, poisoned_batch)
    assert optimizer.skipped_steps == 1
    assert_unchanged(before, snapshot(model, optimizer))
    for pair in pairs[clean_steps + 1:]:  # training goes on, with finite values everywhere
        step(model, optimizer, pair)
    assert_all_finite(model, optimizer)
    assert not torch.equal(model[0].weight, before["param 0.weight"])


def selection_after(poisoned_first_step: bool) -> torch.Tensor:
    """The fixed selection of 0.weight, from a three-batch window over two-batch steps."""
    model, engine, optimizer = setup(selection_batches=3)
    batches = mlp_batches(8)
    if poisoned_first_step:
        step(model, optimizer, batches[:2], NAN, 0)
    step(model, optimizer, batches[2:4])
    step(model, optimizer, batches[4:6])  # its first micro-batch completes the window
    return engine.selected["0.weight"]


def test_a_skipped_step_inside_a_multi_batch_selection_window_leaves_no_trace_in_the_selection():
    assert torch.equal(selection_after(poisoned_first_step=True), selection_after(poisoned_first_step=False))


def test_a_non_finite_step_raises_with_policy_raise_and_leaves_the_weights_as_they_were():
    model, engine, optimizer = setup(nonfinite="raise")
    step(model, optimizer, mlp_batches(2))
    before = snapshot(model, optimizer)
    with pytest.raises(NonFiniteGradientError, match="gradient norm is nan"):
        step(model, optimizer, mlp_batches(2, seed=4), NAN)
    assert_unchanged(before, snapshot(model, optimizer))


def test_a_bf16_model_skips_an_overflowing_step_without_touching_its_fp32_masters():
    model, engine, optimizer = setup(dtype=torch.bfloat16)
    batches = mlp_batches(6, dtype=torch.bfloat16)
    step(model, optimizer, batches[:2])
    before = snapshot(model, optimizer)
    step(model, optimizer, batches[2:4], INF)
    assert optimizer.skipped_steps == 1
    assert_unchanged(before, snapshot(model, optimizer))


def test_non_finite_losses_of_skipped_steps_are_written_to_metrics_json_as_null():
    from siftune.recipes.train import _json_safe

    assert _json_safe({"losses": [0.5, NAN], "x": {"y": INF}}) == {"losses": [0.5, None], "x": {"y": None}}
