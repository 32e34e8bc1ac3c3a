"""Checkpoints: the complete training state survives SIGKILL, damaged files and failing disks."""
from __future__ import annotations

import copy
import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import siftune  # noqa: E402
from siftune import CheckpointError, WriteError, cli  # noqa: E402
from siftune.artifacts import checkpoint  # noqa: E402
from _models import MLP_DENSE, MLP_TARGETS, mlp, mlp_batches, mlp_loss  # noqa: E402

# -- the training state, in process -------------------------------------------------------------


def sift(model, **overrides):
    """Engine, optimizer and an LR scheduler whose factor changes every step, for the MLP."""
    config = siftune.SiftConfig(**{"density": 0.2, "target_modules": MLP_TARGETS, "dense_modules": MLP_DENSE,
                                   **overrides})
    engine = siftune.attach(model, config)
    optimizer = engine.optimizer(lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return engine, optimizer, scheduler


def train(model, optimizer, scheduler, batches, accum=1):
    for i in range(0, len(batches), accum):
        for batch in batches[i:i + accum]:
            mlp_loss(model, batch).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def round_trip(state: dict, folder: Path) -> dict:
    """``state`` written as a checkpoint file and read back."""
    checkpoint.Checkpoints(folder).save(state)
    return checkpoint.Checkpoints(folder).load_latest()


SETTINGS = {
    "fixed": ({}, torch.float32, 1),
    "periodic refresh after the checkpoint, bf16 with fp32 masters": (
        {"mode": "periodic", "refresh_every": 3}, torch.bfloat16, 1),
    "per_step": ({"mode": "per_step"}, torch.float32, 1),
    "selection window still open at the checkpoint": ({"selection_batches": 5}, torch.float32, 2),
    "signal-to-noise window still open at the checkpoint": ({"selection_batches": 5, "score": "grad_snr"},
                                                             torch.float32, 2),
    "random selection": ({"selection": "random", "mode": "periodic", "refresh_every": 2}, torch.float32, 1),
    "lean: packed indices, update in backward, bf16 moments, periodic": (
        {"compact_indices": True, "update_in_backward": True, "state_dtype": "bfloat16", "mode": "periodic",
         "refresh_every": 3}, torch.bfloat16, 1),
}


@pytest.mark.parametrize("setting", list(SETTINGS), ids=list(SETTINGS))
def test_resuming_from_a_checkpoint_gives_the_same_weights_as_never_stopping(setting, tmp_path):
    overrides, dtype, accum = SETTINGS[setting]
    base, batches = mlp(dtype=dtype), mlp_batches(12, dtype=dtype)
    straight = copy.deepcopy(base)
    engine, optimizer, scheduler = sift(straight, **overrides)
    train(straight, optimizer, scheduler, batches[:4], accum)
    state = round_trip(checkpoint.capture(4, engine, optimizer, scheduler, {}), tmp_path)
    train(straight, optimizer, scheduler, batches[4:], accum)

    resumed = copy.deepcopy(base)
    engine2, optimizer2, scheduler2 = sift(resumed, **overrides)
    checkpoint.restore(state, engine2, optimizer2, scheduler2)
    train(resumed, optimizer2, scheduler2, batches[4:], accum)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(straight[0].weight, base[0].weight)  # it did train


def test_optimizer_state_of_a_bf16_model_comes_back_in_fp32(tmp_path):
    model = mlp(dtype=torch.bfloat16)
    engine, optimizer, scheduler = sift(model)
    train(model, optimizer, scheduler, mlp_batches(2, dtype=torch.bfloat16))
    state = round_trip(checkpoint.capture(2, engine, optimizer, scheduler, {}), tmp_path)
    fresh = mlp(dtype=torch.bfloat16)
    engine2, optimizer2, scheduler2 = sift(fresh)
    checkpoint.restore(state, engine2, optimizer2, scheduler2)
    for p, p2 in ((model[0].weight, fresh[0].weight), (model[4].weight, fresh[4].weight)):
        before, after = optimizer.state[p], optimizer2.state[p2]
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert after[key].dtype == torch.float32, key
            assert torch.equal(after[key], before[key]), key


def test_restored_optimizer_state_shares_the_engine_selection_tensor(tmp_path):
    model = mlp()
    engine, optimizer, scheduler = sift(model)
    train(model, optimizer, scheduler, mlp_batches(2))
    state = round_trip(checkpoint.capture(2, engine, optimizer, scheduler, {}), tmp_path)
    fresh = mlp()
    engine2, optimizer2, scheduler2 = sift(fresh)
    checkpoint.restore(state, engine2, optimizer2, scheduler2)
    slot = engine2.slots[0]
    assert optimizer2.state[slot.param]["idx"] is slot.idx


def test_restore_brings_back_step_count_skipped_steps_scheduler_and_random_state(tmp_path):
    model = mlp()
    engine, optimizer, scheduler = sift(model)
    train(model, optimizer, scheduler, mlp_batches(3))
    optimizer.skipped_steps = 2
    torch.manual_seed(123)
    state = round_trip(checkpoint.capture(3, engine, optimizer, scheduler, {"mine": [1.5]}), tmp_path)
    expected_draw = torch.rand(3)
    engine2, optimizer2, scheduler2 = sift(mlp())
    progress = checkpoint.restore(state, engine2, optimizer2, scheduler2)
    assert torch.equal(torch.rand(3), expected_draw)
    assert (engine2.steps, optimizer2.skipped_steps, progress) == (3, 2, {"mine": [1.5]})
    assert scheduler2.last_epoch == 3 and optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_restoring_onto_another_base_model_is_a_checkpoint_error(tmp_path):
    model = mlp(seed=0)
    engine, optimizer, scheduler = sift(model)
    train(model, optimizer, scheduler, mlp_batches(2))
    state = round_trip(checkpoint.capture(2, engine, optimizer, scheduler, {}), tmp_path)
    with pytest.raises(CheckpointError, match="differs from the base"):
        checkpoint.restore(state, *sift(mlp(seed=1)))


def test_restoring_into_an_engine_with_other_settings_is_a_checkpoint_error_naming_them(tmp_path):
    model = mlp()
    engine, optimizer, scheduler = sift(model)
    train(model, optimizer, scheduler, mlp_batches(2))
    state = round_trip(checkpoint.capture(2, engine, optimizer, scheduler, {}), tmp_path)
    with pytest.raises(CheckpointError, match="density"):
        checkpoint.restore(state, *sift(mlp(), density=0.5))


def test_engine_state_cannot_be_taken_in_the_middle_of_a_step():
    model = mlp()
    engine, optimizer, _ = sift(model)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    with pytest.raises(CheckpointError, match="between optimizer steps"):
        engine.state_dict()


# -- files: newest valid one wins -------------------------------------------------------------------


def small_state(step: int) -> dict:
    model = mlp()
    engine, optimizer, scheduler = sift(model)
    train(model, optimizer, scheduler, mlp_batches(1))
    return checkpoint.capture(step, engine, optimizer, scheduler, {"tag": step})


def test_an_empty_folder_has_no_checkpoint(tmp_path):
    assert checkpoint.Checkpoints(tmp_path / "none").load_latest() is None


def test_saving_keeps_only_the_newest_two(tmp_path):
    store = checkpoint.Checkpoints(tmp_path)
    for step in (2, 4, 6):
        store.save(small_state(step))
    assert store.steps() == [6, 4]
    assert store.load_latest()["progress"] == {"tag": 6}


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "one byte flipped": lambda data: data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],
    "empty": lambda data: b"",
    "not a checkpoint": lambda data: b"PK\x03\x04" + data[4:],
    "header only": lambda data: data[: len(checkpoint.MAGIC) + 32],
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_and_the_previous_one_loads(tmp_path, damage):
    store = checkpoint.Checkpoints(tmp_path)
    store.save(small_state(2))
    newest = store.save(small_state(4))
    newest.write_bytes(DAMAGE[damage](newest.read_bytes()))
    with pytest.warns(UserWarning, match="checkpoint-00000004"):
        state = store.load_latest()
    assert state["progress"] == {"tag": 2}


def test_a_folder_whose_checkpoints_are_all_damaged_is_a_checkpoint_error(tmp_path):
    store = checkpoint.Checkpoints(tmp_path)
    store.save(small_state(2)).write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no valid checkpoint"):
        store.load_latest()


def test_a_checkpoint_whose_payload_is_not_a_state_dict_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "checkpoint-00000002.pt"
    path.write_bytes(checkpoint.encode({"format_version": 1}))
    with pytest.raises(CheckpointError, match="lacks"):
        checkpoint.decode(path)


def test_a_checkpoint_that_would_run_code_when_unpickled_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    import hashlib
    import pickle

    payload = pickle.dumps(Evil())
    path = tmp_path / "checkpoint-00000002.pt"
    path.write_bytes(checkpoint.MAGIC + hashlib.sha256(payload).digest() + payload)
    with pytest.raises(CheckpointError):
        checkpoint.decode(path)
    assert not (tmp_path / "pwned").exists()


def test_leftover_temporary_files_of_a_killed_writer_are_ignored_and_removed(tmp_path):
    store = checkpoint.Checkpoints(tmp_path)
    store.save(small_state(2))
    leftover = tmp_path / ".checkpoint-00000004.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert store.load_latest()["progress"] == {"tag": 2}
    assert not leftover.exists()


# -- failing disks ----------------------------------------------------------------------------------


def test_disk_full_while_saving_is_a_write_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    store = checkpoint.Checkpoints(tmp_path)
    store.save(small_state(2))
    before = store.path(2).read_bytes()
    real_write = pathlib.Path.write_bytes

    def full_disk(self, data):
        real_write(self, data[: len(data) // 3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk)
    with pytest.raises(WriteError, match="No space left on device") as error:
        store.save(small_state(4))
    monkeypatch.undo()
    assert "\n" not in str(error.value)
    assert store.steps() == [2] and store.path(2).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [store.path(2).name]  # no temporary file left


def test_permission_denied_while_saving_is_a_write_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    store = checkpoint.Checkpoints(tmp_path)
    store.save(small_state(2))

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(WriteError, match="Permission denied"):
        store.save(small_state(4))
    monkeypatch.undo()
    assert store.load_latest()["progress"] == {"tag": 2}


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 512 KiB tmpfs mounted for the test (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(folder: Path) -> None:
    """Write a file into ``folder`` until its disk is full."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_full_disk_leaves_the_previous_checkpoint_and_increment_intact(small_tmpfs):
    store = checkpoint.Checkpoints(small_tmpfs / "checkpoints")
    store.save(small_state(2))
    model = mlp()
    engine, optimizer, scheduler = sift(model)
    train(model, optimizer, scheduler, mlp_batches(2))
    engine.increment().save(small_tmpfs / "increment")
    saved = load_file(str(small_tmpfs / "increment" / "increment.safetensors"))
    fill(small_tmpfs)
    with pytest.raises(WriteError, match="No space left"):
        store.save(small_state(4))
    train(model, optimizer, scheduler, mlp_batches(2, seed=5))
    with pytest.raises(WriteError, match="No space left"):
        engine.increment().save(small_tmpfs / "increment")
    (small_tmpfs / "filler").unlink()
    assert store.load_latest()["progress"] == {"tag": 2}
    again = load_file(str(small_tmpfs / "increment" / "increment.safetensors"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    siftune.SparseIncrement.load(small_tmpfs / "increment")


def test_a_read_only_disk_is_a_write_error_and_the_previous_checkpoint_stays(small_tmpfs):
    store = checkpoint.Checkpoints(small_tmpfs)
    store.save(small_state(2))
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(WriteError, match="Read-only file system"):
        store.save(small_state(4))
    assert store.load_latest()["progress"] == {"tag": 2}


# -- the train recipe, killed and resumed ------------------------------------------------------------

# Runs `siftune train` with two ways to die: SIGKILL right after optimizer step
# KILL_AFTER_STEP (before that step's checkpoint), or SIGKILL half-way through
# writing the checkpoint of step KILL_WRITING_CHECKPOINT.
DYING_TRAIN = """
import os, signal, sys
import siftune.artifacts.checkpoint, siftune.cli, siftune.artifacts.io, siftune.core.optim

after_step = int(os.environ.get("KILL_AFTER_STEP", "0"))
in_checkpoint = int(os.environ.get("KILL_WRITING_CHECKPOINT", "0"))
real_step, real_write = siftune.core.optim.SiftAdamW.step, siftune.artifacts.checkpoint.atomic_write_bytes

def step(self, *args, **kwargs):
    out = real_step(self, *args, **kwargs)
    if self.engine.steps == after_step:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

def write(path, data):
    if path.name == f"checkpoint-{in_checkpoint:08d}.pt":
        def half_then_die(tmp):
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        siftune.artifacts.io.atomic_write(path, half_then_die)
    return real_write(path, data)

siftune.core.optim.SiftAdamW.step = step
siftune.artifacts.checkpoint.atomic_write_bytes = write
sys.exit(siftune.cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A tiny BERT folder, a 24-row CSV, and the flags of a 6-step run over almost 3 epochs (5 batches each)."""
    from conftest import make_tiny_tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("recipe")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, pad_token_id=0))  # dropout on: the RNG state matters
    model.save_pretrained(folder / "model")
    make_tiny_tokenizer().save_pretrained(folder / "model")
    rows = ["text,label"] + [f"{'good fun' if i % 2 else 'dull slow'} film {i},{'pos' if i % 2 else 'neg'}"
                             for i in range(24)]
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    flags = ["train", "--model", str(folder / "model"), "--dataset", str(folder / "data.csv"),
             "--steps", "6", "--batch-size", "4", "--grad-accum", "2", "--eval-size", "4", "--max-length", "16",
             "--density", "0.05", "--lr", "0.01", "--warmup-steps", "2", "--checkpoint-every", "2", "--quiet"]
    straight = folder / "straight"
    assert cli.main(flags + ["--output-dir", str(straight)]) == 0
    return flags, straight


def run_dying(flags: list[str], env: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([sys.executable, "-c", DYING_TRAIN, *flags], env=env, capture_output=True, text=True,
                          timeout=300)


def assert_same_result(a: Path, b: Path) -> None:
    first, second = load_file(str(a / "increment.safetensors")), load_file(str(b / "increment.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-5, atol=1e-6, msg=key)
    losses = [json.loads((d / "metrics.json").read_text())["losses"] for d in (a, b)]
    assert len(losses[1]) == 6
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-6)


def test_sigkill_in_the_middle_of_a_run_then_resume_ends_as_an_uninterrupted_run(recipe, tmp_path, capsys):
    flags, straight = recipe
    out = ["--output-dir", str(tmp_path)]
    killed = run_dying(flags + out, {"KILL_AFTER_STEP": "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint.Checkpoints(tmp_path / "checkpoints").steps() == [4, 2]
    assert not (tmp_path / "increment.safetensors").exists()
    assert cli.main(flags + out + ["--resume"]) == 0  # skips 8 micro-batches: into the second epoch
    assert "checkpoint-00000004.pt (step 4)" in capsys.readouterr().out
    assert_same_result(straight, tmp_path)


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(recipe, tmp_path, capsys):
    flags, straight = recipe
    out = ["--output-dir", str(tmp_path)]
    killed = run_dying(flags + out, {"KILL_WRITING_CHECKPOINT": "4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    folder = tmp_path / "checkpoints"
    assert checkpoint.Checkpoints(folder).steps() == [2]
    assert any(p.name.startswith(".checkpoint-00000004.pt") for p in folder.iterdir())  # the half-written file
    assert cli.main(flags + out + ["--resume"]) == 0
    assert "checkpoint-00000002.pt (step 2)" in capsys.readouterr().out
    assert_same_result(straight, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-00000004.pt", "checkpoint-00000006.pt"]


def test_resume_without_a_checkpoint_starts_afresh(recipe, tmp_path, capsys):
    flags, _ = recipe
    assert cli.main(flags + ["--output-dir", str(tmp_path), "--resume", "--steps", "1", "--eval-size", "0"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 1


def test_resume_with_other_training_settings_is_a_one_line_error_naming_them(recipe, tmp_path, capsys):
    flags, straight = recipe
    shutil.copytree(straight / "checkpoints", tmp_path / "checkpoints")
    assert cli.main(flags + ["--output-dir", str(tmp_path), "--resume", "--lr", "0.02"]) == 2
    error = capsys.readouterr().err.strip()
    assert "other settings (lr: " in error and "then, 0.02 now)" in error and "checkpoint-00000006.pt" in error
    assert "\n" not in error


def test_a_fresh_run_with_overwrite_deletes_checkpoints_of_an_earlier_run(recipe, tmp_path):
    flags, _ = recipe
    stale = checkpoint.Checkpoints(tmp_path / "checkpoints")
    stale.save(small_state(100))
    assert cli.main(flags + ["--output-dir", str(tmp_path), "--steps", "1", "--eval-size", "0", "--overwrite"]) == 0
    assert stale.steps() == []


def test_metrics_json_of_a_run_is_valid_json_with_every_output_in_place(recipe):
    _, straight = recipe
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["skipped_steps"] == 0 and metrics["args"]["checkpoint_every"] == 2
    assert (straight / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    assert not [p for p in straight.iterdir() if p.name.endswith(".tmp")]


def test_optimizer_state_loaded_without_the_engine_state_keeps_the_moments_of_components_selected_again():
    # E.g. a transformers Trainer resuming: it restores the optimizer but not the engine, which selects anew.
    base, batches = mlp(), mlp_batches(3)
    model = copy.deepcopy(base)
    engine, optimizer, scheduler = sift(model)
    train(model, optimizer, scheduler, batches[:2])
    old_idx, old_m = engine.selected["0.weight"], optimizer.state[model[0].weight]["exp_avg"]
    fresh = copy.deepcopy(base)
    engine2, optimizer2, scheduler2 = sift(fresh)
    optimizer2.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    train(fresh, optimizer2, scheduler2, batches[2:3])
    probe = copy.deepcopy(base)
    mlp_loss(probe, batches[2]).backward()
    new_idx, g = engine2.selected["0.weight"], probe[0].weight.grad.reshape(-1)
    stays = torch.isin(new_idx, old_idx)
    assert 0 < int(stays.sum()) < new_idx.numel()  # some components stay selected, some are new
    expected = 0.1 * g[new_idx]
    expected[stays] += 0.9 * old_m[torch.searchsorted(old_idx, new_idx[stays])]
    torch.testing.assert_close(optimizer2.state[fresh[0].weight]["exp_avg"], expected)
