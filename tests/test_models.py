"""Tests of siftune.recipes.models: built-in model names, local folders, offline loading for a task."""
from pathlib import Path

import pytest
import torch

from siftune.recipes.data import causal_lm_batches
from siftune.errors import ModelLoadError
from siftune.recipes.models import load_model, resolve_model

PAIRS = [
    {"prompt": "Hi there", "response": "Hello!"},
    {"prompt": "How are you?", "response": "Fine, thanks."},
]


def test_resolve_model_minilm_gives_a_folder_with_config(minilm_path):
    assert (Path(minilm_path) / "config.json").is_file()
    assert resolve_model("all-MiniLM-L6-v2") == minilm_path


def test_resolve_model_returns_a_local_folder_unchanged(tiny_bert_dir):
    assert resolve_model(tiny_bert_dir) == tiny_bert_dir


def test_resolve_model_unknown_name_says_what_to_pass():
    with pytest.raises(ModelLoadError, match="minilm, smollm2"):
        resolve_model("no-such-org/no-such-model")


def test_load_model_minilm_classifier_gives_two_logits(minilm_path):
    model, tokenizer = load_model(minilm_path, "classification", labels=["neg", "pos"])
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2)
    assert model.config.id2label == {0: "neg", 1: "pos"}


def test_load_model_gives_a_missing_pad_token_the_eos_token(tmp_path, tiny_llama, tiny_tokenizer):
    tiny_tokenizer.pad_token = None
    tiny_llama.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path), "causal_lm")
    assert tokenizer.pad_token == tokenizer.eos_token
    assert isinstance(model, torch.nn.Module)


def test_load_model_causal_lm_batches_run_through_the_model(tiny_llama_dir):
    model, tokenizer = load_model(tiny_llama_dir, "causal_lm")
    (batch,) = causal_lm_batches(PAIRS, tokenizer, 3, 32, shuffle=False, seed=0)
    with torch.no_grad():
        output = model(**batch)
    assert output.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(output.loss)
