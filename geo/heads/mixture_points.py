"""A vMF mixture with shared components at many points per row, summing only the components that can matter.

The MvMF's Monte Carlo HPD levels and credible areas (``geo.heads.density``) evaluate each
row's mixture p(x) = sum_j Gamma_j C(kappa_j) exp(-kappa_j |x - mu_j|^2 / 2) at its own 2,501
points. Summed over all c components that is n x c terms a row: 0.58 s a row at c = 2^13
(measured on a trained head whose weights spread over every component), 34 hours for a
210k-row test set. A trained MvMF's components are sharp (kappa ~ e^16, a few km wide), so at
any point all but a few terms are below any float64 resolution; this module sums those few and
*proves* that the rest cannot matter:

- Every point x lies in the Voronoi cell of its nearest mean mu_i (a k-d tree query), and then
  |x - mu_j| >= |mu_i - mu_j| / 2 for every j (triangle inequality), so component j adds at
  most Gamma_j C(kappa_j) exp(-kappa_j |mu_i - mu_j|^2 / 8) at x.
- The *neighbours* of i are the j for which that bound is at least e^LOG_TAU Gamma_j, i.e.
  |mu_i - mu_j| <= 2 sqrt(2 (log C(kappa_j) - LOG_TAU) / kappa_j). They depend on the means and
  kappas only (shared by every row), found once with a k-d tree (``neighbour_lists``).
- Summing the neighbours of x's nearest mean leaves out at most e^LOG_TAU sum_j Gamma_j =
  e^LOG_TAU per steradian, whatever the weights. A point whose partial sum is not at least
  e^(LOG_TAU + SAFE_NATS) (so that what is left out could exceed e^-SAFE_NATS ~ 9e-17 of it,
  float64's resolution) is summed over every component instead.

The result therefore equals the sum over all c components to float64 rounding, at every point
(the true location far from all mass included), and costs a tree query plus a few neighbours
a point on sharp mixtures. Heads whose components overlap widely (more than ``max_pairs``
neighbour pairs) get None from ``neighbour_lists``, and their callers sum every component.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from geo.geometry import vmf_log_normalizer
from geo.heads.mixture_reach import pairs_within, ranges

LOG_TAU = -80.0    # nats/sr: what the components left out at a point can add, at most, in all
SAFE_NATS = 37.0   # a point's partial sum must be this far above LOG_TAU (e^-37 < float64's 2^-52)
PAIRS_PER_CHUNK = 2**16  # (point, neighbour) terms evaluated at once: arrays that stay in the CPU's caches


@dataclass(frozen=True)
class NeighbourLists:
    """For each component i, the components j that can matter in i's Voronoi cell (module docstring).

    ``ptr [c + 1]`` int64 and ``j [n_pairs]`` int32 (CSR by i); ``tree``: a k-d tree over ``mu [c, 3]``
    (float64 unit vectors); ``log_c [c]`` = log C(kappa_j), ``kappa [c]``, float64.
    """

    ptr: np.ndarray
    j: np.ndarray
    tree: object
    mu: np.ndarray
    log_c: np.ndarray
    kappa: np.ndarray

    @property
    def n_pairs(self) -> int:
        return len(self.j)


def neighbour_radius(log_kappa: np.ndarray) -> np.ndarray:
    """Chord 2 sqrt(2 (log C(kappa) - LOG_TAU) / kappa) within which a mean's Voronoi cell can feel
    the component (``[c]`` float64, capped beyond the sphere's diameter 2: then every cell does)."""
    log_kappa = np.asarray(log_kappa, dtype=np.float64)
    log_c = vmf_log_normalizer(torch.from_numpy(log_kappa)).numpy()
    radius = 2.0 * np.sqrt(2.0 * (log_c - LOG_TAU) * np.exp(-log_kappa))
    # a margin for the rounding of the tree's distances (relative ~1e-16; this is 1e-9)
    return np.minimum(radius * (1.0 + 1e-9) + 1e-12, 2.5)


def neighbour_lists(mu_xyz: np.ndarray, log_kappa: np.ndarray, max_pairs: int) -> NeighbourLists | None:
    """The neighbour lists of components ``mu_xyz [c, 3]`` (unit vectors), ``log_kappa [c]``; None when
    they would hold more than ``max_pairs`` pairs (widely overlapping components: sum them all)."""
    mu = np.ascontiguousarray(mu_xyz, dtype=np.float64)
    log_kappa = np.asarray(log_kappa, dtype=np.float64)
    pairs = pairs_within(mu, neighbour_radius(log_kappa), max_pairs)
    if pairs is None:
        return None
    by_j_ptr, by_j_i, tree = pairs
    c = len(mu)
    j_of = np.repeat(np.arange(c, dtype=np.int32), np.diff(by_j_ptr))
    order = np.argsort(by_j_i, kind="stable")                    # CSR by j -> CSR by i
    ptr = np.concatenate([[0], np.cumsum(np.bincount(by_j_i, minlength=c))]).astype(np.int64)
    log_c = vmf_log_normalizer(torch.from_numpy(log_kappa)).numpy()
    return NeighbourLists(ptr, j_of[order], tree, mu, log_c, np.exp(log_kappa))


def _all_components(lists: NeighbourLists, log_w: np.ndarray, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """log p at points ``x [m, 3]`` of rows ``rows [m]`` (weights ``log_w [B, c]``), every component summed."""
    out = np.empty(len(x))
    step = max(1, 2**21 // max(1, len(lists.mu)))
    for s in range(0, len(x), step):
        sq = ((x[s:s + step, None, :] - lists.mu[None]) ** 2).sum(-1)
        term = log_w[rows[s:s + step]] + lists.log_c[None] - 0.5 * lists.kappa[None] * sq
        out[s:s + step] = torch.logsumexp(torch.from_numpy(term), dim=1).numpy()
    return out


def log_density_points(lists: NeighbourLists, log_w: np.ndarray, points: np.ndarray) -> np.ndarray:
    """log p (nats/sr) of each row's mixture at its own points: ``log_w [B, c]`` (normalised, float64),
    ``points [B, n, 3]`` unit vectors -> ``[B, n]`` float64, equal to the sum over every component to
    float64 rounding (module docstring)."""
    log_w = np.asarray(log_w, dtype=np.float64)
    b, n = points.shape[:2]
    flat = np.ascontiguousarray(points, dtype=np.float64).reshape(-1, 3)
    out = np.empty(len(flat))
    if not len(flat):
        return out.reshape(b, n)
    row_of = np.repeat(np.arange(b), n)
    c = log_w.shape[1]
    w_flat = np.ascontiguousarray(log_w).reshape(-1)
    xyz = np.ascontiguousarray(flat.T)
    mu_t, log_c, half_kappa = np.ascontiguousarray(lists.mu.T), lists.log_c, 0.5 * lists.kappa
    _, nearest = lists.tree.query(flat)
    length = lists.ptr[nearest + 1] - lists.ptr[nearest]          # >= 1: a mean is its own neighbour
    ends = np.cumsum(length)
    start = 0
    while start < len(flat):
        # as many points as keep the chunk's terms under PAIRS_PER_CHUNK (at least one point)
        done = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, done + PAIRS_PER_CHUNK, side="right")))
        pts = np.arange(start, stop)
        pos, owner = ranges(lists.ptr, nearest[pts])
        j = lists.j[pos]
        point = pts[owner]
        # coordinate by coordinate from contiguous columns (a [terms, 3] gather costs ~3x more)
        sq = np.square(xyz[0].take(point) - mu_t[0].take(j))
        sq += np.square(xyz[1].take(point) - mu_t[1].take(j))
        sq += np.square(xyz[2].take(point) - mu_t[2].take(j))
        term = w_flat.take(row_of.take(point) * c + j)
        term += log_c.take(j)
        term -= half_kappa.take(j) * sq
        seg = (ends[pts] - length[pts]) - done                        # each point's first term
        peak = np.maximum.reduceat(term, seg)
        with np.errstate(invalid="ignore"):                           # -inf - -inf: rows of zero weight
            total = np.add.reduceat(np.exp(term - peak[owner]), seg)
        with np.errstate(divide="ignore"):
            out[pts] = peak + np.log(total)
        start = stop
    unsure = np.flatnonzero(~(out >= LOG_TAU + SAFE_NATS))           # NaN and -inf included
    if len(unsure):
        out[unsure] = _all_components(lists, log_w, row_of[unsure], flat[unsure])
    return out.reshape(b, n)
