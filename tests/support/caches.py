"""Synthetic feature caches for the tests.

- ``make_rows`` / ``write_cache`` / ``write_blocks``: tiny caches (n in the hundreds, d <= 64)
  written block by block, and ``file_content`` / ``assert_same_content`` to compare files
  (the cache tests);
- ``make_location_cache``: a cache whose features carry the location (around 12 cities),
  for training, sweeps, reports and predict.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

from geo.cache.store import CacheWriter
from geo.geometry import latlon_to_xyz, xyz_to_latlon

COUNTRIES = ["FR", "US", "JP", "XX"]
PROVENANCE = {"backbone": "wide_resnet50_2", "weights": "ab12" * 16, "image_size": 224,
              "transform": "resize 256, centre crop 224, imagenet normalise", "manifest_sha256": "cd34" * 16}


@dataclass
class Rows:
    """The input of a cache: what the reader must give back."""

    features: np.ndarray  # float32 [n, d]
    ids: list
    lat_deg: np.ndarray
    lon_deg: np.ndarray
    split: np.ndarray
    country: np.ndarray
    skipped: list  # per block: list of (id, reason)


def make_rows(n=300, d=16, seed=0, n_blocks=5) -> Rows:
    rng = np.random.default_rng(seed)
    return Rows(
        features=rng.normal(size=(n, d)).astype(np.float32),
        ids=[f"img/{seed}/{i:05d}.jpg" for i in range(n)],
        lat_deg=rng.uniform(-90, 90, n),
        lon_deg=rng.uniform(-180, 180, n),
        split=rng.choice(3, size=n, p=[0.7, 0.15, 0.15]).astype(np.uint8),
        country=rng.integers(0, len(COUNTRIES), n).astype(np.int16),
        skipped=[[(f"bad/{b}.jpg", "cannot identify image file")] if b % 2 else [] for b in range(n_blocks)],
    )


def block_bounds(n, n_blocks):
    edges = np.linspace(0, n, n_blocks + 1).astype(int)
    return list(zip(edges[:-1], edges[1:]))


def write_blocks(writer: CacheWriter, rows: Rows, blocks):
    """Write the given block indices of rows (blocks as in block_bounds(n, len(rows.skipped)))."""
    bounds = block_bounds(len(rows.ids), len(rows.skipped))
    for b in blocks:
        lo, hi = bounds[b]
        writer.write_block(features=rows.features[lo:hi], ids=rows.ids[lo:hi], lat_deg=rows.lat_deg[lo:hi],
                           lon_deg=rows.lon_deg[lo:hi], split=rows.split[lo:hi], country=rows.country[lo:hi],
                           skipped=rows.skipped[b])


def write_cache(path, rows: Rows, **kw):
    """A complete cache of rows, written in len(rows.skipped) blocks; returns its path."""
    d = rows.features.shape[1]
    with CacheWriter(path, feature_dim=d, countries=COUNTRIES, provenance=PROVENANCE, **kw) as w:
        write_blocks(w, rows, range(len(rows.skipped)))
        return w.finalize()


def file_content(path) -> dict:
    """Every dataset and root attribute of an HDF5 file, read with h5py alone (``created`` left out)."""
    out = {}
    with h5py.File(path, "r") as f:
        for name, ds in f.items():
            out[name] = ds[()]
            out.update({f"{name}@{k}": np.asarray(v).tolist() for k, v in ds.attrs.items()})
        out.update({f"@{k}": np.asarray(v).tolist() for k, v in f.attrs.items() if k != "created"})
    return out


def assert_same_content(a, b):
    ca, cb = file_content(a), file_content(b)
    assert sorted(ca) == sorted(cb)
    for key in ca:
        if isinstance(ca[key], np.ndarray) and ca[key].dtype.names:
            assert ca[key].tolist() == cb[key].tolist(), key
        else:
            np.testing.assert_array_equal(ca[key], cb[key], err_msg=key)


CITIES = [(48.86, 2.35), (40.71, -74.0), (-33.87, 151.21), (35.68, 139.69), (-23.55, -46.63), (55.75, 37.62),
          (1.35, 103.82), (-1.29, 36.82), (19.43, -99.13), (64.15, -21.94), (-34.6, -58.38), (28.61, 77.21)]
CODES = ["FR", "US", "AU", "JP", "BR", "RU", "SG", "KE", "MX", "IS", "AR", "IN"]


def make_location_cache(path, *, n=3000, d=32, seed=0, splits=(0, 1, 2), provenance=None):
    """A cache of ``n`` rows scattered ~100 km around 12 cities; features = 3 * P y_city + N(0, 1).

    The features identify the city (not the point within it), like a real
    backbone that recognises a region. ``splits`` are the split codes drawn
    (70/15/15 of train/val/test when all three are present).
    """
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



def make_held_out_cache(path, *, n_train=1500, n_test=300, d=32, seed=0, exclusion_km=500.0):
    """A cache like ``make_location_cache`` whose test rows all lie >= ``exclusion_km`` from every train row.

    Train and val rows scatter ~100 km around the 12 cities; test rows lie 600-1200 km from a city
    centre in a random direction (features: that city's, as a backbone would see its region), and any
    within ``exclusion_km`` of a train row (brute-force haversine) is dropped. Returns (path, the
    smallest test-to-train distance in km, by brute force).
    """
    rng = np.random.default_rng(seed)
    centre = latlon_to_xyz(*np.array(CITIES).T)
    n_near = n_train + n_train // 5
    city = rng.integers(len(CITIES), size=n_near + n_test)
    y = centre[city] + rng.normal(scale=100 / 6371, size=(len(city), 3))
    # test rows: rotate the city centre by 600-1200 km towards a random tangent direction
    tangent = np.cross(centre[city[n_near:]], rng.normal(size=(n_test, 3)))
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    angle = rng.uniform(600, 1200, n_test)[:, None] / 6371.0088
    y[n_near:] = centre[city[n_near:]] * np.cos(angle) + tangent * np.sin(angle)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    lat, lon = xyz_to_latlon(y)
    lon = np.where(lon >= 180, lon - 360, lon)
    split = np.concatenate([np.zeros(n_train, np.uint8), np.ones(n_near - n_train, np.uint8),
                            np.full(n_test, 2, np.uint8)])
    cos_arc = np.clip(y[split == 2] @ y[split == 0].T, -1, 1)
    nearest_km = np.arccos(cos_arc.max(axis=1)) * 6371.0088
    keep = np.ones(len(split), bool)
    keep[np.flatnonzero(split == 2)[nearest_km < exclusion_km]] = False
    projection = rng.normal(size=(3, d))
    features = (3 * centre[city] @ projection + rng.normal(size=(len(city), d))).astype(np.float16)
    with CacheWriter(path, feature_dim=d, countries=CODES, provenance={"backbone": "synthetic"}) as w:
        w.write_block(features=features[keep], ids=[f"img{i:05d}" for i in np.flatnonzero(keep)],
                      lat_deg=lat[keep], lon_deg=lon[keep], split=split[keep], country=city[keep].astype(np.int16))
        w.finalize()
    return path, float(nearest_km[nearest_km >= exclusion_km].min())
