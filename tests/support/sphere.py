"""Sphere helpers for the tests: a quadrature grid, an independent lat/lon -> xyz and haversine, and
stand-in partitions with known cells (a real tiling, checked by hand)."""

import math

import numpy as np


def fibonacci_sphere(n: int) -> np.ndarray:
    """n unit vectors on a Fibonacci lattice ([n, 3] float64); an equal-weight quadrature rule."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    r = np.sqrt(1.0 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def latlon_xyz(lat_deg, lon_deg) -> np.ndarray:
    """Unit vectors ``[..., 3]`` of degrees, written out independently of geo.geometry."""
    lat, lon = np.radians(lat_deg), np.radians(lon_deg)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def haversine_km(lat1, lon1, lat2, lon2):
    """Independent float64 reference for the great-circle distance (haversine, R = 6371.0088 km)."""
    p1, p2, dl = np.radians(lat1), np.radians(lat2), np.radians(lon2 - lon1)
    h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * 6371.0088 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))


class CubePartition:
    """Six cells = the cube faces +x, -x, +y, -y, +z, -z (area 4 pi / 6 each); a real tiling.

    With ``off_centre_mean`` the first cell's training mean is moved off its centre.
    """

    n_cells = 6

    def __init__(self, off_centre_mean: bool = False):
        self.centres_xyz = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
        self.means_xyz = self.centres_xyz.copy()
        if off_centre_mean:
            self.means_xyz[0] = [0.9, 0.1, np.sqrt(1 - 0.82)]
        self.areas_sr = np.full(6, 4 * np.pi / 6)

    def assign(self, lat_deg, lon_deg):
        xyz = latlon_xyz(np.asarray(lat_deg, float), np.asarray(lon_deg, float))
        axis = np.argmax(np.abs(xyz), axis=1)
        negative = xyz[np.arange(len(xyz)), axis] < 0
        return (2 * axis + negative).astype(np.int64)
