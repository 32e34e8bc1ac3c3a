"""Checkpoints of a complete training state, written so that a crash never loses the last good one.

A checkpoint is one file, ``checkpoint-<step>.pt`` in the run's checkpoint
folder, holding everything needed to continue a run as if it had never
stopped: the trained values of the model (sparse entries and dense modules),
the engine's selection and ledger, the optimizer's state (fp32 masters and
moments kept in their own dtypes), the LR scheduler, the random number
generators, and the position in the data stream.

On disk the file is a magic line, the SHA-256 of the payload, then the
payload (``torch.save`` of a dict of tensors and plain values, read back
with ``weights_only=True`` so a file can never run code). It is written
through :func:`siftune.artifacts.io.atomic_write`; the previous checkpoint is deleted
only after the new one is complete. :meth:`Checkpoints.load_latest` takes
the newest file that is complete and intact and warns about any it skips.
The file is assembled in memory (its checksum comes first), so saving takes
about the checkpoint's size in free RAM for a moment.
"""
from __future__ import annotations

import hashlib
import random
import re
import warnings
from io import BytesIO
from pathlib import Path

import torch

from ..parallel import distributed
from ..errors import CheckpointError, ConfigError, WriteError
from .io import atomic_write_bytes, remove_stale_temporaries

FORMAT_VERSION = 1
MAGIC = b"siftune-checkpoint\n"
_DIGEST_BYTES = 32
_NAME = re.compile(r"^checkpoint-(\d{8,})\.pt$")


class Checkpoints:
    """The checkpoint folder of one run: numbered files, the newest valid one wins.

    Args:
        folder: where the files live (created on the first save).
        keep: complete checkpoints kept; older ones are deleted once a newer
            one is safely on disk. At least 1; default 2, so that a checkpoint
            damaged after it was written still leaves one to resume from.
    """

    def __init__(self, folder: str | Path, keep: int = 2):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"keep must be an integer >= 1, got {keep!r}")
        self.folder = Path(folder)
        self.keep = keep

    def path(self, step: int) -> Path:
        """The file of the checkpoint taken after ``step`` optimizer steps."""
        return self.folder / f"checkpoint-{step:08d}.pt"

    def steps(self) -> list[int]:
        """Steps of the checkpoint files present, newest first (valid or not)."""
        if not self.folder.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.folder.iterdir())
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def save(self, state: dict) -> Path:
        """Write ``state`` (see :func:`capture`) as the checkpoint of ``state["step"]``.

        Raises :class:`~siftune.errors.WriteError` when the disk refuses;
        the checkpoints already there are then untouched.
        """
        path = self.path(int(state["step"]))
        atomic_write_bytes(path, encode(state))
        for step in self.steps()[self.keep:]:
            _delete(self.path(step))
        return path

    def load_latest(self) -> dict | None:
        """The newest complete and intact checkpoint, or ``None`` when the folder holds none.

        A damaged or unreadable file is skipped with a warning naming it.
        Raises CheckpointError when checkpoint files exist but none is valid.
        """
        remove_stale_temporaries(self.folder, "checkpoint-")
        steps = self.steps()
        for step in steps:
            path = self.path(step)
            try:
                state = decode(path)
            except CheckpointError as exc:
                warnings.warn(f"skipping checkpoint: {exc}", stacklevel=2)
                continue
            if state["step"] != step:
                warnings.warn(f"skipping checkpoint: {path} holds step {state['step']}, not {step}", stacklevel=2)
                continue
            state["path"] = str(path)
            return state
        if steps:
            raise CheckpointError(f"no valid checkpoint in {self.folder} (all {len(steps)} damaged); "
                                  "train afresh with --overwrite (without --resume)")
        return None

    def clear(self) -> None:
        """Delete every checkpoint of the folder (a fresh run must never resume from a stale one)."""
        remove_stale_temporaries(self.folder, "checkpoint-")
        for step in self.steps():
            _delete(self.path(step))


# -- the training state ----------------------------------------------------------------------

def capture(step: int, engine, optimizer, scheduler, progress: dict) -> dict:
    """The complete training state after ``step`` optimizer steps, ready for :meth:`Checkpoints.save`.

    Take it between optimizer steps (after ``zero_grad``). ``progress`` is
    the caller's own record (losses, data position, run settings, ...) and
    must hold only tensors and plain Python values; :func:`restore` gives it back.
    """
    sparse = {}
    for slot in engine.slots:
        if slot.ever_idx is not None:
            sparse[slot.name] = distributed.local(slot.param).reshape(-1)[slot.ledger_indices()].cpu()
    # A sharded model's values are this rank's part (see siftune.parallel.sharding.ShardedCheckpoints).
    dense = {name: distributed.local(p).cpu() for name, p in engine.dense.items()}
    return {
        "format_version": FORMAT_VERSION,
        "step": step,
        "model": {"sparse": sparse, "dense": dense},
        "engine": engine.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "progress": progress,
    }


def restore(state: dict, engine, optimizer, scheduler) -> dict:
    """Put a freshly attached engine, its model, optimizer, scheduler and RNGs back in ``state``.

    The model must be the untrained base the checkpoint was trained from
    (checked on every trained component). Returns ``state["progress"]``.
    """
    where = state.get("path", "checkpoint")
    engine.load_state_dict(state["engine"])
    _restore_model(where, engine, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    try:
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: scheduler state does not fit ({exc}); start a fresh run") from None
    _set_rng_state(where, state["rng"])
    return state["progress"]


@torch.no_grad()
def _restore_model(where: str, engine, model_state: dict) -> None:
    sparse, dense = model_state.get("sparse", {}), model_state.get("dense", {})
    for slot in engine.slots:
        values = sparse.get(slot.name)
        if (values is None) != (slot.ever_idx is None):
            raise CheckpointError(f"{where}: trained values of {slot.name} do not match its selection")
        if values is None:
            continue
        flat = distributed.local(slot.param).view(-1)
        if values.shape != slot.ever_idx.shape or values.dtype != flat.dtype:
            raise CheckpointError(f"{where}: trained values of {slot.name} have the wrong shape or dtype")
        ever_idx = slot.ledger_indices()
        if not torch.equal(flat[ever_idx], slot.base.to(flat.device)):
            raise CheckpointError(f"{where}: {slot.name} of the model differs from the base the checkpoint was "
                                  "trained from; resume with the same model")
        flat[ever_idx] = values.to(flat.device)
    if set(dense) != set(engine.dense):
        raise CheckpointError(f"{where}: dense modules {sorted(dense)} differ from the run's {sorted(engine.dense)}")
    for name, p in engine.dense.items():
        p = distributed.local(p)
        if dense[name].shape != p.shape or dense[name].dtype != p.dtype:
            raise CheckpointError(f"{where}: dense tensor {name} has the wrong shape or dtype")
        p.copy_(dense[name])


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(where: str, state: dict) -> None:
    try:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{where}: random number generator state is damaged ({exc})") from None


# -- the file ----------------------------------------------------------------------------------

def encode(state: dict) -> bytes:
    """The bytes of a checkpoint file: magic line, SHA-256 of the payload, payload."""
    buffer = BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def decode(path: str | Path) -> dict:
    """Read and check a checkpoint file; every problem is a CheckpointError naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a siftune checkpoint (no header line)")
    digest, payload = data[len(MAGIC):len(MAGIC) + _DIGEST_BYTES], data[len(MAGIC) + _DIGEST_BYTES:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path} is incomplete or corrupt (checksum mismatch)")
    try:
        state = torch.load(BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for payloads it cannot unpickle
        raise CheckpointError(f"{path}: payload cannot be read ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        version = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(f"{path} has format_version {version!r}; this siftune reads version {FORMAT_VERSION}")
    missing = [k for k in ("step", "model", "engine", "optimizer", "scheduler", "rng", "progress") if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}")
    if isinstance(state["step"], bool) or not isinstance(state["step"], int) or state["step"] < 0:
        raise CheckpointError(f"{path}: step {state['step']!r} is not a step count")
    return state


def _delete(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise WriteError(f"cannot delete old checkpoint {path}: {exc.strerror or exc}; check the folder's "
                         "permissions") from None
