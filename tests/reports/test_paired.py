"""Paired bootstrap of accuracy differences: constructed predictions where the answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geo.reports.paired import matched_errors, paired_accuracy_difference
from geo.training.runs import write_predictions


def _correlated(n=400, seed=0):
    """Two heads on the same images: b is a except that it misses 6 % of images a gets (@25 km)."""
    rng = np.random.default_rng(seed)
    a = np.where(rng.random(n) < 0.5, 10.0, 5000.0)  # right on half the images
    b = a.copy()
    flip = np.flatnonzero(a <= 25)[: int(0.06 * n)]
    b[flip] = 5000.0
    return a, b


def test_paired_interval_sees_a_difference_the_overlap_of_intervals_cannot():
    a, b = _correlated()
    d = paired_accuracy_difference(a, b, 25.0)
    assert d.difference == pytest.approx(0.06) and d.n == 400
    assert d.outcome == "higher" and d.low > 0  # every resample has a >= b: the interval excludes 0
    # The independent intervals of the two accuracies (normal approximation) overlap.
    half = [1.96 * math.sqrt(p * (1 - p) / 400) for p in ((a <= 25).mean(), (b <= 25).mean())]
    assert (a <= 25).mean() - half[0] < (b <= 25).mean() + half[1]
    # Swapped: lower; identical: exactly 0 with a zero-width interval.
    assert paired_accuracy_difference(b, a, 25.0).outcome == "lower"
    same = paired_accuracy_difference(a, a, 25.0)
    assert (same.difference, same.low, same.high, same.outcome) == (0.0, 0.0, 0.0, "overlap")


def test_paired_interval_matches_the_normal_approximation_and_holds_zero_without_a_difference():
    rng = np.random.default_rng(1)
    n = 3000
    a = rng.exponential(800, n)
    b = a * rng.lognormal(0, 0.5, n)  # errors correlated with a's
    d = paired_accuracy_difference(a, b, 750.0, n_bootstrap=4000)
    delta = (a <= 750).astype(float) - (b <= 750)
    se = delta.std(ddof=1) / math.sqrt(n)  # the closed-form standard error of a paired mean
    assert d.difference == pytest.approx(delta.mean())
    assert d.low == pytest.approx(delta.mean() - 1.96 * se, abs=0.25 * se)
    assert d.high == pytest.approx(delta.mean() + 1.96 * se, abs=0.25 * se)
    # Exchangeable runs (b is a permuted within pairs at random): the interval holds 0 in ~95 % of draws.
    holds = 0
    for seed in range(40):
        r = np.random.default_rng(100 + seed)
        x, y = r.exponential(800, 500), r.exponential(800, 500)
        swap = r.random(500) < 0.5
        holds += paired_accuracy_difference(np.where(swap, y, x), np.where(swap, x, y), 750.0,
                                            n_bootstrap=500).outcome == "overlap"
    assert holds >= 34


def test_predictions_are_matched_by_image_id(tmp_path):
    def write(path, ids, dist):
        n = len(ids)
        z = np.zeros((n, 1))
        write_predictions(path, ids=np.array(ids), lat_deg=np.zeros(n), lon_deg=np.zeros(n), pred_lat_deg=np.zeros(n),
                          pred_lon_deg=np.zeros(n), dist_km=np.array(dist, float), topk_lat_deg=z, topk_lon_deg=z,
                          topk_prob=z, log_density=None)

    write(tmp_path / "a.parquet", ["x", "y", "z"], [1, 2, 3])
    write(tmp_path / "b.parquet", ["z", "w", "x"], [30, 40, 10])
    a, b = matched_errors(tmp_path / "a.parquet", tmp_path / "b.parquet")
    assert a.tolist() == [1, 3] and b.tolist() == [10, 30]  # ids x, z
    assert matched_errors(tmp_path / "a.parquet", tmp_path / "missing.parquet") is None
