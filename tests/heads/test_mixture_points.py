"""``geo.heads.mixture_points``: the pruned density of shared-component vMF mixtures against a float64
sum over every component (scipy's logsumexp), the bound behind the pruning checked term by term, and
the MvMF's HPD levels and credible areas through it against the same levels summed over every component."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from geo.heads import create_head, mixture_points
from geo.heads.mixture_points import LOG_TAU, log_density_points, neighbour_lists
from support.mixtures import clustered, log_c, log_density, unit


def _rows_of_weights(rng, c: int, b: int) -> np.ndarray:
    """``[b, c]`` normalised log weights: one flat row, one peaked row, the rest random."""
    raw = rng.normal(size=(b, c)) * 2.0
    raw[0] = 0.0
    raw[1] = rng.normal(size=c) * 12.0
    return raw - logsumexp(raw, axis=1, keepdims=True)


def _points(rng, log_w, mu, kappa, n: int) -> np.ndarray:
    """Per row: n/2 draws near the row's components (a mean plus a kappa-scaled offset) and n/2 uniform points."""
    b = len(log_w)
    out = np.empty((b, n, 3))
    for r in range(b):
        comp = rng.choice(len(mu), size=n // 2, p=np.exp(log_w[r]))
        near = mu[comp] + rng.normal(size=(n // 2, 3)) * 2.0 / np.sqrt(kappa[comp])[:, None]
        out[r] = unit(np.concatenate([near, rng.normal(size=(n - n // 2, 3))]))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_density_equals_the_sum_over_every_component(seed):
    """Clusters of light components, sharp isolated ones and a few wide ones; points near the mass,
    uniform points and points where every component is negligible: float64 agreement."""
    mu, log_kappa, _, _ = clustered(seed)
    kappa = np.exp(log_kappa)
    rng = np.random.default_rng(100 + seed)
    log_w = _rows_of_weights(rng, len(mu), 4)
    lists = neighbour_lists(mu, log_kappa, max_pairs=10**7)
    assert lists is not None and lists.n_pairs < len(mu) ** 2 / 4            # it prunes
    points = _points(rng, log_w, mu, kappa, 400)
    got = log_density_points(lists, log_w, points)
    want = np.stack([log_density(log_w[r], mu, kappa, points[r]) for r in range(len(log_w))])
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-12)


def test_chunks_of_a_few_terms_give_the_same_densities(monkeypatch):
    """Points are evaluated in chunks of at most PAIRS_PER_CHUNK terms (at least one point each): 5 terms
    a chunk, i.e. single points with more neighbours than that, give the same result."""
    mu, log_kappa, _, _ = clustered(1)
    rng = np.random.default_rng(9)
    log_w = _rows_of_weights(rng, len(mu), 3)
    points = _points(rng, log_w, mu, np.exp(log_kappa), 60)
    lists = neighbour_lists(mu, log_kappa, max_pairs=10**7)
    whole = log_density_points(lists, log_w, points)
    monkeypatch.setattr(mixture_points, "PAIRS_PER_CHUNK", 5)
    np.testing.assert_array_equal(log_density_points(lists, log_w, points), whole)


def test_points_far_from_every_component_are_summed_whole():
    """A mixture of sharp components on one hemisphere: points on the other have densities of e^-10^5,
    below anything the pruning can certify, and get the sum over every component."""
    rng = np.random.default_rng(7)
    mu = unit(rng.normal(size=(300, 3)) + np.array([0.0, 0.0, 4.0]))
    log_kappa = np.full(300, 12.0)
    log_w = _rows_of_weights(rng, 300, 2)
    far = unit(rng.normal(size=(2, 50, 3)) - np.array([0.0, 0.0, 6.0]))
    lists = neighbour_lists(mu, log_kappa, max_pairs=10**6)
    got = log_density_points(lists, log_w, far)
    want = np.stack([log_density(log_w[r], mu, np.exp(log_kappa), far[r]) for r in range(2)])
    assert want.max() < LOG_TAU                                               # far below the certified range
    np.testing.assert_allclose(got, want, rtol=1e-13)


def test_every_component_left_out_adds_at_most_its_weight_times_tau():
    """The bound itself, term by term: at random points, each component not in the neighbour list of the
    point's nearest mean has vMF density <= e^LOG_TAU (so times Gamma_j, all of them <= e^LOG_TAU)."""
    mu, log_kappa, _, _ = clustered(3)
    kappa = np.exp(log_kappa)
    lists = neighbour_lists(mu, log_kappa, max_pairs=10**7)
    rng = np.random.default_rng(4)
    x = unit(np.concatenate([mu[rng.integers(0, len(mu), 3000)] + rng.normal(size=(3000, 3)) * 0.003,
                             rng.normal(size=(3000, 3))]))
    nearest = np.argmin(((x[:, None] - mu[None]) ** 2).sum(-1), axis=1)      # brute-force Voronoi cells
    log_vmf = log_c(kappa)[None] - 0.5 * kappa[None] * ((x[:, None] - mu[None]) ** 2).sum(-1)
    listed = np.zeros((len(x), len(mu)), dtype=bool)
    for p, i in enumerate(nearest):
        listed[p, lists.j[lists.ptr[i]:lists.ptr[i + 1]]] = True
    assert listed[np.arange(len(x)), nearest].all()                           # a mean is its own neighbour
    assert (~listed).sum() > 0.5 * listed.size                                # most are left out
    assert log_vmf[~listed].max() <= LOG_TAU


def test_too_many_pairs_gives_none():
    mu, log_kappa, _, _ = clustered(0)
    assert neighbour_lists(mu, np.full(len(mu), 1.0), max_pairs=10**4) is None   # wide components overlap


def _mvmf(log_kappa: float, c: int = 256):
    from geo.sphere.partition import Partition

    rng = np.random.default_rng(5)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, 20_000)))
    part = Partition.build(lat, rng.uniform(-180, 180, 20_000), c)
    head = create_head("mvmf", feature_dim=8, partition=part, kappa0=log_kappa).double()
    with torch.no_grad():
        head.log_kappa.add_(torch.from_numpy(rng.uniform(-1.0, 1.0, head.n_cells)))
    return head


def test_mvmf_calibration_through_the_pruning_equals_it_over_every_component():
    """The MvMF's Monte Carlo HPD levels and credible areas (the same samples, the same generator seed)
    through the neighbour lists and through the per-row sum over (nearly) every component."""
    head = _mvmf(math.log(5000.0))
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(6, head.n_cells, dtype=torch.float64, generator=g) * 2
    y = torch.from_numpy(unit(np.random.default_rng(6).normal(size=(6, 3))))
    y[:3] = head.sample(logits[:3], 1, generator=g)[:, 0]                     # three truths inside the mass
    assert head._neighbour_lists() is not None
    pruned = head.calibration(logits, y, n_samples=800, generator=torch.Generator().manual_seed(3))
    head.max_chunk_bytes = 0                                                  # no lists: the per-row sum
    head.__dict__.pop("_neighbour_cache")
    assert head._neighbour_lists() is None
    whole = head.calibration(logits, y, n_samples=800, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(pruned[0], whole[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(pruned[1], whole[1], rtol=1e-7, atol=0)


def test_mvmf_rows_use_float64_means_as_the_loss_does():
    """A float32 MvMF at kappa = e^16: the density of the truth in the calibration path equals the
    float64 recomputation from its stored means (normalised in float64), to ~1e-9 nats; normalising
    in float32 moves it by ~1e-4."""
    head = _mvmf(16.0).float()
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, head.n_cells, generator=g)
    y = head.sample(logits, 1, generator=g)[:, 0]
    got = head.log_density_rows(logits, y[:, None, :])[:, 0].numpy()
    mu = head.mu_raw.detach().double().numpy()
    mu = mu / np.linalg.norm(mu, axis=1, keepdims=True)
    kappa = np.exp(head.log_kappa.detach().double().numpy())
    log_w = torch.log_softmax(logits.double(), -1).numpy()
    want = np.array([log_density(log_w[r], mu, kappa, y[r:r + 1].numpy())[0] for r in range(4)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-8)
