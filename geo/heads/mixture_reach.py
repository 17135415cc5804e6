"""Which components of a large vMF mixture can matter near its maximum: the MvMF mode search's support.

A component's term P_j exp(-kappa_j |y - mu_j|^2 / 2) (P_j = Gamma_j C(kappa_j), its peak) is
below e^-REACH_NATS P_j beyond its *reach* r_j = sqrt(2 REACH_NATS / kappa_j) (chord). Every
point y lies in the Voronoi cell of its nearest mean mu_i, and then |y - mu_j| >= |mu_i - mu_j| / 2
for every j (triangle inequality), so

    p(y) <= B_i = sum_j P_j h_ij,   h_ij = exp(-kappa_j |mu_i - mu_j|^2 / 8),

where only the j with |mu_i - mu_j| <= 2 r_j count (the others add at most the *tail*
e^-REACH_NATS sum_j P_j). Those pairs depend on the means and kappas only (shared by every row
of the MvMF head): ``reach_graph`` finds them once with a k-d tree, never as a [c, c] matrix.

Per row (``mode_support``): t = the density at the densest mean (computed exactly, so the search
reaches it); the *hot* components have B_i >= t; the kept set K holds, for every hot i, each j
with |mu_i - mu_j| <= 2 r_j. Then no point beats max(t, max of the kept mixture) by more than the
tail: in a cold cell p <= B_i < t; in a hot cell every component left out is beyond its reach.
The margin log(1 + tail / t) is at most e^-REACH_NATS c nats (5e-7 at c = 2^15; ~1e-9 on
concentrated rows), whatever the weights: a cluster of light components is kept whenever its
summed peaks could beat the densest mean. B_i is bounded cheaply: the components lighter than
delta = 1 / (4 max_i G_i) (G_i = sum_j h_ij, row-independent) add at most t / 4 anywhere, so
only the heavier ones are summed. For k > 1 maxima, t is the k-th densest of those means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Beyond its reach a component's term is below e^-REACH_NATS of its peak (the bound's tail).
REACH_NATS = 25.0


@dataclass(frozen=True)
class ReachGraph:
    """The pairs (i, j) with |mu_i - mu_j| <= 2 r_j of c components, in two CSR layouts.

    By j (the component whose reach counts): ``by_j_ptr [c + 1]``, ``by_j_i [n]`` (int32),
    ``by_j_h [n]`` = h_ij. By i: ``by_i_ptr [c + 1]``, ``by_i_j [n]`` (int32). ``g [c]`` = sum_j h_ij.
    ``mu [c, 3]``, ``kappa [c]`` float64.
    """

    by_j_ptr: np.ndarray
    by_j_i: np.ndarray
    by_j_h: np.ndarray
    by_i_ptr: np.ndarray
    by_i_j: np.ndarray
    g: np.ndarray
    mu: np.ndarray
    kappa: np.ndarray

    @property
    def n_pairs(self) -> int:
        return len(self.by_j_i)


def reach_chord(log_kappa: np.ndarray) -> np.ndarray:
    """Reach r = sqrt(2 REACH_NATS / kappa) (chord, at most 2: the whole sphere), same shape."""
    return np.minimum(np.sqrt(2.0 * REACH_NATS * np.exp(-log_kappa)), 2.0)


def ranges(ptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the CSR entries of ``rows`` (concatenated) and the row of each entry."""
    start, length = ptr[rows], ptr[rows + 1] - ptr[rows]
    total = int(length.sum())
    owner = np.repeat(np.arange(len(rows)), length)
    offset = np.arange(total) - np.repeat(np.cumsum(length) - length, length)
    return np.repeat(start, length) + offset, owner


def pairs_within(mu: np.ndarray, radius: np.ndarray, max_pairs: int):
    """For each j, the i with |mu_i - mu_j| <= radius_j (chord), as CSR ``(ptr [c + 1], i [n] int32, tree)``.

    ``mu [c, 3]`` float64 unit vectors, ``radius [c]``; found with a k-d tree over the means (returned
    for further queries), never as a [c, c] matrix. None when there would be more than ``max_pairs``.
    """
    from scipy.spatial import cKDTree

    c = len(mu)
    tree = cKDTree(mu)
    if int(tree.query_ball_point(mu, radius, return_length=True).sum()) > max_pairs:
        return None
    lists = tree.query_ball_point(mu, radius, return_sorted=False)
    length = np.fromiter((len(x) for x in lists), np.int64, c)
    ptr = np.concatenate([[0], np.cumsum(length)])
    found = np.concatenate([np.asarray(x, np.int32) for x in lists]) if c else np.zeros(0, np.int32)
    return ptr, found, tree


def reach_graph(mu_xyz: np.ndarray, log_kappa: np.ndarray, max_pairs: int) -> ReachGraph | None:
    """The pair graph of components ``mu_xyz [c, 3]`` (float64 unit vectors), ``log_kappa [c]``, or None
    when it has more than ``max_pairs`` pairs (wide, heavily overlapping components: the caller
    keeps every component instead)."""
    mu = np.ascontiguousarray(mu_xyz, dtype=np.float64)
    log_kappa = np.asarray(log_kappa, dtype=np.float64)
    c = len(mu)
    pairs = pairs_within(mu, 2.0 * reach_chord(log_kappa), max_pairs)
    if pairs is None:
        return None
    by_j_ptr, by_j_i, _ = pairs
    j_of = np.repeat(np.arange(c), np.diff(by_j_ptr))
    kappa = np.exp(log_kappa)
    sq_chord = ((mu[by_j_i] - mu[j_of]) ** 2).sum(-1)
    by_j_h = np.exp(-kappa[j_of] * sq_chord / 8.0)
    g = np.bincount(by_j_i, weights=by_j_h, minlength=c)
    order = np.argsort(by_j_i, kind="stable")
    by_i_j = j_of[order].astype(np.int32)
    by_i_ptr = np.concatenate([[0], np.cumsum(np.bincount(by_j_i, minlength=c))])
    return ReachGraph(by_j_ptr, by_j_i, by_j_h, by_i_ptr, by_i_j, g, mu, kappa)


@dataclass(frozen=True)
class ModeSupport:
    """One row's kept components and what the bound leaves.

    ``index [L]`` component indices, densest mean first (the search's starts come first);
    ``gap_nats``: how far the maximum of the whole mixture can be above max(t, the kept
    mixture's maximum), t the densest mean's density (the tail; more where a cap cut K).
    """

    index: np.ndarray
    gap_nats: float


def _at_means(graph: ReachGraph, scaled: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The density at the means ``rows`` over every component reaching them, float64 ``[len(rows)]``."""
    pos, owner = ranges(graph.by_i_ptr, rows)
    j = graph.by_i_j[pos]
    sq_chord = ((graph.mu[rows[owner]] - graph.mu[j]) ** 2).sum(-1)
    return np.bincount(owner, weights=scaled[j] * np.exp(-0.5 * graph.kappa[j] * sq_chord), minlength=len(rows))


def mode_support(peak_log: np.ndarray, graph: ReachGraph | None, k: int,
                 max_components: int | None = None) -> ModeSupport:
    """The kept components of one row, ``peak_log [c]`` = log Gamma_j + log C(kappa_j) (float64).

    ``graph`` None (too many pairs): every component is kept, heaviest peak first. At most
    ``max_components`` (None: as many as the bound needs); beyond it the densest means are
    kept and ``gap_nats`` adds what the cut ones can add in the hot cells.
    """
    c = len(peak_log)
    scaled = np.exp(peak_log - peak_log.max())                               # the best peak = 1
    if graph is None:
        index = np.argsort(-scaled, kind="stable")
        if max_components is None or max_components >= c:
            return ModeSupport(index, 0.0)
        return ModeSupport(index[:max_components], float(np.log1p(scaled[index[max_components:]].sum())))
    tail = math.exp(-REACH_NATS) * scaled.sum()
    delta = 0.25 / graph.g.max()                                             # lighter ones add <= 1/4 anywhere
    heavy = np.flatnonzero(scaled >= delta)
    pos, owner = ranges(graph.by_j_ptr, heavy)
    upper = np.bincount(graph.by_j_i[pos], weights=scaled[heavy[owner]] * graph.by_j_h[pos], minlength=c)
    upper += delta * graph.g
    at_heavy = _at_means(graph, scaled, heavy)
    # t: the k-th largest of lower bounds of the density at the means (exact at heavy means; a light
    # component's own peak at its mean), so that for k > 1 light components are ranked too (>= 1 for k = 1).
    light = np.ones(c, dtype=bool)
    light[heavy] = False
    candidates = np.concatenate([at_heavy, scaled[light]])
    t = np.sort(candidates)[::-1][min(k, c) - 1]
    hot = np.flatnonzero(upper >= t * (1.0 - 1e-9))                         # rounding must not cool the best
    pos, _ = ranges(graph.by_i_ptr, hot)
    kept = np.unique(graph.by_i_j[pos]).astype(np.int64)
    at_kept = _at_means(graph, scaled, kept)
    index = kept[np.argsort(-at_kept, kind="stable")]
    gap = math.log1p(tail / t)
    if max_components is not None and len(index) > max_components:
        cut = np.zeros(c, dtype=bool)
        cut[index[max_components:]] = True
        index = index[:max_components]
        # in a hot cell the cut components add at most sum_j P_j h_ij over the cut j reaching it
        pos, owner = ranges(graph.by_j_ptr, np.flatnonzero(cut))
        cut_j = np.flatnonzero(cut)[owner]
        extra = np.bincount(graph.by_j_i[pos], weights=scaled[cut_j] * graph.by_j_h[pos], minlength=c)[hot].max()
        gap = math.log1p((extra + tail) / t)
    return ModeSupport(index, gap)
