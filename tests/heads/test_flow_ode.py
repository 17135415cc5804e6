"""geo.heads.flow_ode: the exact surface divergence, ODE log-densities and samples, against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchdiffeq  # noqa: F401  (the flow extra: its absence must fail, not skip, these tests)

from geo.heads.flow_ode import LOG_UNIFORM, flow_log_density, flow_samples, sphere_divergence, uniform_sphere


def _points(n, seed=0):
    return uniform_sphere(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_divergence_of_a_rotation_is_zero_and_of_a_gradient_field_is_minus_two_a_dot_x():
    x = _points(50)
    omega = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    v, div = sphere_divergence(lambda y: torch.linalg.cross(omega.expand_as(y), y, dim=-1), x)
    torch.testing.assert_close(v, torch.linalg.cross(omega.expand_as(x), x, dim=-1))
    torch.testing.assert_close(div, torch.zeros(50, dtype=torch.float64), atol=1e-13, rtol=0)
    a = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    # v = P_x a: the gradient of a.x on the sphere, whose Laplacian is -2 a.x (an l = 1 harmonic)
    _, div = sphere_divergence(lambda y: a - (y @ a)[:, None] * y, x)
    torch.testing.assert_close(div, -2.0 * (x @ a), atol=1e-12, rtol=0)
    # the extension does not matter: the same tangent field scaled off the sphere has the same divergence
    _, div_scaled = sphere_divergence(lambda y: (a - (y @ a)[:, None] * y) * y.norm(dim=-1, keepdim=True) ** 3, x)
    torch.testing.assert_close(div_scaled, div, atol=1e-12, rtol=0)


def test_a_rotation_keeps_the_uniform_density_and_moves_points_by_its_angle():
    omega = torch.tensor([0.0, 0.0, 0.9], dtype=torch.float64)  # 0.9 rad about z over t in [0, 1]
    field = lambda t, y: torch.linalg.cross(omega.expand_as(y), y, dim=-1)  # noqa: E731
    x0 = _points(20)
    x1, log_p = flow_samples(field, x0, rtol=1e-10, atol=1e-10, with_log_density=True)
    c, s = math.cos(0.9), math.sin(0.9)
    rot = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(x1, x0 @ rot.T, atol=1e-8, rtol=0)
    torch.testing.assert_close(log_p, torch.full((20,), LOG_UNIFORM, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(flow_log_density(field, x1), torch.full((20,), LOG_UNIFORM, dtype=torch.float64),
                               atol=1e-8, rtol=0)


def _vmf_path_field(mu: torch.Tensor, kappa: float):
    """The field whose flow carries uniform (t = 0) through vMF(mu, t kappa) to vMF(mu, kappa) at t = 1.

    z = mu.x follows the quantiles of the vMF's marginal CDF F_k(z) = expm1(k (z + 1)) / expm1(2 k):
    dz/dt = -kappa dF/dk / dF/dz, along the unit tangent towards mu, (mu - z x) / sqrt(1 - z^2).
    dF/dk by a fourth-order central difference in k (float64; F is smooth in k, also through k = 0).
    """
    def cdf(z, k):
        k = torch.as_tensor(k, dtype=z.dtype)
        return torch.expm1(k * (z + 1)) / torch.expm1(2 * k)

    def field(t, x):
        k = float(t) * kappa
        z = x @ mu
        h = 1e-3
        dfdk = (-cdf(z, k + 2 * h) + 8 * cdf(z, k + h) - 8 * cdf(z, k - h) + cdf(z, k - 2 * h)) / (12 * h)
        kk = max(k, 1e-12)
        dfdz = kk * torch.exp(kk * (z + 1)) / math.expm1(2 * kk)
        zdot = -kappa * dfdk / dfdz
        return (zdot / (1 - z * z))[:, None] * (mu - z[:, None] * x)

    return field


def test_a_field_pushing_uniform_to_a_vmf_gives_the_vmf_log_density():
    mu = torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64)
    kappa = 6.0
    field = _vmf_path_field(mu, kappa)
    x = _points(40, seed=3)
    expected = math.log(kappa / (2 * math.pi * -math.expm1(-2 * kappa))) + kappa * (x @ mu - 1)
    got = flow_log_density(field, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # and forward: samples of the uniform pushed by the field have the vMF's mean resultant length
    x1, log_p = flow_samples(field, _points(4000, seed=4), rtol=1e-7, atol=1e-7, with_log_density=True)
    torch.testing.assert_close(log_p, math.log(kappa / (2 * math.pi * -math.expm1(-2 * kappa))) + kappa * (x1 @ mu - 1),
                               atol=1e-4, rtol=0)
    mean_z = float((x1 @ mu).mean())
    expected_z = 1 / math.tanh(kappa) - 1 / kappa
    assert abs(mean_z - expected_z) < 4 * float((x1 @ mu).std()) / math.sqrt(4000)


class _SmallField(torch.nn.Module):
    """A random smooth time-dependent tangent field P_x f(t, x) (an MLP), float64."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).double()

    def forward(self, t, x):
        f = self.net(torch.cat([x, torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0], 1)], dim=-1)) * 2.0
        return f - (x * f).sum(-1, keepdim=True) * x


@torch.no_grad()
def test_finite_differences_of_the_flow_map_agree_with_the_integrated_divergence():
    field = _SmallField()
    x0 = _points(6, seed=7)
    x1, log_p = flow_samples(field, x0, rtol=1e-11, atol=1e-11, with_log_density=True)
    # tangent basis at x0; the flow map's tangent Jacobian by central differences along great circles
    e1 = torch.nn.functional.normalize(torch.linalg.cross(x0, torch.tensor([[0.3, 0.4, 0.5]], dtype=torch.float64)
                                                          .expand_as(x0), dim=-1), dim=-1)
    e2 = torch.linalg.cross(x0, e1, dim=-1)
    eps = 1e-4
    columns = []
    for e in (e1, e2):
        plus, _ = flow_samples(field, math.cos(eps) * x0 + math.sin(eps) * e, rtol=1e-11, atol=1e-11)
        minus, _ = flow_samples(field, math.cos(eps) * x0 - math.sin(eps) * e, rtol=1e-11, atol=1e-11)
        columns.append((plus - minus) / (2 * eps))
    area_ratio = (torch.linalg.cross(columns[0], columns[1], dim=-1) * x1).sum(-1)  # det of dPhi on tangent planes
    assert torch.all(area_ratio > 0)
    # log p1(x1) = log p0(x0) - log |det dPhi|
    torch.testing.assert_close(log_p, LOG_UNIFORM - torch.log(area_ratio), atol=1e-6, rtol=0)
    assert float((log_p - LOG_UNIFORM).abs().max()) > 0.1  # the field does change the density
    # the backward solve gives the same log density as the forward one
    torch.testing.assert_close(flow_log_density(field, x1, rtol=1e-10, atol=1e-10), log_p, atol=1e-7, rtol=0)


def test_uniform_points_are_uniform():
    x = uniform_sphere(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(20000, dtype=torch.float64))
    assert np.abs(x.mean(0).numpy()).max() < 4 / math.sqrt(3 * 20000)
