"""Statistics on plain tensors and arrays: gradient concentration and loss-slice amplitude.

Nothing here knows about models; every function takes numbers and returns
numbers, so each can be checked against a direct numpy computation.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..core.select import count_selected

# The fractions of components and the norm shares every report lists.
TOP_FRACTIONS = (0.001, 0.01, 0.05, 0.1)
NORM_SHARES = (0.5, 0.9, 0.99)


class Concentration:
    """How the squared norm of a tensor concentrates on its largest components.

    Built once from any tensor (it is flattened): the squares are sorted
    and summed cumulatively in float64, after which every query is a
    lookup. "Top fraction f" means the ``count_selected(numel, f)`` largest
    components, exactly the ones SIFT would select at density f. When the
    tensor is all zeros, shares and fractions are NaN.
    """

    def __init__(self, values: torch.Tensor):
        squares = values.detach().reshape(-1).float().square().cpu().numpy()
        if squares.size == 0:
            raise ConfigError("cannot measure the concentration of an empty tensor; pass one with components")
        # numpy sorts in place without torch.sort's int64 index tensor, which
        # would double the memory for the hundreds of millions of entries of a
        # whole model.
        squares.sort()
        self._cumulative = np.cumsum(squares[::-1], dtype=np.float64)
        self.numel = int(squares.size)
        self.total = float(self._cumulative[-1])

    def prefix(self, k: int) -> float:
        """Sum of the ``k`` largest squares (0 for k <= 0, the total for k >= numel)."""
        if k <= 0:
            return 0.0
        return float(self._cumulative[min(k, self.numel) - 1])

    def top_share(self, fraction: float) -> float:
        """Share of the squared norm held by the top ``fraction`` of components."""
        if self.total == 0:
            return math.nan
        return self.prefix(count_selected(self.numel, fraction)) / self.total

    def fraction_for_share(self, share: float) -> float:
        """Smallest fraction of components whose squares sum to at least ``share`` of the total."""
        if self.total == 0:
            return math.nan
        k = int(np.searchsorted(self._cumulative, share * self.total, side="left")) + 1
        return min(k, self.numel) / self.numel

    def curve(self, points: int = 200) -> dict[str, list[float]]:
        """Cumulative share against fraction of components, at about ``points`` log-spaced counts."""
        counts = np.unique(np.rint(np.logspace(0, math.log10(self.numel), points)).astype(np.int64))
        shares = self._cumulative[counts - 1] / self.total if self.total else np.full(len(counts), np.nan)
        return {"fraction": (counts / self.numel).tolist(), "share": shares.tolist()}

    def summary(self, fractions: Sequence[float] = TOP_FRACTIONS,
                shares: Sequence[float] = NORM_SHARES) -> dict:
        """numel, squared norm, top shares and fractions for shares, keyed by the number as text."""
        return {
            "numel": self.numel,
            "squared_norm": self.total,
            "top_share": {str(f): self.top_share(f) for f in fractions},
            "fraction_for_share": {str(s): self.fraction_for_share(s) for s in shares},
        }


def selection_share(parts: Sequence[Concentration], density: float) -> float:
    """Share of the pooled squared norm that SIFT's per-tensor selection keeps at ``density``.

    SIFT selects the top ``density`` of every tensor separately, which keeps
    less of the pooled norm than one global top-k over all components.
    """
    total = sum(part.total for part in parts)
    if total == 0:
        return math.nan
    return sum(part.prefix(count_selected(part.numel, density)) for part in parts) / total


def density_for_share(parts: Sequence[Concentration], share: float, iterations: int = 60) -> float:
    """Smallest density at which SIFT's per-tensor selection keeps ``share`` of the pooled squared norm.

    The kept share only grows with the density, so bisection finds the
    threshold (to within 2**-iterations). SIFT keeps at least one component
    per tensor; when that alone keeps ``share``, the answer is 0.
    """
    if sum(part.total for part in parts) == 0:
        return math.nan
    if selection_share(parts, 0.0) >= share:
        return 0.0
    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        if selection_share(parts, middle) >= share:
            high = middle
        else:
            low = middle
    return high


# ---------------------------------------------------------------- loss slices


def amplitude_1d(losses) -> dict:
    """Amplitude of a loss curve sampled on an evenly spaced line.

    range and std of the losses; local_minima: interior points strictly
    below both neighbours; mean_abs_second_difference: mean of
    |L[i-1] - 2 L[i] + L[i+1]| in loss units per grid step squared.
    """
    values = np.asarray(losses, dtype=np.float64)
    if values.ndim != 1 or values.size < 3:
        raise ConfigError(f"a 1-D loss slice needs at least 3 points, got shape {values.shape}")
    middle = values[1:-1]
    minima = (middle < values[:-2]) & (middle < values[2:])
    second = values[:-2] - 2 * middle + values[2:]
    return {
        "min": float(values.min()), "max": float(values.max()),
        "range": float(values.max() - values.min()), "std": float(values.std()),
        "local_minima": int(minima.sum()),
        "mean_abs_second_difference": float(np.abs(second).mean()),
    }


def amplitude_2d(losses) -> dict:
    """Amplitude of a loss surface sampled on an evenly spaced square grid.

    As :func:`amplitude_1d`, where a local minimum is an interior point
    strictly below all 8 neighbours, and second differences are taken along
    both axes and averaged together.
    """
    values = np.asarray(losses, dtype=np.float64)
    if values.ndim != 2 or min(values.shape) < 3:
        raise ConfigError(f"a 2-D loss slice needs at least 3x3 points, got shape {values.shape}")
    rows, cols = values.shape
    centre = values[1:-1, 1:-1]
    minima = np.ones_like(centre, dtype=bool)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr or dc:
                minima &= centre < values[1 + dr:rows - 1 + dr, 1 + dc:cols - 1 + dc]
    along_rows = values[:-2, :] - 2 * values[1:-1, :] + values[2:, :]
    along_cols = values[:, :-2] - 2 * values[:, 1:-1] + values[:, 2:]
    second = np.concatenate([along_rows.ravel(), along_cols.ravel()])
    return {
        "min": float(values.min()), "max": float(values.max()),
        "range": float(values.max() - values.min()), "std": float(values.std()),
        "local_minima": int(minima.sum()),
        "mean_abs_second_difference": float(np.abs(second).mean()),
    }
