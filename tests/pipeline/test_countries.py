"""Country labels on places whose country is known (the reference is the table below)."""

import numpy as np
import pytest

from geo.errors import GeoError
from geo.pipeline.countries import (NO_COUNTRY, _gazetteer, country_codes, country_index,
                                    country_name, nearest_place)

# (name, lat_deg, lon_deg, expected code)
KNOWN_PLACES = [
    ("Paris", 48.8566, 2.3522, "FR"), ("Reykjavik", 64.1466, -21.9426, "IS"),
    ("London", 51.5074, -0.1278, "GB"), ("Berlin", 52.52, 13.405, "DE"),
    ("Madrid", 40.4168, -3.7038, "ES"), ("Lisbon", 38.7223, -9.1393, "PT"),
    ("Oslo", 59.9139, 10.7522, "NO"), ("Helsinki", 60.1699, 24.9384, "FI"),
    ("Athens", 37.9838, 23.7275, "GR"), ("Istanbul", 41.0082, 28.9784, "TR"),
    ("Cairo", 30.0444, 31.2357, "EG"), ("Nairobi", -1.2921, 36.8219, "KE"),
    ("Cape Town", -33.9249, 18.4241, "ZA"), ("Lagos", 6.5244, 3.3792, "NG"),
    ("Moscow", 55.7558, 37.6173, "RU"), ("Tehran", 35.6892, 51.389, "IR"),
    ("Delhi", 28.6139, 77.209, "IN"), ("Beijing", 39.9042, 116.4074, "CN"),
    ("Tokyo", 35.6762, 139.6503, "JP"), ("Seoul", 37.5665, 126.978, "KR"),
    ("Bangkok", 13.7563, 100.5018, "TH"), ("Jakarta", -6.2088, 106.8456, "ID"),
    ("Sydney", -33.8688, 151.2093, "AU"), ("Wellington", -41.2865, 174.7762, "NZ"),
    ("New York", 40.7128, -74.006, "US"), ("Honolulu", 21.3069, -157.8583, "US"),
    ("Anchorage", 61.2181, -149.9003, "US"), ("Toronto", 43.6532, -79.3832, "CA"),
    ("Mexico City", 19.4326, -99.1332, "MX"), ("Bogota", 4.711, -74.0721, "CO"),
    ("Lima", -12.0464, -77.0428, "PE"), ("Buenos Aires", -34.6037, -58.3816, "AR"),
    ("Rio de Janeiro", -22.9068, -43.1729, "BR"), ("Suva", -18.1248, 178.4501, "FJ"),
    ("Nuuk", 64.1814, -51.6941, "GL"), ("Longyearbyen", 78.2232, 15.6267, "SJ"),
    # interior land far from any GeoNames place still gets its country
    ("Greenland ice sheet", 72.0, -40.0, "GL"), ("Libyan desert", 24.5, 17.5, "LY"),
    # both sides of a border
    ("Strasbourg", 48.5734, 7.7521, "FR"), ("Kehl", 48.5720, 7.8150, "DE"),
    ("El Paso", 31.7619, -106.4850, "US"), ("Ciudad Juarez", 31.6904, -106.4245, "MX"),
    ("Detroit", 42.3314, -83.0458, "US"), ("Windsor", 42.30, -83.03, "CA"),
    ("Basel", 47.5596, 7.5886, "CH"), ("Saint-Louis (Haut-Rhin)", 47.5903, 7.5600, "FR"),
    # no country: open sea and Antarctica
    ("mid-Pacific", 0.0, -150.0, NO_COUNTRY), ("North Atlantic", 40.0, -40.0, NO_COUNTRY),
    ("Indian Ocean", -30.0, 80.0, NO_COUNTRY), ("South Pole", -90.0, 0.0, NO_COUNTRY),
    ("McMurdo Station", -77.846, 166.676, NO_COUNTRY), ("Antarctic Peninsula", -64.8, -62.9, NO_COUNTRY),
]


@pytest.mark.parametrize("name, lat, lon, expected", KNOWN_PLACES, ids=[p[0] for p in KNOWN_PLACES])
def test_known_place(name, lat, lon, expected):
    assert country_codes(lat, lon).tolist() == [expected]


def test_vectorised_matches_one_by_one():
    lat = np.array([p[1] for p in KNOWN_PLACES])
    lon = np.array([p[2] for p in KNOWN_PLACES])
    assert country_codes(lat, lon).tolist() == [p[3] for p in KNOWN_PLACES]


def test_100k_points_vectorised_and_consistent():
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(100_000, 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    lat, lon = np.rad2deg(np.arcsin(xyz[:, 2])), np.rad2deg(np.arctan2(xyz[:, 1], xyz[:, 0]))
    codes = country_codes(lat, lon)
    assert codes.shape == (100_000,) and codes.dtype == np.dtype("<U2")
    assert set(codes.tolist()) <= set(_gazetteer().codes.tolist()) | {NO_COUNTRY}
    assert (codes[lat < -60] == NO_COUNTRY).all()
    # About 71 % of the sphere is sea; with the 25 km coast rule most of it is "XX".
    assert 0.6 < (codes == NO_COUNTRY).mean() < 0.8
    # Land far from the Antarctic: the label is the nearest place's country.
    nearest, dist_km = nearest_place(lat, lon)
    labelled = codes != NO_COUNTRY
    assert (codes[labelled] == nearest[labelled]).all()


def test_nearest_place_agrees_with_brute_force_haversine():
    # Reference: float64 haversine from each query to all 155k places, argmin.
    from geo.pipeline.countries import _gazetteer

    gaz = _gazetteer()
    place_xyz = gaz.tree.data
    place_lat = np.arcsin(np.clip(place_xyz[:, 2], -1, 1))
    place_lon = np.arctan2(place_xyz[:, 1], place_xyz[:, 0])
    query = np.array([[48.8566, 2.3522], [-45.0, 170.0], [10.0, -140.0], [72.0, -40.0], [-89.0, 60.0]])
    codes, dist_km = nearest_place(query[:, 0], query[:, 1])
    for (lat, lon), code, dist in zip(np.deg2rad(query), codes, dist_km):
        h = (np.sin((place_lat - lat) / 2) ** 2
             + np.cos(lat) * np.cos(place_lat) * np.sin((place_lon - lon) / 2) ** 2)
        brute_km = 2 * 6371.0088 * np.arcsin(np.sqrt(h))
        best = int(np.argmin(brute_km))
        assert dist == pytest.approx(brute_km[best], abs=1e-6)
        assert code == gaz.codes[best]


def test_country_names():
    assert country_name("FR") == "France" and country_name(NO_COUNTRY) == "no country"


def test_country_index_roundtrip_and_unknown():
    countries = ["DE", "FR", "XX"]
    index = country_index(np.array(["FR", "XX", "DE", "FR"]), countries)
    assert index.dtype == np.int16 and index.tolist() == [1, 2, 0, 1]
    with pytest.raises(GeoError, match="IS"):
        country_index(["FR", "IS"], countries)


def test_bad_input():
    with pytest.raises(ValueError):
        country_codes([np.nan], [0.0])
    with pytest.raises(ValueError):
        country_codes([91.0], [0.0])
    assert country_codes([], []).shape == (0,)
