"""geo.sphere.s2cells against s2sphere, the independent reference: ids bit for bit, centres, areas."""

import math

import numpy as np
import pytest
import s2sphere
from s2sphere import sphere

from geo.sphere import s2cells as sc


def _s2_leaf_ids(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    return np.array([s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(a, b)).id()
                     for a, b in zip(np.asarray(lat_deg).tolist(), np.asarray(lon_deg).tolist())], dtype=np.uint64)


def _uniform_points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


def _special_points() -> tuple[np.ndarray, np.ndarray]:
    """Poles, the antimeridian, the equator, face edges and cube corners, and points a hair off them."""
    corner_lat = math.degrees(math.atan(1 / math.sqrt(2)))  # cube corners
    lat = [90, -90, 90, -90, 0, 0, 0, 0, 0, 0, 0, 0, corner_lat, -corner_lat, corner_lat, -corner_lat, 45, -45,
           45, -45, 0.0, -0.0, 89.9999999999, -89.9999999999, 1e-300, -1e-300]
    lon = [0, 0, 180, -180, 0, 45, 90, 135, 180, -180, -135, -45, 45, 135, -45, -135, 0, 90,
           180, -90, 1e-300, -0.0, 180, -180, -180, 180]
    lat, lon = np.array(lat, float), np.array(lon, float)
    # Face edges: lon = +-45, +-135 at many latitudes; lat = +-45 on the meridians; and neighbours 1 ulp away.
    grid_lat = np.linspace(-89, 89, 179)
    edge_lat = np.concatenate([grid_lat] * 4 + [np.full(8, 45.0), np.full(8, -45.0)])
    edge_lon = np.concatenate([np.full(179, v) for v in (45.0, -45.0, 135.0, -135.0)] + [np.arange(-180, 180, 45.0)] * 2)
    lat, lon = np.concatenate([lat, edge_lat]), np.concatenate([lon, edge_lon])
    lat = np.concatenate([lat, np.clip(np.nextafter(lat, 100), -90, 90), np.clip(np.nextafter(lat, -100), -90, 90)])
    lon = np.concatenate([lon, np.nextafter(lon, 200), np.nextafter(lon, -200)])
    return lat, lon


def test_lookup_tables_are_s2spheres():
    assert sc.LOOKUP_POS.tolist() == sphere.LOOKUP_POS
    assert sc.LOOKUP_IJ.tolist() == sphere.LOOKUP_IJ


def test_numpy_trig_matches_libm():
    """Bit-exact ids rely on numpy's float64 sin/cos agreeing with the C library's (what s2sphere calls)."""
    x = np.random.default_rng(0).uniform(-math.pi, math.pi, 100_000)
    assert np.array_equal(np.sin(x), [math.sin(v) for v in x.tolist()])
    assert np.array_equal(np.cos(x), [math.cos(v) for v in x.tolist()])


def test_leaf_ids_equal_s2sphere_on_100k_random_points():
    # The s2sphere loop takes ~1 s here (about 10 us per point).
    lat, lon = _uniform_points(100_000, seed=1)
    assert np.array_equal(sc.leaf_cell_ids(lat, lon), _s2_leaf_ids(lat, lon))


def test_leaf_ids_equal_s2sphere_on_special_points():
    lat, lon = _special_points()
    assert np.array_equal(sc.leaf_cell_ids(lat, lon), _s2_leaf_ids(lat, lon))


def test_leaf_ids_accept_scalars_and_lists():
    assert sc.leaf_cell_ids(48.85, 2.35).tolist() == _s2_leaf_ids([48.85], [2.35]).tolist()
    assert sc.leaf_cell_ids([48.85], [2.35]).dtype == np.uint64


def _s2_parents(leaf_ids, level) -> np.ndarray:
    """s2sphere's ancestors at ``level`` of leaf ids, uint64 [n]."""
    return np.array([s2sphere.CellId(int(i)).parent(level).id() for i in leaf_ids], dtype=np.uint64)


@pytest.mark.parametrize("level", [0, 1, 2, 7, 13, 20, 29, 30])
def test_levels_ranges_children_match_s2sphere(level):
    lat, lon = _uniform_points(300, seed=level)
    leaves = sc.leaf_cell_ids(lat, lon)
    parents = _s2_parents(leaves, level)
    assert sc.cell_levels(parents).tolist() == [level] * len(parents)
    assert sc.range_min(parents).tolist() == [s2sphere.CellId(int(i)).range_min().id() for i in parents]
    if level < 30:
        children = sc.child_ids(parents[:50])
        assert children.tolist() == [[c.id() for c in s2sphere.CellId(int(i)).children()] for i in parents[:50]]


def test_face_cells_match_s2sphere():
    assert sc.face_cell_ids().tolist() == [s2sphere.CellId.from_face_pos_level(f, 0, 0).id() for f in range(6)]


@pytest.mark.parametrize("level", [0, 1, 4, 10, 17, 24, 30])
def test_centres_bit_exact_and_areas_close_to_s2sphere(level):
    lat, lon = _special_points()
    rng = np.random.default_rng(level)
    pick = rng.choice(lat.size, 150, replace=False)
    ids = _s2_parents(sc.leaf_cell_ids(lat[pick], lon[pick]), level)
    cells = [s2sphere.Cell(s2sphere.CellId(int(i))) for i in ids]
    centres = np.array([[c.get_center()[k] for k in range(3)] for c in cells])
    assert np.array_equal(sc.cell_centres_xyz(ids), centres)
    vertices = np.array([[[c.get_vertex(v)[k] for k in range(3)] for v in range(4)] for c in cells])
    assert np.array_equal(sc.cell_vertices_xyz(ids), vertices)
    areas = np.array([c.exact_area() for c in cells])
    # Different float64 triangle formulas: both lose digits as cells shrink (s2sphere promises 6 at level 30).
    rtol = 1e-12 if level <= 10 else 1e-9 if level <= 20 else 1e-6
    np.testing.assert_allclose(sc.cell_areas_sr(ids), areas, rtol=rtol)


def test_areas_of_a_complete_level_sum_to_4pi():
    ids = sc.child_ids(sc.child_ids(sc.face_cell_ids()).ravel()).ravel()  # all 96 level-2 cells
    assert sc.cell_areas_sr(ids).sum() == pytest.approx(4 * math.pi, rel=1e-14)
    assert sc.cell_areas_sr(sc.face_cell_ids()) == pytest.approx(np.full(6, 4 * math.pi / 6), rel=1e-14)
