"""Helpers for the training tests (test_train.py, test_cli_fit_head.py): a small generated
cache whose features carry location.

A plain module, not a conftest, so nothing here touches the other heads' tests.
"""

from __future__ import annotations

import numpy as np

from geo.geometry import latlon_to_xyz, xyz_to_latlon

CITIES = [(48.86, 2.35), (40.71, -74.0), (-33.87, 151.21), (35.68, 139.69), (-23.55, -46.63), (55.75, 37.62),
          (1.35, 103.82), (-1.29, 36.82), (19.43, -99.13), (64.15, -21.94), (-34.6, -58.38), (28.61, 77.21)]
CODES = ["FR", "US", "AU", "JP", "BR", "RU", "SG", "KE", "MX", "IS", "AR", "IN"]


def make_location_cache(path, *, n=3000, d=32, seed=0, splits=(0, 1, 2), provenance=None):
    """A cache of ``n`` rows scattered ~100 km around 12 cities; features = 3 * P y_city + N(0, 1).

    The features identify the city (not the point within it), like a real
    backbone that recognises a region. ``splits`` are the split codes drawn
    (70/15/15 of train/val/test when all three are present).
    """
    from geo.cache.store import CacheWriter

    rng = np.random.default_rng(seed)
    city = rng.integers(len(CITIES), size=n)
    centre = latlon_to_xyz(*np.array(CITIES).T)
    y = centre[city] + rng.normal(scale=100 / 6371, size=(n, 3))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    lat, lon = xyz_to_latlon(y)
    lon = np.where(lon >= 180, lon - 360, lon)
    projection = rng.normal(size=(3, d))
    features = (3 * centre[city] @ projection + rng.normal(size=(n, d))).astype(np.float16)
    probs = np.array([0.7, 0.15, 0.15])[list(splits)]
    split = rng.choice(np.array(splits, np.uint8), size=n, p=probs / probs.sum())
    with CacheWriter(path, feature_dim=d, countries=CODES, provenance=provenance or {"backbone": "synthetic"}) as w:
        w.write_block(features=features, ids=[f"img{i:05d}" for i in range(n)], lat_deg=lat, lon_deg=lon,
                      split=split, country=city.astype(np.int16))
        w.finalize()
    return path

