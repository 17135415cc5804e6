"""Geolocation metrics: accuracy at distance scales, median/mean error, GeoScore, NLL.

Conventions (stated in every report):

- accuracy@X km is the *fraction* of predictions whose great-circle error is
  <= X km (less-or-equal, accuracy not error rate), at the field's standard
  scales 1, 25, 200, 750 and 2500 km;
- distances are great-circle km on a sphere of radius 6371.0088 km;
- GeoScore is the mean of 5000 * exp(-d / 1492.7) (GeoGuessr's score);
- NLL is the mean negative log-density at the true location, in nats per
  steradian, so that heads with densities are comparable.

Everything is vectorised over numpy arrays; bootstrap intervals resample
indices once per replicate for all statistics together.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from geo.geometry import EARTH_RADIUS_KM

DISTANCE_SCALES_KM: tuple[int, ...] = (1, 25, 200, 750, 2500)
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


def _statistics(dist_km: np.ndarray, country_hit: np.ndarray | None, log_density: np.ndarray | None) -> dict[str, float]:
    """Every summary statistic of one (re)sample; the single place that defines them."""
    stats = {accuracy_key(x): accuracy_at_km(dist_km, x) for x in DISTANCE_SCALES_KM}
    stats["median_km"] = float(np.median(dist_km))
    stats["mean_km"] = float(np.mean(dist_km))
    stats["geoscore"] = geoscore(dist_km)
    if country_hit is not None:
        stats["country_acc"] = float(np.mean(country_hit))
    if log_density is not None:
        stats["nll_nats"] = mean_nll(log_density)
    return stats


def summarize(
    dist_km: np.ndarray,
    *,
    pred_country: Sequence[str] | None = None,
    true_country: Sequence[str] | None = None,
    log_density: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """All metrics of one set of predictions, with bootstrap intervals.

    Args:
        dist_km: [n] great-circle errors in km.
        pred_country, true_country: [n] country codes; both or neither.
        log_density: [n] log-density (nats/sr) of the head at each true location.
        n_bootstrap: number of bootstrap replicates (0 disables the intervals).
        level: coverage of the percentile intervals.
        seed: seed of the resampling.
    Returns:
        ``{"n": n, "acc@1km": ..., ..., "median_km", "mean_km", "geoscore",
        ["country_acc"], ["nll_nats"], "ci": {key: [lo, hi]}}``; accuracies are
        fractions in [0, 1].
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

    result: dict = {"n": int(n), **_statistics(dist_km, country_hit, log_density)}
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples: dict[str, list[float]] = {key: [] for key in result if key != "n"}
        for _ in range(n_bootstrap):
            idx = rng.integers(0, n, size=n)
            replicate = _statistics(
                dist_km[idx],
                None if country_hit is None else country_hit[idx],
                None if log_density is None else log_density[idx],
            )
            for key, value in replicate.items():
                samples[key].append(value)
        alpha = (1.0 - level) / 2.0
        result["ci"] = {
            key: [float(np.quantile(vals, alpha)), float(np.quantile(vals, 1.0 - alpha))] for key, vals in samples.items()
        }
    return result
