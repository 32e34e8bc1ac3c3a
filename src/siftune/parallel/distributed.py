"""Several processes, one SIFT run: the process group, each rank's share of the data, rank-0 output.

``torchrun`` and ``accelerate launch`` start one process per device and
describe the job in environment variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`init` joins that
job; the engine then finds the process group by itself and exchanges only
the selected gradient entries (see :meth:`siftune.SiftEngine.gradients`).

Data parallelism here means: every rank takes its slice of every global
batch (:func:`shard`), so that the ranks together see exactly the batch a
single process would see, and the averaged gradient is the single-process
gradient. Only rank 0 prints and writes files (:func:`is_main_process`).

FSDP2 splits tensors over the ranks (``DTensor``): :func:`local` is this
rank's part of one, :func:`full` the whole gathered, :func:`reshard` puts a
model back to its sharded parameters; :func:`cut_over_ranks` and
:func:`top_over_ranks` rank scores spread over the ranks without gathering
them, :func:`global_norm` is a gradient norm over shards.

Every collective gives up after a timeout (``SIFTUNE_DIST_TIMEOUT`` seconds,
default 600), so a rank that dies or stops responding ends the job with
:class:`DistributedError` on the others instead of a hang.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ConfigError, DistributedError

TIMEOUT_ENV = "SIFTUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``; 1 when not launched by one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def timeout_s() -> float:
    """Seconds a collective waits for the other ranks (``SIFTUNE_DIST_TIMEOUT``, default 600)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def init() -> bool:
    """Join the launcher's process group when ``WORLD_SIZE`` > 1; True if this call created it.

    Does nothing when the group exists already (e.g. accelerate made it) or
    when the process was not started by a multi-process launcher. The
    backend is NCCL for CUDA tensors and gloo for CPU tensors, so the
    engine's collectives work wherever the model lives. The group is
    destroyed when the process exits.
    """
    if dist.is_initialized() or launched_world_size() <= 1:
        return False
    missing = [name for name in _LAUNCHER_ENV if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set; start the job with torchrun "
                          "or accelerate launch, which set them")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    with collective_errors():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    atexit.register(cleanup)
    return True


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the job (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def is_main_process() -> bool:
    """True on the one rank that prints progress and writes files."""
    return rank() == 0


def shard_batch(batch, part: int | None = None, parts: int | None = None):
    """Slice ``part`` of ``parts`` equal slices of a batch (default: this rank's of the job's).

    ``batch`` is a tensor, or a dict / tuple / list of them, batch dimension
    first; the batch size must be a multiple of ``parts``.
    """
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    size = _batch_size(batch)
    if size % parts:
        raise ConfigError(f"a batch of {size} cannot be split evenly into {parts} processes; "
                          f"use a batch size that is a multiple of {parts}")
    share = size // parts
    return _take(batch, slice(part * share, (part + 1) * share))


def shard(batches):
    """This rank's slice of every global batch of ``batches`` (see :func:`shard_batch`).

    The slices of all ranks together are the global batch, so the averaged
    gradient equals a single process's on that batch. A batch that cannot be
    split evenly (the short last batch of an epoch) is first padded with its
    own first examples, as ``DistributedSampler`` pads an epoch: every rank
    then still takes part in every step, and the batch count stays the same.
    """
    parts = world_size()
    for batch in batches:
        size = _batch_size(batch)
        if size % parts:
            batch = _take(batch, torch.arange(-(-size // parts) * parts) % size)
        yield shard_batch(batch, rank(), parts)


def shard_examples(examples: list) -> list:
    """Every ``world_size``-th example from this rank's position: a disjoint share for evaluation."""
    return examples[rank()::world_size()]


def mean_across_ranks(value: float) -> float:
    """``value`` averaged over the ranks (unchanged in a single process)."""
    return sum_across_ranks([value])[0] / world_size()


def sum_across_ranks(values: list[float], group=None) -> list[float]:
    """Each value summed over the ranks (of ``group``, default all; unchanged in a single process)."""
    if world_size() == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    all_reduce(total, group)
    return total.tolist()


def all_reduce(tensor: torch.Tensor, group=None) -> None:
    """Sum ``tensor`` over the ranks (of ``group``, default all), in place; :class:`DistributedError` if a
    rank is gone."""
    with collective_errors():
        dist.all_reduce(tensor, group=group)


def broadcast(tensor: torch.Tensor, src: int = 0) -> None:
    """Overwrite ``tensor`` with rank ``src``'s, in place; :class:`DistributedError` if a rank is gone."""
    with collective_errors():
        dist.broadcast(tensor, src=src)


@contextlib.contextmanager
def collective_errors():
    """Turn a collective that failed or timed out into :class:`DistributedError`, naming this rank.

    Wrap collective calls only: gloo reports a dead peer or a timeout as a
    plain RuntimeError, so every RuntimeError inside is taken for one, except
    NotImplementedError (a tensor type the collective does not support).
    """
    try:
        yield
    except NotImplementedError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"rank {rank()} of {world_size()}" if _active() else f"rank {os.environ.get('RANK', '?')}"
        raise DistributedError(
            f"{where}: a collective operation failed ({first}); another process of the job has probably "
            f"failed or stopped responding, see its output (collectives give up after {timeout_s():g} s, "
            f"set by {TIMEOUT_ENV})"
        ) from exc


def wait_for_all() -> None:
    """Return when every process of the job has called this (nothing without a process group). At the end
    of a job, before the processes leave: one that tears its connections down while a peer still works
    (rank 0 saving, say) can abort at exit under gloo ("terminate called without an active exception")."""
    if world_size() > 1:
        with collective_errors():
            dist.barrier()


def cleanup() -> None:
    """Leave and destroy the process group, if there is one."""
    if _active():
        dist.destroy_process_group()


def _batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = list(batch.values()) if isinstance(batch, dict) else list(batch)
    return _batch_size(values[0])


def _take(batch, index):
    """``batch`` indexed along its batch dimension, in every tensor it holds."""
    if isinstance(batch, torch.Tensor):
        return batch[index]
    if isinstance(batch, dict):
        return {key: _take(value, index) for key, value in batch.items()}
    return type(batch)(_take(value, index) for value in batch)


# -- tensors split over the ranks (FSDP2's DTensors), rankings across the ranks ----------------
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
        with collective_errors():
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


def cut_over_ranks(scores: torch.Tensor, count: int, group) -> torch.Tensor:
    """The ``count``-th largest of all ranks' ``scores`` (1-D, fp32, >= 0), as a 0-d fp32 tensor (0 when the
    ranks hold fewer); every rank must call this at the same time.

    It is found bit by bit (a non-negative float's bits order as an
    integer), one scalar all-reduce a bit, so no rank gathers the others'
    candidates.
    """
    bits = scores.contiguous().view(torch.int32)
    threshold = 0
    with collective_errors():
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
    with collective_errors():
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
        with collective_errors():
            mesh = sharded[0][0].device_mesh
            dist.all_reduce(part, group=mesh.get_group(mesh.ndim - 1))
        squares = squares + part
    if whole:
        squares = squares + _sum_of_squares(whole)
    return float(squares.sqrt())


def _sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.float().pow(2).sum() for g in grads]).sum()
