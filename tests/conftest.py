"""Shared test setup: offline, deterministic, headless, and tiny models."""

import os

# Set before transformers or matplotlib are imported anywhere, so that no
# test can reach a model hub or open a window.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["MPLBACKEND"] = "Agg"

import json  # noqa: E402
import string  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

torch.set_num_threads(2)

TINY_VOCAB = 100
_SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    "bos_token": "<s>",
    "eos_token": "</s>",
}
_CHARACTERS = string.ascii_letters + string.digits + " .,:!?'\n-"


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose ids all fit the tiny models' vocabulary."""
    tokens = list(_SPECIAL_TOKENS.values()) + list(_CHARACTERS)
    assert len(tokens) <= TINY_VOCAB
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Characters join back without spaces, so decoding gives the text exactly.
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **_SPECIAL_TOKENS)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 model."""
    from siftune.recipes.models import resolve_model

    return resolve_model("minilm")


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer (no chat template) for the tiny models."""
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_bert() -> BertForSequenceClassification:
    """A seeded random 2-layer BERT classifier with 2 labels."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=2, pad_token_id=0,
    )
    return BertForSequenceClassification(config)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    """A seeded random 2-layer Llama causal LM with grouped-query attention."""
    torch.manual_seed(0)
    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_bert_dir(tmp_path, tiny_bert, tiny_tokenizer) -> str:
    """tiny_bert and tiny_tokenizer saved to a folder, as load_model expects."""
    folder = tmp_path / "tiny-bert"
    tiny_bert.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_llama, tiny_tokenizer) -> str:
    """tiny_llama and tiny_tokenizer saved to a folder, as load_model expects."""
    folder = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def chat_jsonl(tmp_path):
    """A prompt/response JSONL file: 16 pairs that teach "say x" -> "xxx"."""
    path = tmp_path / "chat.jsonl"
    lines = [json.dumps({"prompt": f"say {c}", "response": f"{c}{c}{c}"}) for c in "abcdefghijklmnop"]
    path.write_text("\n".join(lines) + "\n")
    return path
