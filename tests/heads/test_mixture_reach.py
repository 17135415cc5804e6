"""``geo.heads.mixture_reach``: the pair graph against brute force, and the bound that decides which
components the MvMF mode search keeps, checked at many points against float64 densities of the
whole mixture and of the kept part."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp

from geo.heads.mixture_reach import REACH_NATS, mode_support, reach_graph
from support.mixtures import clustered, log_c, log_density, unit


def test_graph_matches_brute_force():
    mu, log_kappa, _, _ = clustered(0)
    graph = reach_graph(mu, log_kappa, max_pairs=10**7)
    kappa = np.exp(log_kappa)
    reach = np.minimum(np.sqrt(2 * REACH_NATS / kappa), 2.0)
    dist = np.linalg.norm(mu[:, None, :] - mu[None, :, :], axis=-1)         # [i, j]
    want = dist <= 2 * reach[None, :]
    got = np.zeros_like(want)
    j_of = np.repeat(np.arange(len(mu)), np.diff(graph.by_j_ptr))
    got[graph.by_j_i, j_of] = True
    # pairs within rounding of the cut may go either way
    edge = np.abs(dist - 2 * reach[None, :]) < 1e-12
    assert (got == want)[~edge].all() and got.sum() == graph.n_pairs
    np.testing.assert_allclose(graph.by_j_h, np.exp(-kappa[j_of] * dist[graph.by_j_i, j_of] ** 2 / 8), rtol=1e-12)
    np.testing.assert_allclose(graph.g, np.where(got, np.exp(-kappa[None, :] * dist ** 2 / 8), 0).sum(1), rtol=1e-12)
    i_of = np.repeat(np.arange(len(mu)), np.diff(graph.by_i_ptr))
    assert set(zip(i_of.tolist(), graph.by_i_j.tolist())) == set(zip(graph.by_j_i.tolist(), j_of.tolist()))
    assert reach_graph(mu, log_kappa, max_pairs=len(mu)) is None  # over the budget: no graph


def probe_points(mu, log_kappa, rng, centres) -> np.ndarray:
    """Points near every mean (0-6 kernel widths), around the clusters, and uniform."""
    width = np.exp(-0.5 * log_kappa)
    near = unit(mu + rng.normal(size=mu.shape) * width[:, None] * rng.uniform(0, 3, (len(mu), 1)))
    around = unit(np.repeat(centres, 400, 0) + rng.normal(size=(400 * len(centres), 3)) * 3 * math.exp(-5.0))
    return np.concatenate([near, around, unit(rng.normal(size=(3000, 3)))])


def test_nothing_left_out_can_beat_the_kept_maximum():
    for seed in range(4):
        mu, log_kappa, log_w, centres = clustered(seed)
        kappa = np.exp(log_kappa)
        graph = reach_graph(mu, log_kappa, max_pairs=10**7)
        for k in (1, 3):
            support = mode_support(log_w + log_c(kappa), graph, k)
            kept = support.index
            y = probe_points(mu, log_kappa, np.random.default_rng(seed), centres)
            full = log_density(log_w, mu, kappa, y)
            part = log_density(log_w[kept], mu[kept], kappa[kept], y)
            at_means = log_density(log_w, mu, kappa, mu)
            t = np.sort(at_means[kept])[::-1][k - 1]          # the k-th densest kept mean
            # the densest mean of the whole mixture is kept, first, with every component that counts there
            assert kept[0] == np.argmax(at_means)
            np.testing.assert_allclose(log_density(log_w[kept], mu[kept], kappa[kept], mu[kept[:1]]),
                                       at_means[kept[:1]], rtol=0, atol=1e-9)
            assert support.gap_nats < 1e-8
            assert (full <= np.maximum(part, t) + support.gap_nats + 1e-12).all()
            assert len(kept) < len(mu) / 2  # and it does leave components out


def test_a_cap_reports_what_it_may_hide():
    mu, log_kappa, log_w, centres = clustered(5)
    log_w[10:50] += 6.0  # the first cluster makes the maximum: its members are kept, then cut
    log_w -= logsumexp(log_w)
    kappa = np.exp(log_kappa)
    graph = reach_graph(mu, log_kappa, max_pairs=10**7)
    full_support = mode_support(log_w + log_c(kappa), graph, 1)
    cap = 10
    assert len(full_support.index) >= 40
    support = mode_support(log_w + log_c(kappa), graph, 1, max_components=cap)
    kept = support.index
    assert len(kept) == cap and support.gap_nats > 1e-6
    np.testing.assert_array_equal(kept, full_support.index[:cap])  # the densest means stay
    y = probe_points(mu, log_kappa, np.random.default_rng(5), centres)
    full = log_density(log_w, mu, kappa, y)
    part = log_density(log_w[kept], mu[kept], kappa[kept], y)
    t = log_density(log_w, mu, kappa, mu[kept[:1]])[0]
    assert (full <= np.maximum(part, t) + support.gap_nats + 1e-12).all()


def test_without_a_graph_everything_is_kept():
    mu, log_kappa, log_w, _ = clustered(1)
    peak = log_w + log_c(np.exp(log_kappa))
    support = mode_support(peak, None, 1)
    assert sorted(support.index.tolist()) == list(range(len(mu))) and support.index[0] == np.argmax(peak)
    assert support.gap_nats == 0.0
    cut = mode_support(peak, None, 1, max_components=10)
    np.testing.assert_allclose(cut.gap_nats, np.log1p(np.exp(np.sort(peak)[::-1][10:] - peak.max()).sum()))
