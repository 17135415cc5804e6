"""Input-dependent vMF heads (``vmf``, ``vmf-mixture``): loss and density against scipy in float64,
K = 1 equal to ``vmf``, predictions, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import vonmises_fisher

from geo.errors import ConfigError
from geo.heads import create_head
from support.sphere import fibonacci_sphere


def _problem(k: int, seed: int = 0, d: int = 6, batch: int = 12):
    torch.manual_seed(seed)
    head = create_head("vmf-mixture", feature_dim=d, n_components=k, log_kappa0=4.0).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, generator=g, dtype=torch.float64) * 2
    y = torch.nn.functional.normalize(torch.randn(batch, 3, generator=g, dtype=torch.float64), dim=-1)
    return head, x, y


def _scipy_row(row: np.ndarray, points: np.ndarray) -> np.ndarray:
    """log sum_k pi_k vMF(points; mu_k, kappa_k) for one output row ``[K, 5]``, float64 by scipy ([n])."""
    terms = [row[k, 0] + vonmises_fisher(row[k, 1:4] / np.linalg.norm(row[k, 1:4]), math.exp(row[k, 4])).logpdf(points)
             for k in range(row.shape[0])]
    return logsumexp(np.stack(terms), axis=0)


def _scipy_log_density(output: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row's log density at its own point ([B] for output [B, K, 5], y [B, 3])."""
    return np.array([_scipy_row(row, point[None])[0] for row, point in zip(output, y)])


@pytest.mark.parametrize("k", [1, 3, 16])
def test_loss_and_density_match_scipy_float64(k):
    head, x, y = _problem(k)
    with torch.no_grad():
        head.linear.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(k))  # kappa over decades
    output = head(x)
    assert output.shape == (12, k, 5)
    ref = _scipy_log_density(output.detach().numpy(), y.numpy())
    np.testing.assert_allclose(head.log_density_at(output, y).detach().numpy(), ref, rtol=1e-10, atol=1e-10)
    assert head.loss(output, y).item() == pytest.approx(-ref.mean(), rel=1e-10)
    grid = head.log_density(output, y[:4]).detach().numpy()           # [B, 4]
    for b in range(12):
        np.testing.assert_allclose(grid[b], _scipy_row(output[b].detach().numpy(), y[:4].numpy()), rtol=1e-10,
                                   atol=1e-10)
    log_kappa = output[..., 4].detach()
    assert math.exp(log_kappa.min()) < 5 and math.exp(log_kappa.max()) > 500
    # the mixing weights are normalised
    np.testing.assert_allclose(np.exp(output[..., 0].detach().numpy()).sum(1), 1.0, rtol=1e-12)


def test_gradcheck_float64():
    head, x, y = _problem(3, batch=4)
    params = [p for p in head.parameters()]
    names = [n for n, _ in head.named_parameters()]

    def f(*tensors):
        out = torch.func.functional_call(head, dict(zip(names, tensors)), (x,))
        return head.loss(out, y)

    assert torch.autograd.gradcheck(f, tuple(p.detach().requires_grad_() for p in params))


def test_one_component_mixture_equals_vmf():
    torch.manual_seed(0)
    vmf = create_head("vmf", feature_dim=6)
    mix = create_head("vmf-mixture", feature_dim=6, n_components=1)
    mix.load_state_dict(vmf.state_dict())
    assert vmf.options == {"log_kappa0": 2.0, "matmul_dtype": None}
    head, x, y = _problem(1)
    x, y = x.float(), y.float()
    torch.testing.assert_close(mix(x), vmf(x))
    torch.testing.assert_close(mix.loss(mix(x), y), vmf.loss(vmf(x), y))
    for mode in ("argmax", "mode"):
        a, b = mix.predict(mix(x), mode=mode), vmf.predict(vmf(x), mode=mode)
        torch.testing.assert_close(a, b)
    # one component: the prediction is the mean mu(x) in either mode
    mu = vmf(x)[:, 0, 1:4].double()
    lat, lon = vmf.predict(vmf(x), mode="mode")
    np.testing.assert_allclose(np.sin(np.radians(lat[:, 0].numpy())), mu[:, 2].detach().numpy(), atol=1e-6)


def test_mixture_mode_beats_every_grid_point():
    head, x, _ = _problem(5, seed=3, batch=3)
    output = head(x).detach()
    lat, lon = head.predict(output, mode="mode")
    found = torch.stack([torch.cos(torch.deg2rad(lat)) * torch.cos(torch.deg2rad(lon)),
                         torch.cos(torch.deg2rad(lat)) * torch.sin(torch.deg2rad(lon)), torch.sin(torch.deg2rad(lat))],
                        -1)[:, 0]
    at_found = _scipy_log_density(output.numpy(), found.numpy())
    grid = fibonacci_sphere(20_000)
    for b in range(3):
        dens = _scipy_row(output[b].numpy(), grid)
        assert at_found[b] >= dens.max() - 1e-9


def test_bad_options():
    with pytest.raises(ConfigError, match="n_components"):
        create_head("vmf-mixture", feature_dim=4, n_components=17)
    with pytest.raises(ConfigError, match="n_components"):
        create_head("vmf-mixture", feature_dim=4, n_components=0)
    with pytest.raises(ConfigError, match="'vmf' has no option"):
        create_head("vmf", feature_dim=4, n_components=2)
