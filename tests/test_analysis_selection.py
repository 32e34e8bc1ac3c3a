"""siftune analyze selection: where each selection's components sit, and the rank of what they train to."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from siftune import ConfigError  # noqa: E402
from siftune.analysis import SelectionArgs, analyze_selection  # noqa: E402
from siftune.analysis.selection import chosen_indices, overlap, spread, stable_rank  # noqa: E402
from test_analysis import reviews_csv  # noqa: E402, F401  (a fixture)
from test_cli import sentiment_csv  # noqa: E402, F401  (a fixture)


def test_spread_counts_rows_and_columns_touched_and_the_busiest_share():
    idx = torch.tensor([0, 1, 2, 3, 13])  # a 4 x 10 weight: row 0 holds four, row 1 one
    stats = spread(idx, (4, 10))
    assert stats["rows_touched"] == 0.5 and stats["columns_touched"] == pytest.approx(0.4)
    assert stats["busiest_rows_share"] == pytest.approx(4 / 5)  # the busiest 1% of 4 rows: one row
    assert stats["busiest_columns_share"] == pytest.approx(2 / 5)  # column 3 holds 3 and 13


def test_stable_rank_is_one_for_a_rank_one_change_and_the_size_for_an_orthogonal_one():
    assert stable_rank(torch.outer(torch.randn(6), torch.randn(4))) == pytest.approx(1.0)
    assert stable_rank(torch.eye(5)) == pytest.approx(5.0)


def test_each_selection_chooses_its_count_and_global_the_same_total():
    torch.manual_seed(0)
    gradients = {"a.weight": torch.randn(8, 6), "b.weight": torch.randn(4, 12)}
    weights = {n: torch.randn_like(g) for n, g in gradients.items()}
    for selection in ("default", "paper", "random", "mixed", "balanced"):
        chosen = chosen_indices(selection, gradients, weights, 0.25)
        assert [i.numel() for i in chosen.values()] == [12, 12], selection
    chosen = chosen_indices("global", gradients, weights, 0.25)
    assert sum(i.numel() for i in chosen.values()) == 24
    score = torch.cat([(g * weights[n]).reshape(-1).abs() for n, g in gradients.items()])
    picked = torch.cat([chosen["a.weight"].long(), chosen["b.weight"].long() + 48])
    assert float(score[picked].min()) >= float(score.topk(24).values.min())


def test_selection_analysis_writes_json_figures_and_report_and_lora_s_rank_stays_below_its_rank(
        tiny_bert_dir, reviews_csv, tmp_path):  # noqa: F811
    out = tmp_path / "selection"
    result = analyze_selection(SelectionArgs(model=tiny_bert_dir, dataset=reviews_csv, batches=2, batch_size=3,
                                             max_length=16, density=0.05, train_steps=3, lora_rank=2,
                                             selections=["default", "random", "balanced", "snr", "grow_drop"],
                                             output_dir=str(out)), progress=False)
    for name in ("selection.json", "selection.md", "selection_spread.png", "selection_rank.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "selection.json").read_text())
    assert set(saved["spread"]) == {"default", "random", "balanced", "snr"}  # grow_drop's is default's
    assert set(saved["stable_rank"]) == {"default", "random", "balanced", "snr", "grow_drop", "lora", "full"}
    assert all(row["stable_rank"] <= 2 + 1e-4 for row in saved["stable_rank"]["lora"]["tensors"].values())
    assert result["spread"]["default"]["whole_model"]["rows_touched"] <= 1.0


def test_snr_ranks_by_the_summed_gradient_over_the_root_of_the_summed_squares():
    batches = [torch.tensor([[4.0, 1.0], [1.0, 0.1]]), torch.tensor([[-4.0, 1.0], [1.0, 0.1]])]
    gradients = {"a.weight": sum(batches)}
    squares = {"a.weight": sum(b ** 2 for b in batches)}
    weights = {"a.weight": torch.ones(2, 2)}
    # the largest gradient (4, then -4) cancels: ratio 0; the small steady ones rank first
    chosen = chosen_indices("snr", gradients, weights, 0.75, squares=squares)["a.weight"]
    assert sorted(chosen.tolist()) == [1, 2, 3]


def test_unknown_selection_is_a_config_error():
    with pytest.raises(ConfigError, match="selections must name some of"):
        SelectionArgs(selections=["top"]).validate()
    with pytest.raises(ConfigError, match="--batches 2 or more"):
        SelectionArgs(selections=["snr"], batches=1).validate()


def test_auto_is_balanced_at_a_cap_of_one_and_from_ranks_by_the_earlier_change():
    torch.manual_seed(0)
    gradients = {"a.weight": torch.randn(8, 6)}
    weights = {"a.weight": torch.randn(8, 6)}
    auto = chosen_indices("auto", gradients, weights, 0.25)["a.weight"]
    rows, columns = auto // 6, auto % 6
    assert auto.numel() == 12 and rows.bincount().max() <= 2 and columns.bincount().max() <= 2  # 12/8, 12/6 rounded up
    # The earlier change: 12 components, one per row and column at most where it can, by size
    earlier = torch.tensor([0, 7, 14, 21, 28, 35, 36, 43, 3, 10, 17, 20])  # within every cap
    sizes = torch.arange(12, 0, -1).float()
    chosen = chosen_indices("from", gradients, weights, 0.25, changes={"a.weight": (earlier, sizes)})["a.weight"]
    assert sorted(chosen.tolist()) == sorted(earlier.tolist())
    # Fewer than the count changed: the changed ones first, whatever the gradient says
    few = chosen_indices("from", gradients, weights, 0.25, changes={"a.weight": (earlier[:4], sizes[:4])})["a.weight"]
    assert set(earlier[:4].tolist()) <= set(few.tolist()) and few.numel() == 12


def test_select_from_adds_the_from_selection_and_trains_it(tiny_bert_dir, reviews_csv, sentiment_csv,  # noqa: F811
                                                           tmp_path):
    from test_cli import main

    earlier = tmp_path / "earlier"  # siftune train's targets: the analysis takes the weights its increment holds
    assert main(["train", "--model", str(tiny_bert_dir), "--dataset", str(sentiment_csv), "--output-dir", str(earlier),
                 "--steps", "2", "--batch-size", "3", "--max-length", "16", "--eval-size", "4", "--warmup-steps", "1",
                 "--lr", "0.01", "--density", "0.2", "--quiet"]) == 0
    out = tmp_path / "selection"
    analyze_selection(SelectionArgs(model=tiny_bert_dir, dataset=reviews_csv, batches=2, batch_size=3, max_length=16,
                                    density=0.05, train_steps=2, selections=["auto", "random"],
                                    select_from=str(earlier), output_dir=str(out)), progress=False)
    saved = json.loads((out / "selection.json").read_text())
    assert set(saved["spread"]) == {"auto", "random", "from"} and saved["setup"]["select_from"] == str(earlier)
    assert set(saved["stable_rank"]) == {"auto", "random", "from", "lora", "full"}
    assert "The earlier run (from)" in (out / "selection.md").read_text()
    # Each pair's shared share: a selection shares all with itself (not listed), some share with the others
    assert set(saved["overlap"]["from"]) == {"auto", "random"} and 0 <= saved["overlap"]["from"]["auto"] <= 1
    assert "## Shared components" in (out / "selection.md").read_text()


def test_overlap_is_the_share_of_the_first_selection_the_second_chose_too():
    first = {"a": torch.tensor([0, 1, 2, 3]), "b": torch.tensor([5])}
    second = {"a": torch.tensor([1, 3, 7]), "b": torch.tensor([5, 6])}
    assert overlap(first, second) == pytest.approx(3 / 5) and overlap(second, first) == pytest.approx(3 / 5)
    assert overlap(first, first) == 1.0


def test_from_without_an_increment_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="give --select-from FOLDER"):
        SelectionArgs(selections=["from"]).validate()
    with pytest.raises(ConfigError, match="holds no increment.safetensors"):
        SelectionArgs(select_from=str(tmp_path)).validate()
