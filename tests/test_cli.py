"""The siftune command as a user runs it: train, info, merge, and its errors."""
from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import json
import random
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import siftune
from siftune import SiftConfig, SparseIncrement
from siftune.cli import build_parser, field_docs, main
from siftune.recipes.data import classification_batches
from siftune.recipes.models import load_model


@pytest.fixture
def sentiment_csv(tmp_path):
    """A learnable toy task: the label says whether the letter 'z' appears."""
    rng = random.Random(0)
    rows = ["text,label"]
    for _ in range(160):
        word = "".join(rng.choice("abcdefgh") for _ in range(6))
        positive = rng.random() < 0.5
        rows.append(f"{word}{'z' if positive else ''},{'pos' if positive else 'neg'}")
    path = tmp_path / "toy.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def write_csv(path, rows):
    path.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows))
    return path


def train(tmp_path, model_dir, dataset, *extra):
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--dataset", str(dataset), "--output-dir", str(out),
                 "--steps", "6", "--batch-size", "8", "--max-length", "16", "--eval-size", "32",
                 "--warmup-steps", "1", "--density", "0.05", "--lr", "0.01", "--quiet", *extra])
    assert code == 0
    return out


def test_train_writes_increment_metrics_and_loss_plot(tmp_path, tiny_bert_dir, sentiment_csv):
    out = train(tmp_path, tiny_bert_dir, sentiment_csv)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["losses"]) == 6 and metrics["steps"] == 6
    assert 0.0 <= metrics["after"]["accuracy"] <= 1.0 and metrics["before"]["examples"] == 32
    assert (out / "loss_curve.png").stat().st_size > 1000
    increment = SparseIncrement.load(out)
    assert increment.metadata["labels"] == ["neg", "pos"]
    assert "classifier.weight" in increment.dense


def test_train_reads_a_yaml_config_and_flags_override_it(tmp_path, tiny_bert_dir, sentiment_csv):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_bert_dir}\ndataset: {sentiment_csv}\nsteps: 99\ndensity: 0.5\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--steps", "3", "--output-dir", str(out), "--eval-size", "16",
                 "--batch-size", "4", "--max-length", "16", "--warmup-steps", "0", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3
    assert metrics["args"]["density"] == 0.5


def test_trained_increment_applied_to_the_base_gives_the_trained_predictions(tmp_path, tiny_bert_dir, sentiment_csv):
    out = train(tmp_path, tiny_bert_dir, sentiment_csv)
    merged = tmp_path / "merged"
    assert main(["merge", str(out), str(merged)]) == 0
    increment = SparseIncrement.load(out)
    base, tokenizer = load_model(tiny_bert_dir, "classification", labels=["neg", "pos"])
    increment.apply(base)
    plain = AutoModelForSequenceClassification.from_pretrained(merged)
    batch = next(iter(classification_batches([{"text": "abcz", "label": "pos"}, {"text": "abc", "label": "neg"}],
                                             tokenizer, ["neg", "pos"], 2, 16, shuffle=False, seed=0)))
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, base.eval()(**batch).logits, atol=1e-5, rtol=0)
    assert plain.config.id2label == {0: "neg", 1: "pos"}


def test_causal_lm_training_reports_response_loss(tmp_path, tiny_llama_dir, chat_jsonl):
    out = train(tmp_path, tiny_llama_dir, chat_jsonl, "--task", "causal_lm", "--eval-size", "4")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    merged = tmp_path / "merged"
    assert main(["merge", str(out), str(merged)]) == 0
    assert AutoModelForCausalLM.from_pretrained(merged).config.model_type == "llama"


def test_lean_memory_flags_train_a_causal_lm(tmp_path, tiny_llama_dir, chat_jsonl):
    out = train(tmp_path, tiny_llama_dir, chat_jsonl, "--task", "causal_lm", "--eval-size", "4",
                "--update-in-backward", "--compact-indices", "--state-dtype", "bfloat16", "--max-grad-norm", "0")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert SparseIncrement.load(out).config["compact_indices"] is True


def test_info_summarises_the_increment(tmp_path, tiny_bert_dir, sentiment_csv, capsys):
    out = train(tmp_path, tiny_bert_dir, sentiment_csv)
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["density"] == pytest.approx(0.05, rel=0.05)
    assert summary["selected_components"] > 0
    assert main(["info", str(out), "--tensors"]) == 0
    assert "bert.encoder.layer.0.attention.self.query.weight" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--density", "0"], "density"),
    (["--density", "1.5"], "density"),
    (["--mode", "sometimes"], "mode"),
    (["--target-modules", "no_such_module"], "matched no"),
    (["--dataset", "/nonexistent/file.csv"], "file.csv"),
    (["--task", "translation"], "task"),
    (["--update-in-backward"], "max_grad_norm"),
    (["--update-in-backward", "--max-grad-norm", "0", "--grad-accum", "2"], "grad_accum 1"),
    (["--eval-dataset", "/nonexistent/held_out.csv"], "held_out.csv"),
    (["--eval-dataset", "/nonexistent/held_out.csv", "--eval-size", "0"], "eval_size is 0"),
    (["--report-to", "wandb"], "report_to"),
])
def test_bad_train_input_is_one_line_error_and_exit_2(tmp_path, tiny_bert_dir, sentiment_csv, capsys, flags, message):
    args = ["train", "--model", str(tiny_bert_dir), "--dataset", str(sentiment_csv), "--output-dir",
            str(tmp_path / "run"), "--steps", "2", "--eval-size", "16", "--quiet", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "increment.safetensors").exists()


def test_info_on_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err


def _flags(parser, command=()):
    """(command words, action) for every option of every (sub)command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from _flags(subparser, (*command, name))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield command, action


def test_every_flag_of_every_command_says_what_it_does():
    flags = list(_flags(build_parser()))
    assert {command for command, _ in flags} >= {("train",), ("info",), ("merge",), ("bench",),
                                                 ("analyze", "gradients"), ("analyze", "landscape")}
    for command, action in flags:
        text = re.sub(r"\(?default:? [^)]*\)?", "", action.help or "", flags=re.IGNORECASE)
        assert len(text.split()) >= 2, f"siftune {' '.join(command)} {action.option_strings or action.dest}"


def test_train_help_states_each_fields_actual_default():
    from siftune.recipes.train import TrainArgs

    docs = field_docs(SiftConfig, TrainArgs)
    for field in dataclasses.fields(TrainArgs):
        stated = re.search(r"Default (\S+?)[.:]?(\s|$)", docs[field.name])
        assert stated, f"{field.name}: help states no default"
        assert ast.literal_eval(stated[1]) == field.default, field.name


def test_the_command_imports_no_optional_package_until_a_flag_needs_it():
    code = ("import sys; from siftune import cli; from siftune.recipes import data, models, train; cli.build_parser(); "
            "print(sorted({'datasets', 'pyarrow', 'tensorboard'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"siftune {siftune.__version__}"


def test_eval_dataset_is_the_held_out_set_and_all_of_dataset_trains(tmp_path, tiny_bert_dir, sentiment_csv):
    held_out = write_csv(tmp_path / "held_out.csv", [("abcz", "pos"), ("abc", "neg"), ("zz", "pos")])
    out = train(tmp_path, tiny_bert_dir, sentiment_csv, "--eval-dataset", str(held_out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"]["examples"] == metrics["after"]["examples"] == 3
    assert metrics["args"]["eval_dataset"] == str(held_out)


def test_train_reads_a_save_to_disk_folder_and_a_parquet_held_out_file(tmp_path, tiny_bert_dir, sentiment_csv):
    import datasets

    rows = list(csv.DictReader(sentiment_csv.open()))
    datasets.Dataset.from_list(rows[:-8]).save_to_disk(tmp_path / "train")
    datasets.Dataset.from_list(rows[-8:]).to_parquet(tmp_path / "held_out.parquet")
    out = train(tmp_path, tiny_bert_dir, tmp_path / "train", "--eval-dataset", str(tmp_path / "held_out.parquet"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["examples"] == 8
    assert SparseIncrement.load(out).metadata["labels"] == ["neg", "pos"]


def test_a_corrupt_parquet_file_is_a_one_line_error_and_exit_2(tmp_path, tiny_bert_dir, capsys):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 cut short")
    assert main(["train", "--model", tiny_bert_dir, "--dataset", str(path), "--output-dir", str(tmp_path / "run"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"siftune train: error: \S*broken.parquet: not a readable Parquet file \(.+\)\n", err)


def test_eval_size_0_trains_without_evaluating(tmp_path, tiny_bert_dir, sentiment_csv):
    out = train(tmp_path, tiny_bert_dir, sentiment_csv, "--eval-size", "0")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"] == metrics["after"] == {}
    assert len(metrics["losses"]) == 6


def test_eval_dataset_label_unseen_in_training_names_the_file(tmp_path, tiny_bert_dir, sentiment_csv, capsys):
    held_out = write_csv(tmp_path / "held_out.csv", [("abcz", "pos"), ("abc", "maybe")])
    args = ["train", "--model", tiny_bert_dir, "--dataset", str(sentiment_csv), "--eval-dataset", str(held_out),
            "--output-dir", str(tmp_path / "run"), "--steps", "2", "--quiet"]
    assert main(args) == 2
    assert re.fullmatch(r'siftune train: error: label "maybe" in .*held_out.csv never appears in training data.*\n',
                        capsys.readouterr().err)


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs of every scalar tag in a TensorBoard log folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_report_to_tensorboard_logs_each_step_and_the_held_out_metrics(tmp_path, tiny_bert_dir, sentiment_csv):
    out = train(tmp_path, tiny_bert_dir, sentiment_csv, "--report-to", "tensorboard")
    metrics = json.loads((out / "metrics.json").read_text())
    logged = scalars(out / "tensorboard")
    assert sorted(logged) == ["eval/accuracy", "train/grad_norm", "train/learning_rate", "train/loss",
                              "train/skipped_steps"]
    assert [value for _, value in logged["train/loss"]] == pytest.approx(metrics["losses"])
    assert [step for step, _ in logged["train/grad_norm"]] == [1, 2, 3, 4, 5, 6]
    assert all(value > 0 for _, value in logged["train/grad_norm"])
    assert logged["train/learning_rate"][0] == (1, pytest.approx(0.01))  # one warm-up step reaches --lr
    assert logged["train/skipped_steps"][-1] == (6, 0)
    assert logged["eval/accuracy"] == [(0, pytest.approx(metrics["before"]["accuracy"])),
                                       (6, pytest.approx(metrics["after"]["accuracy"]))]


def test_a_fresh_run_replaces_an_earlier_runs_tensorboard_log(tmp_path, tiny_bert_dir, sentiment_csv):
    out = train(tmp_path, tiny_bert_dir, sentiment_csv, "--report-to", "tensorboard")
    train(tmp_path, tiny_bert_dir, sentiment_csv, "--report-to", "tensorboard")
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [step for step, _ in scalars(out / "tensorboard")["train/loss"]] == [1, 2, 3, 4, 5, 6]


def test_report_to_tensorboard_without_the_package_says_what_to_install(tmp_path, tiny_bert_dir, sentiment_csv,
                                                                        monkeypatch, capsys):
    from siftune.recipes import tracking

    find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *rest: None if name == "tensorboard" else find_spec(name, *rest))
    args = ["train", "--model", tiny_bert_dir, "--dataset", str(sentiment_csv), "--output-dir", str(tmp_path / "run"),
            "--report-to", "tensorboard", "--quiet"]
    assert main(args) == 2
    assert capsys.readouterr().err == ("siftune train: error: report_to tensorboard needs the tensorboard package; "
                                       "pip install siftune[tensorboard]\n")


def test_a_resumed_run_continues_the_tensorboard_log_from_its_checkpoint(tmp_path, tiny_bert_dir, sentiment_csv):
    out = train(tmp_path, tiny_bert_dir, sentiment_csv, "--report-to", "tensorboard", "--checkpoint-every", "3")
    (out / "checkpoints" / "checkpoint-00000006.pt").unlink()  # as if the run had died after step 5
    train(tmp_path, tiny_bert_dir, sentiment_csv, "--report-to", "tensorboard", "--checkpoint-every", "3", "--resume")
    logged = scalars(out / "tensorboard")
    assert [step for step, _ in logged["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in logged["train/loss"]] == pytest.approx(
        json.loads((out / "metrics.json").read_text())["losses"])
    assert [step for step, _ in logged["eval/accuracy"]] == [0, 6]


def test_the_commands_hide_the_optional_packages_import_noise_and_only_that():
    code = ("import logging; from siftune.cli import _quiet_imports; _quiet_imports(); "
            "import peft, transformers; transformers.Trainer; "
            "logging.getLogger('torchao').warning('a real torchao warning')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Failed to load" not in done.stderr and "Enum subclass" not in done.stderr, done.stderr
    assert "a real torchao warning" in done.stderr


def test_no_help_text_states_its_default_twice():
    import argparse

    from siftune.cli import build_parser

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from parsers(child)

    def shown(action):  # the help as --help prints it
        return action.help % {"default": action.default} if "%(default)" in action.help else action.help

    twice = [(p.prog, a.dest) for p in parsers(build_parser()) for a in p._actions
             if a.help and shown(a).count("(default") > 1]
    assert twice == []


def test_default_lr_for_the_top_k_falls_as_density_to_the_0_6_from_2_5e3_at_1_percent_under_a_cap():
    from siftune.recipes.train import default_lr

    def top_k(density):
        return default_lr(density, "gradient", step_scale=None)

    assert top_k(0.01) == pytest.approx(2.5e-3)
    assert top_k(0.1) == pytest.approx(2.5e-3 * 0.1 ** 0.6)  # 6.3e-4, where the sweep chose 8e-4 on (b)
    assert top_k(0.001) == pytest.approx(2.5e-3 * 10 ** 0.6)  # 1e-2, where the sweep chose 8e-3 on both tasks
    assert top_k(0.0001) == pytest.approx(3.2e-2)  # the cap: (a) falls to the majority class at 6.4e-2
    assert top_k(1e-6) == pytest.approx(3.2e-2)
    assert top_k(1.0) < top_k(0.5) < top_k(0.1)  # no floor: denser trains slower


def test_default_lr_for_the_default_selection_is_random_components_rule():
    from siftune.recipes.train import default_lr

    for density in (0.1, 0.01, 0.001):  # "auto": balanced with scaled steps in mode fixed
        assert default_lr(density) == pytest.approx(default_lr(density, "random")) == pytest.approx(
            1e-2 * (0.01 / density) ** 0.8)
    # whole rows keep plain steps under "auto", and the top-k's rule at twice the rate
    assert default_lr(0.01, "auto", "rows") == pytest.approx(2 * default_lr(0.01, "gradient", step_scale=None))


def test_default_lr_for_random_components_and_balanced_rises_faster_and_is_held_below_0_01_percent():
    from siftune.recipes.train import default_lr

    for density in (0.1, 0.01, 0.001, 0.0001):
        random = default_lr(density, "random")
        assert random == pytest.approx(1e-2 * (0.01 / density) ** 0.8)  # 0.01%: 0.4, where (b) chose 0.512
        assert default_lr(density, "balanced") == pytest.approx(random)  # its fit over 15 grids
        top_k = default_lr(density, "gradient", step_scale=None)
        assert default_lr(density, "gradient", "rows", None) == pytest.approx(2 * top_k)
        assert default_lr(density, "random", "rows", None) == pytest.approx(random)  # the selection's rule
        assert default_lr(density, "mixed", step_scale=None) == default_lr(density, "grow_drop", step_scale=None) \
            == top_k
        assert default_lr(density, "gradient", "columns", None) == top_k
    assert default_lr(1e-6, "random") == default_lr(1e-4, "random")  # below the sweep's lowest density: held
    for selection in ("gradient", "balanced", "mixed"):  # scaled steps: random components' rule for every selection
        assert default_lr(0.023, selection, step_scale="input") == pytest.approx(default_lr(0.023, "random"))
    assert default_lr(0.023, "gradient", "rows", "input") == pytest.approx(default_lr(0.023, "random"))
    assert default_lr(0.001, select_from=True) == pytest.approx(0.5 * default_lr(0.001))  # both grids chose half
    with pytest.raises(siftune.ConfigError, match="density must be in"):
        default_lr(0.0)


def run_without_lr(tmp_path, model_dir, dataset, *extra):
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--dataset", str(dataset), "--output-dir", str(out),
                 "--steps", "2", "--batch-size", "8", "--max-length", "16", "--eval-size", "16",
                 "--warmup-steps", "1", "--density", "0.002", *extra]) == 0
    return out


def test_train_without_lr_trains_at_the_density_rules_rate_and_records_where_it_came_from(
        tmp_path, tiny_bert_dir, sentiment_csv, capsys):
    from siftune.recipes.train import default_lr

    out = run_without_lr(tmp_path, tiny_bert_dir, sentiment_csv, "--report-to", "tensorboard")
    rate = default_lr(0.002)
    assert rate == pytest.approx(1e-2 * 5 ** 0.8)  # the default selection: balanced with scaled steps
    printed = capsys.readouterr().out
    assert "selection balanced (line_cap 1), steps scaled by input\n" in printed
    assert (f"learning rate {rate:.3g} (by density 0.002 and selection balanced, scaled: "
            "default_lr(density, selection, structure, step_scale, select_from)), dense modules 0.004" in printed)
    assert scalars(out / "tensorboard")["train/learning_rate"][0] == (1, pytest.approx(rate))  # the warm-up's peak
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["lr"] == pytest.approx(rate)
    assert metrics["lr_from"] == "default_lr(density, selection, structure, step_scale, select_from)"
    increment = SparseIncrement.load(out)
    assert increment.metadata["lr"] == pytest.approx(rate) and increment.metadata["lr_from"] == (
        "default_lr(density, selection, structure, step_scale, select_from)")
    assert increment.metadata["dense_lr"] == pytest.approx(4e-3)  # the head at the sweep's head rate, not the rule's


def test_train_without_lr_trains_random_components_at_their_own_rules_rate(tmp_path, tiny_bert_dir, sentiment_csv,
                                                                            capsys):
    from siftune.recipes.train import default_lr

    out = run_without_lr(tmp_path, tiny_bert_dir, sentiment_csv, "--selection", "random", "--step-scale", "none")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["lr"] == pytest.approx(default_lr(0.002, "random")) == pytest.approx(1e-2 * 5 ** 0.8)
    assert "(by density 0.002 and selection random: " in capsys.readouterr().out
    out = run_without_lr(tmp_path / "top-k", tiny_bert_dir, sentiment_csv, "--selection", "gradient",
                         "--step-scale", "none")
    assert json.loads((out / "metrics.json").read_text())["args"]["lr"] == pytest.approx(2.5e-3 * 5 ** 0.6)
    assert "selection gradient\n" in capsys.readouterr().out


def test_a_given_lr_is_the_dense_modules_rate_unless_dense_lr_is_given(tmp_path, tiny_bert_dir, sentiment_csv):
    out = run_without_lr(tmp_path, tiny_bert_dir, sentiment_csv, "--lr", "0.0005")
    assert SparseIncrement.load(out).metadata["dense_lr"] == 0.0005
    out = run_without_lr(tmp_path / "b", tiny_bert_dir, sentiment_csv, "--dense-lr", "0.0003")
    assert SparseIncrement.load(out).metadata["dense_lr"] == 0.0003


def test_an_lr_flag_wins_over_the_density_rule(tmp_path, tiny_bert_dir, sentiment_csv, capsys):
    out = run_without_lr(tmp_path, tiny_bert_dir, sentiment_csv, "--lr", "0.0005")
    assert "learning rate 0.0005\n" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["lr"] == 0.0005 and metrics["lr_from"] == "given"
    assert SparseIncrement.load(out).metadata["lr_from"] == "given"


def test_an_lr_in_the_yaml_wins_over_the_density_rule_and_a_flag_over_both(tmp_path, tiny_bert_dir, sentiment_csv):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.0005\n")
    out = run_without_lr(tmp_path, tiny_bert_dir, sentiment_csv, "--config", str(config), "--quiet")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["args"]["lr"] == 0.0005 and metrics["lr_from"] == "given"
    out = run_without_lr(tmp_path, tiny_bert_dir, sentiment_csv, "--config", str(config), "--lr", "0.003",
                         "--quiet")
    assert json.loads((out / "metrics.json").read_text())["args"]["lr"] == 0.003


def test_train_args_sift_fields_are_sift_configs_with_its_defaults():
    from siftune.recipes.train import SIFT_FIELDS, TrainArgs

    config, args = SiftConfig(), TrainArgs()
    for name in (*SIFT_FIELDS, "storage"):
        assert getattr(args, name) == getattr(config, name), name
    shared = {f.name for f in dataclasses.fields(TrainArgs)} & {f.name for f in dataclasses.fields(SiftConfig)}
    # the fields sift_config() sets from elsewhere: quantize, the default head, 0 meaning no clipping
    assert shared - {"storage", "target_modules", "dense_modules", "max_grad_norm", "seed"} == set(SIFT_FIELDS)
    assert TrainArgs(structure="rows", selection="random").sift_config().structure == "rows"


def test_select_first_makes_the_window_before_training_so_the_first_step_trains_the_selection(
        tmp_path, tiny_bert_dir, sentiment_csv, capsys):
    within = train(tmp_path / "within", tiny_bert_dir, sentiment_csv, "--selection-batches", "3", "--steps", "1")
    # A window of three micro-batches is not complete after one step: no targeted tensor trained yet.
    assert not SparseIncrement.load(within).tensors
    first = train(tmp_path / "first", tiny_bert_dir, sentiment_csv, "--selection-batches", "3", "--steps", "1",
                  "--select-first", "--score", "grad_snr")
    assert "selected from 3 micro-batches of 8 before training" in capsys.readouterr().out
    tensors = SparseIncrement.load(first).tensors
    assert tensors and all(float(delta.values.abs().max()) > 0 for delta in tensors.values())


def test_signal_to_noise_score_without_a_window_is_refused_before_loading_anything(tmp_path, capsys):
    assert main(["train", "--score", "grad_snr", "--output-dir", str(tmp_path / "x")]) == 2
    assert "selection_batches to 2 or more" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_select_first_refuses_per_step_mode_before_loading_anything(tmp_path, capsys):
    assert main(["train", "--mode", "per_step", "--select-first", "--output-dir", str(tmp_path / "x")]) == 2
    assert "select_first makes one selection before training; mode per_step" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
