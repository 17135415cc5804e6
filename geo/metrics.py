"""Geolocation metrics: accuracy at distance scales, median/mean error, GeoScore, NLL.

Conventions (stated in every report):

- accuracy@X km is the *fraction* of predictions whose great-circle error is
  <= X km (less-or-equal, accuracy not error rate), at the field's standard
  scales 1, 25, 200, 750 and 2500 km;
- distances are great-circle km on a sphere of radius 6371.0088 km;
- GeoScore is the mean of 5000 * exp(-d / 1492.7) (GeoGuessr's score);
- NLL is the mean negative log-density at the true location, in nats per
  steradian, so that heads with densities are comparable;
- calibration (heads with a density): each image's HPD level h (the mass of the
  predicted density where it is higher than at the truth; uniform on [0, 1] for
  a correctly specified head). coverage@L is the fraction of images with
  h <= L / 100, i.e. whose truth lies in the L % highest-density region;
  ``calibration_error`` is the mean |coverage(a) - a| over a = 0.05, 0.10, ..., 0.95
  (0 = calibrated; a head that is too confident has coverage below the level);
- sharpness: ``area50_km2`` / ``area95_km2``, the median area (km^2) of the 50 % / 95 %
  credible regions over the images (smaller = sharper; only meaningful beside calibration).

Everything is vectorised over numpy arrays; bootstrap intervals resample
indices once per replicate for all statistics together.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from geo.geometry import EARTH_RADIUS_KM

DISTANCE_SCALES_KM: tuple[int, ...] = (1, 25, 200, 750, 2500)
COVERAGE_LEVELS: tuple[int, ...] = (50, 80, 95)  # percent: the keys coverage@50, coverage@80, coverage@95
CALIBRATION_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95, the calibration error's levels
AREA_LEVELS: tuple[int, ...] = (50, 95)  # percent: the credible regions whose median areas are area50_km2, area95_km2
GEOSCORE_MAX = 5000.0
GEOSCORE_SCALE_KM = 1492.7


def accuracy_key(threshold_km: float) -> str:
    """The metrics-dict key of accuracy at ``threshold_km``, e.g. ``"acc@25km"``."""
    return f"acc@{threshold_km:g}km"


def accuracy_at_km(dist_km: np.ndarray, threshold_km: float) -> float:
    """Fraction of ``dist_km`` [n] that is <= ``threshold_km``."""
    dist_km = np.asarray(dist_km)
    return float(np.mean(dist_km <= threshold_km))



def uniform_accuracy(threshold_km: float) -> float:
    """Accuracy@``threshold_km`` of guessing uniformly on the sphere: the fraction of its area
    within that distance of any point, (1 - cos(X / R)) / 2 (a spherical cap), for any truth;
    computed as sin^2(X / 2R), the same without cancellation at small X."""
    angle = min(float(threshold_km) / EARTH_RADIUS_KM, np.pi)
    return float(np.sin(angle / 2.0) ** 2)

def geoscore(dist_km: np.ndarray) -> float:
    """Mean GeoScore, 5000 * exp(-d / 1492.7), of errors ``dist_km`` [n] in km."""
    return float(np.mean(GEOSCORE_MAX * np.exp(-np.asarray(dist_km, dtype=np.float64) / GEOSCORE_SCALE_KM)))


def mean_nll(log_density: np.ndarray) -> float:
    """Mean negative log-density (nats per steradian) of ``log_density`` [n]."""
    return float(-np.mean(np.asarray(log_density, dtype=np.float64)))


def coverage_key(level_pct: int) -> str:
    """The metrics-dict key of the coverage of the ``level_pct`` % credible region, e.g. ``"coverage@95"``."""
    return f"coverage@{level_pct:g}"


def area_key(level_pct: int) -> str:
    """The metrics-dict key of the median area of the ``level_pct`` % credible region, e.g. ``"area95_km2"``."""
    return f"area{level_pct:g}_km2"


def coverage(hpd_level: np.ndarray, levels) -> np.ndarray:
    """Fraction of ``hpd_level [n]`` that is <= each of ``levels [L]`` (fractions): ``[L]``."""
    hpd = np.sort(np.asarray(hpd_level, np.float64))
    return np.searchsorted(hpd, np.asarray(levels, np.float64), side="right") / max(len(hpd), 1)


def calibration_error(hpd_level: np.ndarray, levels=CALIBRATION_GRID) -> float:
    """Mean |coverage(a) - a| over ``levels`` (default 0.05 .. 0.95): 0 for a calibrated head."""
    levels = np.asarray(levels, np.float64)
    return float(np.mean(np.abs(coverage(hpd_level, levels) - levels)))


def _statistics(dist_km: np.ndarray, country_hit: np.ndarray | None, log_density: np.ndarray | None,
                hpd_level: np.ndarray | None = None, area_km2: np.ndarray | None = None) -> dict[str, float]:
    """Every summary statistic of one (re)sample; the single place that defines them."""
    stats = {accuracy_key(x): accuracy_at_km(dist_km, x) for x in DISTANCE_SCALES_KM}
    stats["median_km"] = float(np.median(dist_km))
    stats["mean_km"] = float(np.mean(dist_km))
    stats["geoscore"] = geoscore(dist_km)
    if country_hit is not None:
        stats["country_acc"] = float(np.mean(country_hit))
    if log_density is not None:
        stats["nll_nats"] = mean_nll(log_density)
    if hpd_level is not None:
        covered = coverage(hpd_level, [level / 100 for level in COVERAGE_LEVELS])
        stats.update({coverage_key(level): float(c) for level, c in zip(COVERAGE_LEVELS, covered)})
        stats["calibration_error"] = calibration_error(hpd_level)
    if area_km2 is not None:
        medians = np.median(area_km2, axis=0)
        stats.update({area_key(level): float(m) for level, m in zip(AREA_LEVELS, medians)})
    return stats


def summarize(
    dist_km: np.ndarray,
    *,
    pred_country: Sequence[str] | None = None,
    true_country: Sequence[str] | None = None,
    log_density: np.ndarray | None = None,
    hpd_level: np.ndarray | None = None,
    area_km2: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """All metrics of one set of predictions, with bootstrap intervals.

    Args:
        dist_km: [n] great-circle errors in km.
        pred_country, true_country: [n] country codes; both or neither.
        log_density: [n] log-density (nats/sr) of the head at each true location.
        hpd_level: [n] HPD level of each true location (calibration: coverage@50/80/95, calibration_error).
        area_km2: [n, 2] areas (km^2) of each image's 50 % and 95 % credible regions (``AREA_LEVELS``).
        n_bootstrap: number of bootstrap replicates (0 disables the intervals).
        level: coverage of the percentile intervals.
        seed: seed of the resampling.
    Returns:
        ``{"n": n, "acc@1km": ..., ..., "median_km", "mean_km", "geoscore",
        ["country_acc"], ["nll_nats"], ["coverage@50", "coverage@80", "coverage@95",
        "calibration_error"], ["area50_km2", "area95_km2"], "ci": {key: [lo, hi]}}``; accuracies
        and coverages are fractions in [0, 1].
    """
    dist_km = np.asarray(dist_km, dtype=np.float64)
    n = dist_km.shape[0]
    if n == 0:
        raise ValueError("cannot summarize zero predictions")
    if (pred_country is None) != (true_country is None):
        raise ValueError("give both pred_country and true_country, or neither")
    country_hit = None
    if pred_country is not None:
        pred, true = np.asarray(pred_country), np.asarray(true_country)
        if pred.shape != (n,) or true.shape != (n,):
            raise ValueError(f"country arrays must have shape ({n},), got {pred.shape} and {true.shape}")
        country_hit = pred == true
    if log_density is not None:
        log_density = np.asarray(log_density, dtype=np.float64)
        if log_density.shape != (n,):
            raise ValueError(f"log_density must have shape ({n},), got {log_density.shape}")
    if hpd_level is not None:
        hpd_level = np.asarray(hpd_level, dtype=np.float64)
        if hpd_level.shape != (n,):
            raise ValueError(f"hpd_level must have shape ({n},), got {hpd_level.shape}")
    if area_km2 is not None:
        area_km2 = np.asarray(area_km2, dtype=np.float64)
        if area_km2.shape != (n, len(AREA_LEVELS)):
            raise ValueError(f"area_km2 must have shape ({n}, {len(AREA_LEVELS)}), got {area_km2.shape}")

    result: dict = {"n": int(n), **_statistics(dist_km, country_hit, log_density, hpd_level, area_km2)}
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples: dict[str, list[float]] = {key: [] for key in result if key != "n"}
        for _ in range(n_bootstrap):
            idx = rng.integers(0, n, size=n)
            replicate = _statistics(
                dist_km[idx],
                None if country_hit is None else country_hit[idx],
                None if log_density is None else log_density[idx],
                None if hpd_level is None else hpd_level[idx],
                None if area_km2 is None else area_km2[idx],
            )
            for key, value in replicate.items():
                samples[key].append(value)
        alpha = (1.0 - level) / 2.0
        result["ci"] = {
            key: [float(np.quantile(vals, alpha)), float(np.quantile(vals, 1.0 - alpha))] for key, vals in samples.items()
        }
    return result
