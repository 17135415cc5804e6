"""The regression head: distance loss vs a float64 haversine, kappa fitted on val vs a numerical scipy MLE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.stats import vonmises_fisher

from geo.heads import create_head
from geo.heads.regression import fit_log_kappa
from support.sphere import haversine_km


def _latlon(xyz: np.ndarray):
    return np.degrees(np.arcsin(np.clip(xyz[:, 2], -1, 1))), np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0]))


def test_loss_is_the_mean_great_circle_angle():
    torch.manual_seed(0)
    head = create_head("regression", feature_dim=5).double()
    x = torch.randn(64, 5, dtype=torch.float64)
    y = torch.nn.functional.normalize(torch.randn(64, 3, dtype=torch.float64), dim=-1)
    y[0] = head(x[:1])[0].detach()  # an exact prediction: finite gradient
    y[1] = -head(x[1:2])[0].detach()  # an antipodal one
    out = head(x)
    ref_km = haversine_km(*_latlon(out.detach().numpy()), *_latlon(y.numpy()))
    # rel 2e-5: the antipodal row's angle is clamped just below pi (asin's slope is infinite at 1)
    assert head.loss(out, y).item() == pytest.approx(np.mean(ref_km) / 6371.0088, rel=2e-5)
    assert head.loss(out[2:], y[2:]).item() == pytest.approx(np.mean(ref_km[2:]) / 6371.0088, rel=1e-9)
    head.loss(out, y).backward()
    assert torch.isfinite(head.linear.weight.grad).all()


@pytest.mark.parametrize("kappa", [0.5, 30.0, 2e4, 1e8])
def test_kappa_fitted_on_val_is_the_maximum_likelihood(kappa):
    rng = np.random.default_rng(1)
    n = 4000
    pred = rng.normal(size=(n, 3))
    pred /= np.linalg.norm(pred, axis=1, keepdims=True)
    # true points drawn from vMF(pred, kappa): one draw around the north pole, rotated to each prediction
    pole = vonmises_fisher([0.0, 0.0, 1.0], kappa).rvs(n, random_state=rng)
    e1 = np.cross(pred, [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(pred, e1)
    y = pole[:, :1] * e1 + pole[:, 1:2] * e2 + pole[:, 2:] * pred
    head = create_head("regression", feature_dim=3)
    head.calibrate(torch.from_numpy(pred).float(), torch.from_numpy(y))
    # the independent reference: maximise scipy's mean log-likelihood over log kappa numerically
    cos = np.sum(pred * y, axis=1)

    def neg_ll(log_k):
        return -np.mean(vonmises_fisher([0.0, 0.0, 1.0], math.exp(log_k)).logpdf(
            np.stack([np.sqrt(np.clip(1 - cos**2, 0, 1)), np.zeros(n), cos], axis=1)))

    best = minimize_scalar(neg_ll, bounds=(-10, 20), method="bounded", options={"xatol": 1e-9}).x
    # float32 predictions limit the fit at huge kappa (1 - cos ~ 1e-8)
    assert float(head.log_kappa) == pytest.approx(best, abs=1e-4 if kappa < 1e6 else 5e-2)
    assert float(head.log_kappa) == pytest.approx(math.log(kappa), abs=0.25)  # sampling noise of 4000 draws


def test_fit_log_kappa_limits():
    assert fit_log_kappa(1.5) == -14.0 and fit_log_kappa(0.0) == 21.0
    assert math.exp(fit_log_kappa(1e-4)) == pytest.approx(1e4, rel=1e-9)  # 1 / S in the sharp limit
