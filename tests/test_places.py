"""Nearest named place, against a brute-force great-circle search over the same GeoNames data."""

from __future__ import annotations

import numpy as np
import pytest

from geo.geometry import great_circle_km
from geo.places import load_places, nearest_places


def test_nearest_place_matches_brute_force():
    gaz = load_places()
    lat_all, lon_all = np.degrees(np.arcsin(gaz.tree.data[:, 2])), np.degrees(np.arctan2(gaz.tree.data[:, 1],
                                                                                         gaz.tree.data[:, 0]))
    rng = np.random.default_rng(0)
    lat = rng.uniform(-60, 70, 5)
    lon = np.append(rng.uniform(-180, 180, 4), 179.99)  # and one at the antimeridian seam
    for place, la, lo in zip(nearest_places(lat, lon), lat, lon):
        dist = great_circle_km(la, lo, lat_all, lon_all)
        i = int(np.argmin(dist))
        assert place.name == gaz.names[i] and place.dist_km == pytest.approx(dist[i], abs=1e-6)


def test_known_places():
    paris, sydney = nearest_places([48.8566, -33.8688], [2.3522, 151.2093])
    assert (paris.name, paris.country_code) == ("Paris", "FR") and paris.dist_km < 5
    assert sydney.country_code == "AU" and "Sydney" in sydney.describe()
