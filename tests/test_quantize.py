"""Quantized bases from the command line and the Python API: --quantize, refusals, bitsandbytes' CPU path."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import siftune  # noqa: E402
from siftune import ConfigError, SparseIncrement  # noqa: E402
from siftune.cli import main  # noqa: E402
from siftune.recipes.models import load_model  # noqa: E402

bnb = pytest.importorskip("bitsandbytes")


def _train(tmp_path, model_dir, dataset, *extra):
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--dataset", str(dataset), "--output-dir", str(out),
                 "--task", "causal_lm", "--steps", "6", "--batch-size", "8", "--max-length", "16",
                 "--eval-size", "4", "--warmup-steps", "1", "--density", "0.05", "--lr", "0.01", "--quiet", *extra])
    assert code == 0
    return out


def test_train_with_quantize_nf4_trains_a_delta_beside_4bit_weights(tmp_path, tiny_llama_dir, chat_jsonl):
    out = _train(tmp_path, tiny_llama_dir, chat_jsonl, "--quantize", "nf4")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    increment = SparseIncrement.load(out)
    assert increment.config["storage"] == "delta" and increment.metadata["quantize"] == "nf4"
    assert increment.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)


def test_an_unknown_quantization_is_a_one_line_error(tmp_path, tiny_llama_dir, chat_jsonl, capsys):
    code = main(["train", "--model", tiny_llama_dir, "--dataset", str(chat_jsonl), "--task", "causal_lm",
                 "--output-dir", str(tmp_path / "run"), "--quantize", "int4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "quantize must be one of nf4, fp4, int8" in err
    assert not (tmp_path / "run").exists()


def test_quantize_without_bitsandbytes_says_what_to_install(monkeypatch):
    from siftune.core.quantize import quantization_config

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'siftune\[quant\]'"):
        quantization_config("nf4")


def test_load_model_quantizes_the_projections_and_keeps_the_head(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, "causal_lm", quantize="nf4")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert type(model.lm_head) is torch.nn.Linear


def test_an_evaluation_before_training_leaves_a_4bit_model_on_its_trainable_path(tiny_llama_dir):
    """bitsandbytes repacks a 4-bit weight for a backward-less bf16 kernel at an eval-mode forward."""
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))

    def trained(evaluate_first: bool):
        model, _ = load_model(tiny_llama_dir, "causal_lm", quantize="nf4")
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        engine = siftune.attach(model, density=0.05, storage="delta")
        optimizer = engine.optimizer(lr=1e-2)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return engine.increment()

    plain, evaluated = trained(False), trained(True)
    for name, delta in plain.tensors.items():
        assert torch.equal(delta.indices, evaluated.tensors[name].indices), name
        torch.testing.assert_close(delta.values, evaluated.tensors[name].values)


def test_a_model_the_user_quantized_trains_through_the_python_api(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # hidden 64: bitsandbytes' bf16 repacking needs a whole 4-bit block per row
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                               bnb_4bit_compute_dtype=torch.float32))
    model.eval()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids)  # the user evaluated once: the weights are repacked for bf16 inference
    model.train()
    with pytest.raises(ConfigError, match="storage='delta'"):
        siftune.attach(model, density=0.05)
    engine = siftune.attach(model, density=0.05, storage="delta")
    optimizer = engine.optimizer(lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_the_benchmark_matches_sift_on_nf4_to_qlora_r8s_count(tiny_llama_dir):
    from siftune.bench.methods import MethodRun, lora_count, prepare

    counts = {}
    for method in ("qlora", "sift-nf4"):
        model, _ = load_model(tiny_llama_dir, "causal_lm", quantize="nf4")
        setting = 8 if method == "qlora" else "matched"
        prepared = prepare(model, MethodRun(method, "causal_lm", setting, lr=1e-3, dense_lr=1e-3, seed=0))
        counts[method] = prepared.trainable
    model, _ = load_model(tiny_llama_dir, "causal_lm")
    expected = lora_count(model, "causal_lm", 8)  # from the unquantized shapes
    assert counts["qlora"] == expected
    assert abs(counts["sift-nf4"] - expected) <= 14  # one rounding per targeted tensor


def _train_nf4_increment(model_dir, seed: int):
    model, _ = load_model(model_dir, "causal_lm", quantize="nf4")
    model.train()
    engine = siftune.attach(model, density=0.05, storage="delta")
    optimizer = engine.optimizer(lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        ids = torch.randint(0, 50, (2, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    increment = engine.increment(base_model=str(model_dir))
    increment.metadata.update(task="causal_lm", quantize="nf4")
    engine.detach()
    return model, increment


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_two_increments_swap_on_one_quantized_model_without_reloading_it(tiny_llama_dir):
    trained_a, first = _train_nf4_increment(tiny_llama_dir, seed=1)
    _, second = _train_nf4_increment(tiny_llama_dir, seed=2)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    first.apply(trained_a)  # trained_a no longer carries its delta (detached): this puts it back
    with_first = _logits(trained_a, ids)
    first.remove(trained_a)
    bare = _logits(trained_a, ids)
    second.apply(trained_a)
    with_second = _logits(trained_a, ids)
    second.remove(trained_a)
    first.apply(trained_a)
    torch.testing.assert_close(_logits(trained_a, ids), with_first)
    first.remove(trained_a)
    torch.testing.assert_close(_logits(trained_a, ids), bare)
    assert not torch.allclose(with_first, with_second) and not torch.allclose(with_first, bare)
    assert type(trained_a.model.layers[0].self_attn.q_proj.weight).__name__ == "Params4bit"  # never rewritten


def test_an_applied_increment_on_a_quantized_model_gives_the_trained_model(tiny_llama_dir):
    model, increment = _train_nf4_increment(tiny_llama_dir, seed=1)
    fresh, _ = load_model(tiny_llama_dir, "causal_lm", quantize="nf4")
    fresh.train()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(4))
    increment.apply(model)
    increment.apply(fresh)
    torch.testing.assert_close(_logits(fresh, ids), _logits(model, ids))


def test_merge_of_a_quantized_run_writes_the_dequantized_base_plus_the_delta(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, increment = _train_nf4_increment(tiny_llama_dir, seed=1)
    increment.apply(model)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(5))
    merged_dir = increment.merge(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert getattr(merged.config, "quantization_config", None) is None
    torch.testing.assert_close(_logits(merged.train(), ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
