"""geo.sphere.partition: the densest-first S2 partition, checked against a plain s2sphere implementation."""

import bisect
import heapq
import math

import numpy as np
import pytest
import s2sphere
import torch

from geo.errors import ConfigError
from geo.sphere.partition import Partition


def _clustered(n: int, seed: int, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, 3))
    p = centres[rng.integers(0, k, n)]
    p = p / np.linalg.norm(p, axis=1, keepdims=True) + rng.normal(size=(n, 3)) * 10 ** rng.uniform(-4, -1, (n, 1))
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    return np.degrees(np.arcsin(p[:, 2])), np.degrees(np.arctan2(p[:, 1], p[:, 0]))


def _s2_leaf(lat: float, lon: float) -> s2sphere.CellId:
    return s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(lat, lon))


def _reference_partition(lat, lon, n_cells):
    """The rule written out plainly with s2sphere objects: {piece id: owner id}."""
    leaves = sorted(_s2_leaf(a, b).id() for a, b in zip(np.asarray(lat).tolist(), np.asarray(lon).tolist()))

    def count(cell):
        return bisect.bisect_right(leaves, cell.range_max().id()) - bisect.bisect_left(leaves, cell.range_min().id())

    heap = [(-count(c), c.id()) for c in (s2sphere.CellId.from_face_pos_level(f, 0, 0) for f in range(6))]
    heapq.heapify(heap)
    owner, n_now = {}, 6
    while n_now < n_cells:
        _, cid = heapq.heappop(heap)
        cell = s2sphere.CellId(cid)
        if cell.is_leaf():
            owner[cid] = cid
            continue
        children = sorted((-count(ch), ch.id()) for ch in cell.children())
        need = n_cells - n_now
        keep = children if need >= 3 else children[:need]
        for child in keep:
            heapq.heappush(heap, child)
        owner.update({child_id: cid for _, child_id in children[len(keep):]})
        n_now += min(need, 3)
    owner.update({cid: cid for _, cid in heap})
    return owner


@pytest.mark.parametrize("n_points, n_cells, seed", [(2000, 6, 0), (2000, 7, 1), (2000, 8, 2), (2000, 9, 3),
                                                     (2000, 64, 4), (2000, 500, 5), (3000, 2048, 6), (400, 400, 7)])
def test_matches_plain_s2sphere_implementation_and_has_exactly_c_cells(n_points, n_cells, seed):
    lat, lon = _clustered(n_points, seed)
    if seed % 2:  # coarse coordinates: many equal counts, so the tie-breaking matters
        lat, lon = np.round(lat, 1), np.round(lon, 1)
    partition = Partition.build(lat, lon, n_cells)
    expected = _reference_partition(lat, lon, n_cells)
    assert partition.n_cells == n_cells == len(set(expected.values()))
    got = dict(zip(partition.piece_ids.tolist(), partition.cell_ids[partition.piece_cells].tolist()))
    assert got == expected
    assert partition.levels.tolist() == [s2sphere.CellId(i).level() for i in partition.cell_ids.tolist()]


def test_every_point_in_exactly_one_cell_and_statistics():
    lat, lon = _clustered(3000, seed=11)
    partition = Partition.build(lat, lon, 200)  # 200 - 6 is not a multiple of 3: one remainder cell
    cell = partition.assign(lat, lon)
    pieces = [s2sphere.CellId(i) for i in partition.piece_ids.tolist()]
    for k in range(0, 3000, 7):  # brute force with s2sphere: which pieces contain the point?
        leaf = _s2_leaf(lat[k], lon[k])
        containing = [p for p, piece in enumerate(pieces) if piece.contains(leaf)]
        assert len(containing) == 1
        assert partition.piece_cells[containing[0]] == cell[k]
    assert partition.counts.sum() == 3000
    assert np.array_equal(np.bincount(cell, minlength=200), partition.counts)
    assert partition.areas_sr.sum() == pytest.approx(4 * math.pi, rel=1e-13)
    # Means: float64 recomputation from the points' unit vectors (never lat/lon averages).
    lat_r, lon_r = np.radians(lat), np.radians(lon)
    xyz = np.stack([np.cos(lat_r) * np.cos(lon_r), np.cos(lat_r) * np.sin(lon_r), np.sin(lat_r)], axis=1)
    for c in range(200):
        if partition.counts[c]:
            mean = xyz[cell == c].sum(axis=0)
            np.testing.assert_allclose(partition.means_xyz[c], mean / np.linalg.norm(mean), atol=1e-12)
        else:
            assert np.array_equal(partition.means_xyz[c], partition.centres_xyz[c])
    whole = np.bincount(partition.piece_cells, minlength=200) == 1
    for c in np.flatnonzero(whole):
        centre = s2sphere.Cell(s2sphere.CellId(int(partition.cell_ids[c]))).get_center()
        assert partition.centres_xyz[c].tolist() == [centre[0], centre[1], centre[2]]
        area = s2sphere.Cell(s2sphere.CellId(int(partition.cell_ids[c]))).exact_area()
        assert partition.areas_sr[c] == pytest.approx(area, rel=1e-9)
    assert np.allclose(np.linalg.norm(partition.centres_xyz, axis=1), 1.0)


def test_hand_made_points_split_the_densest_cell():
    paris, sydney, quito = (48.85, 2.35), (-33.87, 151.21), (-0.18, -78.47)
    lat = [paris[0]] * 5 + [paris[0] + 0.001 * k for k in range(5)] + [sydney[0]] * 4 + [quito[0]]
    lon = [paris[1]] * 5 + [paris[1]] * 5 + [sydney[1]] * 4 + [quito[1]]
    paris_leaf = _s2_leaf(*paris)
    partition = Partition.build(lat, lon, 9)  # one split: the face holding Paris (10 points)
    face_ids = [s2sphere.CellId.from_face_pos_level(f, 0, 0).id() for f in range(6)]
    split_face = paris_leaf.parent(0).id()
    expected = sorted([f for f in face_ids if f != split_face] + [c.id() for c in paris_leaf.parent(0).children()])
    assert partition.cell_ids.tolist() == expected
    # Two more splits both go down the Paris line: its level-1 cell, then its level-2 cell.
    partition = Partition.build(lat, lon, 15)
    ids = partition.cell_ids.tolist()
    assert paris_leaf.parent(3).id() in ids and paris_leaf.parent(2).id() not in ids
    assert paris_leaf.parent(1).id() not in ids and _s2_leaf(*sydney).parent(0).id() in ids
    assert partition.counts[partition.assign([paris[0]], [paris[1]])[0]] == 10


def test_partial_last_split_keeps_the_densest_child_and_a_remainder():
    lat, lon = [48.85] * 6 + [-33.87] * 3, [2.35] * 6 + [151.21] * 3
    partition = Partition.build(lat, lon, 7)
    paris_face = _s2_leaf(48.85, 2.35).parent(0)
    paris_child = _s2_leaf(48.85, 2.35).parent(1)
    assert paris_child.id() in partition.cell_ids.tolist() and paris_face.id() in partition.cell_ids.tolist()
    remainder = partition.cell_ids.tolist().index(paris_face.id())
    pieces = partition.piece_ids[partition.piece_cells == remainder].tolist()
    assert sorted(pieces) == sorted(c.id() for c in paris_face.children() if c != paris_child)
    assert partition.areas_sr[remainder] == pytest.approx(4 * math.pi / 6 - s2sphere.Cell(paris_child).exact_area())
    assert partition.counts[remainder] == 0 and partition.areas_sr.sum() == pytest.approx(4 * math.pi)


def test_ties_break_by_smaller_id_and_input_order_does_not_matter():
    lat, lon = [0.0] * 10, [10.0] * 5 + [100.0] * 5  # faces 0 and 1 hold 5 points each
    partition = Partition.build(lat, lon, 9)
    assert s2sphere.CellId.from_face_pos_level(0, 0, 0).id() not in partition.cell_ids.tolist()
    assert s2sphere.CellId.from_face_pos_level(1, 0, 0).id() in partition.cell_ids.tolist()
    lat, lon = _clustered(2000, seed=3)
    lat, lon = np.round(lat, 0), np.round(lon, 0)
    order = np.random.default_rng(0).permutation(2000)
    a, b = Partition.build(lat, lon, 300), Partition.build(lat[order], lon[order], 300)
    assert np.array_equal(a.cell_ids, b.cell_ids) and np.array_equal(a.piece_ids, b.piece_ids)
    assert np.array_equal(a.counts, b.counts)
    np.testing.assert_allclose(a.means_xyz, b.means_xyz, atol=1e-15)


def test_identical_points_reach_a_leaf_that_stays_and_then_refuse():
    lat, lon = np.full(200, 12.345), np.full(200, -67.89)
    partition = Partition.build(lat, lon, 96)  # 30 splits down to the leaf: 6 + 3 * 30 = 96
    assert partition.levels.max() == 30 and partition.counts.max() == 200
    with pytest.raises(ConfigError, match="n_cells=97 cannot be reached"):
        Partition.build(lat, lon, 97)


@pytest.mark.parametrize("n_cells, match", [(11, "more than the 10 training points"), (5, "at least 6"),
                                            (7.5, "must be an integer")])
def test_impossible_cell_counts_are_config_errors(n_cells, match):
    lat, lon = _clustered(10, seed=0)
    with pytest.raises(ConfigError, match=match):
        Partition.build(lat, lon, n_cells)


def test_bad_coordinates_are_config_errors():
    with pytest.raises(ConfigError, match="row 1"):
        Partition.build([1.0, float("nan"), 3.0], [0.0, 0.0, 0.0], 6)
    with pytest.raises(ConfigError, match="row 0"):
        Partition.build([91.0], [0.0], 6)


def test_state_dict_round_trips_through_torch_save(tmp_path):
    lat, lon = _clustered(1000, seed=4)
    partition = Partition.build(lat, lon, 101)
    path = tmp_path / "partition.pt"
    torch.save(partition.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["cell_ids"].dtype == torch.int64  # uint64 ids are stored bit-cast
    restored = Partition.from_state_dict(state)
    for key in ("cell_ids", "levels", "centres_xyz", "areas_sr", "means_xyz", "counts", "piece_ids", "piece_cells"):
        assert getattr(restored, key).dtype == getattr(partition, key).dtype
        assert np.array_equal(getattr(restored, key), getattr(partition, key)), key
    assert np.array_equal(restored.assign(lat, lon), partition.assign(lat, lon))
    with pytest.raises(ConfigError, match="missing piece_ids"):
        Partition.from_state_dict({k: v for k, v in state.items() if k != "piece_ids"})
