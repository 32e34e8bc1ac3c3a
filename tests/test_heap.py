"""The host heap's free pages go back to the system once per training forward (siftune.core.heap)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import siftune  # noqa: E402
from siftune import SiftConfig  # noqa: E402
from siftune.core import heap  # noqa: E402
from _models import MLP_DENSE, MLP_TARGETS, mlp, mlp_batches, mlp_loss  # noqa: E402


@pytest.fixture
def trims(monkeypatch):
    """Counts malloc_trim calls instead of making them."""
    calls = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda pad: calls.append(pad) or 1)
    monkeypatch.setenv(heap.TRIM_ENV, "1")
    return calls


def train(structure=None, steps: int = 3):
    model = mlp()
    engine = siftune.attach(model, SiftConfig(density=0.2, target_modules=MLP_TARGETS, dense_modules=MLP_DENSE,
                                              structure=structure))
    opt = engine.optimizer(lr=1e-2)
    for batch in mlp_batches(steps):
        mlp_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return model, engine


@pytest.mark.parametrize("structure", [None, "rows", "columns"])
def test_the_engine_trims_once_per_training_forward(trims, structure):
    train(structure, steps=3)
    assert trims == [0, 0, 0]


def test_no_trim_in_evaluation_or_without_gradients(trims):
    model, _ = train(steps=1)
    trims.clear()
    batch = mlp_batches(1)[0]
    with torch.no_grad():
        mlp_loss(model, batch)
    model.eval()
    mlp_loss(model, batch)
    assert trims == []


@pytest.mark.parametrize("value", [None, "0"])
def test_trim_is_off_unless_the_environment_variable_is_1(trims, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(heap.TRIM_ENV)
    else:
        monkeypatch.setenv(heap.TRIM_ENV, value)
    train(steps=2)
    assert trims == [] and not heap.enabled()


def test_detach_removes_the_trim(trims):
    model, engine = train(steps=1)
    engine.detach()
    trims.clear()
    mlp_loss(model, mlp_batches(1)[0]).backward()
    assert trims == []


def test_release_does_nothing_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(heap, "_malloc_trim", None)
    assert not heap.enabled() and heap.release() is False


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(heap._malloc_trim is None, reason="needs glibc's malloc_trim")
def test_release_hands_the_heaps_free_pages_back(monkeypatch):
    monkeypatch.setenv(heap.TRIM_ENV, "1")
    # 64 KiB tensors come from the heap (below glibc's smallest mmap threshold); freeing every other one
    # leaves holes that no later allocation fills and that malloc's own trimming of the heap's top misses.
    chunks = [torch.ones(16 * 1024) for _ in range(2048)]  # 128 MiB, every page written
    del chunks[::2]
    before = _rss_mib()
    assert heap.release()
    assert before - _rss_mib() > 32  # about 64 MiB of holes
