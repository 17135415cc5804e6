"""The ``flow`` head: geodesic paths, a trained head's density against its own samples, prediction.

A small flow head is trained here (a few hundred steps, ~seconds) on two vMF targets
(kappa 20, "moderately concentrated") chosen by a one-hot feature, then its exact
ODE density is checked: it integrates to 1, its samples' mean log-density is its
negative entropy, and (slow) a histogram of 10^6 of its samples matches it.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.stats import vonmises_fisher

from geo.geometry import latlon_to_xyz
from geo.heads import create_head
from geo.heads.flow import FlowHead, geodesic_path
from support.sphere import fibonacci_sphere

MU = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
KAPPA = 20.0


def test_geodesic_path_is_the_great_circle_at_constant_speed():
    g = torch.Generator().manual_seed(0)
    x0 = torch.nn.functional.normalize(torch.randn(200, 3, generator=g, dtype=torch.float64), dim=-1)
    x1 = torch.nn.functional.normalize(torch.randn(200, 3, generator=g, dtype=torch.float64), dim=-1)
    t = torch.rand(200, generator=g, dtype=torch.float64)
    x_t, u_t = geodesic_path(x0, x1, t)
    angle = torch.arccos((x0 * x1).sum(-1).clamp(-1, 1))
    torch.testing.assert_close(x_t.norm(dim=-1), torch.ones(200, dtype=torch.float64))
    # slerp, written independently
    slerp = (torch.sin((1 - t) * angle)[:, None] * x0 + torch.sin(t * angle)[:, None] * x1) / torch.sin(angle)[:, None]
    torch.testing.assert_close(x_t, slerp, atol=1e-10, rtol=0)
    # u_t is the time derivative (central differences) and has the constant speed of the angle
    h = 1e-6
    fd = (geodesic_path(x0, x1, t + h)[0] - geodesic_path(x0, x1, t - h)[0]) / (2 * h)
    torch.testing.assert_close(u_t, fd, atol=1e-7, rtol=0)
    torch.testing.assert_close(u_t.norm(dim=-1), angle)
    torch.testing.assert_close(geodesic_path(x0, x1, torch.ones(200, dtype=torch.float64))[0], x1, atol=1e-12, rtol=0)
    # x0 = x1: stays put, no NaN
    x_t, u_t = geodesic_path(x0, x0, t)
    torch.testing.assert_close(x_t, x0) and torch.testing.assert_close(u_t, torch.zeros_like(u_t))


def _fitted_head() -> FlowHead:
    """A small flow head fitted to vMF(MU[c], KAPPA) for one-hot features of class c (float64)."""
    torch.manual_seed(0)
    head = create_head("flow", feature_dim=2, partition=None, width=48, depth=2, cond_dropout=0.0, n_samples=8)
    head = head.double()
    rng = np.random.default_rng(0)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for step in range(600):
        c = rng.integers(0, 2, 256)
        y = np.concatenate([vonmises_fisher(MU[k], KAPPA).rvs(int((c == k).sum()), random_state=rng) for k in (0, 1)])
        c = np.sort(c)
        x = torch.nn.functional.one_hot(torch.from_numpy(c), 2).double()
        loss = head.loss(head(x), torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


@pytest.fixture(scope="module")
def fitted():
    head = _fitted_head()
    with torch.no_grad():
        output = head(torch.eye(2, dtype=torch.float64))
    return head, output


@pytest.mark.slow  # ~1 min on a loaded 2-core CPU: thousands of ODE solves
def test_the_fitted_density_integrates_to_one_and_is_near_its_target(fitted):
    head, output = fitted
    grid = torch.from_numpy(fibonacci_sphere(4000))
    log_p = head.log_density(output, grid)                                            # [2, G]
    integral = torch.exp(log_p).sum(1) * (4 * math.pi / len(grid))
    np.testing.assert_allclose(integral.numpy(), 1.0, atol=3e-3)
    # moderately concentrated, where the target is: peak density of vMF(kappa 20) is ~3.2 per sr
    assert float(log_p.exp().max()) > 1.0
    for c in (0, 1):
        peak = grid[int(log_p[c].argmax())].numpy()
        assert peak @ MU[c] > math.cos(math.radians(10))
    # log_density_at agrees with log_density at the same points
    pts = grid[:2]
    torch.testing.assert_close(head.log_density_at(output, pts), torch.diagonal(log_p[:, :2]), atol=2e-3, rtol=0)


@pytest.mark.slow  # ~1 min on a loaded 2-core CPU: thousands of ODE solves
def test_samples_have_the_mean_log_density_the_head_reports(fitted):
    head, output = fitted
    torch.manual_seed(3)
    n = 3000
    samples = head.sample(output[:1], n)[0]                                            # [n, 3]
    assert samples.shape == (n, 3)
    torch.testing.assert_close(samples.norm(dim=-1), torch.ones(n, dtype=torch.float64))
    log_p = head.log_density_at(output[:1].expand(n, -1), samples)
    # E_p[log p] (the negative entropy) by quadrature of the head's own density
    grid = torch.from_numpy(fibonacci_sphere(4000))
    grid_log_p = head.log_density(output[:1], grid)[0]
    neg_entropy = float((grid_log_p.exp() * grid_log_p).sum() * (4 * math.pi / len(grid)))
    assert abs(float(log_p.mean()) - neg_entropy) < 4 * float(log_p.std()) / math.sqrt(n)
    # the samples lie where the target vMF is: mean resultant towards MU[0]
    assert float(samples.mean(0) @ torch.from_numpy(MU[0])) > 0.8


def test_predictions_are_high_density_points(fitted):
    head, output = fitted
    lat, lon = head.predict(output, k=1, mode="best")
    xyz = latlon_to_xyz(lat.numpy()[:, 0], lon.numpy()[:, 0])
    assert np.all(np.sum(xyz * MU, axis=1) > math.cos(math.radians(20)))
    lat_m, lon_m = head.predict(output, k=1, mode="mode")
    xyz_m = torch.from_numpy(latlon_to_xyz(lat_m.numpy()[:, 0], lon_m.numpy()[:, 0]))
    # the refined mode is at least as probable as the best sample
    best = head.log_density_at(output, torch.from_numpy(xyz))
    mode = head.log_density_at(output, xyz_m)
    assert torch.all(mode >= best - 1e-6)
    # k distinct points, ranked as topk ranks them; the same output gives the same points
    lat3, lon3 = head.predict(output, k=3, mode="best")
    prob, index = head.topk(output, 3)
    assert torch.all(prob[:, :-1] >= prob[:, 1:]) and torch.all(prob.sum(1) <= 1 + 1e-6)
    p3 = latlon_to_xyz(lat3.numpy(), lon3.numpy())
    for row in range(2):
        for i in range(3):
            for j in range(i):
                assert p3[row, i] @ p3[row, j] < math.cos(100 / 6371.0088)
    np.testing.assert_array_equal(head.predict(output, k=3, mode="best")[0].numpy(), lat3.numpy())


def test_guidance_and_options():
    head = create_head("flow", feature_dim=4, partition=None, width=8, depth=1, guidance=2.0)
    assert head.options["guidance"] == 2.0 and head.max_k == 16
    with torch.no_grad():
        out = head.eval()(torch.randn(2, 4))
        assert torch.isfinite(head.log_density_at(out, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))).all()
    for bad in (dict(width=0), dict(cond_dropout=1.0), dict(rtol=0.0), dict(n_samples=0)):
        with pytest.raises(Exception, match="flow head"):
            create_head("flow", feature_dim=4, partition=None, **bad)


@pytest.mark.slow
def test_a_histogram_of_a_million_samples_matches_the_density(fitted):
    head, output = fitted
    torch.manual_seed(11)
    n = 10**6
    # The samples come from a float32 copy of the head (half the cost of float64: 10^6 ODE solves took 13 min on
    # one core in float64); rounding the weights moves its density by ~1e-7, far below the histogram's error.
    sampler = copy.deepcopy(head).float()
    samples = torch.cat([sampler.sample(output[:1].float(), 100_000)[0] for _ in range(n // 100_000)])
    # caps of radius r around points near the mode and in the tail: sample fraction vs the density's mass
    r = 0.12
    centres = torch.nn.functional.normalize(torch.tensor([[0.0, 0.0, 1.0], [0.1, 0.05, 1.0], [0.3, -0.2, 1.0],
                                                          [-0.5, 0.1, 1.0]], dtype=torch.float64), dim=-1)
    local = torch.from_numpy(fibonacci_sphere(200_000))
    local = local[local[:, 2] >= math.cos(r)]  # equal-area points inside a cap around +z
    area = 2 * math.pi * (1 - math.cos(r))
    for c in centres:
        # rotate +z onto c (Rodrigues), then quadrature of the density over the cap
        axis = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), c)
        s, cos_a = axis.norm(), c[2]
        k = axis / s if s > 0 else axis
        kx = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64)
        rot = torch.eye(3, dtype=torch.float64) + s * kx + (1 - cos_a) * kx @ kx
        cap = local @ rot.T
        mass = float(head.log_density(output[:1], cap)[0].exp().mean()) * area
        fraction = float(((samples @ c) >= math.cos(r)).double().mean())
        sigma = math.sqrt(mass * (1 - mass) / n)
        assert abs(fraction - mass) < 4 * sigma + 1e-3 * mass, (c, fraction, mass, sigma)


def test_training_draws_pairs_per_row_and_times_skewed_to_one(monkeypatch):
    # pairs = k is the loss of the rows repeated k times (one draw of (x0, t) for each copy), and
    # time_power p draws t = 1 - u^p: P(t <= a) = 1 - (1 - a)^(1/p) (Kolmogorov-Smirnov against it).
    from scipy.stats import kstest

    import geo.heads.flow as flow

    torch.manual_seed(0)
    two = create_head("flow", feature_dim=5, width=16, depth=1, cond_dropout=0.0, pairs=2, time_power=3.0)
    one = create_head("flow", feature_dim=5, width=16, depth=1, cond_dropout=0.0, pairs=1, time_power=3.0)
    one.load_state_dict(two.state_dict())
    x = torch.randn(7, 5)
    y = torch.nn.functional.normalize(torch.randn(7, 3), dim=-1)
    torch.manual_seed(1)
    loss_two = two.loss(two(x), y)
    torch.manual_seed(1)
    loss_one = one.loss(one(x.repeat(2, 1)), y.repeat(2, 1))
    assert torch.allclose(loss_two, loss_one, rtol=1e-6)
    seen = []
    real = flow.geodesic_path
    monkeypatch.setattr(flow, "geodesic_path", lambda x0, x1, t: (seen.append(t), real(x0, x1, t))[1])
    two.loss(two(torch.randn(20_000, 5)), torch.nn.functional.normalize(torch.randn(20_000, 3), dim=-1))
    t = seen[0].double().numpy()
    assert t.shape == (40_000,)
    assert kstest(t, lambda a: 1 - (1 - np.clip(a, 0, 1)) ** (1 / 3)).pvalue > 1e-3
    assert kstest(t, "uniform").pvalue < 1e-6  # and not uniform
    with pytest.raises(Exception, match="time_power"):
        create_head("flow", feature_dim=5, time_power=0.0)
    with pytest.raises(Exception, match="pairs"):
        create_head("flow", feature_dim=5, pairs=0)
