"""The densest-cell baseline against a hand-made cache whose answer is known."""

import numpy as np
import pytest

from geo.cache.store import CacheWriter
from geo.geometry import great_circle_km
from geo.reports.baseline import densest_cell_baseline


def test_baseline_predicts_the_densest_cluster(tmp_path):
    rng = np.random.default_rng(0)
    # 300 train points tightly around Paris, 30 around Sydney; test: 10 in Paris, 10 in Sydney
    lat = np.concatenate([48.85 + rng.normal(0, 0.01, 300), -33.87 + rng.normal(0, 0.01, 30), [48.85] * 10, [-33.87] * 10])
    lon = np.concatenate([2.35 + rng.normal(0, 0.01, 300), 151.2 + rng.normal(0, 0.01, 30), [2.35] * 10, [151.2] * 10])
    split = np.array([0] * 330 + [2] * 20, dtype=np.uint8)
    split[:5] = 1  # a val split, as caches have
    n = len(lat)
    path = tmp_path / "c.h5"
    with CacheWriter(path, feature_dim=4, countries=["FR", "AU"], provenance={"backbone": "test"}) as w:
        w.write_block(features=np.zeros((n, 4), np.float32), ids=[f"r{i}" for i in range(n)], lat_deg=lat, lon_deg=lon,
                      split=split, country=np.zeros(n, np.int16))
        w.finalize()
    result = densest_cell_baseline(path, [16])[16]
    # half the test images (Paris) lie within a few km of the prediction, the other half ~17,000 km away
    assert result["acc@25km"] == pytest.approx(0.5)
    assert result["acc@2500km"] == pytest.approx(0.5)
    assert result["mean_km"] == pytest.approx(0.5 * great_circle_km(48.85, 2.35, -33.87, 151.2), rel=1e-3)
