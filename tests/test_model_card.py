"""The README.md model card that `siftune train` leaves beside the increment."""
from __future__ import annotations

import json

import torch

from siftune.cli import main


def test_train_writes_a_model_card_with_the_held_out_metrics_and_code_that_runs(tmp_path, tiny_llama_dir,
                                                                                  monkeypatch):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {c}", "response": f"{c}{c}{c}"}) + "\n" for c in "abcdefgh"))
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_llama_dir, "--dataset", str(data), "--task", "causal_lm",
                 "--output-dir", str(out), "--steps", "3", "--batch-size", "4", "--max-length", "16",
                 "--eval-size", "4", "--density", "0.05", "--lr", "0.01", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    card = (out / "README.md").read_text()
    assert f"| base model | `{tiny_llama_dir}` |" in card and "| task | causal_lm |" in card
    assert "| metric | before | after |" in card
    assert f"| loss | {metrics['before']['loss']:.4g} | {metrics['after']['loss']:.4g} |" in card

    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(card.split("```python\n", 1)[1].split("```", 1)[0], namespace)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run-merged")
    trained = namespace["model"]
    for name, value in trained.named_parameters():
        torch.testing.assert_close(merged.get_parameter(name), value.detach(), rtol=0, atol=1e-6, msg=name)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert any(not torch.equal(value, base.get_parameter(name)) for name, value in trained.named_parameters())
