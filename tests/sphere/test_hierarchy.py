"""Coarser partitions derived from a fine one equal Partition.build with fewer cells, and nest."""

from __future__ import annotations

import numpy as np
import pytest

from geo.geometry import xyz_to_latlon
from geo.sphere.hierarchy import coarser_cells, reachable_cells
from geo.sphere.partition import Partition


def _points(n=6000, seed=0):
    rng = np.random.default_rng(seed)
    lat = np.clip(rng.normal(30, 20, n), -89, 89)
    lon = (rng.normal(10, 50, n) + 180) % 360 - 180
    return lat, lon


@pytest.mark.parametrize("n_fine, n_coarse", [(256, 64), (256, 16), (100, 6), (257, 63)])
def test_coarser_cells_are_partition_build_with_fewer_cells(n_fine, n_coarse):
    lat, lon = _points()
    fine = Partition.build(lat, lon, n_fine)
    index, n = coarser_cells(fine, n_coarse)
    assert n == reachable_cells(n_coarse) and (n - 6) % 3 == 0 and n <= n_coarse
    reference = Partition.build(lat, lon, n)  # built from the points, independently
    # nested: every fine cell's centre and every training point of it lie in its coarse cell
    np.testing.assert_array_equal(index, reference.assign(*xyz_to_latlon(fine.centres_xyz)))
    np.testing.assert_array_equal(index[fine.assign(lat, lon)], reference.assign(lat, lon))
    np.testing.assert_array_equal(np.bincount(index, weights=fine.counts, minlength=n), reference.counts)


def test_reachable_cells():
    assert [reachable_cells(c) for c in (6, 7, 8, 9, 64, 1024)] == [6, 6, 6, 9, 63, 1023]
    assert reachable_cells(2) == 6
