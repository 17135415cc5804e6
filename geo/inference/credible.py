"""The radius around a point that holds a given fraction of a head's predicted probability.

``geo predict`` reports, for each image, the great-circle radius r_q around its
best guess p with P(angle(y, p) <= r_q) = q for q = 0.5 and 0.95: a small r_q says
the head is sure of the place, a radius of thousands of km says the image is weakly
localizable. M(r) = P(angle(y, p) <= r) is monotone in r; r_q is found by bisection
on log r between 1e-9 rad (6 mm) and pi, to a relative precision of ``REL_TOL``.

MvMF (``mvmf_radii_km``). M(r) = sum_i Gamma_i P_i(r), with P_i the mass of
component i inside the cap of radius r around p. In component i's own frame
(mean mu_i, delta_i = angle(mu_i, p)), a point at angle theta from mu_i and
uniform azimuth lies in the cap for an azimuth fraction
frac(theta) = 2 asin(sqrt(h)) / pi, h = (hav r - hav(theta - delta)) / (sin theta sin delta)
clipped to [0, 1] (the haversine form stays exact for the 2.5 km components of
kappa = e^16). theta's law is closed form, F(theta) = expm1(-kappa u) / expm1(-2 kappa)
with u = 1 - cos theta, so
    P_i(r) = F(r - delta) [if delta < r] + integral over t in [F(|r - delta|), F(r + delta)] of frac(theta(t)) dt,
the integral by ``N_NODES``-point Gauss-Legendre after t = a + (b - a)(1 - cos pi s)/2,
which smooths the square-root ends of frac. A component centred on p (delta < 1e-12)
is the closed form F(r) itself. Components whose mass (to 1 - 1e-12) lies wholly
inside or outside the cap are counted without quadrature; the lightest components
summing to at most ``NEGLECT`` of the weight are dropped (reported as ``neglected``).
Accuracy: mass error < 1e-5 against 10^6-sample Monte Carlo in the tests (radius
error well under 0.1 %).

Softmax (``cell_radii_km``): the density is p(cell) / area(cell), uniform inside each
cell. Every S2 piece of the partition is split ``SUBDIVIDE`` levels down (64 sub-cells);
each sub-cell's exact area share of its cell carries its mass at its centre, and r_q is
the weighted q-quantile of their distances to p. Accuracy: within about half a
sub-cell's diagonal (1/16 of the cell's side) of the exact radius.
"""

from __future__ import annotations

import math
import weakref
from typing import Sequence

import numpy as np

from geo.geometry import EARTH_RADIUS_KM, angle_between_xyz
from geo.sphere import s2cells

MASSES = (0.5, 0.95)
N_NODES = 48
REL_TOL = 1e-5
NEGLECT = 1e-9
SUBDIVIDE = 3
_R_MIN_RAD = 1e-9
_GL_S, _GL_W = np.polynomial.legendre.leggauss(N_NODES)
_GL_S, _GL_W = 0.5 * (_GL_S + 1.0), 0.5 * _GL_W  # nodes and weights on [0, 1]


def _hav(x):
    return np.sin(0.5 * x) ** 2


def _angle_rad(xyz: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Great-circle angle between unit vectors ``xyz [n, 3]`` and ``p [3]`` (atan2 form, exact near 0)."""
    return angle_between_xyz(xyz, p[None, :])


def _vmf_cdf(theta: np.ndarray, kappa: np.ndarray) -> np.ndarray:
    """P(angle to the mean <= theta) of a vMF on S^2 (broadcasting)."""
    u = 2.0 * _hav(theta)
    return np.expm1(-kappa * u) / np.expm1(-2.0 * kappa)


def _vmf_inverse_cdf(t: np.ndarray, kappa: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):  # t == 1 exactly: u = inf, clipped to theta = pi below
        u = -np.log1p(t * np.expm1(-2.0 * kappa)) / kappa
    return 2.0 * np.arcsin(np.sqrt(np.clip(u / 2.0, 0.0, 1.0)))


def _component_mass(r: np.ndarray, delta: np.ndarray, kappa: np.ndarray) -> np.ndarray:
    """P_i(r): mass of vMF(mu_i, kappa_i) in the cap of radius r around p; all args broadcast to [..]."""
    r, delta, kappa = np.broadcast_arrays(r, delta, kappa)
    lo = np.abs(r - delta)
    hi = np.minimum(r + delta, math.pi)
    a, b = _vmf_cdf(lo, kappa), _vmf_cdf(hi, kappa)
    inside = np.where(delta < r, a, 0.0)
    t = a[..., None] + (b - a)[..., None] * 0.5 * (1.0 - np.cos(math.pi * _GL_S))
    dt = (b - a)[..., None] * 0.5 * math.pi * np.sin(math.pi * _GL_S) * _GL_W
    theta = _vmf_inverse_cdf(t, kappa[..., None])
    d = delta[..., None]
    den = np.sin(theta) * np.sin(d)
    num = _hav(r[..., None]) - _hav(theta - d)
    h = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num >= 0, 1.0, 0.0))
    frac = 2.0 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))) / math.pi
    partial = (frac * dt).sum(-1)
    centred = delta < 1e-12
    return np.where(centred, _vmf_cdf(np.minimum(r, math.pi), kappa), inside + partial)


def _bisect_log_radius(mass_fn, masses: Sequence[float]) -> np.ndarray:
    """Radii (rad) r_q with mass_fn(r) = q for each q, by bisection on log r; mass_fn: r [q] -> [q]."""
    q = np.asarray(masses, np.float64)
    lo = np.full(q.shape, math.log(_R_MIN_RAD))
    hi = np.full(q.shape, math.log(math.pi))
    for _ in range(int(math.ceil(math.log2((hi[0] - lo[0]) / REL_TOL)))):
        mid = 0.5 * (lo + hi)
        below = mass_fn(np.exp(mid)) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.exp(hi)


def mvmf_radii_km(centre_xyz: np.ndarray, log_weights: np.ndarray, mu_xyz: np.ndarray, log_kappa: np.ndarray,
                  masses: Sequence[float] = MASSES) -> tuple[np.ndarray, float]:
    """Radii (km) around ``centre_xyz [3]`` holding ``masses`` of an MvMF; method in the module docstring.

    Args:
        log_weights: log Gamma [c] (log-softmax of the logits); mu_xyz: unit means [c, 3];
        log_kappa: [c].
    Returns:
        (radii_km [len(masses)], neglected weight). A mass above 1 - neglected gets the largest radius.
    """
    p = np.asarray(centre_xyz, np.float64)
    p = p / np.linalg.norm(p)
    w = np.exp(np.asarray(log_weights, np.float64) - np.max(log_weights))
    w /= w.sum()
    order = np.argsort(-w, kind="stable")
    keep = order[: int(np.searchsorted(np.cumsum(w[order]), 1.0 - NEGLECT)) + 1]
    neglected = float(max(0.0, 1.0 - w[keep].sum()))
    w, kappa = w[keep], np.exp(np.asarray(log_kappa, np.float64)[keep])
    delta = _angle_rad(np.asarray(mu_xyz, np.float64)[keep], p)
    extent = _vmf_inverse_cdf(np.full_like(kappa, 1.0 - 1e-12), kappa)  # holds all but 1e-12 of each component

    def mass(r: np.ndarray) -> np.ndarray:
        out = np.empty(r.shape)
        for j, rj in enumerate(r):
            full = delta + extent <= rj
            straddle = ~full & (delta - extent < rj)
            out[j] = w[full].sum() + (w[straddle] * _component_mass(rj, delta[straddle], kappa[straddle])).sum()
        return out

    return _bisect_log_radius(mass, masses) * EARTH_RADIUS_KM, neglected


# ---- softmax: cells split into sub-cells ---------------------------------------------------------

_SUBCELLS: dict[int, tuple] = {}  # id(partition) -> (weakref to it, sub-cells); Partition is unhashable


def _subcells(partition) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres_xyz [m, 3], cell index [m], share of the cell's area [m]) of the partition's sub-cells."""
    hit = _SUBCELLS.get(id(partition))
    if hit is not None and hit[0]() is partition:
        return hit[1]
    ids, cells = np.asarray(partition.piece_ids, np.uint64), np.asarray(partition.piece_cells, np.int64)
    for _ in range(SUBDIVIDE):
        leaf = s2cells.cell_levels(ids) >= s2cells.MAX_LEVEL
        children = s2cells.child_ids(np.where(leaf, s2cells.face_cell_ids()[0], ids))
        ids = np.where(leaf[:, None], ids[:, None], children).reshape(-1)  # a leaf stands for itself 4 times
        cells = np.repeat(cells, 4)
    area = s2cells.cell_areas_sr(ids)
    share = area / np.bincount(cells, weights=area, minlength=partition.n_cells)[cells]
    result = (s2cells.cell_centres_xyz(ids), cells, share)
    _SUBCELLS[id(partition)] = (weakref.ref(partition), result)
    return result


def cell_radii_km(centre_xyz: np.ndarray, cell_probs: np.ndarray, partition,
                  masses: Sequence[float] = MASSES) -> np.ndarray:
    """Radii (km) around ``centre_xyz [3]`` holding ``masses`` of a distribution over partition cells.

    ``cell_probs [c]`` sums to 1; each cell's probability is spread uniformly over its area.
    """
    xyz, cells, share = _subcells(partition)
    probs = np.asarray(cell_probs, np.float64)
    weight = probs[cells] * share
    use = weight > NEGLECT / len(weight)
    p = np.asarray(centre_xyz, np.float64)
    dist = _angle_rad(xyz[use], p / np.linalg.norm(p))
    order = np.argsort(dist, kind="stable")
    cum = np.cumsum(weight[use][order])
    cum /= max(cum[-1], 1e-300) / min(1.0, probs.sum())
    at = np.minimum(np.searchsorted(cum, np.asarray(masses, np.float64)), len(cum) - 1)
    return dist[order][at] * EARTH_RADIUS_KM


def head_radii_km(head, output_row, centre_xyz: np.ndarray, masses: Sequence[float] = MASSES) -> np.ndarray | None:
    """Radii (km) for one image's head output (e.g. logits ``[c]``); None when the head's density is
    neither a vMF mixture (``head.vmf_mixture``) nor constant on cells (``head.cell_density``)."""
    mixture = head.vmf_mixture(output_row)
    if mixture is not None:
        return mvmf_radii_km(centre_xyz, np.asarray(mixture.log_weights), np.asarray(mixture.mu_xyz),
                             np.asarray(mixture.log_kappa), masses)[0]
    cells = head.cell_density(output_row)
    if cells is not None and hasattr(cells.partition, "piece_ids"):
        return cell_radii_km(centre_xyz, cells.probs, cells.partition, masses)
    return None


def calibration_statement(metrics: dict | None) -> str:
    """Whether a run's credible regions held the truth as often as they claim, on its own test split.

    ``metrics``: the run's ``metrics.json`` (``geo.metrics.summarize``: ``coverage@50``, ``coverage@95`` and
    their bootstrap intervals in ``ci``). The coverage is that of the head's highest-density regions (the
    smallest regions holding 50 % / 95 %), measured per test image from its HPD level; the radii ``geo
    predict`` prints describe regions of the same probability around the best guess. A coverage whose 95 %
    interval excludes the level is called overconfident (below) or underconfident (above).
    """
    metrics = metrics or {}
    cov95, cov50 = metrics.get("coverage@95"), metrics.get("coverage@50")
    if cov95 is None or cov50 is None:
        return ("Calibration of these radii: not measured (the run's metrics.json has no coverage; runs scored "
                "by this version of geo have it).")
    n = metrics.get("n")
    split = metrics.get("split") or "test"
    where = f"on the {split} split ({n:,} images)" if isinstance(n, int) else f"on the {split} split"
    ci = (metrics.get("ci") or {}).get("coverage@95")
    if ci is None:
        verdict = "no interval recorded, so not judged"
    elif ci[1] < 0.95:
        verdict = "overconfident: the truth falls outside them more often than they claim"
    elif ci[0] > 0.95:
        verdict = "underconfident: they are larger than they need to be"
    else:
        verdict = "consistent with calibration"
    interval = f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else ""
    return (f"Calibration {where}: 95 % regions held the truth for {100 * cov95:.0f} %{interval} of images, "
            f"50 % regions for {100 * cov50:.0f} %: {verdict}.")
