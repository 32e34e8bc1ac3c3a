"""Giving the host heap's free pages back to the system before a step's memory peaks.

glibc's malloc keeps freed chunks of its heap resident: a tensor below its
mmap threshold (which rises, up to 32 MiB, to the largest mapped block
freed so far) comes from the heap, and when it is freed its pages stay in
the process's resident memory until a later allocation reuses them. Activations change
size with every batch's length, so a longer batch after a shorter one
cannot reuse all of the shorter one's chunks, and what stays resident
depends on the order and sizes of every allocation: two methods with the
same live tensors reach different peaks. ``malloc_trim(0)`` hands every
free page of the heap back (the chunks stay the heap's, and a page is
faulted in again when one is reused), so each step starts from its live
tensors alone.

:func:`release` calls it where the C library has it (glibc on Linux) and
does nothing elsewhere. A step's memory peaks at the start of its
backward, when every saved activation is alive; the engine calls
:func:`release` just before, once in each training forward on the host,
when the forward has passed the last targeted layer (again when gradient
checkpointing recomputes that layer), so the forward's freed temporaries
are not resident at the peak (tens of ms; the backward faults in again the
pages it reuses: ``python bench/heap_trim.py`` measures both).
It is off unless ``SIFTUNE_TRIM_HEAP=1`` when the engine attaches: it can lower the peak towards
the live tensors (73 to 90 MiB lower over 6 steps of SmolLM2-135M's chat batches), but the page
faults it causes make the run 7 to 14% longer on one thread (docs/structured.md, "Peak memory").
"""
from __future__ import annotations

import ctypes
import os
import sys

TRIM_ENV = "SIFTUNE_TRIM_HEAP"


def _find_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library: absent from musl
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()


def enabled() -> bool:
    """Whether :func:`release` trims: the C library has ``malloc_trim`` and ``SIFTUNE_TRIM_HEAP`` is ``1``."""
    return _malloc_trim is not None and os.environ.get(TRIM_ENV, "0").strip() == "1"


def release() -> bool:
    """Give the heap's free pages back to the system (``malloc_trim(0)``); whether it trimmed."""
    if not enabled():
        return False
    _malloc_trim(0)
    return True
