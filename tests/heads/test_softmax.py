"""Softmax (PlaNet) head: cross-entropy, density per steradian, predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geo.errors import ConfigError
from geo.heads import create_head
from geo.sphere.partition import Partition
from support.sphere import CubePartition, fibonacci_sphere, latlon_xyz


class CapPartition:
    """Two cells of unequal area: the polar cap z > 0.5 (pi sr) and the rest (3 pi sr)."""

    centres_xyz = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    means_xyz = centres_xyz
    areas_sr = np.array([np.pi, 3 * np.pi])
    n_cells = 2

    def assign(self, lat_deg, lon_deg):
        return np.where(np.asarray(lat_deg) > 30.0, 0, 1).astype(np.int64)


def random_batch(seed=0, batch=32, d=8):
    rng = np.random.default_rng(seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, batch)))
    lon = rng.uniform(-180, 180, batch)
    return torch.from_numpy(rng.normal(size=(batch, d))).float(), lat, lon


def test_loss_equals_torch_cross_entropy():
    part = CubePartition(off_centre_mean=True)
    head = create_head("softmax", feature_dim=8, partition=part)
    x, lat, lon = random_batch()
    logits = head(x)
    target = torch.from_numpy(part.assign(lat, lon))
    ref = F.cross_entropy(logits, target)
    y = torch.from_numpy(latlon_xyz(lat, lon)).float()
    torch.testing.assert_close(head.loss(logits, y), ref)
    torch.testing.assert_close(head.loss(logits, y, target_cell=target), ref)
    torch.testing.assert_close(head.loss(logits, target_cell=target), ref)
    # and against a numpy log-softmax
    lg = logits.detach().double().numpy()
    np_ref = -np.mean(lg[np.arange(len(lg)), target.numpy()] - np.log(np.exp(lg).sum(1)))
    assert head.loss(logits, y).item() == pytest.approx(np_ref, rel=1e-6)


def test_log_density_is_probability_over_area():
    part = CapPartition()
    head = create_head("softmax", feature_dim=8, partition=part)
    x, lat, lon = random_batch(1)
    logits = head(x)
    y = torch.from_numpy(latlon_xyz(lat, lon))
    probs = torch.softmax(logits, -1).detach().double().numpy()
    cells = part.assign(lat, lon)
    ref = np.log(probs[np.arange(len(cells)), cells]) - np.log(part.areas_sr[cells])
    np.testing.assert_allclose(head.log_density_at(logits, y).detach().numpy(), ref, rtol=1e-5, atol=1e-6)
    grid = head.log_density(logits, y)
    np.testing.assert_allclose(np.diag(grid.detach().numpy()), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("partition", [CubePartition(off_centre_mean=True), CapPartition()], ids=["cube", "cap"])
def test_density_integrates_to_one(partition):
    head = create_head("softmax", feature_dim=8, partition=partition).double()
    x, _, _ = random_batch(2, batch=4)
    grid = torch.from_numpy(fibonacci_sphere(100_000))
    integral = torch.exp(head.log_density(head(x.double()), grid)).sum(1) * (4 * math.pi / len(grid))
    # piecewise-constant integrand: the quadrature error comes from the cell edges only
    np.testing.assert_allclose(integral.detach().numpy(), 1.0, atol=2e-3)


def test_predict_centre_mean_and_density_mode():
    head = create_head("softmax", feature_dim=2, partition=CubePartition(off_centre_mean=True))
    logits = torch.tensor([[3.0, 0.0, 1.0, 0.0, 2.0, 0.0]])
    lat, lon = head.predict(logits, k=3)  # PlaNet: cells +x, +z, +y at their centres
    np.testing.assert_allclose(lat.numpy(), [[0.0, 90.0, 0.0]], atol=1e-9)
    np.testing.assert_allclose(lon.numpy()[0, [0, 2]], [0.0, 90.0], atol=1e-9)
    lat_m, lon_m = head.predict(logits, k=1, mode="mean")
    mean = CubePartition(off_centre_mean=True).means_xyz[0]
    assert lat_m.item() == pytest.approx(np.degrees(np.arcsin(mean[2])))
    assert lon_m.item() == pytest.approx(np.degrees(np.arctan2(mean[1], mean[0])))
    at_mean = create_head("softmax", feature_dim=2, partition=CubePartition(off_centre_mean=True), predict_at="mean")
    assert at_mean.predict(logits)[0].item() == pytest.approx(lat_m.item())
    # unequal areas: the cap holds less probability but more per steradian
    cap = create_head("softmax", feature_dim=2, partition=CapPartition())
    logits = torch.log(torch.tensor([[0.4, 0.6]]))
    assert cap.predict(logits, mode="argmax")[0].item() == pytest.approx(-90.0)
    assert cap.predict(logits, mode="mode")[0].item() == pytest.approx(90.0)
    with pytest.raises(ConfigError, match="predict mode"):
        cap.predict(logits, mode="median")


def test_options_and_bad_input():
    head = create_head("softmax", feature_dim=3, partition=CubePartition(off_centre_mean=True), predict_at="mean")
    assert head.options == {"predict_at": "mean", "label_smoothing_km": 0.0, "matmul_dtype": None}
    with pytest.raises(ConfigError, match="predict_at"):
        create_head("softmax", feature_dim=3, partition=CubePartition(off_centre_mean=True), predict_at="middle")
    with pytest.raises(ConfigError, match="k must be"):
        head.predict(torch.zeros(1, 6), k=7)


def test_real_partition_cells_and_density():
    rng = np.random.default_rng(3)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, 2000)))
    lon = rng.uniform(-180, 180, 2000)
    part = Partition.build(lat, lon, 20)
    head = create_head("softmax", feature_dim=4, partition=part).double()
    logits = head(torch.from_numpy(rng.normal(size=(3, 4))))
    y = torch.from_numpy(latlon_xyz(lat[:3], lon[:3]))
    cells = torch.from_numpy(part.assign(lat[:3], lon[:3]))
    torch.testing.assert_close(head.loss(logits, y), F.cross_entropy(logits, cells))
    grid = torch.from_numpy(fibonacci_sphere(100_000))
    integral = torch.exp(head.log_density(logits, grid)).sum(1) * (4 * math.pi / len(grid))
    np.testing.assert_allclose(integral.detach().numpy(), 1.0, atol=5e-3)


# ---- haversine label smoothing (PIGEON) ---------------------------------------------------


def test_label_smoothing_target_and_loss_match_a_float64_haversine_reference():
    from support.sphere import haversine_km

    part = Partition.build(*_scattered_latlon(3000, seed=2), 24)
    tau_km = 300.0
    head = create_head("softmax", feature_dim=8, partition=part, label_smoothing_km=tau_km)
    assert head.options["label_smoothing_km"] == tau_km
    x, lat, lon = random_batch(seed=4)
    y = torch.from_numpy(latlon_xyz(lat, lon))
    centres = head.centres_xyz.double().numpy()  # the head's cell centres (float32 buffers, ~0.4 m)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    c_lat, c_lon = np.degrees(np.arcsin(centres[:, 2])), np.degrees(np.arctan2(centres[:, 1], centres[:, 0]))
    true = part.assign(lat, lon)
    dist = haversine_km(lat[:, None], lon[:, None], c_lat[None], c_lon[None])     # [B, c]
    weights = np.exp(-(dist - dist[np.arange(len(lat)), true][:, None]) / tau_km)  # the formula
    q_ref = weights / weights.sum(1, keepdims=True)
    np.testing.assert_allclose(head.smoothed_target(y).numpy(), q_ref, rtol=1e-9, atol=1e-12)
    logits = head(x)
    lg = logits.detach().double().numpy()
    log_p = lg - np.log(np.exp(lg).sum(1, keepdims=True))
    assert head.loss(logits, y.float()).item() == pytest.approx(-np.mean((q_ref * log_p).sum(1)), rel=1e-5)
    head.loss(logits, y.float()).backward()
    assert torch.isfinite(head.linear.weight.grad).all()


def test_label_smoothing_zero_and_its_limit_are_cross_entropy():
    part = CubePartition()  # the face holding a point is the face whose centre is nearest it
    x, lat, lon = random_batch(seed=5)
    y = torch.from_numpy(latlon_xyz(lat, lon)).float()
    target = torch.from_numpy(part.assign(lat, lon))
    plain = create_head("softmax", feature_dim=8, partition=part)
    for tau_km in (0.0, 1e-3):
        head = create_head("softmax", feature_dim=8, partition=part, label_smoothing_km=tau_km)
        head.load_state_dict(plain.state_dict())
        logits = head(x)
        torch.testing.assert_close(head.loss(logits, y), F.cross_entropy(logits, target))
    with pytest.raises(ConfigError, match="label_smoothing_km"):
        create_head("softmax", feature_dim=8, partition=part, label_smoothing_km=-1.0)


def _scattered_latlon(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)
