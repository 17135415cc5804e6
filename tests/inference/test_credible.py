"""Radii holding 50 % / 95 % of a head's probability, against scipy quadrature, Monte Carlo and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate

from geo.inference.credible import _component_mass, _hav, cell_radii_km, mvmf_radii_km
from geo.geometry import EARTH_RADIUS_KM, latlon_to_xyz, normalize, vmf_radius_km


def _reference_component_mass(r, delta, kappa):
    """P(angle(y, p) <= r) for y ~ vMF(mu, kappa), angle(mu, p) = delta, by scipy.integrate.quad over theta."""
    def integrand(theta):
        den = math.sin(theta) * math.sin(delta)
        h = (_hav(r) - _hav(theta - delta)) / den if den > 0 else float(theta <= r)
        frac = 2 * math.asin(math.sqrt(min(max(h, 0.0), 1.0))) / math.pi
        return kappa * math.exp(kappa * (math.cos(theta) - 1)) * math.sin(theta) / -math.expm1(-2 * kappa) * frac
    return integrate.quad(integrand, 0, math.pi, points=[abs(r - delta), min(r + delta, math.pi)],
                          limit=500, epsabs=1e-13)[0]


@pytest.mark.parametrize("kappa, delta, r", [(50.0, 0.2, 0.25), (50.0, 0.2, 0.1), (3.0, 2.0, 1.0),
                                             (1e-6, 1.0, 2.0), (400.0, 0.05, 0.3), (2e4, 0.02, 0.021)])
def test_component_mass_matches_quadrature(kappa, delta, r):
    ours = _component_mass(np.array(r), np.array(delta), np.array(kappa))
    assert float(ours) == pytest.approx(_reference_component_mass(r, delta, kappa), abs=1e-6)


@pytest.mark.parametrize("log_kappa", [-5.0, 0.0, 3.0, 8.0, 16.0, 20.0])
def test_single_centred_component_is_the_closed_form(log_kappa):
    radii, neglected = mvmf_radii_km([0, 0, 1], np.zeros(1), np.array([[0, 0, 1.0]]), np.array([log_kappa]))
    assert neglected == 0.0
    assert radii[0] == pytest.approx(vmf_radius_km(log_kappa, 0.5), rel=1e-4)
    assert radii[1] == pytest.approx(vmf_radius_km(log_kappa, 0.95), rel=1e-4)


def test_mixture_radii_match_monte_carlo():
    rng = np.random.default_rng(1)
    c = 20
    mu = normalize(np.array([0, 0, 1.0]) + rng.normal(scale=0.4, size=(c, 3)))
    log_kappa = rng.uniform(2, 7, c)
    log_w = rng.normal(size=c)
    p = mu[int(np.argmax(log_w))]
    radii, _ = mvmf_radii_km(p, log_w, mu, log_kappa)
    # Independent reference: sample the mixture (Wood's exact vMF sampler on S^2) and take distance quantiles.
    n = 400_000
    w = np.exp(log_w - log_w.max())
    comp = rng.choice(c, size=n, p=w / w.sum())
    kappa = np.exp(log_kappa[comp])
    u = rng.random(n)
    cos_t = 1 + np.log(u + (1 - u) * np.exp(-2 * kappa)) / kappa
    v = rng.normal(size=(n, 3))
    v -= (v * mu[comp]).sum(1, keepdims=True) * mu[comp]
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    y = cos_t[:, None] * mu[comp] + np.sqrt(np.clip(1 - cos_t**2, 0, None))[:, None] * v
    dist_km = np.arctan2(np.linalg.norm(np.cross(y, p), axis=1), y @ p) * EARTH_RADIUS_KM
    for radius, q in zip(radii, (0.5, 0.95)):
        assert np.mean(dist_km <= radius) == pytest.approx(q, abs=0.004)  # ~4 MC standard errors


def test_cells_uniform_on_the_sphere_give_the_cap_law():
    """p(cell) = area / 4 pi is the uniform law: mass in a cap of radius r is (1 - cos r) / 2."""
    from geo.sphere.partition import Partition

    rng = np.random.default_rng(0)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, 5000)))
    lon = rng.uniform(-180, 180, 5000)
    partition = Partition.build(lat, lon, 200)
    probs = partition.areas_sr / (4 * math.pi)
    radii = cell_radii_km(latlon_to_xyz(48.85, 2.35), probs, partition)
    expected = [math.acos(1 - 2 * q) * EARTH_RADIUS_KM for q in (0.5, 0.95)]
    assert radii == pytest.approx(expected, rel=0.01)


def test_one_cell_radius_is_within_the_cell():
    from geo.sphere.partition import Partition

    rng = np.random.default_rng(0)
    partition = Partition.build(rng.uniform(-60, 60, 3000), rng.uniform(-180, 180, 3000), 100)
    k = 37
    probs = np.zeros(partition.n_cells)
    probs[k] = 1.0
    r50, r95 = cell_radii_km(partition.centres_xyz[k], probs, partition)
    # A cell of area A is roughly a square of side sqrt(A): its mass lies within ~0.8 sqrt(A) of its centre.
    side_km = math.sqrt(partition.areas_sr[k]) * EARTH_RADIUS_KM
    assert 0.2 * side_km < r50 < r95 < 0.85 * side_km


def test_calibration_statement_reports_the_test_split_coverage():
    from geo.inference.credible import calibration_statement
    from geo.metrics import summarize

    rng = np.random.default_rng(0)
    n = 800
    dist = rng.exponential(500, n)
    over = summarize(dist, hpd_level=rng.uniform(size=n) ** 0.3, n_bootstrap=200)  # truths too often outside
    text = calibration_statement(dict(over, split="test"))
    assert text.startswith(f"Calibration on the test split ({n:,} images): 95 % regions held the truth for "
                           f"{100 * over['coverage@95']:.0f} %")
    assert "overconfident" in text
    calibrated = summarize(dist, hpd_level=rng.uniform(size=n), n_bootstrap=200)
    assert "consistent with calibration" in calibration_statement(calibrated)
    under = summarize(dist, hpd_level=rng.uniform(size=n) ** 3, n_bootstrap=200)
    assert "underconfident" in calibration_statement(under)
    assert "not measured" in calibration_statement({"n": 5, "acc@1km": 0.0})
    assert "not measured" in calibration_statement(None)
