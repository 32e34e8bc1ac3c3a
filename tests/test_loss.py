"""A batch's loss with the output layer run at the labelled positions only: the same loss and gradients
as ``model(**batch).loss``, and the full path wherever the gathered one does not apply."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from siftune import attach
from siftune.recipes.loss import batch_loss, labelled_logits
from siftune.recipes.train import evaluate


def _chat_batch(vocab: int, seed: int = 0):
    """Right-padded prompt/response rows: labels on each row's response only."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (prompt, length) in enumerate([(4, 12), (2, 7), (6, 9)]):
        mask[row, length:] = 0
        labels[row, prompt:length] = ids[row, prompt:length]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_same_loss_and_gradients_as_the_models_own(tiny_llama):
    batch = _chat_batch(tiny_llama.config.vocab_size)
    tiny_llama.train()
    assert labelled_logits(tiny_llama, batch)[0].shape[0] == int((batch["labels"][:, 1:] != -100).sum())
    ours = batch_loss(tiny_llama, batch)
    ours.backward()
    ours_grads = _grads(tiny_llama)
    tiny_llama.zero_grad(set_to_none=True)
    theirs = tiny_llama(**batch).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    theirs_grads = _grads(tiny_llama)
    assert ours_grads.keys() == theirs_grads.keys() and len(ours_grads) > 5
    for name, grad in theirs_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_through_a_peft_wrapper_and_the_engine(tiny_llama):
    from peft import LoraConfig, get_peft_model

    batch = _chat_batch(tiny_llama.config.vocab_size, seed=1)
    lora = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    assert labelled_logits(lora, batch) is not None  # the gathered path, under the wrapper
    torch.testing.assert_close(batch_loss(lora, batch), lora(**batch).loss, rtol=1e-6, atol=1e-6)
    base = lora.unload()
    engine = attach(base, density=0.1, target_modules=["q_proj", "down_proj"])
    torch.testing.assert_close(batch_loss(base, batch), base(**batch).loss, rtol=1e-6, atol=1e-6)
    assert engine.select([batch], loss_of=batch_loss) == 1


def test_other_models_and_batches_take_the_full_path(tiny_llama, tiny_bert):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    batch = _chat_batch(100)
    assert labelled_logits(gpt2, batch) is None
    torch.testing.assert_close(batch_loss(gpt2, batch), gpt2(**batch).loss)
    ids = torch.randint(5, 50, (2, 6))
    classification = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    tiny_bert.eval()
    assert labelled_logits(tiny_bert, classification) is None
    torch.testing.assert_close(batch_loss(tiny_bert, classification), tiny_bert(**classification).loss)
    ddp_like = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    assert labelled_logits(ddp_like, batch) is None


@pytest.mark.parametrize("seed", [0, 1])
def test_evaluation_counts_the_same(tiny_llama, seed):
    batches = [_chat_batch(tiny_llama.config.vocab_size, seed=seed), _chat_batch(tiny_llama.config.vocab_size, 7)]
    gathered = evaluate(tiny_llama, batches, "causal_lm", split=False)
    full = {"loss": 0.0, "tokens": 0}
    with torch.no_grad():
        for batch in batches:
            logits = tiny_llama(**batch).logits[:, :-1].float()
            target = batch["labels"][:, 1:]
            full["loss"] += float(torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"))
            full["tokens"] += int((target != -100).sum())
    assert gathered["tokens"] == full["tokens"] == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert gathered["loss"] == pytest.approx(full["loss"] / full["tokens"], rel=1e-6)
