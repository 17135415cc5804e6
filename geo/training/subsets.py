"""Nested random subsets of the train split, for learning curves (``--train-fraction``).

A head trained with ``train_fraction = f`` sees only ``subset_size(n, f)`` of the
train split's ``n`` rows (val and test stay whole). The subset is a prefix of one
permutation of the train rows drawn from the run's seed alone, so for one seed the
subset of a fraction a is contained in that of every fraction b > a: a learning
curve adds data to what the smaller runs saw, it never swaps it. ``f = 1`` is the
whole split, untouched (the same rows and batches as before fractions existed).

The permutation has its own random stream (``_SUBSET_STREAM``), independent of the
data order of each epoch (``FeatureCache.iter_batches``: a function of (seed, epoch)).
"""

from __future__ import annotations

import numpy as np

from geo.errors import ConfigError

# Second word of the subset permutation's seed: far above any epoch number, so the
# stream never equals an epoch's data-order stream default_rng([seed, epoch]).
_SUBSET_STREAM = 0x5B5E7


def check_fraction(fraction: float) -> float:
    """``fraction`` as a float in (0, 1]; ConfigError naming ``--train-fraction`` otherwise."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise ConfigError(f"--train-fraction must be a number in (0, 1], not {fraction!r}") from None
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise ConfigError(f"--train-fraction must be in (0, 1], not {fraction!r}")
    return value


def subset_size(n_rows: int, fraction: float) -> int:
    """Rows of a ``fraction`` of ``n_rows``: round(fraction * n_rows), at least 1 (non-decreasing in fraction)."""
    fraction = check_fraction(fraction)
    if fraction == 1.0:
        return int(n_rows)
    return min(int(n_rows), max(1, round(fraction * n_rows)))


def train_subset(train_rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The sorted int64 rows of the ``fraction`` subset of ``train_rows`` for ``seed`` (all of them at 1).

    ``train_rows`` [n]: the train split's cache rows (sorted, as ``FeatureCache.split_rows`` gives).
    The subset is the first ``subset_size(n, fraction)`` entries of one seeded permutation
    of the n rows, so subsets of one seed are nested.
    """
    train_rows = np.asarray(train_rows, dtype=np.int64)
    return seeded_subset(train_rows, subset_size(train_rows.size, fraction), seed, _SUBSET_STREAM)


def seeded_subset(rows: np.ndarray, size: int, seed: int, stream: int) -> np.ndarray:
    """The sorted first ``size`` entries of the permutation of ``rows`` [n] drawn from ``(seed, stream)``
    (``rows`` itself when size >= n): subsets of one seed and stream are nested."""
    rows = np.asarray(rows, dtype=np.int64)
    if size >= rows.size:
        return rows
    order = np.random.default_rng([int(seed), int(stream)]).permutation(rows.size)
    return np.sort(rows[order[:size]])
