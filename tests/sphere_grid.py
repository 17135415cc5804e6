"""Quadrature on the sphere for the tests: nearly uniform points, each standing for 4 pi / n steradians."""

import math

import numpy as np


def fibonacci_sphere(n: int) -> np.ndarray:
    """n unit vectors on a Fibonacci lattice ([n, 3] float64); an equal-weight quadrature rule."""
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    r = np.sqrt(1.0 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)
