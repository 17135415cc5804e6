"""Helpers for the training tests (test_train.py, test_cli_fit_head.py): a small generated
cache whose features carry location, and a stand-in partition while the real one is missing.

A plain module, not a conftest, so nothing here touches the other heads' tests.
"""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np

from geo.geometry import latlon_to_xyz, xyz_to_latlon

CITIES = [(48.86, 2.35), (40.71, -74.0), (-33.87, 151.21), (35.68, 139.69), (-23.55, -46.63), (55.75, 37.62),
          (1.35, 103.82), (-1.29, 36.82), (19.43, -99.13), (64.15, -21.94), (-34.6, -58.38), (28.61, 77.21)]
CODES = ["FR", "US", "AU", "JP", "BR", "RU", "SG", "KE", "MX", "IS", "AR", "IN"]


def _grid_partition_module() -> types.ModuleType:
    """A stand-in ``geo.heads.partition`` (lat/lon grid cells) for when the real one has not landed."""
    import torch

    class Partition:
        def __init__(self, n_lat, n_lon, means_xyz, counts):
            self.n_lat, self.n_lon = n_lat, n_lon
            lat_edges = np.linspace(-90, 90, n_lat + 1)
            lon_edges = np.linspace(-180, 180, n_lon + 1)
            lat_c = (lat_edges[:-1] + lat_edges[1:]) / 2
            lon_c = (lon_edges[:-1] + lon_edges[1:]) / 2
            la, lo = np.meshgrid(lat_c, lon_c, indexing="ij")
            self.centres_xyz = latlon_to_xyz(la.ravel(), lo.ravel())
            band = np.diff(np.sin(np.deg2rad(lat_edges)))
            self.areas_sr = np.repeat(band, n_lon) * (2 * np.pi / n_lon)
            self.cell_ids = np.arange(n_lat * n_lon, dtype=np.uint64)
            self.levels = np.zeros(n_lat * n_lon, np.int64)
            self.means_xyz, self.counts = means_xyz, counts

        @property
        def n_cells(self):
            return self.n_lat * self.n_lon

        def assign(self, lat_deg, lon_deg):
            i = np.clip(((np.asarray(lat_deg) + 90) / 180 * self.n_lat).astype(np.int64), 0, self.n_lat - 1)
            j = np.clip(((np.asarray(lon_deg) + 180) / 360 * self.n_lon).astype(np.int64), 0, self.n_lon - 1)
            return i * self.n_lon + j

        @classmethod
        def build(cls, lat_deg, lon_deg, n_cells):
            from geo.errors import ConfigError

            if n_cells > len(lat_deg):
                raise ConfigError(f"n_cells {n_cells} > {len(lat_deg)} training points")
            n_lat = max(1, int(np.sqrt(n_cells / 2)))
            p = cls(n_lat, n_cells // n_lat, None, None)
            cell = p.assign(lat_deg, lon_deg)
            sums = np.zeros((p.n_cells, 3))
            np.add.at(sums, cell, latlon_to_xyz(lat_deg, lon_deg))
            p.counts = np.bincount(cell, minlength=p.n_cells)
            norm = np.linalg.norm(sums, axis=1, keepdims=True)
            p.means_xyz = np.where(norm > 0, sums / np.maximum(norm, 1e-300), p.centres_xyz)
            return p

        def state_dict(self):
            return {"shape": torch.tensor([self.n_lat, self.n_lon]), "means_xyz": torch.from_numpy(self.means_xyz),
                    "counts": torch.from_numpy(self.counts)}

        @classmethod
        def from_state_dict(cls, d):
            n_lat, n_lon = (int(v) for v in d["shape"])
            return cls(n_lat, n_lon, d["means_xyz"].numpy(), d["counts"].numpy())

    mod = types.ModuleType("geo.heads.partition")
    mod.Partition = Partition
    return mod


def ensure_partition(monkeypatch):
    """Use the real ``geo.heads.partition``; a private grid stand-in only while it is missing."""
    try:
        importlib.import_module("geo.heads.partition")
    except ModuleNotFoundError:
        monkeypatch.setitem(sys.modules, "geo.heads.partition", _grid_partition_module())


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

