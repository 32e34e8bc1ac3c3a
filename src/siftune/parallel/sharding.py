"""SIFT on a model sharded by FSDP2's ``fully_shard``: each rank trains the components of its own shard.

FSDP2 replaces every parameter by a ``DTensor`` whose rank-local part holds
a contiguous block of rows (``Shard(0)``; the last ranks hold fewer rows, or
none, when the rows do not divide evenly). After each backward it
reduce-scatters the gradient, so a parameter's post-accumulate-grad hook
sees the local rows of the gradient **already averaged** over the ranks.
The engine then works on that local part only:

* **Selection.** Each tensor selects the global top-k of the averaged
  gradient, exactly as one process would: every rank sends its local top-k
  magnitudes (k floats), the k-th largest of the gathered values is the
  threshold, each rank keeps its entries above it, and the entries equal to
  it are taken in global index order (ranks hold increasing index ranges).
  Ranks so hold different counts that sum to k. ``selection="random"``
  draws the same global indices on every rank (same seed) and each keeps
  its own.
* **Indices, state, ledger** are local to the shard (flat indices into the
  rank's rows): optimizer moments, fp32 masters and the increment ledger
  are split across the ranks like the weights.
* **Updates** are written into the local rows in place; FSDP2's next
  all-gather carries them to every rank.
* **Results.** :func:`whole_delta` and :func:`full` gather a tensor's
  per-rank parts (global indices in order) for an increment.
* **Checkpoints** are written with ``torch.distributed.checkpoint``, one
  file per rank, by :class:`ShardedCheckpoints`.

No weight or dense gradient is gathered beyond what FSDP2 does itself.
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
from ..errors import CheckpointError, ConfigError, WriteError
from ..core.select import index_dtype, random_indices
from ..core.storage import InPlace


def is_sharded(t: torch.Tensor | None) -> bool:
    """Whether ``t`` is a DTensor (a parameter or gradient of a model sharded by ``fully_shard``)."""
    if t is None or not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, and for a DTensor this rank's part of it (a view: writes go into the shard)."""
    t = t.detach()
    return t.to_local() if is_sharded(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of the whole of ``t``; for a DTensor, gathered from every rank (all ranks must call)."""
    if is_sharded(t):
        with distributed.collective_errors():
            return t.detach().full_tensor().cpu()
    return t.detach().cpu().clone()


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2-sharded module of ``model`` back to its sharded parameters.

    FSDP2 leaves the root's parameters gathered after a forward (it expects
    the backward next), so after an evaluation the model holds whole
    tensors in their place; SIFT must find the sharded parameters it trains.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class ShardedInPlace(InPlace):
    """The trained values of a weight sharded along dim 0: this rank's rows, read and written in place.

    ``numel`` and ``shape`` are the local part's, which the engine's
    indices point into; ``full_numel`` and ``full_shape`` the whole
    weight's; global flat index = ``offset`` + local flat index.
    """

    averaged_over_ranks = True  # by FSDP2's reduce-scatter

    def __init__(self, param: torch.nn.Parameter, name: str):
        from torch.distributed.tensor import Replicate, Shard

        placements = tuple(param.placements)
        if placements not in ((Shard(0),), (Replicate(), Shard(0))):
            raise ConfigError(f"targeted weight {name} is sharded as {placements}; SIFT trains weights sharded "
                              "along dim 0 (fully_shard's default, no shard_placement_fn), replicated or not (HSDP)")
        if not param.is_floating_point():
            raise ConfigError(f"targeted weight {name} is {param.dtype}; SIFT writes updates into float weights")
        self.trainable = param
        self.full_shape, self.full_numel = tuple(param.shape), param.numel()
        part = param.to_local()
        self.shape, self.numel = tuple(part.shape), part.numel()
        self.base_dtype = param.dtype
        # Under HSDP the replicas hold the same shards and, after FSDP2's all-reduce, the same
        # gradients: they select alike, and only the ranks along the shard dimension split a tensor.
        mesh = param.device_mesh
        dim = mesh.ndim - 1
        self.group, self.world, self.rank = mesh.get_group(dim), mesh.size(dim), mesh.get_local_rank(dim)
        # FSDP2 cuts the rows as torch.chunk does: ceil(rows / world) per rank, the last ones short or empty.
        rows = self.full_shape[0]
        per_rank = -(-rows // self.world)
        self.offset = min(self.rank * per_rank, rows) * (self.full_numel // rows if rows else 0)

    def attached_to(self, model: torch.nn.Module, name: str) -> bool:
        reshard(model)  # a forward since attach may have left the whole tensor in the parameter's place
        return super().attached_to(model, name)

    def _flat(self) -> torch.Tensor:
        # Looked up each time: FSDP2 may re-point the local tensor (lazy init after model.to()).
        return self.trainable.detach().to_local().view(-1)

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        return self._flat()[idx]

    def current_weight(self) -> torch.Tensor:
        """This rank's rows of the weight, as they are now (the local part of score="grad_weight")."""
        return self._flat().view(self.shape)

    def write(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        flat = self._flat()
        flat[idx] = values.to(flat.dtype)


def shard_group(param: torch.Tensor):
    """The process group of the ranks among which ``param`` (a DTensor) is split: its mesh's last dimension."""
    mesh = param.device_mesh
    return mesh.get_group(mesh.ndim - 1)


def make_storage(kind: str, param: torch.nn.Parameter, name: str) -> ShardedInPlace:
    """The storage of a sharded targeted weight (``kind`` is ``SiftConfig.storage``)."""
    if kind != "in_place":
        raise ConfigError(f"targeted weight {name} is sharded (FSDP2); storage={kind!r} needs whole weights: "
                          "attach with storage='in_place' (the default)")
    return ShardedInPlace(param, name)


def select(store: ShardedInPlace, score: torch.Tensor, k: int, generator: torch.Generator,
           selection: str) -> torch.Tensor:
    """This rank's part of the global selection of k components: sorted local flat indices.

    ``score`` is the local part of the (averaged) gradient. Every rank of
    the shard group must call this for the same tensor at the same time.
    """
    device = score.device
    if selection == "random":
        drawn = random_indices(store.full_numel, k, generator, device).long()  # the same on every rank
        mine = drawn[(drawn >= store.offset) & (drawn < store.offset + store.numel)] - store.offset
        return mine.to(index_dtype(store.numel))
    magnitude = score.detach().reshape(-1).abs().float()
    own = torch.topk(magnitude, min(k, magnitude.numel())).values  # descending
    padded = torch.full((k,), -1.0, device=device)  # -1 is below every magnitude: padding never counts
    padded[:own.numel()] = own
    gathered = [torch.empty_like(padded) for _ in range(store.world)]
    with distributed.collective_errors():
        dist.all_gather(gathered, padded, group=store.group)
    every = torch.cat(gathered)
    threshold = torch.topk(every, k).values[-1]
    keep = magnitude > threshold
    # Entries equal to the threshold fill the rest of k in global index order. A rank whose
    # sent values end in ties may hold more of them than it sent, but then it alone can fill
    # the remainder, so the counts it sent are enough for the ranks after it.
    wanted = k - int((every > threshold).sum())
    before = sum(int((g == threshold).sum()) for g in gathered[:store.rank])
    take = max(0, wanted - before)
    if take:
        keep[(magnitude == threshold).nonzero().squeeze(1)[:take]] = True
    return keep.nonzero().squeeze(1).to(index_dtype(store.numel))


def cut_over_ranks(scores: torch.Tensor, count: int, group) -> torch.Tensor:
    """The ``count``-th largest of all ranks' ``scores`` (1-D, fp32, >= 0), as a 0-d fp32 tensor (0 when the
    ranks hold fewer); every rank must call this at the same time.

    It is found bit by bit (a non-negative float's bits order as an
    integer), one scalar all-reduce a bit, so no rank gathers the others'
    candidates.
    """
    bits = scores.contiguous().view(torch.int32)
    threshold = 0
    with distributed.collective_errors():
        for bit in range(30, -1, -1):  # bit 31 is the sign, 0 for every score
            candidate = threshold | (1 << bit)
            n = (bits >= candidate).sum().reshape(1)
            dist.all_reduce(n, group=group)
            if int(n) >= count:
                threshold = candidate
    return torch.tensor(threshold, dtype=torch.int32).view(torch.float32).to(scores.device)


def top_over_ranks(scores: torch.Tensor, tensors: torch.Tensor, n_tensors: int, count: int, group) -> torch.Tensor:
    """This rank's part of the ``count`` largest ``scores`` of all ranks in ``group``: positions into ``scores``.

    ``scores`` (1-D, fp32, >= 0) are this rank's candidates in ascending
    model order (targeted tensor ``tensors[j]``, then index); every rank
    must call this at the same time. The threshold is
    :func:`cut_over_ranks`'s; entries equal to it are taken in global model
    order: tensor, then rank (ranks hold increasing rows), then index.
    """
    device = scores.device
    threshold = cut_over_ranks(scores, count, group)
    with distributed.collective_errors():
        above = scores > threshold
        n_above = above.sum().reshape(1)
        dist.all_reduce(n_above, group=group)
        tied = (scores == threshold).nonzero().squeeze(1)
        tied_per_tensor = torch.bincount(tensors[tied], minlength=n_tensors)
        every = [torch.empty_like(tied_per_tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, tied_per_tensor, group=group)
    wanted, rank = count - int(n_above), dist.get_rank(group)
    take = torch.zeros(n_tensors, dtype=torch.long)
    for i in range(n_tensors):  # tensor-major, rank-minor: global model order
        for r, ties in enumerate(every):
            got = min(int(ties[i]), wanted)
            wanted -= got
            if r == rank:
                take[i] = got
    keep = [above.nonzero().squeeze(1)]
    for i in take.nonzero().squeeze(1).tolist():
        keep.append(tied[tensors[tied] == i][:int(take[i])])  # ascending: lowest index first
    return torch.cat(keep).to(device)


def global_norm(grads) -> float:
    """The norm of the gradient ``(param, idx, grad)`` triples hold together, across all shards.

    Sharded parameters' parts are summed over the ranks that split them
    (every rank must then call this; all on one mesh); whole (replicated)
    ones count once.
    """
    if not grads:
        return 0.0
    sharded = [(p, g) for p, _, g in grads if is_sharded(p)]
    whole = [g for p, _, g in grads if not is_sharded(p)]
    squares = torch.zeros((), dtype=torch.float32, device=grads[0][2].device)
    if sharded:
        part = _sum_of_squares([g for _, g in sharded])
        with distributed.collective_errors():
            dist.all_reduce(part, group=shard_group(sharded[0][0]))
        squares = squares + part
    if whole:
        squares = squares + _sum_of_squares(whole)
    return float(squares.sqrt())


def _sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.float().pow(2).sum() for g in grads]).sum()


def whole_delta(store: ShardedInPlace, indices: torch.Tensor, values: torch.Tensor):
    """The increment's :class:`TensorDelta` of a sharded weight, from every rank's (local) ledger part."""
    from ..artifacts.increment import TensorDelta

    device = store.trainable.device
    global_idx = torch.cat(_all_gather_varying((indices.long() + store.offset).to(device), store))
    all_values = torch.cat(_all_gather_varying(values.float().to(device), store))
    return TensorDelta(indices=global_idx.to(index_dtype(store.full_numel)), values=all_values,
                       shape=store.full_shape, dtype=str(store.base_dtype).replace("torch.", ""))


def _all_gather_varying(t: torch.Tensor, store: ShardedInPlace) -> list[torch.Tensor]:
    """Every rank's 1-D ``t`` (lengths may differ), in rank order, on the CPU."""
    with distributed.collective_errors():
        count = torch.tensor([t.numel()], device=t.device)
        counts = [torch.empty_like(count) for _ in range(store.world)]
        dist.all_gather(counts, count, group=store.group)
        longest = max(int(c) for c in counts)
        padded = t.new_zeros(longest)
        padded[:t.numel()] = t
        parts = [torch.empty_like(padded) for _ in range(store.world)]
        dist.all_gather(parts, padded, group=store.group)
    return [part[:int(c)].cpu() for part, c in zip(parts, counts)]


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

        from ..artifacts.io import fsync_dir

        step = int(state["step"])
        final, temporary = self.path(step), self.folder / f".checkpoint-{step:08d}.partial"
        if distributed.is_main_process():
            shutil.rmtree(temporary, ignore_errors=True)  # left by a run killed while saving
            temporary.mkdir(parents=True)
        _barrier()
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
        _barrier()
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

    from ..artifacts.checkpoint import FORMAT_VERSION

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


def _barrier() -> None:
    if distributed.world_size() > 1:
        with distributed.collective_errors():
            dist.barrier()


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank must call this)."""
    if distributed.world_size() == 1:
        return flag
    total = torch.tensor([int(flag)])
    distributed.all_reduce(total)
    return bool(total.item())
