"""Which tensors SIFT targets, and which of their components it selects."""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..errors import TargetError

# Module types whose ``weight`` may carry a sparse increment.
TARGETABLE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d)


ALL_LINEAR = "all-linear"  # peft's name for the default: every Linear-like layer but the output layer
# The new head of transformers' sequence classifiers, left out of the default as the output layer.
HEAD_NAMES = ("classifier", "score")


def _matcher(patterns):
    """A predicate on qualified module names: a list holds names (a module matches its qualified name or a
    ``.name`` suffix, as in peft); one string is such a name too, or else a regex matching the whole name,
    so that ``"query"`` and ``["query"]`` mean the same."""
    if isinstance(patterns, str):
        regex = re.compile(patterns)
        return lambda name: name == patterns or name.endswith("." + patterns) or regex.fullmatch(name) is not None
    patterns = tuple(patterns)
    return lambda name: any(name == p or name.endswith("." + p) for p in patterns)


def _is_linear(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D is a Linear with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _is_targetable(module: nn.Module) -> bool:
    return _is_linear(module) or isinstance(module, TARGETABLE)


def _output_layers(model: nn.Module) -> set[int]:
    """ids of the modules that produce the model's output: left out of the default targets.

    The language-model head (``get_output_embeddings()``), or else a
    classification head (``classifier``/``score``) at the top of the model,
    as peft's ``"all-linear"`` leaves them out.
    """
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is None:
        head = next((getattr(model, n) for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)), None)
    return set() if head is None else {id(head)}


def find_targets(model: nn.Module, target_modules, dense_modules=()) -> tuple[dict, dict]:
    """Resolve the config's patterns on ``model``.

    Returns ``(targeted, dense)``: parameter name -> parameter for the weights
    that get a sparse increment, and for the parameters trained densely.
    ``target_modules=None`` or ``"all-linear"`` targets every Linear-like
    layer (``nn.Linear``, transformers' ``Conv1D``) except the output layer.
    A weight reached under several names (tied weights, a module registered
    twice) is targeted once, under the name ``model.named_parameters()``
    gives it. Raises TargetError when a pattern list matches nothing or a
    weight is both targeted and dense.
    """
    is_dense = _matcher(dense_modules) if dense_modules else (lambda name: False)
    modules = list(model.named_modules(remove_duplicate=False))  # every alias, so any name of a module matches
    dense_prefixes = [name for name, _ in modules if name and is_dense(name)]
    if dense_modules and not dense_prefixes:
        raise TargetError(
            f"dense_modules {dense_modules!r} matched no module of {type(model).__name__}; "
            f"module names look like {_examples(model)}"
        )

    def under_dense(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in dense_prefixes)

    all_linear = target_modules is None or target_modules == ALL_LINEAR
    is_target = None if all_linear else _matcher(target_modules)
    excluded = _output_layers(model) if all_linear else set()
    canonical = {id(p): n for n, p in model.named_parameters()}
    targeted = {}
    for name, module in modules:
        if not name or under_dense(name):
            continue
        if all_linear:
            if not _is_linear(module) or id(module) in excluded:
                continue
        elif not is_target(name):
            continue
        weight = getattr(module, "weight", None)
        # A parameter, or a quantized tensor subclass registered as one (torchao).
        if not _is_targetable(module) or "weight" not in module._parameters or weight is None:
            if isinstance(target_modules, (list, tuple)) and name in target_modules:
                raise TargetError(f"target module {name!r} is a {type(module).__name__}, which has no weight SIFT can target")
            continue
        if id(weight) in canonical:
            targeted[canonical[id(weight)]] = weight

    if not targeted:
        raise TargetError(
            f"target_modules {target_modules!r} matched no Linear/Embedding/Conv module of "
            f"{type(model).__name__}; module names look like {_examples(model)}"
        )
    dense_ids = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if under_dense(n.rsplit(".", 1)[0])}
    dense = {n: p for n, p in model.named_parameters() if id(p) in dense_ids}
    # A parameter shared between a targeted and a dense module (tied weights) cannot be both.
    shared = {id(p) for p in targeted.values()} & dense_ids
    if shared:
        names = [n for n, p in targeted.items() if id(p) in shared]
        raise TargetError(f"{names} are targeted and also trained densely (tied weights?); drop one of the patterns")
    return targeted, dense


def _examples(model: nn.Module, count: int = 6) -> list[str]:
    names = [n for n, m in model.named_modules() if n and _is_targetable(m)]
    return names[:count]


def count_selected(numel: int, density: float) -> int:
    """Components selected in a tensor of ``numel`` entries: ceil-free, at least one."""
    return max(1, min(numel, int(round(numel * density))))


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest index type for a tensor of ``numel`` entries: int32 below 2**31, else int64.

    Half the bytes of torch's default int64 for every selected component;
    torch indexing (``t[idx]``, ``t[idx] = v``) takes int32 directly.
    """
    return torch.int32 if numel < 2**31 else torch.int64


def top_k_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices (:func:`index_dtype`) of the k largest |score| entries, sorted ascending.

    Sorting keeps memory access coalesced and makes the result independent of
    the top-k kernel's output order.
    """
    flat = score.detach().reshape(-1)
    idx = torch.topk(flat.abs().float(), k, sorted=False).indices
    return torch.sort(idx.to(index_dtype(flat.numel()))).values


def tensor_generator(seed: int, position: int) -> torch.Generator:
    """The random stream of the ``position``-th targeted tensor (model order).

    One stream per tensor makes a random selection independent of the order
    in which backward hooks happen to fire.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + position)


def random_indices(numel: int, k: int, generator: torch.Generator, device) -> torch.Tensor:
    """k distinct flat indices drawn uniformly, sorted (the paper's random ablation)."""
    idx = torch.randperm(numel, generator=generator)[:k].to(index_dtype(numel))
    return torch.sort(idx).values.to(device)


# Packed indices (SiftConfig.compact_indices): 2 bytes a component instead of 4.
# The flat index space is cut into blocks of 2**16; a packed tensor is int16:
# first the count of selected components in each block (int32, stored as two
# int16 each), then each component's offset in its block (shifted by -2**15).
_BLOCK = 1 << 16


def pack_indices(idx: torch.Tensor, numel: int) -> torch.Tensor:
    """Sorted flat indices of a tensor of ``numel`` entries -> one packed int16 tensor."""
    blocks = -(-numel // _BLOCK)
    idx = idx.long()
    counts = torch.bincount(idx // _BLOCK, minlength=blocks).to(torch.int32)
    offsets = (idx % _BLOCK - (_BLOCK // 2)).to(torch.int16)
    return torch.cat([counts.view(torch.int16), offsets])


def unpack_indices(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: the sorted flat indices (:func:`index_dtype`)."""
    blocks = -(-numel // _BLOCK)
    counts = packed[:2 * blocks].view(torch.int32)
    offsets = packed[2 * blocks:]
    dtype = index_dtype(numel)
    block_of = torch.repeat_interleave(torch.arange(blocks, device=packed.device, dtype=dtype), counts,
                                       output_size=offsets.numel())  # output_size: no device sync
    return block_of * _BLOCK + (offsets.to(dtype) + _BLOCK // 2)


# Selections beyond the top-k (SiftConfig.selection); ``ranking`` is the window's score as
# siftune.budget ranks it, largest magnitude first. Each returns sorted flat indices.

def mixed_indices(ranking: torch.Tensor, k: int, share: float, generator: torch.Generator) -> torch.Tensor:
    """The top round(share * k) of ``ranking``, and the rest of k drawn uniformly from the others."""
    numel = ranking.numel()
    top = top_k_indices(ranking, round(share * k)) if round(share * k) else ranking.new_zeros(0, dtype=torch.long)
    taken = torch.zeros(numel, dtype=torch.bool)
    taken[top.long().cpu()] = True
    drawn = torch.randperm(numel, generator=generator)
    drawn = drawn[~taken[drawn]][:k - top.numel()]
    idx = torch.cat([top.long().cpu(), drawn]).to(index_dtype(numel))
    return torch.sort(idx).values.to(ranking.device)


def line_caps(shape: tuple, k: int, cap: float) -> tuple[int, int]:
    """The most components a row and a column may hold: ``cap`` times k / rows and k / columns, rounded up
    (the weight seen as rows x the product of its other dimensions). With ``cap`` >= 1 they always admit k
    components: rows x row cap >= k and columns x column cap >= k."""
    rows = shape[0]
    columns = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
    return math.ceil(cap * k / rows - 1e-9), math.ceil(cap * k / columns - 1e-9)


def balanced_indices(ranking: torch.Tensor, k: int, shape: tuple, cap: float) -> torch.Tensor:
    """The top-k of ``ranking`` with no row and no column over its cap (:func:`line_caps`).

    In rounds, among the components not chosen yet whose row and column both
    have room left: each row proposes its best (as many as it has room for),
    each column keeps its best proposals (as many as it has room for), and the
    best of those kept are chosen, up to k. Ties: the lower column, row, flat
    index first. When the rounds stall before k (the rows and columns with
    room left meet only at chosen components), each further component comes
    from a chain of swaps that keeps every line within its cap
    (:func:`_add_by_swaps`). It holds an fp32 copy of the scores and the
    chosen mask throughout; a round adds an fp32 copy and three booleans of
    the rows and columns with room left (the whole weight in the first round:
    about 12 bytes an entry at the peak) and takes a top-(row cap) along those
    rows, with no sort of the whole weight.
    """
    device = ranking.device
    # a copy (abs); NaN ranks first, as in torch.topk, and the rounds compare with each row's threshold
    score = ranking.detach().reshape(shape[0], -1).abs().float().nan_to_num_(nan=float("inf"))
    rows, columns = score.shape
    row_room = torch.full((rows,), line_caps(shape, k, cap)[0], device=device)
    column_room = torch.full((columns,), line_caps(shape, k, cap)[1], device=device)
    chosen = torch.zeros(rows * columns, dtype=torch.bool, device=device)
    flat_score, count = score.reshape(-1), 0
    while count < k:
        # the lines with room left: after the first round usually a few
        row_open, column_open = (row_room > 0).nonzero().squeeze(1), (column_room > 0).nonzero().squeeze(1)
        open_ = ~_lines(chosen.view(rows, columns), row_open, column_open)
        if not bool(open_.any()):
            break
        proposed = _rows_best(score, row_open, column_open, open_, row_room[row_open])
        proposed = row_open[proposed // column_open.numel()] * columns + column_open[proposed % column_open.numel()]
        kept = _columns_best(proposed, flat_score, columns, column_room)
        take = kept[top_set(flat_score[kept], min(k - count, kept.numel()))]
        chosen[take] = True
        count += take.numel()
        row_room -= torch.bincount(take // columns, minlength=rows)
        column_room -= torch.bincount(take % columns, minlength=columns)
    for _ in range(k - count):
        _add_by_swaps(score, chosen.view(rows, columns), row_room, column_room)
    return chosen.nonzero().squeeze(1).to(index_dtype(rows * columns))


def _lines(x: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``x`` at these ``rows`` and ``columns`` (ascending indices): ``x`` itself when they are all of its
    lines, else one copy."""
    if rows.numel() == x.shape[0]:
        return x if columns.numel() == x.shape[1] else x.index_select(1, columns)
    return x.index_select(0, rows) if columns.numel() == x.shape[1] else x[rows[:, None], columns[None, :]]


def _rows_best(score: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, open_: torch.Tensor,
               room: torch.Tensor) -> torch.Tensor:
    """The flat indices (ascending, among these ``rows`` and ``columns`` of ``score``) of the ``open_``
    entries among their row's best ``room`` open ones (ties: the lower column). A top-(most room + 1)
    along the rows finds each row's room-th best value; the entries above it are in, and those equal
    to it in column order up to the room: no sort of the whole tensor, and no count over it unless a
    row's ties reach past its top. Holds one fp32 copy of the lines' scores and three booleans."""
    masked = _lines(score, rows, columns)
    if masked is score:
        masked = torch.where(open_, score, -1.0)  # scores are >= 0: a closed entry is never proposed
    else:
        masked.masked_fill_(~open_, -1.0)  # a copy already
    width = masked.shape[1]
    most = min(int(room.max()), width)
    room = room.clamp(1, most)  # a row with no room has no open entry
    best = torch.topk(masked, min(most + 1, width), dim=1).values  # each row's best, descending
    threshold = best.gather(1, (room - 1)[:, None])
    above = masked > threshold
    at = masked == threshold
    del masked
    at &= open_
    left = room - (best > threshold).sum(1)  # how many of a row's ties at its threshold it proposes
    ties = (best == threshold).sum(1)  # a row's ties among its best: all of them unless they reach its last
    beyond = ((best[:, -1] == threshold[:, 0]) & (best.shape[1] < width)).nonzero().squeeze(1)
    if beyond.numel():
        ties[beyond] = at[beyond].sum(1)
    tied = ((ties > left) & (threshold[:, 0] >= 0)).nonzero().squeeze(1)
    if tied.numel():  # ties across the threshold: the lower columns
        at[tied] &= at[tied].cumsum(1) <= left[tied, None]
    above |= at
    del at
    return above.reshape(-1).nonzero().squeeze(1)


def _columns_best(proposed: torch.Tensor, flat_score: torch.Tensor, columns: int,
                  room: torch.Tensor) -> torch.Tensor:
    """Of the ``proposed`` flat indices (ascending), those among their column's best ``room``
    (ties: the lower row), ascending."""
    column = proposed % columns
    by_score = torch.argsort(flat_score[proposed], descending=True, stable=True)  # ties: the lower row
    order = by_score[torch.argsort(column[by_score], stable=True)]
    column = column[order]
    sizes = torch.bincount(column, minlength=columns)
    place = torch.arange(order.numel(), device=order.device) - (sizes.cumsum(0) - sizes)[column]
    return torch.sort(proposed[order[place < room[column]]]).values


def _add_by_swaps(score: torch.Tensor, chosen: torch.Tensor, row_room: torch.Tensor,
                  column_room: torch.Tensor) -> None:
    """One more component chosen, in place, with no row or column over its room.

    A chain of swaps: a row with room takes a component in a full column,
    that column gives up one of its components in another row, which takes
    one in another column, and so on until a column with room takes the last:
    the chain's first row and last column hold one more, every other line as
    many as before. Among the shortest chains (found row by row, column by
    column, from every row with room at once), the one whose taken scores less
    its given-up scores is largest, in fp32; ties: the lower row, column. Such
    a chain exists while fewer than k are chosen, since the caps admit k
    (an augmenting path of the bipartite rows-columns graph).
    """
    rows, columns = chosen.shape
    device, minus_inf = score.device, torch.tensor(float("-inf"), dtype=score.dtype, device=score.device)
    row_seen, column_seen = row_room > 0, torch.zeros(columns, dtype=torch.bool, device=device)
    frontier, row_gain = row_seen.clone(), torch.zeros(rows, dtype=score.dtype, device=device)
    row_from = torch.full((rows,), -1, device=device)  # the column whose component a row gave up
    column_from = torch.full((columns,), -1, device=device)  # the row that took a component of a column
    column_gain = torch.zeros(columns, dtype=score.dtype, device=device)
    while bool(frontier.any()):
        can_take = ~chosen & frontier[:, None] & ~column_seen[None, :]
        gain = torch.where(can_take, row_gain[:, None] + score, minus_inf)
        best = gain.argmax(0)  # the first of equal maxima: the lower row
        reached = can_take.any(0)
        column_from = torch.where(reached, best, column_from)
        column_gain = torch.where(reached, gain.gather(0, best[None, :])[0], column_gain)
        column_seen |= reached
        ends = reached & (column_room > 0)
        if bool(ends.any()):
            column = int(torch.where(ends, column_gain, minus_inf).argmax())
            column_room[column] -= 1
            while True:
                row = int(column_from[column])
                chosen[row, column] = True
                column = int(row_from[row])
                if column < 0:  # a row that had room
                    row_room[row] -= 1
                    return
                chosen[row, column] = False
        can_give = chosen & reached[None, :] & ~row_seen[:, None]
        gain = torch.where(can_give, column_gain[None, :] - score, minus_inf)
        best = gain.argmax(1)
        frontier = can_give.any(1)
        row_from = torch.where(frontier, best, row_from)
        row_gain = gain.gather(1, best[:, None])[:, 0]
        row_seen |= frontier
    raise RuntimeError("balanced selection: no chain of swaps adds a component within the caps")


def grow_drop_indices(held: torch.Tensor, change: torch.Tensor, ranking: torch.Tensor, drop: int) -> torch.Tensor:
    """``held`` (sorted flat indices) without the ``drop`` whose |change| is smallest (ties: the lower
    index dropped), with the ``drop`` best of ``ranking`` outside ``held`` grown in their place."""
    held = held.long()
    dropped = top_set(-change.detach().abs().float().to(held.device), drop)
    kept = torch.ones(held.numel(), dtype=torch.bool, device=held.device)
    kept[dropped] = False
    score = ranking.detach().reshape(-1).abs().float()
    score[held.to(score.device)] = -1.0  # abs() made a copy: the ranking is left alone
    grown = top_set(score, drop).to(held.device)
    idx = torch.cat([held[kept], grown]).to(index_dtype(ranking.numel()))
    return torch.sort(idx).values.to(ranking.device)


def top_set(score: torch.Tensor, m: int, at_least: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of the ``m`` largest entries of the 1-D ``score`` (ties: lower index first), unordered;
    with ``at_least``, only those of them >= it."""
    if m == 0:
        return torch.zeros(0, dtype=torch.long, device=score.device)
    if at_least is not None:  # usually few pass: rank only them
        idx = (score >= at_least).nonzero().squeeze(1)
        return idx if idx.numel() <= m else idx[top_set(score[idx], m)]
    values, idx = torch.topk(score, m, sorted=False)
    value = values.min()  # the m-th largest
    if int((score == value).sum()) == int((values == value).sum()):
        return idx  # no tie left out at the boundary: top-k's own choice is the one
    above = (score > value).nonzero().squeeze(1)
    ties = (score == value).nonzero().squeeze(1)[:m - above.numel()]  # ascending: lowest index first
    return torch.cat([above, ties])
