"""Paired bootstrap of an accuracy difference between two runs on the same test images.

Two heads evaluated on the same images make correlated errors: the image that
one head places well, the other usually does too. Comparing their two separate
95 % intervals ignores that and calls most real differences "inconclusive". The
paired bootstrap resamples *images* (the same resample for both runs) and takes
the percentile interval of acc_a − acc_b; the difference is significant when the
interval excludes 0. Predictions are matched by image id (``predictions.parquet``),
so two runs are comparable only on the images both evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

N_BOOTSTRAP = 2000
SEED = 0


@dataclass(frozen=True)
class PairedDifference:
    """acc_a − acc_b (fractions) over ``n`` shared images, and its percentile interval."""

    difference: float
    low: float
    high: float
    n: int

    @property
    def outcome(self) -> str:
        """"higher" (a above b), "lower", or "overlap" (the interval holds 0)."""
        return "higher" if self.low > 0 else "lower" if self.high < 0 else "overlap"


def paired_accuracy_difference(dist_a_km: np.ndarray, dist_b_km: np.ndarray, threshold_km: float, *,
                               n_bootstrap: int = N_BOOTSTRAP, level: float = 0.95,
                               seed: int = SEED) -> PairedDifference:
    """The paired bootstrap of accuracy@threshold (error ≤ threshold) of a minus b.

    Args:
        dist_a_km, dist_b_km: float [n] errors of the two runs on the same n images, same order.
    """
    hit_a = np.asarray(dist_a_km, np.float64) <= threshold_km
    hit_b = np.asarray(dist_b_km, np.float64) <= threshold_km
    delta = hit_a.astype(np.float64) - hit_b.astype(np.float64)  # per image: +1, 0 or -1
    n = len(delta)
    if n == 0:
        return PairedDifference(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = np.empty(n_bootstrap)
    for start in range(0, n_bootstrap, 256):  # bounded memory: 256 resamples of n indices at a time
        count = min(256, n_bootstrap - start)
        means[start:start + count] = delta[rng.integers(0, n, size=(count, n))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedDifference(float(delta.mean()), float(low), float(high), n)


@lru_cache(maxsize=256)
def _errors(path: str, mtime_ns: int) -> dict[str, float]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "dist_km"])
    return dict(zip(table["id"].to_pylist(), table["dist_km"].to_numpy(zero_copy_only=False).tolist()))


def _matched(column_of, path_a: Path, path_b: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """``column_of(path, mtime_ns) -> {id: value}`` of two predictions files on their shared ids (sorted),
    or None if either is unreadable or lacks the column, or they share no id."""
    try:
        a = column_of(str(path_a), Path(path_a).stat().st_mtime_ns)
        b = column_of(str(path_b), Path(path_b).stat().st_mtime_ns)
    except (OSError, KeyError, ValueError, ImportError):
        return None
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    return np.array([a[i] for i in shared]), np.array([b[i] for i in shared])


def matched_errors(path_a: Path, path_b: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Errors of two predictions files on their shared image ids (sorted), or None if either is unreadable."""
    return _matched(_errors, path_a, path_b)


# ---- calibration: the paired bootstrap of a calibration-error difference --------------------------------


def paired_calibration_difference(hpd_a: np.ndarray, hpd_b: np.ndarray, *, n_bootstrap: int = N_BOOTSTRAP,
                                  level: float = 0.95, seed: int = SEED) -> PairedDifference:
    """The paired bootstrap of calibration error (``geo.metrics.calibration_error``) of a minus b.

    Args:
        hpd_a, hpd_b: float [n] HPD levels of the two runs on the same n images, same order.
    The same image resamples for both runs; the interval is the percentile interval of the differences.
    """
    from geo.metrics import CALIBRATION_GRID

    a, b = np.asarray(hpd_a, np.float64), np.asarray(hpd_b, np.float64)
    n = len(a)
    if n == 0:
        return PairedDifference(float("nan"), float("nan"), float("nan"), 0)
    grid = np.asarray(CALIBRATION_GRID)
    # per image and level: is it covered? The calibration error of a resample is then a mean of these.
    covered_a, covered_b = a[:, None] <= grid[None, :], b[:, None] <= grid[None, :]

    def error(covered: np.ndarray, index: np.ndarray) -> np.ndarray:  # index [r, n] -> [r]
        return np.abs(covered[index].mean(axis=1) - grid[None, :]).mean(axis=1)

    rng = np.random.default_rng(seed)
    diffs = np.empty(n_bootstrap)
    for start in range(0, n_bootstrap, 64):  # bounded memory: 64 resamples at a time ([64, n, levels] booleans)
        count = min(64, n_bootstrap - start)
        index = rng.integers(0, n, size=(count, n))
        diffs[start:start + count] = error(covered_a, index) - error(covered_b, index)
    whole = np.arange(n)[None, :]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return PairedDifference(float((error(covered_a, whole) - error(covered_b, whole))[0]), float(low), float(high), n)


@lru_cache(maxsize=256)
def _hpd_levels(path: str, mtime_ns: int) -> dict[str, float]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "hpd_level"])
    values = table["hpd_level"].to_pylist()
    if any(v is None for v in values):
        raise ValueError(f"{path}: hpd_level has nulls (a head without a density)")
    return dict(zip(table["id"].to_pylist(), values))


def hpd_levels(path: Path) -> np.ndarray | None:
    """The ``hpd_level`` column of a predictions file, or None when it has none (older runs, no density)."""
    try:
        return np.array(list(_hpd_levels(str(path), Path(path).stat().st_mtime_ns).values()))
    except (OSError, KeyError, ValueError, ImportError):
        return None


def matched_hpd_levels(path_a: Path, path_b: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """HPD levels of two predictions files on their shared image ids (sorted), or None if either has none."""
    return _matched(_hpd_levels, path_a, path_b)
