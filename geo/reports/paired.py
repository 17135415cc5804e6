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


def matched_errors(path_a: Path, path_b: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Errors of two predictions files on their shared image ids (sorted), or None if either is unreadable."""
    try:
        a = _errors(str(path_a), Path(path_a).stat().st_mtime_ns)
        b = _errors(str(path_b), Path(path_b).stat().st_mtime_ns)
    except (OSError, KeyError, ValueError, ImportError):
        return None
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    return np.array([a[i] for i in shared]), np.array([b[i] for i in shared])
