"""vMF mixtures for the tests of ``geo.heads.mixture_reach`` and ``geo.heads.mixture_points``: a float64
reference density by squared chords, and mixtures with clusters of light components."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def log_c(kappa: np.ndarray) -> np.ndarray:
    return np.log(kappa) - np.log(2 * np.pi) - np.log1p(-np.exp(-2 * kappa))


def log_density(log_w, mu, kappa, y) -> np.ndarray:
    """log sum_i w_i vMF(y; mu_i, kappa_i), float64 by squared chords, ``[n]``."""
    sq = ((y[:, None, :] - mu[None]) ** 2).sum(-1)
    return logsumexp(log_w + log_c(kappa) - 0.5 * kappa * sq, axis=1)


def clustered(seed: int, c: int = 600):
    """Components with kappa e^4 .. e^12 (a few wide ones), a third of them in 5 tight clusters of light
    weight; random log weights."""
    rng = np.random.default_rng(seed)
    mu = unit(rng.normal(size=(c, 3)))
    log_kappa = rng.uniform(8.0, 12.0, c)
    log_kappa[:5] = rng.uniform(4.0, 6.0, 5)
    log_w = rng.normal(size=c) * 1.5
    centres = unit(rng.normal(size=(5, 3)))
    for n, centre in enumerate(centres):
        block = slice(10 + 40 * n, 50 + 40 * n)
        mu[block] = unit(centre + rng.normal(size=(40, 3)) * rng.uniform(0.3, 3.0) * math.exp(-5.0))
        log_kappa[block] = 10.0
        log_w[block] = rng.normal(size=40) * 0.3 - 2.0
    log_w -= logsumexp(log_w)
    return mu, log_kappa, log_w, centres
