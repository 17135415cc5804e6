"""geo.metrics against hand-computed values."""

import math

import numpy as np
import pytest

from geo import metrics as m


def test_accuracy_is_less_or_equal():
    d = np.array([0.0, 1.0, 1.0000001, 25.0, 199.0, 750.0, 2500.0, 2500.5, 20000.0])
    assert m.accuracy_at_km(d, 1) == pytest.approx(2 / 9)
    assert m.accuracy_at_km(d, 25) == pytest.approx(4 / 9)
    assert m.accuracy_at_km(d, 200) == pytest.approx(5 / 9)
    assert m.accuracy_at_km(d, 750) == pytest.approx(6 / 9)
    assert m.accuracy_at_km(d, 2500) == pytest.approx(7 / 9)


def test_geoscore_hand_values():
    assert m.geoscore(np.array([0.0])) == 5000.0
    assert m.geoscore(np.array([1492.7])) == pytest.approx(5000 / math.e)
    assert m.geoscore(np.array([0.0, 1492.7 * 2])) == pytest.approx((5000 + 5000 * math.exp(-2)) / 2)


def test_country_accuracy_and_nll():
    country = m.summarize(np.ones(4), pred_country=["FR", "DE", "XX", "US"], true_country=["FR", "FR", "XX", "MX"],
                          n_bootstrap=0)["country_acc"]
    assert country == 0.5
    with pytest.raises(ValueError):
        m.summarize(np.ones(1), pred_country=["FR"], true_country=["FR", "DE"])
    assert m.mean_nll(np.array([-1.0, -3.0, 2.0])) == pytest.approx(2 / 3)


def test_summarize_keys_values_and_intervals():
    rng = np.random.default_rng(0)
    d = rng.exponential(800.0, 500)
    logp = rng.normal(-5, 2, 500)
    pred = rng.choice(["FR", "DE"], 500)
    true = rng.choice(["FR", "DE"], 500)
    s = m.summarize(d, pred_country=pred, true_country=true, log_density=logp, n_bootstrap=300)
    assert s["n"] == 500
    assert s["acc@750km"] == pytest.approx(np.mean(d <= 750))
    assert s["median_km"] == pytest.approx(np.median(d))
    assert s["mean_km"] == pytest.approx(d.mean())
    assert s["country_acc"] == pytest.approx(np.mean(pred == true))
    assert s["nll_nats"] == pytest.approx(-logp.mean())
    for key in ["acc@1km", "acc@25km", "acc@200km", "acc@750km", "acc@2500km", "median_km", "mean_km", "geoscore", "country_acc", "nll_nats"]:
        lo, hi = s["ci"][key]
        assert lo <= s[key] <= hi, key
    # the interval of a fraction has the binomial width: ~ 2 * 1.96 * sqrt(p (1-p) / n)
    p = s["acc@750km"]
    width = s["ci"]["acc@750km"][1] - s["ci"]["acc@750km"][0]
    assert width == pytest.approx(2 * 1.96 * math.sqrt(p * (1 - p) / 500), rel=0.25)


def test_summarize_without_bootstrap_and_bad_input():
    s = m.summarize(np.array([10.0, 30.0]), n_bootstrap=0)
    assert "ci" not in s and "country_acc" not in s and "nll_nats" not in s
    assert s["acc@25km"] == 0.5
    with pytest.raises(ValueError):
        m.summarize(np.array([]))
    with pytest.raises(ValueError):
        m.summarize(np.array([1.0]), pred_country=["FR"])


def test_bootstrap_ci_of_mean_matches_normal_theory():
    rng = np.random.default_rng(1)
    x = rng.normal(10.0, 2.0, 2000)
    lo, hi = m.summarize(x, n_bootstrap=1000)["ci"]["mean_km"]
    half = 1.96 * x.std() / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.3 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.3 * half)
    assert lo <= x.mean() <= hi


def test_uniform_accuracy_is_the_spherical_cap_fraction():
    from scipy.integrate import quad

    # numerical integral of the cap around the north pole: int_0^theta sin(t) dt / 2 (area over 4 pi)
    for scale_km in (*m.DISTANCE_SCALES_KM, 10_000.0, 20_000.0):
        theta = min(scale_km / 6371.0088, math.pi)
        integral, _ = quad(math.sin, 0.0, theta, epsabs=1e-15, epsrel=1e-12)
        assert m.uniform_accuracy(scale_km) == pytest.approx(integral / 2, rel=1e-9, abs=1e-18)
    # Monte Carlo: uniform guesses (normalised Gaussians) around a fixed truth, 10^6 draws
    rng = np.random.default_rng(0)
    guesses = rng.normal(size=(1_000_000, 3))
    guesses /= np.linalg.norm(guesses, axis=1, keepdims=True)
    truth = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    dist_km = 6371.0088 * np.arccos(np.clip(guesses @ truth, -1, 1))
    for scale_km in (750.0, 2500.0, 10_000.0):
        p = m.uniform_accuracy(scale_km)
        assert np.mean(dist_km <= scale_km) == pytest.approx(p, abs=5 * math.sqrt(p * (1 - p) / 1e6))
    assert m.uniform_accuracy(20_037.5) == pytest.approx(1.0)  # past the antipode: the whole sphere


def test_calibration_metrics_against_brute_force():
    from geo.metrics import CALIBRATION_GRID, calibration_error, coverage

    rng = np.random.default_rng(3)
    hpd = rng.uniform(size=500) ** 0.5
    area = np.sort(rng.exponential(1000.0, size=(500, 2)), axis=1)
    r = m.summarize(rng.exponential(500.0, 500), hpd_level=hpd, area_km2=area, n_bootstrap=50)
    for level in (50, 80, 95):
        assert r[f"coverage@{level}"] == sum(h <= level / 100 for h in hpd) / 500
    brute = sum(abs(sum(h <= a for h in hpd) / 500 - a) for a in CALIBRATION_GRID) / len(CALIBRATION_GRID)
    assert r["calibration_error"] == pytest.approx(brute, abs=1e-12) == calibration_error(hpd)
    assert r["area50_km2"] == np.median(area[:, 0]) and r["area95_km2"] == np.median(area[:, 1])
    assert {"coverage@95", "calibration_error", "area95_km2"} <= set(r["ci"])
    assert list(coverage([0.1, 0.5, 0.5, 0.9], [0.5])) == [0.75]  # "<= level": the boundary is covered
    with pytest.raises(ValueError, match="hpd_level must have shape"):
        m.summarize(np.ones(3), hpd_level=np.ones(2))
