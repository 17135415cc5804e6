"""MvMF head: loss vs an independent float64 reference, gradients, extreme kappa, predictions."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import mpmath
import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import vonmises_fisher

from geo.errors import ConfigError
from geo.heads import create_head
from support.sphere import fibonacci_sphere, haversine_km, latlon_xyz


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def stand_in_partition(centres_xyz: np.ndarray) -> SimpleNamespace:
    """The attributes a head reads from a Partition; means are perturbed centres."""
    c = len(centres_xyz)
    rng = np.random.default_rng(123)
    return SimpleNamespace(centres_xyz=centres_xyz, means_xyz=unit(centres_xyz + 0.01 * rng.normal(size=(c, 3))),
                           areas_sr=np.full(c, 4 * np.pi / c), n_cells=c)


def reference_log_density(logits: np.ndarray, y: np.ndarray, mu: np.ndarray, log_kappa: np.ndarray) -> np.ndarray:
    """log sum_i softmax(logits)_i vMF(y; mu_i, kappa_i) in float64 with scipy's vMF ([B])."""
    log_w = logits - logsumexp(logits, axis=1, keepdims=True)
    log_vmf = np.stack([vonmises_fisher(mu[i], math.exp(log_kappa[i])).logpdf(y) for i in range(len(mu))], axis=1)
    return logsumexp(log_w + log_vmf, axis=1)


def random_problem(seed: int, c: int = 7, d: int = 5, batch: int = 48):
    """Random head with kappa spread over 1..e^16 and points near, far and antipodal to the means."""
    rng = np.random.default_rng(seed)
    head = create_head("mvmf", feature_dim=d, partition=stand_in_partition(unit(rng.normal(size=(c, 3)))))
    with torch.no_grad():
        head.log_kappa.copy_(torch.from_numpy(rng.uniform(0.0, 16.0, size=c)))
        head.log_kappa[0] = 16.0
        head.mu_raw.mul_(torch.from_numpy(rng.uniform(0.5, 2.0, size=(c, 1))))  # unconstrained: any length
    mu = unit(head.mu_raw.detach().double().numpy())
    kappa = np.exp(head.log_kappa.detach().double().numpy())
    comp = rng.integers(0, c, size=batch)
    # near: offsets of a few standard deviations (1 / sqrt(kappa)); then uniform; then antipodes
    offsets = rng.normal(size=(batch, 3)) * (2.0 / np.sqrt(kappa[comp]))[:, None]
    y = unit(mu[comp] + offsets)
    y[batch // 2:] = unit(rng.normal(size=(batch - batch // 2, 3)))
    y[-4:] = -mu[0]  # antipodal to the kappa = e^16 component
    return head, torch.from_numpy(rng.normal(size=(batch, d))), y


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_scipy_float64(seed):
    head, x, y = random_problem(seed)
    head = head.double()
    logits = head(x)
    got = head.log_density_at(logits, torch.from_numpy(y)).detach().numpy()
    ref = reference_log_density(logits.detach().numpy(), y, unit(head.mu_raw.detach().numpy()),
                                head.log_kappa.detach().numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-8)
    assert head.loss(logits, torch.from_numpy(y)).item() == pytest.approx(-ref.mean(), rel=1e-10)


def test_loss_float32_matches_float64_reference():
    head, x, y = random_problem(2)
    y32 = torch.from_numpy(y).float()
    logits = head(x.float())
    got = head.log_density_at(logits, y32).detach().double().numpy()
    # Reference on exactly the float32 inputs, re-normalised in float64.
    ref = reference_log_density(logits.detach().double().numpy(), unit(y32.double().numpy()),
                                unit(head.mu_raw.detach().double().numpy()), head.log_kappa.detach().double().numpy())
    assert ref.max() > 10 and ref.min() < -50  # peaked (kappa ~ e^16) and far-out points both present
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=2e-3)


@pytest.mark.parametrize("log_kappa", [math.log(1e-6), 0.0, math.log(16.0), 16.0, math.log(1e9)])
def test_single_component_is_minus_log_vmf(log_kappa):
    rng = np.random.default_rng(5)
    mu = unit(rng.normal(size=(1, 3)))
    head = create_head("mvmf", feature_dim=3, partition=stand_in_partition(mu), kappa0=log_kappa).double()
    # the float32-rounded mean and log kappa the head holds
    mu, kappa = unit(head.mu_raw.detach().numpy()), math.exp(head.log_kappa.item())
    y = unit(mu + rng.normal(size=(6, 3)) * min(1.0, 1.0 / math.sqrt(kappa)))
    y[-1] = -mu[0]
    logits = head(torch.from_numpy(rng.normal(size=(6, 3))))
    got = head.log_density_at(logits, torch.from_numpy(y)).detach().numpy()
    ref = vonmises_fisher(mu[0], kappa).logpdf(y)  # kappa (mu.y) - kappa: ~1e-16 kappa absolute error
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-9 + 1e-15 * kappa)
    # textbook form kappa / (4 pi sinh kappa) exp(kappa mu.y), in 60-digit arithmetic
    mpmath.mp.dps = 60
    k = mpmath.mpf(kappa)
    for row in range(len(y)):
        m, v = [mpmath.mpf(a) for a in mu[0]], [mpmath.mpf(a) for a in y[row]]
        # cosine of the exact directions: kappa (mu.y) is sensitive to float64 norm errors at large kappa
        dot = mpmath.fdot(m, v) / mpmath.sqrt(mpmath.fdot(m, m) * mpmath.fdot(v, v))
        textbook = mpmath.log(k / (4 * mpmath.pi * mpmath.sinh(k))) + k * dot
        # the head's float64 form log C - kappa + kappa (mu.y) is exact to ~1e-16 kappa nats
        assert got[row] == pytest.approx(float(textbook), rel=1e-10, abs=1e-9 + 1e-15 * kappa)
    assert head.loss(logits, torch.from_numpy(y)).item() == pytest.approx(-ref.mean(), rel=1e-10)


@pytest.mark.parametrize("chunked", [False, True])
def test_gradcheck_float64(chunked):
    rng = np.random.default_rng(7)
    c, d, batch = 4, 3, 5
    head = create_head("mvmf", feature_dim=d, partition=stand_in_partition(unit(rng.normal(size=(c, 3))))).double()
    if chunked:
        head.max_chunk_bytes = 1  # one row per checkpointed chunk
    with torch.no_grad():
        head.log_kappa.copy_(torch.from_numpy(rng.uniform(0.0, 3.0, size=c)))
    x = torch.from_numpy(rng.normal(size=(batch, d)))
    y = torch.from_numpy(unit(rng.normal(size=(batch, 3))))
    names = ["linear.weight", "linear.bias", "mu_raw", "log_kappa"]
    params = tuple(dict(head.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)
    model = LossOf(head)

    def loss_of(*tensors):
        return torch.func.functional_call(model, {"head." + n: t for n, t in zip(names, tensors)}, (x, y))

    assert torch.autograd.gradcheck(loss_of, params, eps=1e-6, atol=1e-6, rtol=1e-5)


class LossOf(torch.nn.Module):
    """features, targets -> head.loss(head(features), targets), for functional_call."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x, y):
        return self.head.loss(self.head(x), y)


def test_chunked_loss_and_gradients_equal_unchunked():
    head, x, y = random_problem(3, c=9, batch=20)
    y = torch.from_numpy(y).float()
    results = []
    for max_bytes in (256 * 2**20, 1000):
        head.zero_grad()
        head.max_chunk_bytes = max_bytes
        loss = head.loss(head(x.float()), y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in head.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_far_point_finite_loss_and_gradient_at_large_kappa():
    # three components around (0, 0); the target at the antipode, ~20,000 km from each
    lat, lon = np.array([0.0, 0.5, -0.5]), np.array([0.0, 0.5, 0.3])
    mu = np.stack([np.cos(np.radians(lat)) * np.cos(np.radians(lon)),
                   np.cos(np.radians(lat)) * np.sin(np.radians(lon)), np.sin(np.radians(lat))], axis=-1)
    head = create_head("mvmf", feature_dim=4, partition=stand_in_partition(mu), kappa0=16.0)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([[-1.0, 0.0, 0.0], [-1.0, 1e-3, 0.0]])
    dist_km = 6371.0088 * np.arccos(np.clip(unit(y.double().numpy()) @ mu.T, -1, 1))
    assert dist_km.min() > 19_900
    logits = head(x)
    loss = head.loss(logits, y)
    loss.backward()
    ref = -reference_log_density(logits.detach().double().numpy(), y.double().numpy() / np.linalg.norm(
        y.double().numpy(), axis=1, keepdims=True), mu, np.full(3, 16.0)).mean()
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(ref, rel=1e-6)
    for name, p in head.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert head.mu_raw.grad.abs().sum() > 0 and head.linear.weight.grad.abs().sum() > 0


def test_density_integrates_to_one_with_varied_kappa():
    rng = np.random.default_rng(11)
    c = 5
    head = create_head("mvmf", feature_dim=3, partition=stand_in_partition(unit(rng.normal(size=(c, 3))))).double()
    with torch.no_grad():
        head.log_kappa.copy_(torch.log(torch.tensor([10.0, 30.0, 60.0, 120.0, 200.0], dtype=torch.float64)))
    grid = fibonacci_sphere(200_000)
    logits = head(torch.from_numpy(rng.normal(size=(3, 3))))
    integral = torch.exp(head.log_density(logits, torch.from_numpy(grid))).sum(1) * (4 * math.pi / len(grid))
    np.testing.assert_allclose(integral.detach().numpy(), 1.0, atol=1e-4)


def test_log_density_grid_matches_reference_and_rows():
    head, x, y = random_problem(4, batch=12)
    head = head.double()
    logits = head(x)
    grid = torch.from_numpy(y)
    dens = head.log_density(logits, grid).detach().numpy()                       # [B, G]
    mu, lk = unit(head.mu_raw.detach().numpy()), head.log_kappa.detach().numpy()
    for b in range(len(y)):
        ref = reference_log_density(np.repeat(logits[b:b + 1].detach().numpy(), len(y), 0), y, mu, lk)
        np.testing.assert_allclose(dens[b], ref, rtol=1e-10, atol=1e-8)
    head.max_chunk_bytes = 1000  # chunked over the grid and the batch
    np.testing.assert_allclose(head.log_density(logits, grid).detach().numpy(), dens, rtol=1e-12, atol=1e-8)
    np.testing.assert_allclose(np.diag(dens), head.log_density_at(logits, grid).detach().numpy(), rtol=1e-12,
                               atol=1e-8)


def test_argmax_prediction_is_top_component_mean_in_degrees():
    lat = np.array([10.0, -45.0, 60.0, 0.0])
    lon = np.array([20.0, 170.0, -120.0, -179.5])
    head = create_head("mvmf", feature_dim=2, partition=stand_in_partition(latlon_xyz(lat, lon)))
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.5, 1.0]])
    pred_lat, pred_lon = head.predict(logits, k=3)
    order = np.argsort(-logits.numpy(), axis=1)[:, :3]
    np.testing.assert_allclose(pred_lat.numpy(), lat[order], atol=1e-5)
    np.testing.assert_allclose(pred_lon.numpy(), lon[order], atol=1e-5)
    probs, index = head.topk(logits, 3)
    np.testing.assert_array_equal(index.numpy(), order)
    np.testing.assert_allclose(probs.numpy(), np.take_along_axis(
        np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True), order, 1), rtol=1e-6)


def test_mode_prediction_finds_grid_maximum_of_two_component_mixture():
    # row 0: two overlapping components (the third has negligible weight): the mode lies
    # between their means; row 1: a broad heavy component and a sharp light one far away:
    # the mode is the sharp one's mean although eq. 7 picks the heavy one
    mu = latlon_xyz(np.array([20.0, 28.0, -30.0]), np.array([30.0, 36.0, -100.0]))
    head = create_head("mvmf", feature_dim=2, partition=stand_in_partition(mu)).double()
    with torch.no_grad():
        head.log_kappa.copy_(torch.log(torch.tensor([40.0, 25.0, 400.0], dtype=torch.float64)))
    logits = torch.tensor([[0.4, 0.0, -30.0], [2.0, 0.0, 0.3]], dtype=torch.float64)
    lat_m, lon_m = head.predict(logits, k=1, mode="mode")
    lat_a, lon_a = head.predict(logits, k=1, mode="argmax")
    mu_n, lk = unit(head.mu_raw.detach().numpy()), head.log_kappa.detach().numpy()
    grid = fibonacci_sphere(400_000)
    for b, min_shift_deg in [(0, 0.2), (1, 30.0)]:
        # coarse global grid (~0.3 deg), then a fine local grid (0.0025 deg) around its best point
        coarse = reference_log_density(np.repeat(logits[b:b + 1].numpy(), len(grid), 0), grid, mu_n, lk)
        best = grid[np.argmax(coarse)]
        blat, blon = np.degrees(np.arcsin(best[2])), np.degrees(np.arctan2(best[1], best[0]))
        glat, glon = np.meshgrid(blat + np.linspace(-0.5, 0.5, 401), blon + np.linspace(-0.5, 0.5, 401))
        fine = latlon_xyz(glat.ravel(), glon.ravel())
        fine_dens = reference_log_density(np.repeat(logits[b:b + 1].numpy(), len(fine), 0), fine, mu_n, lk)
        grid_best = fine[np.argmax(fine_dens)]
        found = latlon_xyz(lat_m[b, 0].item(), lon_m[b, 0].item())
        found_dens = reference_log_density(logits[b:b + 1].numpy(), found[None], mu_n, lk)[0]
        assert found_dens >= fine_dens.max() - 1e-12
        assert np.degrees(np.arccos(np.clip(found @ grid_best, -1, 1))) < 0.01
        argmax_xyz = latlon_xyz(lat_a[b, 0].item(), lon_a[b, 0].item())
        assert np.degrees(np.arccos(np.clip(found @ argmax_xyz, -1, 1))) > min_shift_deg  # not eq. 7's answer


def test_mode_prediction_at_large_kappa_returns_distinct_maxima():
    lat, lon = np.array([0.0, 40.0, -30.0]), np.array([0.0, 100.0, -60.0])
    head = create_head("mvmf", feature_dim=2, partition=stand_in_partition(latlon_xyz(lat, lon)), kappa0=16.0)
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    pred_lat, pred_lon = head.predict(logits, k=3, mode="mode")
    # separated components at kappa = e^16: the maxima are the means, ordered by weight
    np.testing.assert_allclose(pred_lat.numpy()[0], lat[[1, 2, 0]], atol=1e-4)
    np.testing.assert_allclose(pred_lon.numpy()[0], lon[[1, 2, 0]], atol=1e-4)


def test_options_freeze_init_and_errors():
    rng = np.random.default_rng(0)
    part = stand_in_partition(unit(rng.normal(size=(6, 3))))
    head = create_head("mvmf", feature_dim=4, partition=part, kappa0=3.5, train_mu=False, train_kappa=False,
                       mu_init="mean")
    assert not head.mu_raw.requires_grad and not head.log_kappa.requires_grad
    np.testing.assert_allclose(head.mu().detach().numpy(), part.means_xyz, atol=1e-6)
    assert torch.all(head.log_kappa == 3.5)
    again = create_head("mvmf", feature_dim=4, partition=part, **head.options)
    assert again.options == head.options
    again.load_state_dict(head.state_dict())
    with pytest.raises(ConfigError, match="mu_init"):
        create_head("mvmf", feature_dim=4, partition=part, mu_init="median")
    with pytest.raises(ConfigError, match="predict mode"):
        head.predict(torch.zeros(1, 6), mode="centre")


def test_difference_form_fallback_agrees(monkeypatch):
    # devices without float64 (MPS) use geometry's squared-chord differences in float32
    head, x, y = random_problem(6)
    y32 = torch.from_numpy(y).float()
    logits = head(x.float())
    exact = head.log_density_at(logits, y32)
    grid_exact = head.log_density(logits, y32[:5])
    monkeypatch.setattr(head, "_exact", lambda device: False)
    torch.testing.assert_close(head.log_density_at(logits, y32), exact, rtol=1e-6, atol=2e-3)
    torch.testing.assert_close(head.log_density(logits, y32[:5]), grid_exact, rtol=1e-6, atol=2e-3)
    head.loss(logits, y32).backward()
    assert torch.isfinite(head.mu_raw.grad).all() and torch.isfinite(head.log_kappa.grad).all()


def test_mode_at_large_kappa_between_close_components():
    # two components 3 km apart at kappa = e^16 (~2.5 km half-mass radius): the maximum of a
    # two-component mixture lies on the arc between the means; search that arc densely
    lat, lon = np.array([45.0, 45.0]), np.array([7.0, 7.0 + 3.0 / (111.2 * math.cos(math.radians(45.0)))])
    head = create_head("mvmf", feature_dim=2, partition=stand_in_partition(latlon_xyz(lat, lon)),
                       kappa0=16.0).double()
    logits = torch.tensor([[0.3, 0.0]], dtype=torch.float64)
    mu, lk = unit(head.mu_raw.detach().numpy()), head.log_kappa.detach().numpy()
    t = np.linspace(-0.2, 1.2, 28_001)[:, None]
    arc = unit(mu[0] * (1 - t) + mu[1] * t)
    dens = reference_log_density(np.repeat(logits.numpy(), len(arc), 0), arc, mu, lk)
    pred_lat, pred_lon = head.predict(logits, mode="mode")
    found = latlon_xyz(pred_lat.item(), pred_lon.item())
    found_dens = reference_log_density(logits.numpy(), found[None], mu, lk)[0]
    assert found_dens >= dens.max() - 1e-6
    dist_m = 6371.0088e3 * np.arccos(np.clip(found @ arc[np.argmax(dens)], -1, 1))
    assert dist_m < 5.0


# ---- the mode search on clustered mixtures and near a bifurcation (the audit's cases) --------


def _log_mixture_f64(log_w: np.ndarray, mu: np.ndarray, kappa: np.ndarray, y: np.ndarray) -> np.ndarray:
    """log sum_i w_i vMF(y; mu_i, kappa_i) in float64 by squared-chord differences, chunked over y ([n])."""
    log_c = np.log(kappa) - np.log(2 * np.pi) - np.log1p(-np.exp(-2 * kappa))
    out = []
    for start in range(0, len(y), 4096):
        sq = ((y[start:start + 4096, None, :] - mu[None]) ** 2).sum(-1)
        out.append(logsumexp(log_w + log_c - 0.5 * kappa * sq, axis=1))
    return np.concatenate(out)


def _local_grid(centre: np.ndarray, half_width_rad: float, n: int) -> np.ndarray:
    """An n x n grid of unit vectors on the tangent plane at ``centre``, +- half_width_rad."""
    e1 = unit(np.cross(centre, [0.0, 0.0, 1.0] if abs(centre[2]) < 0.9 else [1.0, 0.0, 0.0]))
    e2 = np.cross(centre, e1)
    s, t = np.meshgrid(np.linspace(-half_width_rad, half_width_rad, n), np.linspace(-half_width_rad, half_width_rad, n))
    return unit(centre + s.reshape(-1, 1) * e1 + t.reshape(-1, 1) * e2)


def _check_global_mode(head, logits: torch.Tensor, spread_rad: float, n_grid: int = 121, **predict_kw) -> float:
    """The predicted mode is at least as dense as every point of dense grids around every mean; returns
    how many nats the mode beats the best component mean by."""
    mu = unit(head.mu_raw.detach().double().numpy())
    kappa = np.exp(head.log_kappa.detach().double().numpy())
    log_w = torch.log_softmax(logits.double(), -1)[0].numpy()
    lat, lon = head.predict(logits, mode="mode", **predict_kw)
    found = latlon_xyz(lat.item(), lon.item())
    found_dens = _log_mixture_f64(log_w, mu, kappa, found[None])[0]
    at_means = _log_mixture_f64(log_w, mu, kappa, mu)
    centres = mu[np.argsort(-at_means)[:32]]  # grids around the 32 densest means (each +- spread_rad)
    grid = np.concatenate([_local_grid(c, spread_rad, n_grid) for c in centres])
    grid_dens = _log_mixture_f64(log_w, mu, kappa, grid)
    assert found_dens >= grid_dens.max() - 1e-9
    return found_dens - at_means.max()


def test_mode_search_finds_a_cluster_of_light_components():
    # 8 isolated components with Gamma = 0.06, 16 clustered ones with Gamma = 0.0325, all at kappa = e^12:
    # the cluster's summed density is the global maximum although each member is lighter than
    # any isolated component (the heaviest-peak starts all lie on isolated components).
    rng = np.random.default_rng(7)
    sigma = math.exp(-6.0)  # 1 / sqrt(kappa) radians, ~16 km
    isolated = latlon_xyz(np.array([60.0, -40.0, 10.0, 30.0, -10.0, 45.0, -60.0, 5.0]),
                          np.array([-150.0, -100.0, -60.0, 0.0, 40.0, 80.0, 120.0, 170.0]))
    centre = latlon_xyz(20.0, 100.0)
    clustered = unit(centre + rng.normal(size=(16, 3)) * sigma * 0.8)
    mu = np.concatenate([isolated, clustered])
    head = create_head("mvmf", feature_dim=2, partition=stand_in_partition(mu), kappa0=12.0).double()
    with torch.no_grad():
        head.mu_raw.copy_(torch.from_numpy(mu))
    logits = torch.from_numpy(np.log(np.r_[np.full(8, 0.06), np.full(16, 0.0325)]))[None]
    gain = _check_global_mode(head, logits, spread_rad=4 * sigma)
    assert gain > 0  # beyond every mean: the mode lies inside the cluster
    lat, lon = head.predict(logits, mode="mode")
    assert haversine_km(lat.item(), lon.item(), 20.0, 100.0) < 100  # not on an isolated component


def test_mode_search_with_many_random_overlapping_components():
    # c = 1024 components with random weights and means scattered over a few clusters, kappa = e^12
    rng = np.random.default_rng(3)
    sigma = math.exp(-6.0)
    centres = unit(rng.normal(size=(6, 3)))
    mu = unit(centres[rng.integers(0, 6, 1024)] + rng.normal(size=(1024, 3)) * 3 * sigma)
    head = create_head("mvmf", feature_dim=2, partition=stand_in_partition(mu), kappa0=12.0).double()
    with torch.no_grad():
        head.mu_raw.copy_(torch.from_numpy(mu))
    logits = torch.from_numpy(rng.normal(size=1024))[None]
    _check_global_mode(head, logits, spread_rad=6 * sigma, n_grid=41, n_components=1024)


def _symmetric_pair(ratio: float) -> tuple:
    """Two equal vMF components at kappa = e^16 whose half-separation a solves kappa sin^2 a = ratio cos a
    (ratio = 1: the bifurcation of one mode into two); their mode (ratio <= 1) is the midpoint (1, 0, 0)."""
    kappa = math.exp(16.0)
    a = math.acos((-ratio + math.sqrt(ratio ** 2 + 4 * kappa ** 2)) / (2 * kappa))
    mu = np.array([[math.cos(a), math.sin(a), 0.0], [math.cos(a), -math.sin(a), 0.0]])
    head = create_head("mvmf", feature_dim=2, partition=stand_in_partition(mu), kappa0=16.0).double()
    with torch.no_grad():
        head.mu_raw.copy_(torch.from_numpy(mu))
    return head, torch.zeros(1, 2, dtype=torch.float64)


def test_mode_search_converges_near_the_two_component_bifurcation():
    head, logits = _symmetric_pair(0.99)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no warning
        lat, lon = head.predict(logits, mode="mode")
    assert haversine_km(lat.item(), lon.item(), 0.0, 0.0) * 1e3 < 0.01  # metres (200 iterations left 49 m)


def test_mode_search_says_when_it_did_not_converge():
    # at the bifurcation log p is flat to 4th order: MM converges sublinearly, Newton only linearly,
    # ~50 m left after 10 iterations
    head, logits = _symmetric_pair(1.0)
    with pytest.warns(RuntimeWarning, match="1 of 1 rows did not converge in 10 iterations"):
        head.predict(logits, mode="mode", max_iter=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: no warning
        lat, lon = head.predict(logits, mode="mode")
    assert haversine_km(lat.item(), lon.item(), 0.0, 0.0) * 1e3 < 0.01  # metres


# ---- the mode search where many light components make the maximum (issue 22) -------------


def _reference_maximum(log_w: np.ndarray, mu: np.ndarray, kappa: np.ndarray, centres: np.ndarray,
                       half_width_rad: float, n_grid: int = 61) -> float:
    """The highest log density near ``centres`` (float64, independent of geo): an n_grid^2 grid of
    +- half_width_rad around each centre, then Nelder-Mead from the 3 best grid points in the
    tangent plane (coordinates in units of the grid step)."""
    from scipy.optimize import minimize

    grids = [_local_grid(c, half_width_rad, n_grid) for c in centres]
    # 256 points at a time: the [points, components, 3] temporary stays small at c = 2^15
    points = np.concatenate(grids)
    dens = np.concatenate([_log_mixture_f64(log_w, mu, kappa, points[s:s + 256]) for s in range(0, len(points), 256)])
    best = dens.max()
    step = 2 * half_width_rad / (n_grid - 1)
    for g in np.argsort(-dens)[:3]:
        start = np.concatenate(grids)[g]
        e1 = unit(np.cross(start, [0.0, 0.0, 1.0] if abs(start[2]) < 0.9 else [1.0, 0.0, 0.0]))
        e2 = np.cross(start, e1)

        def neg(st, start=start, e1=e1, e2=e2):
            return -_log_mixture_f64(log_w, mu, kappa, unit(start + step * (st[0] * e1 + st[1] * e2))[None])[0]

        res = minimize(neg, np.zeros(2), method="Nelder-Mead",
                       options=dict(xatol=1e-10, fatol=1e-14, maxiter=4000, initial_simplex=[[0, 0], [1, 0], [0, 1]]))
        best = max(best, -res.fun)
    return best


def _head_with(mu: np.ndarray, log_kappa) -> object:
    head = create_head("mvmf", feature_dim=2, partition=stand_in_partition(mu)).double()
    with torch.no_grad():
        head.mu_raw.copy_(torch.from_numpy(mu))
        head.log_kappa.copy_(torch.as_tensor(log_kappa, dtype=torch.float64).expand(len(mu)))
    return head


def _found_log_density(head, logits: torch.Tensor, **predict_kw) -> np.ndarray:
    """float64 log density at each row's predicted mode (independent of the head), ``[B]``."""
    lat, lon = head.predict(logits, mode="mode", **predict_kw)
    mu, kappa = unit(head.mu_raw.detach().double().numpy()), np.exp(head.log_kappa.detach().double().numpy())
    log_w = torch.log_softmax(logits.double(), -1).numpy()
    found = latlon_xyz(lat[:, 0].numpy(), lon[:, 0].numpy())
    return np.array([_log_mixture_f64(log_w[b], mu, kappa, found[b:b + 1])[0] for b in range(len(found))])


def _isolated_and_cluster(n_isolated: int, w_isolated: float, n_cluster: int, w_cluster: float,
                          spread_widths: float, seed: int):
    """Components at kappa = e^12: n_isolated on a Fibonacci lattice (>= 8 degrees apart) with weight
    w_isolated, n_cluster within ~spread_widths kernel widths of (20N, 100E) with weight w_cluster."""
    rng = np.random.default_rng(seed)
    sigma = math.exp(-6.0)
    isolated = fibonacci_sphere(n_isolated)
    centre = latlon_xyz(20.0, 100.0)
    isolated = isolated[np.linalg.norm(isolated - centre, axis=1) > 0.1][:n_isolated]
    cluster = unit(centre + rng.normal(size=(n_cluster, 3)) * sigma * spread_widths)
    mu = np.concatenate([isolated, cluster])
    logits = torch.from_numpy(np.log(np.r_[np.full(len(isolated), w_isolated), np.full(n_cluster, w_cluster)]))[None]
    return _head_with(mu, 12.0), logits, centre, sigma


@pytest.mark.parametrize("case", ["1024 at e^12", "256 + cluster of 16"])
def test_mode_search_finds_a_maximum_made_by_many_light_components(case):
    # the audit's two cases: every clustered component is lighter than every isolated one, so the
    # 256 heaviest peaks are all isolated, but the cluster's summed density is the maximum
    if case == "1024 at e^12":
        head, logits, centre, sigma = _isolated_and_cluster(400, 1.25e-3, 624, 8.0e-4, 1.0, seed=1)
    else:
        head, logits, centre, sigma = _isolated_and_cluster(256, 0.0037, 16, 0.0033, 0.3, seed=2)
    mu, kappa = unit(head.mu_raw.detach().double().numpy()), np.exp(head.log_kappa.detach().double().numpy())
    log_w = torch.log_softmax(logits.double(), -1)[0].numpy()
    best_isolated = _log_mixture_f64(log_w, mu, kappa, mu[:1])[0]
    reference = _reference_maximum(log_w, mu, kappa, centre[None], 5 * sigma)
    assert reference > best_isolated + 2.0  # the cluster's maximum is far above any isolated peak
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing was left out unbounded: no warning
        found = _found_log_density(head, logits)[0]
    assert abs(found - reference) < 1e-6, (found, reference)


def test_mode_search_says_when_its_component_cap_may_hide_the_maximum():
    head, logits, centre, sigma = _isolated_and_cluster(256, 0.0037, 16, 0.0033, 0.3, seed=2)
    with pytest.warns(RuntimeWarning, match=r"1 of 1 rows \(rows 0\) could not bound .* up to [0-9.e+-]+ nats"):
        head.predict(logits, mode="mode", n_components=8)


def _clustered_mixture(seed: int, c: int = 2 ** 15):
    """c components: a background with kappa e^10-e^14 at uniform means, and 12 clusters of 100-2000
    light components (~0.3-2 kernel widths apart) whose summed weights compete with the heaviest ones."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(100, 2000, 12)
    centres = unit(rng.normal(size=(12, 3)))
    log_kappa = rng.uniform(10.0, 14.0, c)
    mu = unit(rng.normal(size=(c, 3)))
    logits = rng.normal(size=c) * 1.5
    start = 0
    for centre, size in zip(centres, sizes):
        block = slice(start, start + size)
        log_kappa[block] = rng.uniform(11.0, 13.0)
        spread = rng.uniform(0.3, 2.0) * math.exp(-0.5 * log_kappa[start])
        mu[block] = unit(centre + rng.normal(size=(size, 3)) * spread)
        logits[block] = rng.normal(size=size) * 0.3 - np.log(size) + rng.uniform(2.0, 5.0)
        start += size
    return mu, log_kappa, logits, centres


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_mode_search_on_random_clustered_mixtures_of_2_15_components(seed):
    mu, log_kappa, logits, centres = _clustered_mixture(seed)
    head = _head_with(mu, torch.from_numpy(log_kappa))
    kappa = np.exp(log_kappa)
    log_w = logits - logsumexp(logits)
    # reference: grids around every cluster and the 8 densest means (float64, all 2^15 components)
    peak = log_w + np.log(kappa)
    dense_means = mu[np.argsort(-peak)[:8]]
    width = 4 * math.exp(-5.0)
    reference = max(_reference_maximum(log_w, mu, kappa, centres, width, n_grid=31),
                    _reference_maximum(log_w, mu, kappa, dense_means, width / 4, n_grid=21))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = _found_log_density(head, torch.from_numpy(logits)[None])[0]
    assert found > reference - 1e-6, (found, reference)
