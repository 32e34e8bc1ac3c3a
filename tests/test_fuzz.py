"""Fuzzing the readers of untrusted files: nothing but siftune's own errors may escape.

Every test feeds random or mutated input to one reader and fails on any
exception that is not a :class:`siftune.SiftError` (a bug: a crash with a
traceback instead of a one-line message). Readers that accept the input are
pushed one stage further (an increment is applied, examples are tokenised)
to show the accepted input is really usable.
"""
from __future__ import annotations

import argparse
import copy
import csv
import gzip
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

sys.path.insert(0, str(Path(__file__).parent))
import siftune  # noqa: E402
from siftune import CheckpointError, ConfigError, DataError, IncrementError, SparseIncrement  # noqa: E402
from siftune.artifacts import checkpoint  # noqa: E402
from siftune.recipes import data  # noqa: E402
from siftune.cli import train_args_from  # noqa: E402
from _models import MLP_DENSE, MLP_TARGETS, mlp, mlp_batches, mlp_loss  # noqa: E402
from conftest import make_tiny_tokenizer  # noqa: E402

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WEIGHTS, HEADER = "increment.safetensors", "increment_config.json"
SCRATCH = Path(tempfile.mkdtemp(prefix="siftune-fuzz-"))  # rewritten by every example, removed at the end


@pytest.fixture(scope="module", autouse=True)
def _remove_scratch():
    yield
    shutil.rmtree(SCRATCH, ignore_errors=True)


def write(content: bytes, name: str) -> Path:
    """``content`` as SCRATCH/name (replacing the previous example's file)."""
    path = SCRATCH / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def mutate(blob: bytes, edits, cut) -> bytes:
    """``blob`` with bytes overwritten at (fraction of the length, byte) positions, then cut to a fraction."""
    out = bytearray(blob)
    for where, byte in edits:
        if out:
            out[int(where * (len(out) - 1))] = byte
    return bytes(out[: int(cut * len(out))] if cut < 1 else out)


mutations = st.tuples(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6),
                      st.floats(0, 1) | st.just(1.0))


# -- increment folders -------------------------------------------------------------------------------

def _trained_increment():
    base = mlp()
    model = copy.deepcopy(base)
    engine = siftune.attach(model, density=0.2, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE)
    optimizer = engine.optimizer(lr=1e-2)
    for batch in mlp_batches(2):
        mlp_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = engine.increment(base_model="mlp").save(SCRATCH / "good")
    return base, (folder / WEIGHTS).read_bytes(), (folder / HEADER).read_bytes()


BASE, GOOD_WEIGHTS, GOOD_HEADER = _trained_increment()


def load_and_apply(weights: bytes, header: bytes) -> None:
    """Load an increment from these two files and apply it to a fresh base; a refusal must leave it untouched."""
    write(weights, f"increment/{WEIGHTS}")
    write(header, f"increment/{HEADER}")
    try:
        increment = SparseIncrement.load(SCRATCH / "increment")
    except IncrementError:
        return
    increment.summary()
    model = copy.deepcopy(BASE)
    try:
        increment.apply(model)
    except IncrementError:
        for (name, before), after in zip(BASE.named_parameters(), model.parameters()):
            assert torch.equal(before, after), f"{name} changed by a refused increment"


@FUZZ
@given(st.binary(max_size=4096))
def test_random_weights_file_gives_only_increment_errors(blob):
    load_and_apply(blob, GOOD_HEADER)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_header_file_gives_only_increment_errors(blob):
    load_and_apply(GOOD_WEIGHTS, blob)


@FUZZ
@given(mutations)
def test_mutated_weights_file_gives_only_increment_errors(mutation):
    load_and_apply(mutate(GOOD_WEIGHTS, *mutation), GOOD_HEADER)


@FUZZ
@given(mutations)
def test_mutated_header_file_gives_only_increment_errors(mutation):
    load_and_apply(GOOD_WEIGHTS, mutate(GOOD_HEADER, *mutation))


HEADER_PATHS = [("format_version",), ("format",), ("base_model",), ("sift_config",), ("metadata",), ("tensors",),
                ("dense",), ("tensors", "0.weight"), ("tensors", "0.weight", "shape"),
                ("tensors", "0.weight", "dtype"), ("dense", "4.weight"), ("dense", "4.weight", "shape"),
                ("tensors", "9.weight")]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(HEADER_PATHS), json_values), min_size=1, max_size=3))
def test_header_fields_of_any_json_type_give_only_increment_errors(edits):
    header = json.loads(GOOD_HEADER)
    for path, value in edits:
        holder = header
        for key in path[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(holder, dict):
            holder[path[-1]] = value
    load_and_apply(GOOD_WEIGHTS, json.dumps(header).encode())


TENSOR_KEYS = ["0.weight::indices", "0.weight::values", "2.weight::indices", "2.weight::values",
               "4.weight::dense", "4.bias::dense", "9.weight::values"]
DTYPES = [torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
          torch.bool, torch.uint8]


@st.composite
def replacement_tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 40), max_size=2))
    numbers = draw(st.lists(st.integers(-300, 300) | st.sampled_from([float("nan"), float("inf")]),
                            min_size=1, max_size=8))
    values = torch.tensor(numbers, dtype=torch.float64)
    count = 1
    for d in shape:
        count *= d
    flat = values.repeat(count // len(numbers) + 1)[:count]
    if not dtype.is_floating_point:
        flat = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    return flat.reshape(shape).to(dtype)


@FUZZ
@given(st.dictionaries(st.sampled_from(TENSOR_KEYS), replacement_tensors(), min_size=1, max_size=3),
       st.lists(st.sampled_from(TENSOR_KEYS), max_size=2))
def test_weights_with_tensors_of_any_dtype_shape_and_value_give_only_increment_errors(replaced, dropped):
    from safetensors.torch import load

    tensors = load(GOOD_WEIGHTS)
    tensors.update(replaced)
    for key in dropped:
        tensors.pop(key, None)
    load_and_apply(save_safetensors(tensors), GOOD_HEADER)


# -- dataset files -----------------------------------------------------------------------------------

TOKENIZER = make_tiny_tokenizer()
COLUMNS = ["text", "label", "prompt", "response", "sentence", "instruction", "output", "x", ""]
cells = st.text(max_size=12) | st.sampled_from(["", " ", "0", "1", '"', "a,b", "line\nbreak", "\x00", "é"])


def read_and_tokenise(path: Path, task: str, **columns) -> None:
    """Load a dataset file; when it loads, tokenise it as training would."""
    try:
        examples = data.load_examples(str(path), task, **columns)
        labels = data.label_names(examples) if task == "classification" else None
        data.TokenizedDataset(examples, TOKENIZER, task, max_length=16, labels=labels, source=str(path))
    except DataError:
        pass


tasks = st.sampled_from(["classification", "causal_lm"])
suffixes = st.sampled_from([".csv", ".jsonl", ".csv.gz", ".jsonl.gz", ".csv.bz2", ".jsonl.bz2"])


@FUZZ
@given(st.binary(max_size=1024), suffixes, tasks)
def test_random_bytes_as_a_dataset_give_only_data_errors(blob, suffix, task):
    read_and_tokenise(write(blob, "data" + suffix), task)


@FUZZ
@given(st.binary(max_size=512), mutations, st.sampled_from([".csv.gz", ".jsonl.gz"]), tasks)
def test_damaged_compressed_datasets_give_only_data_errors(text, mutation, suffix, task):
    read_and_tokenise(write(mutate(gzip.compress(text), *mutation), "data" + suffix), task)


@FUZZ
@given(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=4), st.lists(st.lists(cells, max_size=5), max_size=6),
       tasks, st.sampled_from([None, "text", "x", "missing"]), st.sampled_from([None, "label", "x"]))
def test_csv_files_of_any_shape_give_only_data_errors(header, rows, task, text_column, label_column):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    read_and_tokenise(write(buffer.getvalue().encode("utf-8", "surrogatepass"), "data.csv"), task,
                      text_column=text_column, label_column=label_column)


@FUZZ
@given(st.lists(st.dictionaries(st.sampled_from(COLUMNS), json_values, max_size=4) | json_values, max_size=6),
       tasks)
def test_jsonl_lines_of_any_json_value_give_only_data_errors(records, task):
    lines = "\n".join(json.dumps(r) for r in records)
    read_and_tokenise(write(lines.encode(), "data.jsonl"), task)


# -- checkpoints and configs -------------------------------------------------------------------------

def _good_checkpoint() -> bytes:
    model = mlp()
    engine = siftune.attach(model, density=0.2, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE)
    optimizer = engine.optimizer(lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    optimizer.step()
    optimizer.zero_grad()
    return checkpoint.encode(checkpoint.capture(1, engine, optimizer, scheduler, {}))


GOOD_CHECKPOINT = _good_checkpoint()


def decode_only_checkpoint_errors(blob: bytes) -> None:
    path = write(blob, "checkpoint.pt")
    try:
        checkpoint.decode(path)
    except CheckpointError:
        pass


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_as_a_checkpoint_give_only_checkpoint_errors(blob):
    decode_only_checkpoint_errors(blob)


@FUZZ
@given(mutations)
def test_mutated_checkpoint_payload_with_a_matching_checksum_gives_only_checkpoint_errors(mutation):
    import hashlib

    start = len(checkpoint.MAGIC) + 32
    payload = mutate(GOOD_CHECKPOINT[start:], *mutation)
    decode_only_checkpoint_errors(checkpoint.MAGIC + hashlib.sha256(payload).digest() + payload)


SLOT_FIELDS = ["k", "version", "selecting", "seen", "idx", "score", "ever_idx", "base", "generator"]
odd_values = json_values | replacement_tensors()


@FUZZ
@given(st.dictionaries(st.sampled_from(SLOT_FIELDS), odd_values, min_size=1, max_size=3))
def test_engine_state_with_fields_of_any_type_gives_only_checkpoint_errors(edits):
    state = checkpoint.decode(write(GOOD_CHECKPOINT, "checkpoint.pt"))["engine"]
    state["slots"]["0.weight"].update(edits)
    engine = siftune.attach(mlp(), density=0.2, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE)
    try:
        engine.load_state_dict(state)
    except CheckpointError:
        pass


TRAIN_FIELDS = ["density", "lr", "steps", "epochs", "batch_size", "target_modules", "dense_modules", "mode",
                "seed", "eval_size", "dense_lr", "resume", "checkpoint_every", "nonfinite", "max_grad_norm",
                "selection_batches", "dtype", "task", "unknown"]


@FUZZ
@given(st.dictionaries(st.sampled_from(TRAIN_FIELDS), json_values | st.sampled_from(["(", "[a-", "*"]),
                       max_size=4))
def test_yaml_config_values_of_any_type_give_only_config_errors(values):
    import yaml

    path = write(yaml.safe_dump(values).encode(), "config.yaml")
    try:
        train_args_from(argparse.Namespace(config=str(path)))
    except ConfigError:
        pass


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_as_a_yaml_config_give_only_config_errors(blob):
    try:
        train_args_from(argparse.Namespace(config=str(write(blob, "config.yaml"))))
    except ConfigError:
        pass


def test_fuzz_inputs_include_files_the_readers_accept():
    # The properties above would hold vacuously if every input were refused.
    load_and_apply(GOOD_WEIGHTS, GOOD_HEADER)
    assert SparseIncrement.load(SCRATCH / "good").tensors
    assert checkpoint.decode(write(GOOD_CHECKPOINT, "checkpoint.pt"))["step"] == 1
    rows = b'{"text": "a", "label": 1}\n{"text": "b", "label": "x"}\n'
    assert len(data.load_examples(str(write(rows, "data.jsonl")), "classification")) == 2
