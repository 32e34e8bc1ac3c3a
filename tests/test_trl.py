"""SiftMixin under TRL: trl.SFTTrainer becomes a SIFT trainer on chat data."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
sys.path.insert(0, str(Path(__file__).parent))
from siftune import ConfigError, SiftConfig, SparseIncrement  # noqa: E402
from siftune.trainer import SiftMixin, Trainer  # noqa: E402

# Role-prefixed lines; the tiny character tokenizer spells every character of it.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{{ eos_token }}"
SIFT_CONFIG = SiftConfig(density=0.05, dense_modules=["lm_head"])


def chats():
    """Sixteen one-turn conversations: the assistant adds two digits."""
    from datasets import Dataset

    return Dataset.from_list([
        {"messages": [{"role": "user", "content": f"add {a} and {b}"}, {"role": "assistant", "content": f"{a + b}"}]}
        for a in range(4) for b in range(4)
    ])


def sft_args(output_dir, **overrides):
    from trl import SFTConfig

    # bf16=False: TRL turns bf16 autocast on by default, whose rounding would hide what the tests compare.
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=4, num_train_epochs=3, learning_rate=1e-2,
                    lr_scheduler_type="linear", max_grad_norm=1.0, max_length=64, report_to=[], use_cpu=True,
                    save_strategy="no", logging_steps=1, seed=0, data_seed=0, dataloader_num_workers=0, bf16=False)
    return SFTConfig(**{**settings, **overrides})


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def sft_class():
    from trl import SFTTrainer

    class SiftSFTTrainer(SiftMixin, SFTTrainer):
        pass

    return SiftSFTTrainer


def chat_tokenizer():
    """The tiny character tokenizer with a chat template."""
    from conftest import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_chat_llama():
    """(model, tokenizer): a seeded random tiny Llama and :func:`chat_tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    return model, tokenizer


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sft_class):
    """SIFT under SFTTrainer, and under the plain siftune Trainer fed SFTTrainer's batches: (base, sft, plain)."""
    base, tokenizer = tiny_chat_llama()
    tmp = tmp_path_factory.mktemp("trl")
    sft = sft_class(model=copy.deepcopy(base), args=sft_args(tmp / "sft"), train_dataset=chats(),
                    processing_class=tokenizer, sift_config=SIFT_CONFIG)
    plain = Trainer(model=copy.deepcopy(base), args=sft_args(tmp / "plain"), train_dataset=sft.train_dataset,
                    data_collator=sft.data_collator, sift_config=SIFT_CONFIG)
    sft.train()
    plain.train()
    return base, sft, plain


def test_sft_trainer_lowers_the_training_loss(runs):
    _, sft, _ = runs
    losses = logged_losses(sft)
    assert len(losses) == 12 and sft.sift.steps == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


def test_sft_trainer_still_computes_its_own_loss_and_token_accuracy(runs):
    _, sft, _ = runs
    assert all("mean_token_accuracy" in entry for entry in sft.state.log_history if "loss" in entry)


def test_sft_trainer_trains_only_selected_entries_of_the_targeted_weights(runs):
    base, sft, _ = runs
    for slot in sft.sift.slots:
        new = sft.model.get_parameter(slot.name).detach().reshape(-1)
        old = base.get_parameter(slot.name).detach().reshape(-1)
        changed = torch.nonzero(new != old).squeeze(1)
        assert changed.numel() and torch.isin(changed, slot.ever_idx).all(), slot.name
    assert torch.equal(sft.model.model.embed_tokens.weight, base.model.embed_tokens.weight)


def test_sft_trainer_and_plain_trainer_on_the_same_batches_log_the_same_losses(runs):
    _, sft, plain = runs
    torch.testing.assert_close(logged_losses(sft), logged_losses(plain), rtol=1e-6, atol=0)


def test_sft_trainer_and_plain_trainer_on_the_same_batches_train_the_same_increment(runs):
    _, sft, plain = runs
    a, b = sft.increment(), plain.increment()
    assert a.tensors.keys() == b.tensors.keys() and len(a.tensors) == 14
    for name, delta in a.tensors.items():
        assert torch.equal(delta.indices, b.tensors[name].indices), name
        torch.testing.assert_close(delta.values, b.tensors[name].values, rtol=0, atol=1e-6)
    for name, value in a.dense.items():
        torch.testing.assert_close(value, b.dense[name], rtol=0, atol=1e-6)


def test_sft_trainer_saves_an_increment_that_rebuilds_the_trained_model(runs, tmp_path):
    base, sft, _ = runs
    sft.save_model(str(tmp_path / "inc"))
    increment = SparseIncrement.load(tmp_path / "inc")
    assert increment.metadata["task"] == "causal_lm"
    rebuilt = increment.apply(copy.deepcopy(base)).state_dict()
    for name, value in sft.model.state_dict().items():
        # base + (trained - base) in fp32 is the trained value up to one rounding
        torch.testing.assert_close(rebuilt[name], value, rtol=0, atol=1e-7, msg=name)


def test_sft_trainer_given_a_model_path_trains_the_model_it_loads(sft_class, tiny_llama_dir, tmp_path):
    trainer = sft_class(model=tiny_llama_dir, args=sft_args(tmp_path, max_steps=2), train_dataset=chats(),
                        processing_class=chat_tokenizer(), sift_config=SIFT_CONFIG)
    before = trainer.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer.train()
    assert trainer.sift.model is trainer.model and trainer.increment().base_model == tiny_llama_dir
    assert not torch.equal(trainer.model.model.layers[0].mlp.up_proj.weight, before)


def test_peft_config_is_refused_before_the_model_is_wrapped(sft_class, tmp_path):
    from peft import LoraConfig

    from _models import tiny_llama

    model = tiny_llama()
    with pytest.raises(ConfigError, match="peft_config"):
        sft_class(model=model, args=sft_args(tmp_path), train_dataset=chats(), sift_config=SIFT_CONFIG,
                  peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_mixin_placed_after_the_trainer_class_is_a_type_error():
    from trl import SFTTrainer

    with pytest.raises(TypeError, match="SiftMixin must come before"):
        class Misordered(SFTTrainer, SiftMixin):
            pass
