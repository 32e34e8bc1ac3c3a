"""Tests of siftune bench: quick runs end to end, the records they write, the report built from them."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from siftune.bench.runner import merge_records, parse_method, plan, run_bench
from siftune.bench.methods import lora_count, resolve_density
from siftune.bench.report import (README_END, README_START, chosen_on_validation, markdown_table, summarise,
                                  validation_table, write_report)
from siftune.cli import main
from siftune.core import heap
from siftune.errors import ConfigError

REQUIRED = ("method", "trainable", "metric", "value", "step_s", "peak_mib", "load_mib", "increment_bytes", "steps",
            "seed", "machine", "versions", "command", "lr", "dense_lr")


@pytest.fixture
def reviews_csv(tmp_path):
    rows = [f"{'a fine warm film' if i % 2 else 'a dull cold mess'} {i},{'fresh' if i % 2 else 'rotten'}"
            for i in range(60)]
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return str(path)


@pytest.fixture
def chats_jsonl(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"hi {i}", "response": f"hello there {i}"}) + "\n"
                            for i in range(40)))
    return str(path)


def test_quick_cli_run_writes_one_complete_record_per_method(tmp_path, tiny_bert_dir, reviews_csv):
    # Two methods, one from peft: each run is its own process, which is what costs time here.
    code = main(["bench", "--task", "classification", "--quick", "--methods", "lora", "sift-fixed",
                 "--model", tiny_bert_dir, "--dataset", reviews_csv, "--eval-size", "16",
                 "--results-dir", str(tmp_path / "results")])
    assert code == 0
    records = json.loads((tmp_path / "results" / "classification.json").read_text())
    by_method = {r["method"]: r for r in records}
    assert sorted(by_method) == ["lora", "sift-fixed"]
    for r in records:
        assert all(r[key] is not None for key in REQUIRED), r
        assert r["steps"] == 3 and r["seed"] == 0 and r["eval_examples"] == 16
        assert 0.0 <= r["value"] <= 1.0 and r["metric"] == "accuracy"
        assert r["peak_mib"] >= r["load_mib"] > 0  # each run's own process
        assert "--quick" in r["command"] and f"--methods {r['method']}" in r["command"]
        assert r["heap_trim"] is heap.enabled()  # peaks compare only at the same setting
    lora, sift = by_method["lora"], by_method["sift-fixed"]
    assert lora["rank"] == 8 and lora["density"] is None
    # The "matched" density gives LoRA r=8's count, up to per-tensor rounding.
    assert abs(sift["trainable"] - lora["trainable"]) <= 12
    assert sift["trainable_head"] == lora["trainable_head"] > 0
    table = (tmp_path / "results" / "README.md").read_text()
    assert "| sift-fixed |" in table and "| lora | r=8 |" in table


def test_full_fine_tuning_trains_and_saves_every_parameter(tmp_path, tiny_bert, tiny_bert_dir, reviews_csv):
    (full,) = run_bench(plan("classification", ["full"], [0], quick=True, model=tiny_bert_dir, dataset=reviews_csv,
                             eval_size=16), tmp_path, isolate=False, log=lambda _: None)
    assert full["trainable"] == sum(p.numel() for p in tiny_bert.parameters())
    assert full["increment_bytes"] == 4 * full["trainable"]  # fp32 weights, all of them


def test_causal_quick_runs_report_response_loss_and_untrained_base(tmp_path, tiny_llama_dir, chats_jsonl):
    runs = plan("causal_lm", ["base", "sift-fixed:0.05"], [3], quick=True, model=tiny_llama_dir,
                dataset=chats_jsonl, eval_size=8)
    records = run_bench(runs, tmp_path, isolate=False, log=lambda _: None)
    base, sift = records
    assert base["steps"] == 0 and base["trainable"] == 0 and base["step_s"] is None
    assert sift["steps"] == 3 and sift["seed"] == 3 and sift["density"] == pytest.approx(0.05, rel=0.05)
    for r in records:
        assert r["metric"] == "loss" and r["perplexity"] == pytest.approx(math.exp(r["value"]))
    # Only the response tokens count, the same ones for every method.
    assert base["eval_tokens"] == sift["eval_tokens"] > 0
    assert json.loads((tmp_path / "causal_lm.json").read_text()) == records


def test_select_first_selects_on_batches_of_its_own_and_then_trains_every_step(tmp_path, tiny_llama_dir,
                                                                             chats_jsonl):
    runs = plan("causal_lm", ["sift-fixed:0.05"], [0], quick=True, model=tiny_llama_dir, dataset=chats_jsonl,
                eval_size=8, sift=["score=grad_squared", "selection_batches=3", "select_first=1"])
    later = plan("causal_lm", ["sift-fixed:0.05"], [0], quick=True, model=tiny_llama_dir, dataset=chats_jsonl,
                 eval_size=8, sift=["score=grad_squared", "selection_batches=3"])
    first, within = run_bench(runs + later, tmp_path, isolate=False, log=lambda _: None)
    assert first["sift"]["select_first"] == 1 and "select_first" not in within["sift"]
    assert first["steps"] == within["steps"] == 3
    # Selected within the first steps, the window's two first steps train nothing targeted: the losses part.
    assert first["value"] != within["value"]
    assert len(json.loads((tmp_path / "causal_lm.json").read_text())) == 2  # two experiments, two records


def test_paired_timing_steps_every_method_in_turns(tmp_path, tiny_bert_dir, reviews_csv, capsys):
    code = main(["bench", "--task", "classification", "--quick", "--methods", "full", "sift-fixed:0.1",
                 "--model", tiny_bert_dir, "--dataset", reviews_csv, "--paired-steps", "2",
                 "--results-dir", str(tmp_path)])
    assert code == 0
    (entry,) = json.loads((tmp_path / "classification_paired_timing.json").read_text())
    assert sorted(entry["step_s"]) == ["full", "sift-fixed:0.1"] and min(entry["step_s"].values()) > 0
    assert entry["trainable"]["sift-fixed:0.1"] < entry["trainable"]["full"]
    assert entry["steps"] == 2 and "--paired-steps 2" in entry["command"]
    rounds = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  round ")]
    assert len(rounds) == 3 and rounds[0].startswith("  round selects") and rounds[2].startswith("  round 2/2: full ")


def test_matched_density_is_lora_r8_count_over_targeted_components(minilm_path):
    from siftune.recipes.models import load_model

    model, _ = load_model(minilm_path, "classification", num_labels=2)
    # 6 layers x (4 x 8 (384 + 384) + 2 x 8 (384 + 1536)) and 6 x (4 x 384^2 + 2 x 384 x 1536).
    assert lora_count(model, "classification", 8) == 331_776
    assert resolve_density(model, "classification", "matched") == pytest.approx(331_776 / 10_616_832)
    assert resolve_density(model, "classification", 0.001) == 0.001


def test_method_tokens():
    assert parse_method("lora") == ("lora", 8)
    assert parse_method("shira:16") == ("shira", 16)
    assert parse_method("sift-fixed") == ("sift-fixed", "matched")
    assert parse_method("random:0.001") == ("random", 0.001)
    assert parse_method("full") == ("full", None)
    for bad in ("lora:0.5", "sift-fixed:2", "full:8", "adapter"):
        with pytest.raises(ConfigError):
            parse_method(bad)


def test_every_method_of_a_plan_gets_the_same_data_steps_and_seed():
    runs = plan("classification", ["full", "lora", "sift-fixed:0.001"], [0, 1], lr=["lora=1e-3"])
    assert {(r.steps, r.batch_size, r.max_length, r.eval_size) for r in runs} == {(300, 16, 64, 2000)}
    assert [r.seed for r in runs] == [0, 1, 0, 1, 0, 1]
    assert [r.lr for r in runs] == [5e-5, 5e-5, 1e-3, 1e-3, 2e-3, 2e-3]


def _record(method="sift-fixed", seed=0, value=0.8, lr=2e-3, **extra):
    record = {"task": "classification", "method": method, "setting": "matched", "density": 0.03125, "rank": None,
              "trainable": 332_546, "trainable_head": 770, "metric": "accuracy", "value": value, "step_s": 0.5,
              "peak_mib": 900.0, "load_mib": 700.0, "increment_bytes": 2_657_288, "steps": 300, "seed": seed,
              "lr": lr, "dense_lr": lr, "batch_size": 16, "max_length": 64, "majority_accuracy": 0.574}
    return {**record, **extra}


def test_records_of_the_same_experiment_and_seed_are_replaced_others_kept(tmp_path):
    path = tmp_path / "classification.json"
    merge_records(path, [_record(seed=0, value=0.5), _record(seed=1)])
    merge_records(path, [_record(seed=0, value=0.9), _record(seed=0, lr=1e-3)])
    records = json.loads(path.read_text())
    assert sorted((r["seed"], r["lr"], r["value"]) for r in records) == [(0, 1e-3, 0.8), (0, 2e-3, 0.9),
                                                                       (1, 2e-3, 0.8)]


def test_report_gives_mean_and_spread_over_seeds_and_fills_the_readme(tmp_path):
    records = [_record(seed=s, value=v) for s, v in enumerate([0.80, 0.82, 0.84])]
    records.append(_record(method="full", setting="", density=None, seed=0, value=0.81, lr=5e-5))
    rows = summarise(records)
    assert [row["method"] for row in rows] == ["full", "sift-fixed"]
    assert rows[1]["mean"] == pytest.approx(0.82) and rows[1]["sd"] == pytest.approx(0.02)
    table = markdown_table("classification", rows)
    assert "82.00 ± 2.00" in table and "| 0,1,2 |" in table and "3.125% (LoRA r=8 count)" in table
    (tmp_path / "classification.json").write_text(json.dumps(records))
    readme = tmp_path / "project" / "README.md"
    readme.parent.mkdir()
    readme.write_text(f"# x\n\n## Benchmarks\n{README_START}\nold\n{README_END}\n\nafter\n")
    written = write_report(tmp_path, readme=readme, figure_dir=tmp_path / "figures")
    text = readme.read_text()
    assert "old" not in text and "82.00 ± 2.00" in text and text.endswith(f"{README_END}\n\nafter\n")
    assert (tmp_path / "figures" / "bench_quality_vs_trainable.png").stat().st_size > 0
    assert len(written) == 3


def test_no_method_trains_what_it_should_not(tiny_bert):
    from siftune.bench.methods import MethodRun, prepare

    before = {n: p.detach().clone() for n, p in tiny_bert.named_parameters()}
    prepared = prepare(tiny_bert, MethodRun("head", "classification", None, 1e-2, 1e-2, 0))
    tiny_bert(input_ids=torch.randint(0, 100, (2, 8)), labels=torch.tensor([0, 1])).loss.backward()
    prepared.optimizer.step()
    changed = {n for n, p in tiny_bert.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"classifier.weight", "classifier.bias"}
    assert prepared.trainable == prepared.head == 32 * 2 + 2


@pytest.mark.parametrize("method", ["random-rows", "sift-rows"])
def test_random_rows_train_whole_rows_drawn_at_random_and_the_top_rows_by_score(method):
    import copy

    from siftune.bench.methods import MethodRun, prepare
    from _models import tiny_bert_classifier

    def changed_rows(seed):
        model = tiny_bert_classifier()
        before = copy.deepcopy(model)
        prepared = prepare(model, MethodRun(method, "classification", "0.25", 1e-2, 1e-2, seed))
        model(input_ids=torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0)),
              labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        prepared.optimizer.step()
        name = "bert.encoder.layer.0.attention.self.query.weight"
        moved = dict(model.named_parameters())[name] != dict(before.named_parameters())[name]
        rows = moved.any(dim=1)
        assert torch.equal(moved[rows], torch.ones_like(moved[rows]))  # whole rows, nothing outside them
        return rows.nonzero().squeeze(1).tolist()

    first, other_seed = changed_rows(0), changed_rows(1)
    assert len(first) == len(other_seed) > 0
    # the gradient's rows do not depend on the seed; random rows are drawn from it
    assert (first != other_seed) == (method == "random-rows")


def test_gpu_bench_script_runs_peers_and_siftune_on_a_cpu_and_writes_records(tmp_path):
    # The GPU benchmark's plumbing, at the tiny shape on this CPU (each method is a process).
    out = tmp_path / "gpu.json"
    script = Path(__file__).parents[1] / "bench" / "gpu.py"
    done = subprocess.run([sys.executable, str(script), "--methods", "frozen", "sift-5-lean", "--size", "tiny",
                           "--seq", "32", "--steps", "1", "--warmup", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads(out.read_text())
    assert [r["method"] for r in records] == ["frozen", "sift-5-lean"] and not any("error" in r for r in records)
    lean = records[1]
    assert lean["device"] == "cpu" and lean["step_s_median"] > 0 and lean["loss_last"] < lean["loss_first"]
    assert 6 <= lean["state_bytes_per_component"] < 6.01  # packed indices 2 B + bf16 moments 4 B


def test_validation_split_comes_from_the_training_pool_and_each_record_holds_its_score(tmp_path, tiny_bert_dir,
                                                                                         reviews_csv):
    code = main(["bench", "--task", "classification", "--quick", "--methods", "sift-fixed", "--model", tiny_bert_dir,
                 "--dataset", reviews_csv, "--eval-size", "16", "--val-size", "12", "--in-process",
                 "--results-dir", str(tmp_path)])
    assert code == 0
    record = json.loads((tmp_path / "classification.json").read_text())[0]
    assert record["val_examples"] == 12 and record["eval_examples"] == 16
    assert 0.0 <= record["val_value"] <= 1.0
    assert "--val-size 12" in record["command"]


def test_lr_grid_runs_every_method_at_each_factor_of_its_rate():
    runs = plan("classification", ["full", "sift-fixed:0.001"], [0], lr_grid=[0.5, 1, 2])
    assert [(r.method, r.lr) for r in runs] == [("full", 2.5e-5), ("full", 5e-5), ("full", 1e-4),
                                                ("sift-fixed", 1e-3), ("sift-fixed", 2e-3), ("sift-fixed", 4e-3)]
    assert {r.val_size for r in runs} == {1000}


def test_sift_options_reach_the_sift_methods_only_and_repeat_in_the_command():
    runs = plan("classification", ["lora", "sift-fixed"], [0], sift=["budget=global", "selection_batches=4"])
    lora, sift = runs
    assert lora.sift == {} and sift.sift == {"budget": "global", "selection_batches": 4}
    assert "--sift budget=global selection_batches=4" in sift.command()


@pytest.mark.parametrize("option, message", [("density=0.1", "the method and its setting choose density"),
                                             ("budget=layer", "budget must be one of"), ("budget", "field=value"),
                                             ("select_first=2", "select_first=1 completes")])
def test_bad_sift_options_are_config_errors(option, message):
    with pytest.raises(ConfigError, match=message):
        plan("classification", ["sift-fixed"], [0], sift=[option])


def test_report_chooses_each_rate_on_validation_and_shows_test_for_the_chosen_rate_only():
    records = [_record(lr=1e-3, value=0.70, val_value=0.81, val_examples=1000),
               _record(lr=2e-3, value=0.95, val_value=0.80, val_examples=1000),
               _record(lr=2e-3, seed=1, value=0.90, val_value=0.99, val_examples=1000)]
    table = validation_table("classification", summarise(records))
    # Seed 1 ran only at 2e-3: the choice compares seed 0, where 1e-3 is better.
    assert "| 0.001 | 0 | 70.00 |" in table
    assert "95.00" not in table and "92.50" not in table
    # A tie goes to the lower rate, whichever ran first (bench/sweep_records.py's rule too).
    tied = [_record(lr=4e-3, value=0.60, val_value=0.81, val_examples=1000), records[0]]
    assert "| 0.001 | 0 | 70.00 |" in validation_table("classification", summarise(tied))
    # A run that diverged (a loss of NaN) is never the chosen one, wherever it stands in the records.
    losses = [_record(lr=lr, metric="loss", value=v, val_value=v, val_examples=200)
              for lr, v in ((5e-4, float("nan")), (2e-3, 1.2), (1e-3, 1.1))]  # rows go by rate: NaN first
    for order in (losses, losses[::-1]):
        (_, chosen, _), = chosen_on_validation(summarise(order))
        assert chosen["lr"] == 1e-3


def test_report_draws_each_rate_grid_beside_its_tables(tmp_path):
    records = [_record(lr=1e-3, value=0.70, val_value=0.81, val_examples=1000),
               _record(lr=2e-3, value=0.95, val_value=0.80, val_examples=1000),
               _record(method="lora", setting=8, rank=8, density=None, lr=1e-3, val_value=0.7, val_examples=1000)]
    (tmp_path / "classification.json").write_text(json.dumps(records))
    written = write_report(tmp_path)
    assert tmp_path / "rate_grid.png" in written and (tmp_path / "rate_grid.png").stat().st_size > 0
    assert "![validation score against learning rate](rate_grid.png)" in (tmp_path / "README.md").read_text()
    # One rate only (LoRA here) is a choice without a grid: no figure then.
    (tmp_path / "classification.json").write_text(json.dumps(records[2:]))
    (tmp_path / "rate_grid.png").unlink()
    assert tmp_path / "rate_grid.png" not in write_report(tmp_path)
    assert not (tmp_path / "rate_grid.png").exists() and "rate_grid" not in (tmp_path / "README.md").read_text()


def test_sweep_records_find_cells_and_the_best_rate(tmp_path):
    """bench/sweep.sh skips a cell whose record is there and runs seeds at seed 0's best validation rate."""
    script = Path(__file__).resolve().parents[1] / "bench" / "sweep_records.py"
    base = {"method": "sift-fixed", "setting": "matched", "steps": 40, "metric": "loss", "val_examples": 200}
    records = [{**base, "seed": 0, "lr": 1.6e-3, "val_value": 1.11, "sift": {"score": "grad_weight"}},
               {**base, "seed": 0, "lr": 3.2e-3, "val_value": 1.13, "sift": {"score": "grad_weight"}},
               {**base, "seed": 0, "lr": 6.4e-3, "val_value": 1.08,
                "sift": {"score": "grad_weight", "selection": "balanced"}},
               {**base, "seed": 1, "lr": 6.4e-3, "val_value": 1.00, "sift": {"score": "grad_weight"},
                "val_examples": 0}]  # no validation: not a sweep record
    (tmp_path / "causal_lm.json").write_text(json.dumps(records))

    def run(*args):
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)

    folder = str(tmp_path)
    assert run("have", folder, "causal_lm", "40", "0", "sift-fixed", "0.0016").returncode == 0
    assert run("have", folder, "causal_lm", "40", "0", "sift-fixed", "0.0064").returncode == 1  # other options
    assert run("have", folder, "causal_lm", "40", "0", "sift-fixed", "0.0064", "selection=balanced").returncode == 0
    assert run("have", folder, "causal_lm", "40", "1", "sift-fixed", "0.0064").returncode == 1
    assert run("have", folder, "causal_lm", "160", "0", "sift-fixed", "0.0016").returncode == 1
    assert run("best", folder, "causal_lm", "40", "sift-fixed").stdout.strip() == "0.0016"  # lowest loss
    assert run("best", folder, "causal_lm", "40", "sift-fixed", "selection=balanced").stdout.strip() == "0.0064"
    assert run("best", folder, "causal_lm", "40", "random").stdout.strip() == ""
    # A diverged run (NaN, which JSON writes as NaN) ranks last, whichever comes first.
    diverged = {**records[0], "lr": 1e-4, "val_value": float("nan")}
    (tmp_path / "causal_lm.json").write_text(json.dumps([diverged, *records]))
    assert run("best", folder, "causal_lm", "40", "sift-fixed").stdout.strip() == "0.0016"
    (tmp_path / "causal_lm.json").write_text(json.dumps(records))
    # A tie goes to the lower rate, whichever ran first, as in the report.
    tied = {**base, "seed": 0, "val_value": 1.05, "sift": {"score": "grad_weight", "line_cap": 1}}
    (tmp_path / "causal_lm.json").write_text(json.dumps([{**tied, "lr": 3.2e-2}, {**tied, "lr": 1.6e-2}]))
    assert run("best", folder, "causal_lm", "40", "sift-fixed", "line_cap=1").stdout.strip() == "0.016"
    # The best at the grid's lower edge (a tie): one rate below it; inside: none; a single rate: none.
    assert run("beyond", folder, "causal_lm", "40", "sift-fixed", "line_cap=1").stdout.strip() == "0.008"
    (tmp_path / "causal_lm.json").write_text(json.dumps(records))
    assert run("beyond", folder, "causal_lm", "40", "sift-fixed").stdout.strip() == "0.0008"
    (tmp_path / "causal_lm.json").write_text(json.dumps([*records, {**records[0], "lr": 8e-4, "val_value": 1.2}]))
    assert run("beyond", folder, "causal_lm", "40", "sift-fixed").stdout.strip() == ""
    assert run("beyond", folder, "causal_lm", "40", "sift-fixed", "selection=balanced").stdout.strip() == ""
    (tmp_path / "causal_lm.json").write_text(json.dumps([*records, {**records[0], "lr": 6.4e-3, "val_value": 1.0}]))
    assert run("beyond", folder, "causal_lm", "40", "sift-fixed").stdout.strip() == "0.0128"  # at the upper edge
    # The head's rate: without dense_lr= a cell is the one at the task's default head rate (2e-3 for SIFT on (a)).
    head = {**base, "metric": "accuracy", "steps": 300, "seed": 0, "lr": 3.2e-2, "sift": {"score": "grad_weight"}}
    (tmp_path / "classification.json").write_text(json.dumps([{**head, "dense_lr": 8e-3, "val_value": 0.8},
                                                             {**head, "lr": 1.6e-2, "dense_lr": 2e-3, "val_value": 0.7}]))
    assert run("have", folder, "classification", "300", "0", "sift-fixed", "0.032").returncode == 1
    assert run("have", folder, "classification", "300", "0", "sift-fixed", "0.032", "dense_lr=8e-3").returncode == 0
    assert run("have", folder, "classification", "300", "0", "sift-fixed", "0.016", "dense_lr=8e-3").returncode == 1
    assert run("best", folder, "classification", "300", "sift-fixed").stdout.strip() == "0.016"
    # The best head rate at a rate, whatever the head: 8e-3 at 3.2e-2; none ran at 6.4e-2.
    assert run("best-head", folder, "classification", "300", "sift-fixed", "0.032").stdout.strip() == "0.008"
    assert run("best-head", folder, "classification", "300", "sift-fixed", "0.064").stdout.strip() == ""


def test_rate_rule_scores_the_default_rate_at_the_nearest_rate_run(tmp_path):
    """bench/rate_rule.py takes siftune train's default rate to the nearest rate that ran and reports how far its
    validation falls short of the grid's best."""
    from siftune.recipes.train import default_lr

    script = Path(__file__).resolve().parents[1] / "bench" / "rate_rule.py"
    rule = default_lr(0.01, "gradient", step_scale=None)  # the top-k's rate at 1%, plain steps
    base = {"method": "sift-fixed", "setting": "0.01", "density": 0.01, "steps": 40, "metric": "loss",
            "val_examples": 200, "seed": 0, "sift": {"score": "grad_weight"}}
    default = {**base, "sift": {"score": "grad_weight", "selection": "balanced", "line_cap": 1,
                                "step_scale": "input"}}  # SiftConfig's default: its own (random's) rule
    records = [{**base, "lr": rule * 1.1, "val_value": 1.20}, {**base, "lr": rule * 4, "val_value": 1.10},
               {**base, "lr": rule * 4, "val_value": 0.5, "seed": 1},  # another seed: not the grid's
               {**base, "method": "random", "lr": default_lr(0.01, "random") / 3, "val_value": 1.0},
               {**base, "method": "random", "lr": default_lr(0.01, "random"), "val_value": 1.05},
               {**default, "lr": default_lr(0.01), "val_value": 1.0}, {**default, "lr": rule, "val_value": 1.03},
               {**default, "lr": rule, "val_value": 0.9, "dense_lr": 1e-3}]  # another head's rate: not the grid's
    (tmp_path / "causal_lm.json").write_text(json.dumps(records))
    out = subprocess.run([sys.executable, str(script), "--results-dir", str(tmp_path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert "|g w|: mean shortfall 10.00, worst 10.0 over 1 grids" in out.stdout  # (1.20 - 1.10) x 100
    assert "random components: mean shortfall 5.00, worst 5.0 over 1 grids" in out.stdout
    assert "balanced, line_cap=1, scaled steps (SiftConfig's default): mean shortfall 0.00, worst 0.0" in out.stdout
    empty = subprocess.run([sys.executable, str(script), "--results-dir", str(tmp_path / "none")],
                           capture_output=True, text=True)
    assert empty.returncode == 1 and "no sweep records" in empty.stderr


def test_sweep_figures_keep_a_longer_run_apart(tmp_path):
    """A 160-step check of (b) gets its own table in summary.md, not a place among the 40-step rates."""
    script = Path(__file__).resolve().parents[1] / "bench" / "sweep_figures.py"
    records = json.loads((Path(__file__).resolve().parents[1] / "bench/results/sweep/causal_lm.json").read_text())
    lora = [r for r in records if r["method"] == "lora" and r["steps"] == 40 and r["seed"] == 0]
    best = min(lora, key=lambda r: r["val_value"])
    longer = {**best, "steps": 160, "lr": 1e-4, "dense_lr": 1e-4, "val_value": best["val_value"] - 0.5,
              "value": 0.321}
    (tmp_path / "causal_lm.json").write_text(json.dumps(lora + [longer]))
    out = subprocess.run([sys.executable, str(script), "--results-dir", str(tmp_path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "summary.md").read_text()
    main_table, _, longer_table = text.partition("160 steps")
    assert f"| {best['lr']:g} |" in main_table and "0.321" not in main_table  # the 40-step choice stands
    assert "| 0.0001 | " in longer_table and "0.321 (0)" in longer_table
    assert (tmp_path / "causal_lm_quality_vs_trainable.png").is_file()
    # LoRA r=8 ran at several rates: its test quality off the chosen rate gets a figure of its own.
    assert (tmp_path / "causal_lm_rate_forgiveness.png").is_file() and "causal_lm_rate_forgiveness.png" in text
    # ... and, a headline method, a row among the methods off their rate, with the most it loses off it.
    assert (tmp_path / "causal_lm_off_rate.png").is_file() and "causal_lm_off_rate.png" in text
    r8 = min((r for r in lora if r["setting"] == 8), key=lambda r: r["val_value"])  # seed 0's chosen rate of r=8
    quarter = next(r for r in lora if r["setting"] == 8 and abs(r["lr"] - r8["lr"] / 4) < 1e-12 * r8["lr"])
    off_rate = main_table.partition("off the chosen rate (seed 0)")[2]
    row = next(line for line in off_rate.splitlines() if line.startswith("| LoRA | r=8 |"))
    assert f"| {quarter['value']:.3f} | {r8['value']:.3f} |" in row


def test_sweep_figures_rank_a_diverged_run_last_and_say_so(tmp_path):
    """A rate whose loss is NaN is never chosen, and off the chosen rate it reads "diverged"."""
    script = Path(__file__).resolve().parents[1] / "bench" / "sweep_figures.py"
    base = {"method": "random", "setting": "0.001", "density": 0.001, "rank": None, "trainable": 12148,
            "trainable_head": 0, "metric": "loss", "steps": 40, "batch_size": 8, "max_length": 128,
            "val_examples": 200, "sift": {}, "seed": 0, "step_s": 0.5, "peak_mib": 800.0, "load_mib": 700.0,
            "increment_bytes": 1000, "perplexity": 3.0}
    records = [{**base, "lr": lr, "dense_lr": lr, "val_value": v, "value": v} for lr, v in
               ((0.008, float("nan")), (0.032, 1.2), (0.128, float("nan")))]
    (tmp_path / "causal_lm.json").write_text(json.dumps(records))
    out = subprocess.run([sys.executable, str(script), "--results-dir", str(tmp_path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "summary.md").read_text()
    assert "| 0.032 | 1.200 (0) | 1.200 (0) | diverged (0) | diverged (0) |" in text
    assert "| random components | 0.10% | 0.032 | diverged | 1.200 | diverged | all |" in text



def test_sweep_figures_name_a_head_rate_off_the_default(tmp_path):
    """Where a grid also varied the head's rate, the rates tried and the chosen one name it; off the chosen rate
    the head stays at the chosen head rate where the grid ran other rates with it, else at the default."""
    script = Path(__file__).resolve().parents[1] / "bench" / "sweep_figures.py"
    base = {"method": "sift-fixed", "setting": "0.001", "density": 0.001, "rank": None, "trainable": 12148,
            "trainable_head": 770, "metric": "accuracy", "steps": 300, "batch_size": 16, "max_length": 64,
            "val_examples": 1000, "sift": {"score": "grad_weight"}, "seed": 0, "step_s": 0.5, "peak_mib": 800.0,
            "load_mib": 700.0, "increment_bytes": 1000}

    def row(records):
        (tmp_path / "classification.json").write_text(json.dumps(records))
        out = subprocess.run([sys.executable, str(script), "--results-dir", str(tmp_path)], capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr
        lines = (tmp_path / "summary.md").read_text().splitlines()
        return next(line for line in lines if "0.1" in line and "SIFT" in line)

    default = [{**base, "lr": 8e-3, "dense_lr": 2e-3, "val_value": 0.77, "value": 0.701},  # the default head rate
               {**base, "lr": 3.2e-2, "dense_lr": 2e-3, "val_value": 0.78, "value": 0.702}]
    # The head's grid ran at the chosen rate only: a quarter of it is scored at the default head rate.
    chosen = {**base, "lr": 3.2e-2, "dense_lr": 8e-3, "val_value": 0.79, "value": 0.703}
    assert "| 0.008, 0.032, 0.032 (head 0.008) | 0.032 (head 0.008) | 79.00 (0) | 70.30 (0) | 70.10 (0) |" in \
        row(default + [chosen])
    # It also ran a quarter of the chosen rate: that cell counts, not the default head's.
    quarter = {**base, "lr": 8e-3, "dense_lr": 8e-3, "val_value": 0.76, "value": 0.690}
    assert "| 0.032 (head 0.008) | 79.00 (0) | 70.30 (0) | 69.00 (0) |" in row(default + [chosen, quarter])


def test_more_seeds_joins_both_folders_at_seed_0s_rate(tmp_path):
    """bench/more_seeds.py takes each method at the rate seed 0's validation chose in the sweep, adds the later
    seeds from their own folder, and gives the difference to random components seed by seed."""
    script = Path(__file__).resolve().parents[1] / "bench" / "more_seeds.py"
    sweep, more = tmp_path / "sweep", tmp_path / "more"
    sweep.mkdir(), more.mkdir()
    base = {"setting": "matched", "steps": 300, "metric": "accuracy", "val_examples": 1000}
    random = {**base, "method": "random", "sift": {}}
    balanced = {**base, "method": "sift-fixed", "sift": {"score": "grad_weight", "selection": "balanced",
                                                         "line_cap": 1}}
    scaled = {**balanced, "sift": {**balanced["sift"], "step_scale": "input"}}
    lora = {**base, "method": "lora", "setting": "8", "sift": None}
    records = [{**random, "seed": 0, "lr": 2e-3, "val_value": 0.80, "value": 0.81},
               {**random, "seed": 0, "lr": 4e-3, "val_value": 0.79, "value": 0.90},  # not chosen
               {**random, "seed": 1, "lr": 2e-3, "val_value": 0.80, "value": 0.82},
               {**balanced, "seed": 0, "lr": 2e-3, "val_value": 0.80, "value": 0.80},
               {**balanced, "seed": 1, "lr": 2e-3, "val_value": 0.80, "value": 0.80},
               {**scaled, "seed": 0, "lr": 2e-3, "val_value": 0.80, "value": 0.80},
               {**lora, "seed": 0, "lr": 1e-3, "val_value": 0.80, "value": 0.80}]
    (sweep / "classification.json").write_text(json.dumps(records))
    (more / "classification.json").write_text(json.dumps(
        [{**random, "seed": 3, "lr": 2e-3, "val_value": 0.8, "value": 0.83},
         {**random, "seed": 4, "lr": 4e-3, "val_value": 0.8, "value": 0.99},  # another rate: left out
         {**balanced, "seed": 3, "lr": 2e-3, "val_value": 0.8, "value": 0.80}]))
    out = subprocess.run([sys.executable, str(script), "--sweep", str(sweep), "--more", str(more),
                          "--docs-figures", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "more_seeds_classification.png").is_file()
    rows = {line.split(" | ")[0].strip("| "): line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert "| 0, 1, 3 | 81.00, 82.00, 83.00 | 82.00 ± 1.00 |" in rows["random components"]
    # balanced: 80 on seeds 0, 1 and 3, against 81, 82 and 83: -2 ± 0.58 seed by seed
    assert "| 0, 1, 3 | 80.00, 80.00, 80.00 | 80.00 ± 0.00 | 80.00 | -2.00 ± 0.58 (3 seeds) |  |" in \
        rows["balanced at line_cap=1"]
    assert rows["LoRA r=8"].endswith("| 80.00 | 80.00 |  |  |")  # one seed: no spread, no difference
    assert (more / "classification_seeds.png").is_file() and "80.00" in (more / "summary.md").read_text()
    assert "At 0.1%" not in out.stdout and not (more / "classification_seeds_0.1.png").exists()  # never ran
    # Validation against test over the sweep's runs at LoRA's count: all 7 reach 75; the 6 at 80 have one
    # validation score, so no correlation.
    assert "| 75 | 7 | -0.98 |" in out.stdout and "| 80 | 6 | – |" in out.stdout
    # 0.1%: each row also against LoRA r=8 (its records at rank 8 serve both densities), seed by seed
    # The rows with the head at 4e-3 are compared with random components at that head rate.
    low = {**base, "setting": "0.001", "dense_lr": 2e-3}
    low_random, low_scaled = {**low, "method": "random", "sift": {}}, {**low, **{k: scaled[k] for k in ("method", "sift")}}
    records += [{**low_random, "seed": 0, "lr": 3.2e-2, "val_value": 0.78, "value": 0.78},
                {**low_scaled, "seed": 0, "lr": 3.2e-2, "val_value": 0.79, "value": 0.79},
                {**low_random, "seed": 0, "lr": 3.2e-2, "dense_lr": 4e-3, "val_value": 0.79, "value": 0.70},
                {**low_scaled, "seed": 0, "lr": 3.2e-2, "dense_lr": 4e-3, "val_value": 0.80, "value": 0.75},
                {**lora, "seed": 1, "lr": 1e-3, "val_value": 0.80, "value": 0.84}]
    (sweep / "classification.json").write_text(json.dumps(records))
    (more / "classification.json").write_text(json.dumps(
        [{**low_scaled, "seed": 1, "lr": 3.2e-2, "val_value": 0.8, "value": 0.80},
         {**low_random, "seed": 1, "lr": 3.2e-2, "dense_lr": 4e-3, "val_value": 0.8, "value": 0.72},
         {**low_scaled, "seed": 1, "lr": 3.2e-2, "dense_lr": 4e-3, "val_value": 0.8, "value": 0.76}]))
    out = subprocess.run([sys.executable, str(script), "--sweep", str(sweep), "--more", str(more),
                          "--docs-figures", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    low_rows = out.stdout.split("At 0.1%:")[1].split("How far")[0]
    # scaled: 79 and 80 on seeds 0 and 1 against LoRA's 80 and 84: -2.5 ± 1.5; one seed in common with random
    assert "| balanced at line_cap=1, scaled | 0.032 | 0-1 | 79.00, 80.00 | 79.50 ± 0.71 | 79.50 |  | -2.50 ± 1.50 (2 seeds) |" \
        in low_rows
    # head 4e-3: 75 and 76 against random components' 70 and 72 at that head rate: +4.5 ± 0.5
    assert "| balanced at line_cap=1, scaled, head 4e-3 | 0.032 | 0-1 | 75.00, 76.00 | 75.50 ± 0.71 | 75.50 | " \
        "+4.50 ± 0.50 (2 seeds) |" in low_rows
    assert (tmp_path / "more_seeds_classification_0.1.png").is_file()
    assert "At 0.1%" in (more / "summary.md").read_text()
    (sweep / "classification.json").write_text(json.dumps(records[:3]))  # balanced never ran
    out = subprocess.run([sys.executable, str(script), "--sweep", str(sweep), "--more", str(more)],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "no seed-0 record of sift-fixed:matched" in out.stderr


def test_rows_timing_quick_times_every_method_and_writes_nothing(tmp_path):
    """bench/rows_timing.py --quick steps each method on a tiny Llama and prints its phases against LoRA's."""
    script = Path(__file__).resolve().parents[1] / "bench" / "rows_timing.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--output", str(tmp_path / "t.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines() if line.startswith("  ")]
    assert [line[0] for line in lines] == ["lora:8", "sift-rows:matched", "sift-rows:0.0001", "sift-fixed:matched",
                                           "dense-backward"]
    assert lines[0][4] == "(1.000x):" and all(float(line[2]) > 0 for line in lines)
    assert not (tmp_path / "t.json").exists()


def test_random_components_take_the_step_scale_and_no_option_that_chooses_by_score():
    runs = plan("causal_lm", ["random:matched", "sift-fixed:matched", "lora:8"], [0],
                sift=["step_scale=input", "selection=balanced", "line_cap=1"])
    options = {run.method: run.sift for run in runs}
    assert options["random"] == {"step_scale": "input"}
    assert options["sift-fixed"] == {"step_scale": "input", "selection": "balanced", "line_cap": 1}
    assert options["lora"] == {}
    assert "--sift step_scale=input" in runs[0].command()
