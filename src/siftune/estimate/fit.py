"""The largest density, batch size or sequence length whose simulated peak fits a memory size.

Peak memory grows with each of the three, so the answer is bracketed: a value
that fits below, one that does not above, and the next probe inside the
bracket where the line through its ends crosses the budget (clamped to the
bracket's middle 80%, so a curve the line misreads still halves the bracket
at worst). Every probe is a simulation (:func:`.extrapolate.estimate`). With
the density, the peak falls where SIFT's default selection turns from
balanced to the top-k (above 10%): each side is searched.
"""
from __future__ import annotations

import re

from ..errors import ConfigError

FIT_FOR = {
    "density": "SIFT's density, to 1% of itself (SIFT methods only)",
    "batch-size": "sequences per step (per GPU)",
    "seq-len": "tokens per sequence, in steps of 64",
}
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
LOWEST_DENSITY = 1e-4
SEQ_STEP = 64
MAX_BATCH = 4096


def parse_size(text: str) -> int:
    """Bytes in a memory size such as ``24GiB``, ``80 GiB``, ``40GB`` (10^9 B) or ``512MiB``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"cannot read {text!r} as a memory size: give a number and a unit "
                          "(B, KB, MB, GB, TB or KiB, MiB, GiB, TiB), e.g. 24GiB")
    return int(float(match.group(1)) * UNITS[unit])


def largest(peak_at, low, high, budget: int, step=None, relative: float = 0.01):
    """The largest ``x`` in ``[low, high]`` with ``peak_at(x) <= budget``, peak_at growing with x.

    ``step`` makes x a multiple of it (integers); otherwise x is found to ``relative``
    of itself. Returns ``(x or None, {x: peak bytes} of every probe)``.
    """
    probes = {}

    def peak(x):
        if x not in probes:
            probes[x] = peak_at(x)
        return probes[x]

    if peak(low) > budget:
        return None, probes
    if peak(high) <= budget:
        return high, probes
    lo, hi = low, high
    moved = []  # which end each probe moved
    while hi - lo > (step or relative * lo):
        tolerance = step or relative * lo
        crossing = lo + (budget - peak(lo)) * (hi - lo) / (peak(hi) - peak(lo))
        if moved[-2:] in (["lo", "lo"], ["hi", "hi"]):
            x = (lo + hi) / 2  # the line misread the curve twice on one side: halve the bracket
        elif crossing - lo < 2 * tolerance:
            x = lo + tolerance  # the line puts the answer at lo: probe just above it
        else:  # just under the crossing, so that the next probe, just above, can close the bracket
            x = min(max(crossing - tolerance / 2, lo + tolerance), hi - tolerance)
        if step:
            x = min(max(round(x / step) * step, lo + step), hi - step)
        if peak(x) <= budget:
            lo = x
            moved.append("lo")
        else:
            hi = x
            moved.append("hi")
    return lo, probes


def grow_until_over(peak_at, start, budget: int, limit, factor: int = 2):
    """``(low that fits, high that does not or limit)`` found by multiplying from ``start``."""
    low = start
    while low < limit:
        high = min(low * factor, limit)
        if peak_at(high) > budget:
            return low, high
        low = high
    return low, limit


def fit(config, setup, what: str, budget: int, gpus: int = 1, fsdp: bool = False, progress=None) -> dict:
    """The largest ``what`` (a key of :data:`FIT_FOR`) at which ``setup`` peaks within ``budget`` bytes.

    Returns the method, the answer (None when even the smallest value does not fit,
    or a note when the question does not apply), the estimate at the answer and the
    smallest probed value that did not fit.
    """
    from .extrapolate import estimate
    from .methods import SIFT_METHODS

    if what not in FIT_FOR:
        raise ConfigError(f"--for must be one of {', '.join(FIT_FOR)}, got {what!r}")
    out = dict(method=setup.method, fit_for=what, budget_bytes=budget)
    if what == "density" and setup.method not in SIFT_METHODS:
        return dict(out, largest=None, note="density is SIFT's: nothing to fit")
    field = what.replace("-", "_")
    results = {}

    def peak_at(x):
        if x not in results:
            changes = {field: x, "trainable": None} if field == "density" else {field: x}
            results[x] = estimate(config, setup.replace(**changes), gpus, fsdp, progress=progress)
        return results[x]["peak_bytes"]

    if field == "density":
        answer, split = None, _balanced_up_to(setup, gpus, fsdp)
        if split is not None:  # the peak drops where the top-k takes over from balanced: search each side
            answer, _ = largest(peak_at, split * 1.01, 1.0, budget)
        if answer is None:
            answer, _ = largest(peak_at, LOWEST_DENSITY, split or 1.0, budget)
    else:
        unit = 1 if field == "batch_size" else SEQ_STEP
        limit = MAX_BATCH if field == "batch_size" else _longest(config)
        current = max(unit, getattr(setup, field) // unit * unit)
        if peak_at(current) <= budget:
            low, high = grow_until_over(peak_at, current, budget, limit)
        else:
            low, high = unit, current
        answer, _ = largest(peak_at, low, high, budget, step=unit)
    over = [x for x in results if answer is None or x > answer]
    out.update(largest=answer, estimate=results.get(answer), probes=len(results))
    if over:
        out["first_over"] = dict(value=min(over), peak_bytes=results[min(over)]["peak_bytes"])
    if answer is None:
        lowest = min(results)
        out["note"] = f"does not fit even at {what} {lowest:g} ({results[lowest]['peak_bytes'] / 2**30:.2f} GiB)"
    elif answer == (1.0 if field == "density" else MAX_BATCH if field == "batch_size" else _longest(config)):
        out["note"] = f"fits at the largest {what} there is"
    return out


def _balanced_up_to(setup, gpus: int, fsdp: bool) -> float | None:
    """The density above which SIFT's ``selection="auto"`` is the top-k instead of balanced, where ``setup``
    selects balanced below it: there the peak falls (balanced's rounds hold about 12 bytes an entry of the
    weight they choose in, the top-k's selection 4 to 5), so the peak does not grow with the density across it."""
    from ..config import BALANCED_UP_TO
    from .methods import SIFT_METHODS, sift_config

    if setup.method not in SIFT_METHODS:
        return None
    at, above = (sift_config(setup, density, distributed=gpus > 1).resolve(sharded=fsdp).selection
                 for density in (BALANCED_UP_TO, min(1.0, BALANCED_UP_TO * 1.01)))
    return BALANCED_UP_TO if (at, above) == ("balanced", "gradient") else None


def _longest(config) -> int:
    """The longest sequence a model takes: its position count, rounded down to the step."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 131072
    return max(SEQ_STEP, positions // SEQ_STEP * SEQ_STEP)
