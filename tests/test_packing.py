"""Packed causal-LM batches: whole examples end to end in each row, each attending to itself only, so the
loss and gradients are those of the same examples unpacked."""
import json
import shutil

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from conftest import TINY_VOCAB
from siftune.errors import CheckpointError, ConfigError
from siftune.recipes.data import causal_lm_batches, examples_in
from siftune.recipes.loss import batch_loss, check_packing
from siftune.recipes.train import TrainArgs, _BatchMaker

WORDS = ["hi", "hello there", "how are you?", "fine, thanks.", "name?", "bot", "what is it", "a tiny model",
         "ok", "say more", "one two three", "yes"]
EXAMPLES = [{"prompt": WORDS[i], "response": WORDS[(3 * i + 1) % len(WORDS)]} for i in range(len(WORDS))]
# An empty prompt: the example's first token is a label, which no earlier token may predict.
EXAMPLES.append({"prompt": "", "response": "plain text"})

TINY = dict(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=128)
MODELS = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
          "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def _blocks(batch):
    """Each row's blocks of position ids counted from 0 (an example, and a row's last one its padding too):
    (input ids, labels) of each."""
    found = []
    for ids, positions, labels in zip(batch["input_ids"], batch["position_ids"], batch["labels"]):
        starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            assert positions[a:b].tolist() == list(range(b - a))
            found.append((ids[a:b].tolist(), labels[a:b].tolist()))
    return found


def test_rows_hold_whole_examples_in_the_shuffled_order(tiny_tokenizer):
    packed = list(causal_lm_batches(EXAMPLES, tiny_tokenizer, 2, 40, shuffle=True, seed=3, packing=True))
    single = list(causal_lm_batches(EXAMPLES, tiny_tokenizer, 1, 40, shuffle=True, seed=3))
    assert all(b.keys() == {"input_ids", "position_ids", "labels"} for b in packed)
    assert all(b["input_ids"].shape == (2, 40) for b in packed[:-1]) and packed[-1]["input_ids"].shape[1] == 40
    assert len(packed) < len(single) / 2  # more than one example a row
    assert sum(examples_in(b) for b in packed) == len(EXAMPLES) == sum(examples_in(b) for b in single)
    blocks = [block for batch in packed for block in _blocks(batch)]
    examples = [(b["input_ids"][0].tolist(), b["labels"][0].tolist()) for b in single]
    assert len(blocks) == len(examples)
    pad = tiny_tokenizer.pad_token_id
    for (ids, labels), (want_ids, want_labels) in zip(blocks, examples, strict=True):
        n = len(want_ids)
        assert ids[:n] == want_ids
        assert labels[:n] == [-100] + want_labels[1:]  # the first is never predicted from within the example
        assert set(ids[n:]) <= {pad} and set(labels[n:]) <= {-100}  # a row's end: padding


def test_the_last_short_batch_and_drop_last(tiny_tokenizer):
    kept = list(causal_lm_batches(EXAMPLES, tiny_tokenizer, 4, 30, shuffle=False, seed=0, packing=True))
    dropped = list(causal_lm_batches(EXAMPLES, tiny_tokenizer, 4, 30, shuffle=False, seed=0, packing=True,
                                     drop_last=True))
    assert kept[-1]["input_ids"].shape[0] < 4 and len(dropped) == len(kept) - 1
    assert all(b["input_ids"].shape[0] == 4 for b in dropped)


@pytest.mark.parametrize("kind,attention", [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"),
                                            ("qwen2", "sdpa"), ("qwen3", "sdpa")])
def test_same_loss_and_gradients_as_unpacked(tiny_tokenizer, kind, attention):
    config_class, model_class = MODELS[kind]
    torch.manual_seed(0)
    model = model_class(config_class(**TINY, attn_implementation=attention))
    check_packing(model)
    (unpacked,) = causal_lm_batches(EXAMPLES, tiny_tokenizer, len(EXAMPLES), 64, shuffle=False, seed=0)
    packed = list(causal_lm_batches(EXAMPLES, tiny_tokenizer, len(EXAMPLES), 64, shuffle=False, seed=0,
                                    packing=True))
    assert len(packed) == 1 and packed[0]["input_ids"].shape[0] < len(EXAMPLES) / 2
    (packed,) = packed

    def loss_and_grads(batch, loss_of):
        model.zero_grad(set_to_none=True)
        loss = loss_of(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want, want_grads = loss_and_grads(unpacked, batch_loss)
    for loss_of in (batch_loss, lambda m, b: m(**b, use_cache=False).loss):  # gathered, and the model's own
        got, got_grads = loss_and_grads(packed, loss_of)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Without the position ids, or with a key/value cache, the examples see each other: another loss.
    leaky = {k: v for k, v in packed.items() if k != "position_ids"}
    # (A random tiny model barely attends: they differ by ~1e-3 where packed and unpacked agree to ~1e-6.)
    assert abs(float(batch_loss(model, leaky).detach()) - float(want)) > 1e-4
    assert abs(float(model(**packed, use_cache=True).loss.detach()) - float(want)) > 1e-4


def test_models_that_do_not_keep_examples_apart_are_refused(tiny_bert):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    for model in (gpt2, tiny_bert):
        with pytest.raises(ConfigError, match="packing needs a causal LM"):
            check_packing(model)
    with pytest.raises(ConfigError, match="packing joins causal_lm examples"):
        TrainArgs(task="classification", packing=True).validate()


def test_a_resumed_stream_goes_on_where_it_stopped(tiny_tokenizer):
    args = TrainArgs(task="causal_lm", batch_size=2, max_length=30, packing=True, seed=5)
    maker = _BatchMaker(args, tiny_tokenizer, None)
    per_epoch = maker.per_epoch(EXAMPLES)
    assert per_epoch == len(list(causal_lm_batches(EXAMPLES, tiny_tokenizer, 2, 30, shuffle=True, seed=5,
                                                   packing=True)))
    stream = maker.train_forever(EXAMPLES)
    whole = [next(stream) for _ in range(2 * per_epoch + 2)]  # into the third epoch
    for skip in (1, per_epoch, per_epoch + 3):
        resumed = maker.train_forever(EXAMPLES, skip=skip)
        for want in whole[skip:]:
            got = next(resumed)
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_bench_packs_the_causal_task_and_keeps_its_records_apart(tmp_path, tiny_llama_dir, chat_jsonl):
    from siftune.bench.report import setting_label, summarise
    from siftune.bench.runner import plan, run_bench

    runs = [plan("causal_lm", ["sift-fixed:0.05"], [0], quick=True, model=tiny_llama_dir, dataset=str(chat_jsonl),
                 eval_size=4, val_size=0, packing=packing)[0] for packing in (True, False)]
    packed, plain = run_bench(runs, tmp_path, isolate=False, log=lambda _: None)
    assert packed["packing"] is True and plain["packing"] is False and "--packing" in packed["command"]
    assert "--packing" not in plain["command"] and packed["eval_tokens"] == plain["eval_tokens"]  # evaluated unpacked
    assert packed["final_train_loss"] != plain["final_train_loss"]  # other batches
    assert len(json.loads((tmp_path / "causal_lm.json").read_text())) == 2  # two experiments, two records
    labels = sorted(setting_label(row) for row in summarise([packed, plain]))  # two rows in the report's tables
    assert len(labels) == 2 and labels[1] == labels[0] + ", packed"
    with pytest.raises(ConfigError, match="--packing joins causal_lm"):
        plan("classification", ["full"], [0], packing=True)


def test_train_packs_and_resumes(tmp_path, tiny_llama_dir, chat_jsonl, capsys):
    from siftune.cli import main

    common = ["train", "--model", tiny_llama_dir, "--dataset", str(chat_jsonl), "--task", "causal_lm",
              "--eval-size", "4", "--batch-size", "2", "--max-length", "48", "--density", "0.05",
              "--packing", "--warmup-steps", "0", "--steps", "6", "--checkpoint-every", "2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(common + ["--output-dir", str(whole)]) == 0
    assert main(common + ["--output-dir", str(split)]) == 0
    # Back to step 4 of 6 (the older of the two checkpoints kept), then resumed.
    for later in sorted((split / "checkpoints").glob("checkpoint-*.pt"))[1:]:
        later.unlink()
    (split / "metrics.json").unlink()
    assert main(common + ["--output-dir", str(split), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "(step 4)" in out
    ended = [json.loads((run / "metrics.json").read_text()) for run in (whole, split)]
    torch.testing.assert_close(torch.tensor(ended[1]["losses"]), torch.tensor(ended[0]["losses"]), rtol=1e-5, atol=1e-6)
    # Resuming unpacked a run trained packed: refused, naming the setting.
    assert main([c for c in common if c != "--packing"] + ["--output-dir", str(split), "--resume"]) == 2
    assert "packing: True then, False now" in capsys.readouterr().err


def test_an_empty_training_set_is_a_data_error_not_an_endless_loop(tiny_tokenizer):
    from siftune.errors import DataError

    for packing in (True, False):
        maker = _BatchMaker(TrainArgs(task="causal_lm", batch_size=2, max_length=30, packing=packing),
                            tiny_tokenizer, None)
        with pytest.raises(DataError, match="no examples"):
            next(maker.train_forever([]))
