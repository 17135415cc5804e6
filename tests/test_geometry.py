"""geo.geometry against independent references: scipy's vMF, geographiclib, closed forms, gradcheck."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import vonmises_fisher

from geo import geometry as g
from support.sphere import fibonacci_sphere

KAPPAS = [1e-6, 1e-3, 1.0, 16.0, math.exp(10), math.exp(16), 1e9]


def _points_at_angles(mu: np.ndarray, angles_rad: np.ndarray) -> np.ndarray:
    """Unit vectors at the given angles from ``mu`` (rotating toward an orthogonal direction)."""
    ortho = np.cross(mu, [0.3, -0.5, 0.8])
    ortho /= np.linalg.norm(ortho)
    return np.cos(angles_rad)[:, None] * mu[None] + np.sin(angles_rad)[:, None] * ortho[None]


# ---- coordinates ---------------------------------------------------------------


def test_latlon_xyz_round_trip_numpy_and_torch():
    rng = np.random.default_rng(0)
    lat = rng.uniform(-90, 90, 1000)
    lon = rng.uniform(-180, 180, 1000)
    xyz = g.latlon_to_xyz(lat, lon)
    assert xyz.shape == (1000, 3) and xyz.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(xyz, axis=1), 1.0, atol=1e-15)
    lat2, lon2 = g.xyz_to_latlon(xyz)
    np.testing.assert_allclose(lat2, lat, atol=1e-12)
    np.testing.assert_allclose(lon2, lon, atol=1e-12)
    xyz_t = g.latlon_to_xyz(torch.from_numpy(lat), torch.from_numpy(lon))
    assert isinstance(xyz_t, torch.Tensor)
    np.testing.assert_allclose(xyz_t.numpy(), xyz, atol=1e-15)


def test_latlon_xyz_known_points():
    np.testing.assert_allclose(g.latlon_to_xyz(0.0, 0.0), [1, 0, 0], atol=1e-15)
    np.testing.assert_allclose(g.latlon_to_xyz(0.0, 90.0), [0, 1, 0], atol=1e-15)
    np.testing.assert_allclose(g.latlon_to_xyz(90.0, 123.0), [0, 0, 1], atol=1e-15)
    # lambda and lambda + 180 must be different points (the "2 lambda" embedding bug)
    assert np.linalg.norm(g.latlon_to_xyz(10.0, 20.0) - g.latlon_to_xyz(10.0, -160.0)) > 1.9


def test_wrap_lon():
    np.testing.assert_allclose(g.wrap_lon_deg(np.array([180.0, -180.0, 190.0, -190.0, 540.0, 0.0])), [-180, -180, -170, 170, -180, 0])


# ---- distances -----------------------------------------------------------------


def test_great_circle_known_pairs():
    quarter = math.pi / 2 * g.EARTH_RADIUS_KM
    assert g.great_circle_km(0.0, 0.0, 0.0, 90.0) == pytest.approx(quarter, rel=1e-14)
    assert g.great_circle_km(0.0, 0.0, 90.0, 0.0) == pytest.approx(quarter, rel=1e-14)
    assert g.great_circle_km(12.3, 45.6, 12.3, 45.6) == 0.0
    assert g.great_circle_km(0.0, 0.0, 0.0, 180.0) == pytest.approx(math.pi * g.EARTH_RADIUS_KM, rel=1e-15)
    assert g.great_circle_km(30.0, 20.0, -30.0, -160.0) == pytest.approx(math.pi * g.EARTH_RADIUS_KM, rel=1e-15)
    # across the antimeridian: 0.2 degrees of longitude on the equator, not 359.8
    assert g.great_circle_km(0.0, 179.9, 0.0, -179.9) == pytest.approx(0.2 * math.pi / 180 * g.EARTH_RADIUS_KM, rel=1e-9)
    # tiny distances keep relative precision: 1 micro-degree of latitude
    assert g.great_circle_km(45.0, 7.0, 45.000001, 7.0) == pytest.approx(1e-6 * math.pi / 180 * g.EARTH_RADIUS_KM, rel=1e-7)


def test_great_circle_against_geographiclib_on_a_sphere():
    from geographiclib import geodesic

    sphere = geodesic.Geodesic(g.EARTH_RADIUS_KM * 1000.0, 0.0)  # flattening 0: a sphere
    rng = np.random.default_rng(1)
    lat1, lat2 = rng.uniform(-90, 90, (2, 300))
    lon1, lon2 = rng.uniform(-180, 180, (2, 300))
    # add nearly antipodal and nearly identical pairs
    lat2[:50], lon2[:50] = -lat1[:50] + rng.normal(0, 1e-4, 50), g.wrap_lon_deg(lon1[:50] + 180.0 + rng.normal(0, 1e-4, 50))
    lat2[50:100], lon2[50:100] = lat1[50:100] + 1e-5, lon1[50:100] - 1e-5
    ours = g.great_circle_km(lat1, lon1, lat2, lon2)
    ref = np.array([sphere.Inverse(a, b, c, d)["s12"] / 1000.0 for a, b, c, d in zip(lat1, lon1, lat2, lon2)])
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)


def test_great_circle_torch_matches_numpy():
    rng = np.random.default_rng(2)
    a = rng.uniform(-90, 90, (4, 100))
    a[1] *= 2
    a[3] *= 2
    ours = g.great_circle_km(*a)
    torch_km = g.great_circle_km(*[torch.from_numpy(x) for x in a])
    np.testing.assert_allclose(torch_km.numpy(), ours, rtol=1e-12)


def test_angle_between_xyz_matches_distance():
    rng = np.random.default_rng(3)
    lat1, lat2 = rng.uniform(-90, 90, (2, 100))
    lon1, lon2 = rng.uniform(-180, 180, (2, 100))
    ang = g.angle_between_xyz(g.latlon_to_xyz(lat1, lon1), g.latlon_to_xyz(lat2, lon2))
    np.testing.assert_allclose(ang * g.EARTH_RADIUS_KM, g.great_circle_km(lat1, lon1, lat2, lon2), rtol=1e-10)


# ---- von Mises-Fisher ------------------------------------------------------------


@pytest.mark.parametrize("kappa", KAPPAS)
def test_vmf_log_density_matches_scipy(kappa):
    mu = g.latlon_to_xyz(37.0, -122.0)
    # for huge kappa scipy's own float64 evaluation is only meaningful near mu
    max_angle = math.pi if kappa <= math.exp(10) else min(math.pi, 2000.0 / math.sqrt(kappa))
    angles = np.linspace(0.0, max_angle, 41)
    y = _points_at_angles(mu, angles)
    ref = vonmises_fisher(mu, kappa).logpdf(y)
    ours = g.vmf_log_density(torch.from_numpy(y), torch.from_numpy(mu), torch.tensor(math.log(kappa), dtype=torch.float64))
    # scipy evaluates kappa (mu.y - 1) in float64: its own rounding is ~kappa * 4e-16 nats
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-9, atol=1e-9 + 4e-16 * kappa)
    # and at the mean the closed form log kappa - log 2 pi - log(1 - e^{-2 kappa}) exactly
    at_mean = math.log(kappa) - math.log(2 * math.pi) - math.log(-math.expm1(-2 * kappa))
    assert float(ours[0]) == pytest.approx(at_mean, rel=1e-13, abs=1e-13)


def test_vmf_log_density_closed_form_far_from_mean_at_huge_kappa():
    # scipy cannot check the antipode at kappa = 1e9; the closed form can: log C - 2 kappa
    mu = np.array([0.0, 0.0, 1.0])
    for kappa in (math.exp(16), 1e9):
        ours = g.vmf_log_density(torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64), torch.from_numpy(mu), torch.tensor(math.log(kappa), dtype=torch.float64))
        expected = math.log(kappa) - math.log(2 * math.pi) - 2 * kappa  # log(1 - e^{-2 kappa}) = 0 in float64
        assert float(ours) == pytest.approx(expected, rel=1e-15)
    # small-kappa limit: the uniform density 1/(4 pi) everywhere
    tiny = g.vmf_log_density(torch.from_numpy(-mu), torch.from_numpy(mu), torch.tensor(math.log(1e-12), dtype=torch.float64))
    assert float(tiny) == pytest.approx(-math.log(4 * math.pi), abs=1e-11)


@pytest.mark.parametrize("log_kappa", [0.0, 4.0, 10.0, 16.0])
def test_vmf_float32_close_to_float64(log_kappa):
    """float32 error stays below 1e-3 nats near the mean (where 1 - mu.y would lose ~1 nat)
    and below 1e-6 relative far away, up to kappa = e^16."""
    rng = np.random.default_rng(4)
    mu = g.normalize(rng.normal(size=(200, 3)))
    # points from 0 to 3000 km from their mean, plus a few anywhere
    angles = np.concatenate([rng.uniform(0, 3000 / g.EARTH_RADIUS_KM, 150), rng.uniform(0, math.pi, 50)])
    y = np.stack([_points_at_angles(m, np.array([a]))[0] for m, a in zip(mu, angles)])
    y32, mu32 = torch.from_numpy(y).float(), torch.from_numpy(mu).float()
    # reference: float64 evaluation of the same float32 inputs
    ref = g.vmf_log_density(y32.double(), mu32.double(), torch.tensor(log_kappa, dtype=torch.float64))
    ours = g.vmf_log_density(y32, mu32, torch.tensor(log_kappa, dtype=torch.float32))
    err = (ours.double() - ref).abs()
    assert torch.all(err <= 1e-3 + 1e-6 * ref.abs()), float(err.max())
    near = ref.abs() < 1e3
    assert near.any() and float(err[near].max()) < 1e-3


def test_vmf_density_integrates_to_one():
    grid = torch.from_numpy(fibonacci_sphere(400_000))
    cell_sr = 4 * math.pi / grid.shape[0]
    mu = torch.from_numpy(g.latlon_to_xyz(-33.0, 151.0))
    for kappa in (1e-6, 1.0, 16.0, 200.0, 2000.0):
        log_p = g.vmf_log_density(grid, mu, torch.tensor(math.log(kappa), dtype=torch.float64))
        total = float(torch.exp(log_p).sum() * cell_sr)
        assert total == pytest.approx(1.0, abs=2e-3), kappa


def test_vmf_pairwise_matches_broadcast():
    rng = np.random.default_rng(5)
    y = torch.from_numpy(g.normalize(rng.normal(size=(7, 3))))
    mu = torch.from_numpy(g.normalize(rng.normal(size=(5, 3))))
    log_kappa = torch.from_numpy(rng.uniform(-3, 16, 5))
    pair = g.vmf_log_density_pairwise(y, mu, log_kappa)
    ref = g.vmf_log_density(y[:, None, :], mu[None, :, :], log_kappa[None, :])
    torch.testing.assert_close(pair, ref)


def test_vmf_gradcheck():
    rng = np.random.default_rng(6)
    y = torch.from_numpy(g.normalize(rng.normal(size=(4, 3)))).requires_grad_()
    mu = torch.from_numpy(g.normalize(rng.normal(size=(4, 3)))).requires_grad_()
    for lk in (-5.0, 0.0, 3.0, 8.0):
        log_kappa = torch.full((4,), lk, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(g.vmf_log_density, (y, mu, log_kappa))


def test_vmf_gradient_finite_at_extremes():
    mu = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float32, requires_grad=True)
    y = torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float32)
    for lk in (math.log(1e-6), 16.0, math.log(1e9)):
        log_kappa = torch.tensor([lk], requires_grad=True)
        out = g.vmf_log_density(y, mu, log_kappa).sum()
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(log_kappa.grad).all() and torch.isfinite(mu.grad).all()
        mu.grad = None


def test_vmf_radius_closed_form():
    # the numbers DESIGN.md quotes: kappa = e^16 -> ~2.5 km, kappa = 16 -> ~1900 km
    assert g.vmf_radius_km(16.0) == pytest.approx(2.52, abs=0.01)
    assert g.vmf_radius_km(math.log(16.0)) == pytest.approx(1882, abs=2)
    # against scipy: the probability mass inside the radius is the asked-for mass
    kappa = 40.0
    r_km = g.vmf_radius_km(math.log(kappa), mass=0.9)
    mu = np.array([0.0, 0.0, 1.0])
    samples = vonmises_fisher(mu, kappa).rvs(200_000, random_state=np.random.default_rng(7))
    inside = np.arccos(np.clip(samples[:, 2], -1, 1)) * g.EARTH_RADIUS_KM <= r_km
    assert inside.mean() == pytest.approx(0.9, abs=0.005)


@pytest.mark.parametrize("chunk_rows", [7, 65_536])
def test_nearest_distance_km_equals_brute_force_haversine(chunk_rows):
    from support.sphere import haversine_km

    rng = np.random.default_rng(5)
    ref_lat, ref_lon = rng.uniform(-90, 90, 400), rng.uniform(-180, 180, 400)
    # queries anywhere, near the references (metres to km away), across the antimeridian and at the poles
    lat = np.concatenate([rng.uniform(-90, 90, 300), ref_lat[:50] + rng.normal(0, 1e-4, 50), [90.0, -90.0, 0.0]])
    lon = np.concatenate([rng.uniform(-180, 180, 300), ref_lon[:50] + rng.normal(0, 1e-4, 50), [0.0, 0.0, 179.999]])
    ref_lat, ref_lon = np.append(ref_lat, 0.0), np.append(ref_lon, -179.999)  # 0.22 km from the last query
    got = g.nearest_distance_km(lat, lon, ref_lat, ref_lon, chunk_rows=chunk_rows)
    expected = haversine_km(lat[:, None], lon[:, None], ref_lat[None, :], ref_lon[None, :]).min(axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-6)
    assert got[-1] == pytest.approx(0.2224, abs=1e-3)
    with pytest.raises(ValueError, match="at least one reference"):
        g.nearest_distance_km(lat, lon, [], [])


def _mixture_like_terms(dtype):
    """[200, 400] log terms of a vMF mixture at points: a few near the row's maximum, most 1e2-3e5 nats below
    (far components at kappa ~ e^12), whole rows of -inf, a row with +inf, -inf entries scattered."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 400, dtype=torch.float64, generator=g) * 10
    x[:, 20:] -= 3e5 * torch.rand(200, 380, dtype=torch.float64, generator=g)
    x[:, 300:350] = -80.0 - 30.0 * torch.rand(200, 50, dtype=torch.float64, generator=g)  # float32 denormal range
    x[0] = -math.inf
    x[1, 7] = math.inf
    x[2:, 390:] = -math.inf
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logsumexp_equals_torch_and_a_float64_sum_on_terms_that_underflow(dtype):
    logsumexp = g.logsumexp

    x = _mixture_like_terms(dtype)
    ours = logsumexp(x, dim=-1)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, torch.logsumexp(x, dim=-1), rtol=0, atol=0)  # the same to the last bit here
    # independent reference: math.fsum of the exponentials in float64 (Python floats), row by row
    for r in range(2, 200, 37):
        terms = x[r].double().tolist()
        top = max(terms)
        ref = top + math.log(math.fsum(math.exp(t - top) for t in terms))
        assert abs(float(ours[r]) - ref) <= (1e-14 if dtype == torch.float64 else 1e-5) * max(1.0, abs(ref))
    assert ours[0] == -math.inf and ours[1] == math.inf
    assert torch.equal(logsumexp(x.T, dim=0, keepdim=True)[0], ours)


def test_softmax_and_logsumexp_equal_torchs_and_the_gradient_is_the_softmax():
    logsumexp, softmax_and_logsumexp = g.logsumexp, g.softmax_and_logsumexp

    x = _mixture_like_terms(torch.float64)[2:]
    soft, lse = softmax_and_logsumexp(x, dim=-1)
    torch.testing.assert_close(soft, torch.softmax(x, dim=-1), rtol=0, atol=1e-15)
    torch.testing.assert_close(lse, torch.logsumexp(x, dim=-1), rtol=0, atol=0)
    leaf = (torch.randn(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: logsumexp(t, dim=1), (leaf,))
    grad, = torch.autograd.grad(logsumexp(leaf, dim=1).sum(), [leaf])
    torch.testing.assert_close(grad, torch.softmax(leaf.detach(), dim=1), rtol=0, atol=1e-15)
