"""Tests of siftune.recipes.data: built-in datasets, file readers, splits and tokenised batches."""

import bz2
import gzip
import json
from pathlib import Path

import pytest
import torch

from siftune.recipes.data import (
    TokenizedDataset,
    causal_lm_batches,
    classification_batches,
    label_names,
    load_examples,
    split_examples,
)
from siftune.errors import ConfigError, DataError

PAIRS = [
    {"prompt": "Hi there", "response": "Hello!"},
    {"prompt": "How are you?", "response": "Fine, thanks."},
    {"prompt": "Name?", "response": "Bot"},
]


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def response_tokens(batch, row) -> list[int]:
    """The input ids whose labels are not masked, in one batch row."""
    keep = batch["labels"][row] != -100
    return batch["input_ids"][row][keep].tolist()


# ---------------------------------------------------------------- built-ins


def test_rotten_tomatoes_loads_fresh_and_rotten_reviews():
    examples = load_examples("rotten_tomatoes", "classification")
    assert 12_000 < len(examples) < 13_500
    assert label_names(examples) == ["fresh", "rotten"]
    assert all(example["text"].strip() for example in examples)


def test_chatterbot_loads_over_1000_string_pairs():
    examples = load_examples("chatterbot", "causal_lm")
    assert len(examples) > 1000
    assert all(isinstance(e["prompt"], str) and e["prompt"] for e in examples)
    assert all(isinstance(e["response"], str) and e["response"] for e in examples)


def test_builtin_dataset_for_the_other_task_raises():
    with pytest.raises(DataError, match="causal_lm"):
        load_examples("chatterbot", "classification")


def test_unknown_task_raises_config_error():
    with pytest.raises(ConfigError, match="unknown task"):
        load_examples("rotten_tomatoes", "regression")


# ---------------------------------------------------------------- splits


def test_split_is_deterministic_and_sized():
    examples = [{"text": str(i), "label": "a"} for i in range(100)]
    train, held_out = split_examples(examples, 20, seed=3)
    assert (len(train), len(held_out)) == (80, 20)
    assert split_examples(examples, 20, seed=3) == (train, held_out)
    assert split_examples(examples, 20, seed=4) != (train, held_out)
    assert sorted(train + held_out, key=lambda e: int(e["text"])) == examples


def test_split_accepts_a_fraction():
    train, held_out = split_examples(list(range(50)), 0.1)
    assert (len(train), len(held_out)) == (45, 5)


def test_split_leaving_no_training_examples_raises():
    with pytest.raises(DataError, match="no training examples"):
        split_examples(list(range(5)), 5)


def test_label_names_are_sorted_and_unique():
    examples = [{"text": "x", "label": label} for label in ["b", "a", "b", "c"]]
    assert label_names(examples) == ["a", "b", "c"]


# ---------------------------------------------------------------- user files


def test_csv_file_loads_with_quoted_commas_and_newlines(tmp_path):
    path = write_csv(tmp_path / "d.csv", 'text,label\n"good, really",pos\n"two\nlines",neg\n')
    assert load_examples(str(path), "classification") == [
        {"text": "good, really", "label": "pos"},
        {"text": "two\nlines", "label": "neg"},
    ]


def test_csv_sentence_column_is_a_text_fallback(tmp_path):
    path = write_csv(tmp_path / "d.csv", "sentence,label\nfine,pos\n")
    assert load_examples(str(path), "classification") == [{"text": "fine", "label": "pos"}]


def test_explicit_columns_are_used(tmp_path):
    path = write_csv(tmp_path / "d.csv", "review,stars\nfine,5\n")
    examples = load_examples(str(path), "classification", text_column="review", label_column="stars")
    assert examples == [{"text": "fine", "label": "5"}]


def test_jsonl_file_loads_with_numeric_labels_as_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    assert load_examples(str(path), "classification") == [
        {"text": "a", "label": "1"},
        {"text": "b", "label": "0"},
    ]


def test_compressed_files_load(tmp_path):
    gz_path = tmp_path / "d.jsonl.gz"
    gz_path.write_bytes(gzip.compress(b'{"prompt": "p", "response": "r"}\n'))
    bz2_path = tmp_path / "d.csv.bz2"
    bz2_path.write_bytes(bz2.compress(b"prompt,response\np,r\n"))
    for path in (gz_path, bz2_path):
        assert load_examples(str(path), "causal_lm") == [{"prompt": "p", "response": "r"}]


def test_causal_lm_instruction_output_columns_are_fallbacks(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    assert load_examples(str(path), "causal_lm") == [{"prompt": "Say hi", "response": "hi"}]


def test_causal_lm_text_only_file_gives_empty_prompts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "once upon a time"}])
    assert load_examples(str(path), "causal_lm") == [{"prompt": "", "response": "once upon a time"}]


def sentiment_dataset(labels=(0, 1)):
    """A datasets.Dataset whose label column is a ClassLabel named neg/pos."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    return datasets.Dataset.from_dict({"text": ["dull", "fine"], "label": list(labels)}, features=features)


def test_parquet_file_loads_with_numeric_labels_as_text(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "d.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"review": ["a", "b"], "label": [1, 0]}), path)
    assert load_examples(str(path), "classification", text_column="review") == [
        {"text": "a", "label": "1"},
        {"text": "b", "label": "0"},
    ]


def test_parquet_written_by_datasets_gives_class_label_names(tmp_path):
    path = tmp_path / "d.parquet"
    sentiment_dataset().to_parquet(path)
    assert load_examples(str(path), "classification") == [
        {"text": "dull", "label": "neg"},
        {"text": "fine", "label": "pos"},
    ]


def test_save_to_disk_folder_loads_with_class_label_names(tmp_path):
    sentiment_dataset().save_to_disk(tmp_path / "saved")
    assert load_examples(str(tmp_path / "saved"), "classification") == [
        {"text": "dull", "label": "neg"},
        {"text": "fine", "label": "pos"},
    ]


def test_a_datasets_dataset_object_loads():
    import datasets

    chat = datasets.Dataset.from_dict({"instruction": ["Say hi"], "output": ["hi"]})
    assert load_examples(chat, "causal_lm") == [{"prompt": "Say hi", "response": "hi"}]
    assert load_examples(sentiment_dataset(), "classification")[1] == {"text": "fine", "label": "pos"}


# ---------------------------------------------------------------- bad input


def test_missing_file_raises_with_its_name(tmp_path):
    with pytest.raises(DataError, match="nope.csv"):
        load_examples(str(tmp_path / "nope.csv"), "classification")


def test_empty_file_raises_with_its_name(tmp_path):
    path = write_csv(tmp_path / "empty.csv", "")
    with pytest.raises(DataError, match="empty.csv.*empty"):
        load_examples(str(path), "classification")


def test_header_only_file_raises_with_its_name(tmp_path):
    path = write_csv(tmp_path / "header.csv", "text,label\n")
    with pytest.raises(DataError, match="header.csv.*no data rows"):
        load_examples(str(path), "classification")


def test_missing_column_lists_the_columns_found(tmp_path):
    path = write_csv(tmp_path / "cols.csv", "text,category\nfine,pos\n")
    with pytest.raises(DataError, match=r"cols.csv.*'label'.*columns found: text, category"):
        load_examples(str(path), "classification")


def test_empty_text_names_file_and_line(tmp_path):
    path = write_csv(tmp_path / "blank.csv", "text,label\nfine,pos\n  ,neg\n")
    with pytest.raises(DataError, match="blank.csv line 3: empty 'text'"):
        load_examples(str(path), "classification")


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,label\nfine,pos\ncaf\xe9,neg\n")
    with pytest.raises(DataError, match="latin.csv line 3: not valid UTF-8"):
        load_examples(str(path), "classification")


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", \n', encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl line 2: not valid JSON"):
        load_examples(str(path), "classification")


def test_unsupported_extension_raises(tmp_path):
    path = write_csv(tmp_path / "d.txt", "text,label\n")
    with pytest.raises(DataError, match=r"d.txt: unsupported file type"):
        load_examples(str(path), "classification")


def test_unseen_eval_label_raises_with_the_file_name(tmp_path, tiny_tokenizer):
    path = write_csv(tmp_path / "eval.csv", "text,label\nfine,pos\nodd,maybe\n")
    eval_examples = load_examples(str(path), "classification")
    with pytest.raises(DataError, match=r'label "maybe" in .*eval.csv never appears in training data'):
        classification_batches(eval_examples, tiny_tokenizer, ["neg", "pos"], 2, 16,
                               shuffle=False, seed=0, source=str(path))


# ---------------------------------------------------------------- batches


def test_classification_batches_have_label_ids_and_padding(tiny_tokenizer):
    examples = [{"text": "good", "label": "pos"}, {"text": "bad!!!", "label": "neg"},
                {"text": "ok", "label": "pos"}]
    batches = list(classification_batches(examples, tiny_tokenizer, ["neg", "pos"], 2, 16,
                                          shuffle=False, seed=0))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    first = batches[0]
    assert first["labels"].tolist() == [1, 0]
    assert first["input_ids"].shape == (2, 6)
    assert first["attention_mask"].tolist()[0] == [1, 1, 1, 1, 0, 0]
    assert (first["input_ids"][0, 4:] == tiny_tokenizer.pad_token_id).all()


def test_classification_batches_truncate_to_max_length(tiny_tokenizer):
    examples = [{"text": "a long review text", "label": "pos"}]
    (batch,) = classification_batches(examples, tiny_tokenizer, ["pos"], 1, 5, shuffle=False, seed=0)
    assert batch["input_ids"].shape == (1, 5)


def test_shuffled_batches_depend_only_on_seed_and_drop_last_drops(tiny_tokenizer):
    examples = [{"text": "x" * (i + 1), "label": "a"} for i in range(7)]

    def lengths(seed, drop_last=False):
        batches = classification_batches(examples, tiny_tokenizer, ["a"], 3, 32, shuffle=True,
                                         seed=seed, drop_last=drop_last)
        return [b["attention_mask"].sum(1).tolist() for b in batches]

    assert lengths(1) == lengths(1)
    assert lengths(1) != lengths(2)
    assert [len(b) for b in lengths(1, drop_last=True)] == [3, 3]


def test_causal_lm_labels_mask_prompt_and_padding(tiny_tokenizer):
    (batch,) = causal_lm_batches(PAIRS, tiny_tokenizer, 3, 64, shuffle=False, seed=0)
    for row, pair in enumerate(PAIRS):
        length = int(batch["attention_mask"][row].sum())
        prompt_length = len(pair["prompt"]) + 1  # characters plus the newline
        labels = batch["labels"][row]
        assert (labels[:prompt_length] == -100).all()
        assert (labels[length:] == -100).all()
        decoded = tiny_tokenizer.decode(response_tokens(batch, row), skip_special_tokens=True)
        assert decoded == pair["response"]
        assert response_tokens(batch, row)[-1] == tiny_tokenizer.eos_token_id


def test_causal_lm_uses_the_chat_template_when_there_is_one(tiny_tokenizer):
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    (batch,) = causal_lm_batches(PAIRS[:1], tiny_tokenizer, 1, 64, shuffle=False, seed=0)
    full = tiny_tokenizer.decode(batch["input_ids"][0])
    assert full == "<s>user: Hi there</s>\n<s>assistant: Hello!</s>\n"
    assert tiny_tokenizer.decode(response_tokens(batch, 0)) == "Hello!</s>\n"


def test_causal_lm_empty_prompt_trains_on_the_whole_text(tiny_tokenizer):
    (batch,) = causal_lm_batches([{"prompt": "", "response": "story"}], tiny_tokenizer, 1, 64,
                                 shuffle=False, seed=0)
    assert tiny_tokenizer.decode(response_tokens(batch, 0)) == "story</s>"


def test_causal_lm_truncation_keeps_prompt_start_and_some_response(tiny_tokenizer):
    pair = {"prompt": "p" * 30, "response": "r" * 30}
    (batch,) = causal_lm_batches([pair], tiny_tokenizer, 1, 10, shuffle=False, seed=0)
    assert batch["input_ids"].shape == (1, 10)
    assert tiny_tokenizer.decode(batch["input_ids"][0]) == "p" * 5 + "r" * 5
    assert tiny_tokenizer.decode(response_tokens(batch, 0)) == "r" * 5


def test_tokenized_dataset_collates_like_the_batch_functions(tiny_tokenizer):
    dataset = TokenizedDataset(PAIRS, tiny_tokenizer, "causal_lm", max_length=64)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=dataset.collate)
    expected = causal_lm_batches(PAIRS, tiny_tokenizer, 2, 64, shuffle=False, seed=0)
    for got, want in zip(loader, expected, strict=True):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[key], want[key]) for key in got)


def test_tokenized_dataset_classification_items_carry_label_ids(tiny_tokenizer):
    examples = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    dataset = TokenizedDataset(examples, tiny_tokenizer, "classification", 16, labels=["neg", "pos"])
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["labels"].tolist() == [1, 0]


def test_unlabelled_row_of_a_dataset_names_the_row():
    with pytest.raises(DataError, match=r"the Dataset row 1: 'label' is -1, not one of its 2 class ids"):
        load_examples(sentiment_dataset(labels=(0, -1)), "classification")


def test_bad_parquet_row_names_file_and_row(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "d.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": ["a", ""], "label": ["x", "y"]}), path)
    with pytest.raises(DataError, match=r"d.parquet row 1: empty 'text'"):
        load_examples(str(path), "classification")


def test_corrupt_parquet_file_raises_with_its_name(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"d.parquet: not a readable Parquet file \(.+\)$"):
        load_examples(str(path), "classification")


def dataset_dict():
    import datasets

    return datasets.DatasetDict(train=sentiment_dataset(), test=sentiment_dataset())


def test_a_dataset_dict_asks_for_one_split():
    with pytest.raises(DataError, match=r"holds the splits train, test; pass one of them, e.g. dataset\['train'\]"):
        load_examples(dataset_dict(), "classification")


def test_a_saved_dataset_dict_folder_asks_for_one_splits_folder(tmp_path):
    dataset_dict().save_to_disk(tmp_path / "saved")
    with pytest.raises(DataError, match=r"saved holds the splits test, train of a DatasetDict; pass one split's "
                                        r"folder, e.g. \S*saved/test$"):
        load_examples(str(tmp_path / "saved"), "classification")


def test_folder_not_written_by_save_to_disk_raises(tmp_path):
    with pytest.raises(DataError, match=r"not one written by datasets' save_to_disk"):
        load_examples(str(tmp_path), "classification")


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    import importlib

    from siftune.recipes import data

    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    import_module = importlib.import_module

    def without_pyarrow(name, *rest):
        if name.startswith("pyarrow"):
            raise ImportError(f"No module named {name!r}")
        return import_module(name, *rest)

    monkeypatch.setattr(data.importlib, "import_module", without_pyarrow)
    with pytest.raises(DataError, match=r"^\S*d.parquet: reading Parquet needs the pyarrow package; "
                                        r"pip install siftune\[data\]$"):
        load_examples(str(path), "classification")
