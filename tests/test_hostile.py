"""siftune used carelessly or adversarially: nothing lost, nothing silently wrong.

Each case runs the command (or the call) as a user would, at tiny scale, and
checks three things: the exit code, the one-line message, and that no file
was lost, changed or left half-written.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import siftune
from siftune import SparseIncrement
from siftune.cli import main
from siftune.errors import IncrementError

from _models import mlp, mlp_batches, mlp_loss


# -- what a folder holds, to show nothing was lost or changed ----------------------------------------------------

def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path: its SHA-256 (and a link's target)."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[key] = "folder"
    return found


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders an interrupted write would leave."""
    return [str(p) for p in Path(folder).rglob("*") if p.name.endswith(".tmp") or ".partial" in p.name]


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"siftune {command}: error: "), err
    return err


# -- a tiny trained run ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny BERT classifier folder and an 80-row CSV with the README's column names."""
    from conftest import make_tiny_tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, pad_token_id=0)).save_pretrained(folder / "model")
    make_tiny_tokenizer().save_pretrained(folder / "model")
    rows = ["review,stars"] + [f"{'good fun' if i % 2 else 'dull slow'} film {i},{'pos' if i % 2 else 'neg'}"
                               for i in range(80)]
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return folder


def train_flags(inputs: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(inputs / "model"), "--dataset", str(inputs / "data.csv"),
            "--text-column", "review", "--label-column", "stars", "--output-dir", str(out), "--steps", "2",
            "--batch-size", "8", "--max-length", "12", "--eval-size", "8", "--warmup-steps", "1",
            "--density", "0.05", "--lr", "0.01", "--quiet", *extra]


@pytest.fixture(scope="module")
def trained_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(train_flags(inputs, out)) == 0
    return out


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of the trained run's folder, free to damage."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


# -- merge never destroys what it did not create ------------------------------------------------------------------

def test_merge_into_a_folder_that_is_not_empty_is_refused_naming_overwrite(run, tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    before = snapshot(tmp_path)
    assert main(["merge", str(run), str(out)]) == 2
    error = one_line_error(capsys, "merge")
    assert "not empty" in error and "--overwrite" in error
    assert snapshot(tmp_path) == before


def test_merge_onto_an_existing_file_is_refused_naming_overwrite(run, tmp_path, capsys):
    out = tmp_path / "f"
    out.write_text("x")
    before = snapshot(tmp_path)
    assert main(["merge", str(run), str(out)]) == 2
    error = one_line_error(capsys, "merge")
    assert "existing file" in error and "--overwrite" in error
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["the increment's folder", "its parent", "the current folder", "above it"])
def test_merge_with_overwrite_never_replaces_the_increment_or_the_current_folder(run, tmp_path, capsys, monkeypatch,
                                                                               where):
    monkeypatch.chdir(run)
    out = {"the increment's folder": str(run), "its parent": str(tmp_path), "the current folder": ".",
           "above it": ".."}[where]
    before = snapshot(tmp_path)
    assert main(["merge", str(run), out, "--overwrite"]) == 2
    error = one_line_error(capsys, "merge")
    assert "never replaced" in error and "choose another output folder" in error
    assert snapshot(tmp_path) == before


def test_merge_with_overwrite_never_replaces_the_base_models_folder(run, inputs, tmp_path, capsys):
    base = Path(shutil.copytree(inputs / "model", tmp_path / "base"))
    before = snapshot(tmp_path)
    assert main(["merge", str(run), str(base), "--base-model", str(base), "--overwrite"]) == 2
    assert "the base model" in one_line_error(capsys, "merge")
    assert snapshot(tmp_path) == before


def test_merge_with_overwrite_replaces_a_folder_once_the_merged_one_is_complete(run, tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["merge", str(run), str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert leftovers(tmp_path) == []


def test_merge_into_an_empty_folder_needs_no_overwrite(run, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["merge", str(run), str(out)]) == 0
    assert (out / "model.safetensors").is_file()


def test_a_merge_that_fails_while_writing_leaves_nothing_behind(run, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    def full_disk(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    before = snapshot(tmp_path)
    assert main(["merge", str(run), str(tmp_path / "new" / "deeper" / "merged")]) == 2
    assert "No space left on device" in one_line_error(capsys, "merge")
    assert snapshot(tmp_path) == before  # not even the parent folders it would have made


def test_a_failing_merge_with_overwrite_keeps_the_folder_it_would_replace(run, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                        lambda *args, **kwargs: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    before = snapshot(tmp_path)
    assert main(["merge", str(run), str(out), "--overwrite"]) == 2
    one_line_error(capsys, "merge")
    assert snapshot(tmp_path) == before


def test_merge_with_overwrite_replaces_a_file(run, tmp_path):
    out = tmp_path / "f"
    out.write_text("x")
    assert main(["merge", str(run), str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and leftovers(tmp_path) == []


def test_a_merge_whose_swap_fails_puts_the_old_folder_back_and_leaves_nothing_behind(run, tmp_path, capsys,
                                                                                     monkeypatch):
    import siftune.artifacts.io as io

    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    real_replace = io.os.replace

    def busy_on_the_new_folder(source, destination):
        if Path(source).name.startswith(".d.") and Path(destination) == out:
            raise OSError(16, "Device or resource busy")
        real_replace(source, destination)

    monkeypatch.setattr(io.os, "replace", busy_on_the_new_folder)
    before = snapshot(tmp_path)
    assert main(["merge", str(run), str(out), "--overwrite"]) == 2
    assert "Device or resource busy" in one_line_error(capsys, "merge")
    assert snapshot(tmp_path) == before


# -- increments are verified -----------------------------------------------------------------------------------

def flip_a_float(weights: Path, key_suffix: str = "::values") -> str:
    """Change one float32 of the first tensor whose key ends with ``key_suffix``, in place; returns its key."""
    data = bytearray(weights.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    key = next(k for k in sorted(header) if k.endswith(key_suffix) and header[k]["shape"] != [0])
    start = 8 + header_len + header[key]["data_offsets"][0]
    (value,) = struct.unpack("<f", data[start:start + 4])
    data[start:start + 4] = struct.pack("<f", value + 7.3e4)
    weights.write_bytes(bytes(data))
    return key


@pytest.mark.parametrize("command", ["info", "merge"])
def test_a_flipped_float_in_the_increment_is_an_error_naming_the_tensor(run, tmp_path, capsys, command):
    key = flip_a_float(run / "increment.safetensors")
    before = snapshot(tmp_path)
    args = ["info", str(run)] if command == "info" else ["merge", str(run), str(tmp_path / "merged")]
    assert main(args) == 2
    error = one_line_error(capsys, command)
    assert f"tensor {key} does not match its SHA-256" in error
    assert snapshot(tmp_path) == before


def test_a_flipped_float_in_a_dense_tensor_is_an_error_naming_it(run):
    key = flip_a_float(run / "increment.safetensors", "::dense")
    with pytest.raises(IncrementError, match=f"tensor {key.replace('.', '[.]')} does not match its SHA-256"):
        SparseIncrement.load(run)


def test_an_edited_checksum_is_an_error_naming_the_tensor(run):
    for name in ("increment_config.json",):
        header = json.loads((run / name).read_text())
        key = sorted(header["sha256"])[0]
        header["sha256"][key] = "0" * 64
        (run / name).write_text(json.dumps(header))
    # The weights file's own copy of the header still agrees with its tensors; the JSON is what load reads.
    with pytest.raises(IncrementError, match=f"tensor {key.replace('.', '[.]')} does not match"):
        SparseIncrement.load(run)


def test_an_increment_saved_before_checksums_loads_with_one_warning(run, capsys):
    strip_checksums(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SparseIncrement.load(run)
        SparseIncrement.load(run)
    assert len(caught) == 1 and "saved without checksums" in str(caught[0].message)
    assert main(["info", str(run)]) == 0  # still usable from the command line


def strip_checksums(run: Path) -> None:
    """Make ``run``'s increment look as an older siftune saved it: no SHA-256 in either header."""
    tensors = load_file(str(run / "increment.safetensors"))
    header = json.loads((run / "increment_config.json").read_text())
    del header["sha256"]
    save_file(tensors, str(run / "increment.safetensors"), metadata={"format": "siftune", "header": json.dumps(header)})
    (run / "increment_config.json").write_text(json.dumps(header))


def test_the_command_says_a_warning_in_one_line_of_its_own(run):
    import subprocess
    import sys

    strip_checksums(run)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "siftune.cli", "info", str(run)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "checksums" in line]
    assert said == [f"siftune info: warning: {run / 'increment.safetensors'} was saved without checksums (by an "
                    "older siftune), so damage to it cannot be detected; save the increment again to add them"]


def test_the_command_leaves_warnings_formatted_as_it_found_them(run):
    before = warnings.formatwarning
    assert main(["info", str(run)]) == 0
    assert warnings.formatwarning is before


def test_saved_checksums_are_of_the_stored_tensors(run):
    header = json.loads((run / "increment_config.json").read_text())
    tensors = load_file(str(run / "increment.safetensors"))
    assert set(header["sha256"]) == set(tensors)
    for key, tensor in tensors.items():
        assert header["sha256"][key] == hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy()).hexdigest()


# -- apply twice -------------------------------------------------------------------------------------------------

def trained_mlp_increment(dtype=torch.float32):
    model = mlp(dtype=dtype)
    engine = siftune.attach(model, siftune.SiftConfig(density=0.2, target_modules=["0", "2"], dense_modules=["4"]))
    optimizer = engine.optimizer(lr=0.05)
    for batch in mlp_batches(2, dtype=dtype):
        mlp_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return engine.increment(base_model="tiny-mlp")


@pytest.mark.parametrize("again", ["the same object", "a copy loaded from disk"])
def test_applying_an_increment_twice_is_an_error_and_changes_nothing(tmp_path, again):
    increment = trained_mlp_increment()
    model = mlp(seed=5)
    increment.apply(model)
    applied = copy.deepcopy(model.state_dict())
    second = increment if again == "the same object" else SparseIncrement.load(increment.save(tmp_path / "inc"))
    with pytest.raises(IncrementError, match="already applied to this model"):
        second.apply(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, applied[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_remove_restores_the_base_bit_for_bit(dtype):
    increment = trained_mlp_increment(dtype)
    model = mlp(seed=5, dtype=dtype)
    base = copy.deepcopy(model.state_dict())
    increment.apply(model)
    increment.remove(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, base[name]), name
    increment.apply(model)  # and it can go on again once removed
    assert increment.applied_to(model)


def test_merge_of_a_model_given_with_the_increment_applied_writes_it_once(tmp_path):
    from _models import tiny_bert_classifier

    model = tiny_bert_classifier()
    engine = siftune.attach(model, siftune.SiftConfig(density=0.1, target_modules=["query"]))
    optimizer = engine.optimizer(lr=1e-2)
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    increment = engine.increment()
    base = tiny_bert_classifier()
    increment.apply(base)
    expected = copy.deepcopy(base.state_dict())
    increment.merge(tmp_path / "merged", model=base)
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for name, value in merged.items():
        assert torch.equal(value, expected[name]), name
    assert increment.applied_to(base)  # left as it was given


# -- file modes ------------------------------------------------------------------------------------------------

@pytest.fixture
def umask_0022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_siftune_writes_are_readable_as_the_umask_allows(inputs, tmp_path, umask_0022):
    out = tmp_path / "run"
    assert main(train_flags(inputs, out, "--checkpoint-every", "1")) == 0
    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0
    plain = tmp_path / "plain"
    plain.write_text("x")  # what an ordinary open() gives here
    (tmp_path / "plain-folder").mkdir()
    file_mode, folder_mode = plain.stat().st_mode & 0o777, (tmp_path / "plain-folder").stat().st_mode & 0o777
    assert (file_mode, folder_mode) == (0o644, 0o755)
    written = [p for p in (out, tmp_path / "merged") for p in [p, *p.rglob("*")]]
    assert any(p.name == "model.safetensors" for p in written)
    for path in written:
        assert path.stat().st_mode & 0o777 == (folder_mode if path.is_dir() else file_mode), path


def test_a_replaced_file_keeps_its_own_mode(tmp_path, umask_0022):
    from siftune.artifacts.io import atomic_write_text

    path = tmp_path / "notes.txt"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o640


# -- resume: never a silent fresh start, never a lost checkpoint ---------------------------------------------------

@pytest.fixture
def checkpointed(inputs, tmp_path):
    """A run that left checkpoints (as if it had died after step 2 of 3)."""
    out = tmp_path / "run"
    assert main(train_flags(inputs, out, "--checkpoint-every", "1")) == 0
    (out / "checkpoints" / "checkpoint-00000002.pt").unlink()
    return out


def test_a_run_without_resume_into_a_folder_with_checkpoints_refuses_and_keeps_them(inputs, checkpointed, tmp_path,
                                                                                    capsys):
    before = snapshot(tmp_path)
    assert main(train_flags(inputs, checkpointed, "--checkpoint-every", "1")) == 2
    error = one_line_error(capsys, "train")
    assert "holds checkpoints of an earlier run" in error and "--resume" in error and "--overwrite" in error
    assert snapshot(tmp_path) == before


def test_a_run_with_overwrite_deletes_the_earlier_checkpoints_and_trains_afresh(inputs, checkpointed, capsys):
    assert main(train_flags(inputs, checkpointed, "--overwrite")) == 0
    assert "resuming" not in capsys.readouterr().out
    assert not list((checkpointed / "checkpoints").iterdir())


def sharded_checkpoint(folder: Path, step: int, processes: int) -> Path:
    """A checkpoint folder laid out as ``--fsdp`` writes it: one part per process, through torch's DCP."""
    import torch.distributed.checkpoint as dcp

    path = folder / f"checkpoint-{step:08d}"
    parts = {f"rank{rank}/0": torch.zeros(4) for rank in range(processes)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process": it is
        dcp.save(parts, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    return path


def test_resuming_a_sharded_checkpoint_in_one_process_is_an_error_not_a_fresh_start(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    sharded_checkpoint(out / "checkpoints", 3, processes=2)
    before = snapshot(tmp_path)
    assert main(train_flags(inputs, out, "--resume")) == 2
    error = one_line_error(capsys, "train")
    assert "sharded checkpoint, written with --fsdp by 2 processes" in error
    assert "torchrun --nproc_per_node 2" in error and "--overwrite" in error
    assert snapshot(tmp_path) == before


def test_resuming_a_single_process_checkpoint_with_fsdp_is_an_error(inputs, checkpointed, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun starts rank 0; the error comes before the job joins
    before = snapshot(tmp_path)
    assert main(train_flags(inputs, checkpointed, "--resume", "--fsdp", "--batch-size", "8")) == 2
    assert "written by one process without --fsdp" in one_line_error(capsys, "train")
    assert snapshot(tmp_path) == before


def test_resuming_a_sharded_checkpoint_on_another_number_of_processes_is_an_error(inputs, tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    sharded_checkpoint(out / "checkpoints", 3, processes=2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(train_flags(inputs, out, "--resume", "--fsdp")) == 2
    assert "written by 2 processes, this job has 4" in one_line_error(capsys, "train")


def test_resume_finds_the_same_dataset_by_another_path(inputs, checkpointed, tmp_path, capsys, monkeypatch):
    moved = Path(shutil.copy(inputs / "data.csv", tmp_path / "elsewhere.csv"))
    monkeypatch.chdir(tmp_path)
    flags = train_flags(inputs, checkpointed, "--resume")
    flags[flags.index("--dataset") + 1] = moved.name  # relative, and another file with the same rows
    assert main(flags) == 0
    assert "resuming from" in capsys.readouterr().out


def test_resume_with_a_dataset_whose_content_changed_is_an_error_naming_it(inputs, checkpointed, tmp_path, capsys):
    data = Path(shutil.copy(inputs / "data.csv", tmp_path / "data.csv"))
    flags = train_flags(inputs, checkpointed, "--overwrite")
    flags[flags.index("--dataset") + 1] = str(data)
    assert main(flags + ["--checkpoint-every", "1"]) == 0
    capsys.readouterr()
    data.write_text(data.read_text().replace("film 3,", "movie 3,"))  # same path, other rows
    before = snapshot(tmp_path)
    flags[flags.index("--overwrite")] = "--resume"
    assert main(flags + ["--checkpoint-every", "1"]) == 2
    error = one_line_error(capsys, "train")
    assert "other settings (dataset:" in error and str(data) in error
    assert snapshot(tmp_path) == before


# -- configuration and command-line edges --------------------------------------------------------------------------

def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_a_yaml_key_given_twice_is_an_error_with_its_line(inputs, tmp_path, capsys):
    config = write_yaml(tmp_path, "lr: 0.01\nsteps: 2\nlr: 0.02\n")
    assert main(train_flags(inputs, tmp_path / "run") + ["--config", str(config)]) == 2
    error = one_line_error(capsys, "train")
    assert "line 3: key 'lr' is given twice (the first at line 1)" in error
    assert not (tmp_path / "run").exists()


def test_a_yaml_syntax_error_gives_its_line_and_column(inputs, tmp_path, capsys):
    config = write_yaml(tmp_path, "lr: 0.01\n  steps: 2\n")
    assert main(train_flags(inputs, tmp_path / "run") + ["--config", str(config)]) == 2
    assert "config.yaml, line 2, column 8: not valid YAML" in one_line_error(capsys, "train")


def test_a_yaml_target_modules_string_trains_as_the_one_item_list_does(inputs, tmp_path):
    increments = []
    for name, value in (("string", "query"), ("list", "[query]")):
        config = write_yaml(tmp_path, f"target_modules: {value}\n")
        assert main(train_flags(inputs, tmp_path / name) + ["--config", str(config)]) == 0
        increments.append(SparseIncrement.load(tmp_path / name))
    assert sorted(increments[0].tensors) == sorted(increments[1].tensors)
    assert increments[0].tensors and all(name.endswith("query.weight") for name in increments[0].tensors)


def test_a_target_modules_string_in_python_matches_as_the_one_item_list_does():
    from _models import tiny_bert_classifier

    targeted = [sorted(slot.name for slot in siftune.attach(tiny_bert_classifier(),
                                                            siftune.SiftConfig(target_modules=value)).slots)
                for value in ("query", ["query"])]
    assert targeted[0] == targeted[1] and len(targeted[0]) == 2


@pytest.mark.parametrize("field, value, says", [
    ("density", "0.01", "density must be a number in (0, 1]"),
    ("mode", 5, "mode must be one of"),
    ("format_version", "1", "format_version must be an integer, got '1' (str)"),
    ("format_version", 2, "newer than this siftune reads"),
])
def test_a_malformed_increment_config_field_is_an_error_naming_the_file(run, tmp_path, capsys, field, value, says):
    config = run / "increment_config.json"
    header = json.loads(config.read_text())
    (header if field == "format_version" else header["sift_config"])[field] = value
    config.write_text(json.dumps(header))
    before = snapshot(tmp_path)
    assert main(["info", str(run)]) == 2
    error = one_line_error(capsys, "info")
    assert f"{config}" in error and says in error and "increment.safetensors" not in error
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("entry, says", [("shape", "shape [0] must be a list of positive integers"),
                                         ("dtype", "dtype 'float8' must be one of")])
def test_a_bad_shape_or_dtype_in_increment_config_names_that_file(run, capsys, entry, says):
    config = run / "increment_config.json"
    header = json.loads(config.read_text())
    name = sorted(header["tensors"])[0]
    header["tensors"][name][entry] = [0] if entry == "shape" else "float8"
    config.write_text(json.dumps(header))
    assert main(["info", str(run)]) == 2
    error = one_line_error(capsys, "info")
    assert error.startswith(f"siftune info: error: {config}: tensor {name}: {says}")


@pytest.mark.parametrize("flags, says", [
    (["--fsdp", "--quantize", "nf4"], "fsdp cannot be combined with quantize"),
    (["--fsdp", "--storage", "delta"], "fsdp cannot be combined with storage delta"),
])
def test_a_refused_combination_fails_before_anything_is_loaded(inputs, tmp_path, capsys, monkeypatch, flags, says):
    import siftune.recipes.models

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(siftune.recipes.models, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    assert main(train_flags(inputs, tmp_path / "run", *flags)) == 2
    error = one_line_error(capsys, "train")
    assert says in error and flags[0] in error and flags[1] in error
    assert not (tmp_path / "run").exists()


def test_under_a_launcher_a_refused_combination_is_said_once_by_rank_0(inputs, tmp_path):
    import subprocess
    import sys

    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "PYTHONPATH": os.pathsep.join(sys.path)}
        procs.append(subprocess.Popen([sys.executable, "-m", "siftune.cli", *train_flags(inputs, tmp_path / "run"),
                                       "--fsdp", "--quantize", "nf4"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2]
    said = [[line for line in err.splitlines() if line.startswith("siftune")] for _, err in results]
    assert len(said[0]) == 1 and "--fsdp" in said[0][0] and said[1] == []
    assert "Traceback" not in results[0][1] + results[1][1]


def test_the_readme_csv_example_trains_on_an_80_row_file(inputs, tmp_path, capsys):
    flags = train_flags(inputs, tmp_path / "run")
    del flags[flags.index("--eval-size"):flags.index("--eval-size") + 2]  # the default held-out size
    assert main(flags) == 0
    assert "(72 train / 8 held out)" in capsys.readouterr().out


def test_resume_and_overwrite_together_are_refused(inputs, checkpointed, tmp_path, capsys):
    before = snapshot(tmp_path)
    assert main(train_flags(inputs, checkpointed, "--resume", "--overwrite")) == 2
    assert "contradict each other" in one_line_error(capsys, "train")
    assert snapshot(tmp_path) == before
