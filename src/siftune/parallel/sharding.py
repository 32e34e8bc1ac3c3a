"""FSDP2 in a training run: sharding a model, its collectives' failures, and its checkpoints.

:func:`shard_model` applies ``fully_shard`` to each transformer block and
then the model, before :func:`siftune.attach`; SIFT then trains each rank's
rows of every targeted weight (:class:`siftune.core.storage.ShardedInPlace`
says how). :func:`fsdp_collective_errors` turns a lost peer inside FSDP2's
own all-gathers and reduce-scatters into :class:`DistributedError`.
:class:`ShardedCheckpoints` writes a sharded run's training state with
``torch.distributed.checkpoint``, one file per rank.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from . import distributed
from ..artifacts.checkpoint import FORMAT_VERSION
from ..artifacts.io import fsync_dir
from ..errors import CheckpointError, ConfigError, WriteError


@contextlib.contextmanager
def fsdp_collective_errors():
    """Turn a failure of FSDP2's own collectives into :class:`DistributedError`, as the engine's are.

    FSDP2 all-gathers and reduce-scatters inside the forward and backward,
    where the engine cannot wrap them; torch reports a lost or stuck peer
    there as a plain RuntimeError raised in gloo's transport (its message
    names the source file, ``gloo/transport/...``), or as DistBackendError
    from NCCL. Every other error passes unchanged.
    """
    try:
        yield
    except RuntimeError as exc:
        if not (isinstance(exc, dist.DistBackendError) or "gloo/transport" in str(exc)):
            raise
        with distributed.collective_errors():
            raise


def shard_model(model: torch.nn.Module, mp_policy=None, mesh=None) -> torch.nn.Module:
    """``fully_shard`` each transformer block of ``model``, then the model, as torchtune and torchtitan do.

    The blocks are the modules whose class ``model._no_split_modules`` names
    (what transformers and accelerate treat as one layer); a model without
    that list is sharded at the root only. ``mp_policy`` is FSDP2's
    ``MixedPrecisionPolicy``; ``mesh`` a ``DeviceMesh``, by default one
    dimension over every process (a 2-D mesh, replicate x shard, is HSDP).
    Shard before :func:`siftune.attach`.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        mesh = init_device_mesh(next(model.parameters()).device.type, (distributed.world_size(),))
    options = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, **options)
    fully_shard(model, **options)
    return model


class ShardedCheckpoints:
    """The checkpoint folder of a sharded run: ``checkpoint-<step>/`` per step, written by every rank.

    Each rank saves its own part of the training state (its shards' values,
    selections, ledgers, optimizer state and random streams) under its own
    keys through ``torch.distributed.checkpoint``, one file per rank. Every
    rank writes into a hidden temporary folder that rank 0 renames once all
    parts are complete, so a checkpoint folder is always whole. Resuming
    needs the same number of processes. All ranks must call every method
    but :meth:`path` and :meth:`steps`.

    Args:
        folder: where the checkpoint folders live.
        keep: complete checkpoints kept (at least 1; default 2).
    """

    def __init__(self, folder, keep: int = 2):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"keep must be an integer >= 1, got {keep!r}")
        self.folder, self.keep = Path(folder), keep

    def path(self, step: int):
        return self.folder / f"checkpoint-{step:08d}"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoint folders present, newest first."""
        if not self.folder.is_dir():
            return []
        found = (_FOLDER.match(p.name) for p in self.folder.iterdir() if p.is_dir())
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def save(self, state: dict):
        """Write this rank's ``state`` (:func:`siftune.artifacts.checkpoint.capture`) as its part of the step's checkpoint."""
        import torch.distributed.checkpoint as dcp

        step = int(state["step"])
        final, temporary = self.path(step), self.folder / f".checkpoint-{step:08d}.partial"
        if distributed.is_main_process():
            shutil.rmtree(temporary, ignore_errors=True)  # left by a run killed while saving
            temporary.mkdir(parents=True)
        distributed.wait_for_all()
        tensors: list[torch.Tensor] = []
        skeleton = _without_tensors(state, tensors)
        mine = {f"rank{distributed.rank()}/{i}": t for i, t in enumerate(tensors)}
        mine[f"rank{distributed.rank()}/skeleton"] = _as_bytes_tensor(skeleton)
        mine[f"rank{distributed.rank()}/{_SHA256}"] = _digest(mine)  # over this rank's whole part
        try:
            with distributed.collective_errors():
                dcp.save(mine, storage_writer=dcp.FileSystemWriter(temporary))  # returns when every part is written
        except dcp.api.CheckpointException as exc:  # a BaseException: DCP gathers every rank's failure into it
            raise WriteError(f"cannot write checkpoint {final}: {str(exc).strip().splitlines()[0]}; free some "
                             "disk space or choose a writable folder") from None
        if distributed.is_main_process():
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temporary, final)
            fsync_dir(self.folder)
            for old in self.steps()[self.keep:]:
                shutil.rmtree(self.path(old), ignore_errors=True)
        distributed.wait_for_all()
        return final

    def writers(self, step: int) -> int | None:
        """How many processes wrote the checkpoint of ``step`` (None when its metadata cannot be read)."""
        try:
            return len({key.partition("/")[0] for key in _metadata(self.path(step))})
        except CheckpointError:
            return None

    def load_latest(self) -> dict | None:
        """This rank's part of the newest complete checkpoint, or ``None`` when there is none.

        A checkpoint that any rank cannot read is skipped on all of them, with
        a warning. CheckpointError when it was written by another number of
        processes, or when checkpoints exist but none can be read.
        """
        steps = self.steps()
        for step in steps:
            path = self.path(step)
            # The ranks agree after each local part, so that they all load the same
            # checkpoint and all enter (or skip) DCP's collective load together.
            saved, problem = _attempt(_metadata, path)
            if not _any_rank(problem is not None):
                writers = {key.partition("/")[0] for key in saved}
                if len(writers) != distributed.world_size():
                    raise CheckpointError(f"{path} was written by {len(writers)} processes, this job has "
                                          f"{distributed.world_size()}; resume with the same number of processes")
                state, problem = _attempt(_read_part, path, saved)
                if not _any_rank(problem is not None):
                    state["path"] = str(path)
                    return state
            warnings.warn(f"skipping checkpoint: {problem or f'another rank cannot read {path}'}", stacklevel=2)
        if steps:
            raise CheckpointError(f"no valid checkpoint in {self.folder} (all {len(steps)} damaged); "
                                  "train afresh with --overwrite (without --resume)")
        return None

    def clear(self) -> None:
        """Delete every checkpoint of the folder (on rank 0; the others' next save waits for it)."""
        if distributed.is_main_process():
            for step in self.steps():
                shutil.rmtree(self.path(step), ignore_errors=True)
            for partial in self.folder.glob(".checkpoint-*.partial") if self.folder.is_dir() else ():
                shutil.rmtree(partial, ignore_errors=True)


def _attempt(read, *args):
    """``(read(*args), None)``, or ``(None, the message)`` when it raises CheckpointError."""
    try:
        return read(*args), None
    except CheckpointError as exc:
        return None, str(exc)


def _metadata(path: Path) -> dict:
    """The checkpoint's table of saved tensors: key -> size and dtype."""
    import torch.distributed.checkpoint as dcp

    try:
        return dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception as exc:  # a missing or damaged .metadata file: many exception types
        raise CheckpointError(f"{path}: cannot read its metadata ({type(exc).__name__})") from None


def _read_part(path: Path, saved: dict) -> dict:
    """This rank's part of the checkpoint at ``path`` (every rank must call this)."""
    import torch.distributed.checkpoint as dcp

    prefix = f"rank{distributed.rank()}/"
    mine = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in saved.items() if key.startswith(prefix)}
    try:
        with distributed.collective_errors():
            dcp.load(mine, storage_reader=dcp.FileSystemReader(path))
        digest = mine.pop(prefix + _SHA256, None)  # absent from checkpoints of siftune before it
        if digest is not None and not torch.equal(digest, _digest(mine)):
            raise CheckpointError(f"{path}: this rank's part is corrupt (checksum mismatch)")
        skeleton = torch.load(io.BytesIO(mine.pop(prefix + "skeleton").numpy().tobytes()), weights_only=True)
        state = _with_tensors(skeleton, [mine[f"{prefix}{i}"] for i in range(len(mine))])
    except (KeyError, IndexError, dcp.api.CheckpointException, pickle.UnpicklingError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: this rank's part cannot be read ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a checkpoint of this siftune (format version)")
    return state


_FOLDER = re.compile(r"^checkpoint-(\d{8,})$")
_SHA256 = "sha256"  # each rank's part ends with the SHA-256 of the rest of it, checked on load
_TENSOR = "\0siftune-tensor"  # stands for the i-th saved tensor in a checkpoint's skeleton


def _digest(part: dict[str, torch.Tensor]) -> torch.Tensor:
    """SHA-256 of a rank's tensors (names, dtypes, shapes and bytes, in name order), as 32 uint8."""
    h = hashlib.sha256()
    for key in sorted(part):
        t = part[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)


def _without_tensors(value, tensors: list):
    """``value`` with every tensor replaced by a reference into ``tensors`` (to which it is appended)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return (_TENSOR, len(tensors) - 1)
    if isinstance(value, dict):
        return {k: _without_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_without_tensors(v, tensors) for v in value)
    return value


def _with_tensors(value, tensors: list):
    """Inverse of :func:`_without_tensors`."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == _TENSOR:
        return tensors[value[1]]
    if isinstance(value, dict):
        return {k: _with_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_with_tensors(v, tensors) for v in value)
    return value


def _as_bytes_tensor(value) -> torch.Tensor:
    # Saved as a tensor, not as one of DCP's byte entries: DCP unpickles those with
    # weights_only=False, and a checkpoint must never be able to run code.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank must call this)."""
    if distributed.world_size() == 1:
        return flag
    total = torch.tensor([int(flag)])
    distributed.all_reduce(total)
    return bool(total.item())
