"""The PlaNet adaptive partition of the sphere into S2 cells.

Start from the six S2 face cells and repeatedly split the cell holding the
most training points into its four children until there are exactly
``n_cells`` cells. Ties are broken by the smaller cell id (deterministic); a
level-30 (leaf) cell cannot be split and stays as it is.

Exact counts. Every split adds 3 cells, so from 6 faces only 6 + 3k cells
are reachable, and no power of two is. To give exactly ``n_cells`` cells for
every ``n_cells >= 6`` while still tiling the sphere, the *last* split, when
only 1 or 2 more cells are needed, is partial: of the four children of the
densest cell, the 1 or 2 holding the most points (ties: smaller id) become
cells, and the other 3 or 2 children stay together as one cell, the
"remainder" of their parent. The remainder keeps the parent's id and level;
its area is the sum of its children's areas and its centre the normalised,
area-weighted mean of their centres. So at most one cell is not a whole S2
cell, and each cell is the union of one or more disjoint S2 cells
("pieces"): ``piece_ids`` (sorted) and ``piece_cells`` (the cell each piece
belongs to). Every point on the sphere lies in exactly one piece.

Cells are stored in increasing id order (the Hilbert-curve order).
"""

from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass, field

import numpy as np
import torch

from geo.errors import ConfigError
from geo.sphere import s2cells
from geo.sphere.s2cells import leaf_cell_ids  # also part of this module's contract

_STATE_KEYS = ("cell_ids", "levels", "centres_xyz", "areas_sr", "means_xyz", "counts", "piece_ids", "piece_cells")
_BIT_CAST_KEYS = ("cell_ids", "piece_ids")  # uint64 ids stored bit-cast as int64 tensors


@dataclass
class Partition:
    """A tiling of the sphere into ``c`` cells, with per-cell geometry and training statistics.

    Attributes (c = number of cells, m = number of pieces >= c):
        cell_ids: uint64 [c], S2 cell ids (== s2sphere ``CellId.id()``), increasing.
        levels: int64 [c], S2 level of each id (0 = face, 30 = leaf).
        centres_xyz: float64 [c, 3], unit vector of each cell's centre.
        areas_sr: float64 [c], cell areas in steradians (they sum to 4 pi).
        means_xyz: float64 [c, 3], normalised mean of the unit vectors of the
            cell's training points; the centre where a cell is empty.
        counts: int64 [c], training points per cell.
        piece_ids: uint64 [m], the S2 cells that make up the cells, increasing;
            None (the default) means every cell is its own piece.
        piece_cells: int64 [m], index of the cell each piece belongs to.
    """

    cell_ids: np.ndarray
    levels: np.ndarray
    centres_xyz: np.ndarray
    areas_sr: np.ndarray
    means_xyz: np.ndarray
    counts: np.ndarray
    piece_ids: np.ndarray | None = None
    piece_cells: np.ndarray | None = None
    _piece_min: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cell_ids = np.asarray(self.cell_ids, dtype=np.uint64).reshape(-1)
        c = self.cell_ids.size
        self.levels = np.asarray(self.levels, dtype=np.int64).reshape(c)
        self.centres_xyz = np.asarray(self.centres_xyz, dtype=np.float64).reshape(c, 3)
        self.areas_sr = np.asarray(self.areas_sr, dtype=np.float64).reshape(c)
        self.means_xyz = np.asarray(self.means_xyz, dtype=np.float64).reshape(c, 3)
        self.counts = np.asarray(self.counts, dtype=np.int64).reshape(c)
        if self.piece_ids is None:
            self.piece_ids, self.piece_cells = self.cell_ids.copy(), np.arange(c, dtype=np.int64)
        self.piece_ids = np.asarray(self.piece_ids, dtype=np.uint64).reshape(-1)
        self.piece_cells = np.asarray(self.piece_cells, dtype=np.int64).reshape(self.piece_ids.shape)
        if np.any(self.piece_ids[1:] <= self.piece_ids[:-1]):
            order = np.argsort(self.piece_ids, kind="stable")
            self.piece_ids, self.piece_cells = self.piece_ids[order], self.piece_cells[order]
        self._piece_min = s2cells.range_min(self.piece_ids)

    @property
    def n_cells(self) -> int:
        """Number of cells c."""
        return int(self.cell_ids.size)

    # ---- building ----

    @classmethod
    def build(cls, lat_deg, lon_deg, n_cells: int) -> Partition:
        """The adaptive partition of training points (degrees, [n] each) into exactly ``n_cells`` cells.

        Raises ConfigError when ``n_cells`` < 6, exceeds the number of points,
        or cannot be reached because every cell holding points is a leaf.
        """
        lat, lon = _check_points(lat_deg, lon_deg, "Partition.build")
        try:
            n_cells = operator.index(n_cells)
        except TypeError:
            raise ConfigError(f"n_cells must be an integer, not {n_cells!r}") from None
        if n_cells < s2cells.NUM_FACES:
            raise ConfigError(f"n_cells={n_cells}: the partition starts from the 6 S2 faces, so it needs at least 6")
        if n_cells > lat.size:
            raise ConfigError(f"n_cells={n_cells} is more than the {lat.size} training points")
        xyz = s2cells.latlon_to_xyz_s2(lat, lon)
        leaf = s2cells.xyz_to_leaf_ids(xyz)
        sorted_leaf, order = _sort_ids(leaf)

        # A piece is its own cell unless it is one of the remainder's children.
        piece_ids, piece_lo, piece_hi, owner = _split_densest(sorted_leaf, n_cells)
        cell_ids, piece_cells = np.unique(owner, return_inverse=True)
        c = cell_ids.size

        piece_area = s2cells.cell_areas_sr(piece_ids)
        piece_centre = s2cells.cell_centres_xyz(piece_ids)
        areas = np.bincount(piece_cells, weights=piece_area, minlength=c)
        counts = np.bincount(piece_cells, weights=piece_hi - piece_lo, minlength=c).astype(np.int64)
        centres = np.stack([np.bincount(piece_cells, weights=piece_centre[:, k] * piece_area, minlength=c)
                            for k in range(3)], axis=1)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        whole = owner == piece_ids  # pieces that are whole cells keep s2sphere's exact centre
        centres[piece_cells[whole]] = piece_centre[whole]

        # Pieces tile the sorted leaf ids in order, so each sorted point's cell is a repeat.
        cell_of_sorted = np.repeat(piece_cells, piece_hi - piece_lo)
        xyz_sorted = np.take(xyz, order, axis=0)  # ~3x faster than xyz[order] for [n, 3]
        sums = np.stack([np.bincount(cell_of_sorted, weights=xyz_sorted[:, k], minlength=c) for k in range(3)], axis=1)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        # Empty cells (and the degenerate case of points cancelling exactly) fall back to the centre.
        means = np.where(norms > 0, sums / np.where(norms > 0, norms, 1.0), centres)
        levels = s2cells.cell_levels(cell_ids)
        return cls(cell_ids, levels, centres, areas, means, counts, piece_ids, piece_cells)

    # ---- using ----

    def assign(self, lat_deg, lon_deg) -> np.ndarray:
        """Cell index int64 [n] in [0, c) of each point (degrees, [n] each)."""
        lat, lon = _check_points(lat_deg, lon_deg, "Partition.assign")
        return self.assign_leaf_ids(leaf_cell_ids(lat, lon))

    def assign_leaf_ids(self, leaf_ids) -> np.ndarray:
        """Cell index int64 [n] of level-30 S2 cell ids."""
        piece = np.searchsorted(self._piece_min, np.asarray(leaf_ids, dtype=np.uint64), side="right") - 1
        return self.piece_cells[piece]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that ``from_state_dict`` turns back into this partition.

        uint64 ids are stored bit-cast as int64 tensors (torch has no uint64
        arithmetic and ``torch.load(weights_only=True)`` needs plain tensors).
        """
        out = {}
        for key in _STATE_KEYS:
            value = getattr(self, key)
            if key in _BIT_CAST_KEYS:
                value = value.view(np.int64)
            out[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return out

    @classmethod
    def from_state_dict(cls, state: dict) -> Partition:
        """Inverse of :meth:`state_dict`."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ConfigError(f"partition state is missing {', '.join(missing)} (expected {', '.join(_STATE_KEYS)})")
        values = {}
        for key in _STATE_KEYS:
            array = torch.as_tensor(state[key]).detach().cpu().numpy()
            values[key] = array.astype(np.int64).view(np.uint64) if key in _BIT_CAST_KEYS else array
        return cls(**values)


def _split_densest(sorted_leaf: np.ndarray, n_cells: int) -> tuple[np.ndarray, ...]:
    """The densest-first splitting on sorted leaf ids uint64 [n].

    Returns (piece_ids uint64, lo, hi, owner uint64), sorted by piece id: the
    points sorted_leaf[lo:hi] lie in the piece, and owner is the id of the
    cell the piece belongs to (itself, except for the remainder's children).

    The result is that of the plain loop "pop the cell with most points
    (ties: smaller id) and split it", computed in two phases. Pops happen in
    non-increasing count order (a child never holds more points than its
    parent), so the loop splits every cell with more than some T points. Phase
    1 splits, vectorised level by level, all cells with more than T' >= T
    points, for the smallest T' that fits the budget; phase 2 runs the loop
    itself from there, for the few remaining splits (ties at the threshold,
    the partial last split). When a phase 2 of R splits starts, only the R + 1
    most-points frontier cells can be popped, so only those go on the heap.
    """
    n = sorted_leaf.size
    budget = (n_cells - s2cells.NUM_FACES) // 3  # full splits
    t_low = max(1, n // n_cells)  # the loop's T is >= n / n_cells unless leaves hold many points
    while True:
        tree = _explore(sorted_leaf, t_low)
        counts = tree["hi"] - tree["lo"]
        desc = np.sort(counts[tree["expandable"]])[::-1]
        if desc.size >= budget or t_low == 1:
            break
        t_low = max(1, t_low // 4)  # explored too little: every explored cell would be split
    # Largest k <= budget that does not cut through a run of equal counts.
    k = min(budget, desc.size)
    while 0 < k < desc.size and desc[k - 1] == desc[k]:
        k -= 1
    threshold = desc[k] if k < desc.size else t_low
    split = tree["expandable"] & (counts > threshold)
    parent = tree["parent"]
    frontier = ~split & ((parent < 0) | split[np.maximum(parent, 0)])
    f_id, f_lo, f_hi = tree["id"][frontier], tree["lo"][frontier], tree["hi"][frontier]

    n_now = s2cells.NUM_FACES + 3 * int(split.sum())
    splits_left = -(-(n_cells - n_now) // 3)
    splittable = (f_id & np.uint64(1)) == 0
    rank = np.lexsort((f_id, f_lo - f_hi))  # by count desc, then id
    on_heap = rank[splittable[rank]][: splits_left + 1] if splits_left else rank[:0]
    heap = [(int(f_lo[i] - f_hi[i]), int(f_id[i]), int(f_lo[i]), int(f_hi[i])) for i in on_heap]
    heapq.heapify(heap)
    done: list[tuple[int, int, int, int]] = []  # (id, lo, hi, owner)
    while n_now < n_cells:
        if not heap or heap[0][0] == 0:
            raise ConfigError(
                f"n_cells={n_cells} cannot be reached: after {n_now} cells every cell holding training points "
                f"is a level-30 S2 leaf (many identical coordinates?)")
        _, cid, lo, hi = heapq.heappop(heap)
        low_bit = cid & -cid
        child_span = low_bit >> 1  # leaf-id span of each child
        first_min = cid - low_bit + 1
        cuts = np.searchsorted(sorted_leaf[lo:hi], np.array(
            [first_min + child_span, first_min + 2 * child_span, first_min + 3 * child_span], dtype=np.uint64))
        edges = [lo, lo + int(cuts[0]), lo + int(cuts[1]), lo + int(cuts[2]), hi]
        children = sorted((edges[k] - edges[k + 1], cid - low_bit + (2 * k + 1) * (low_bit >> 2), edges[k], edges[k + 1])
                          for k in range(4))
        need = n_cells - n_now
        keep = children if need >= 3 else children[:need]  # partial last split: the densest `need` children
        for child in keep:
            if child[1] & 1:  # a leaf cannot split; it stays a cell
                done.append((child[1], child[2], child[3], child[1]))
            else:
                heapq.heappush(heap, child)
        done.extend((child_id, clo, chi, cid) for _, child_id, clo, chi in children[len(keep):])
        n_now += min(need, 3)
    done.extend((cid, lo, hi, cid) for _, cid, lo, hi in heap)

    untouched = np.ones(f_id.size, dtype=bool)
    untouched[on_heap] = False
    extra = np.array(done, dtype=object).reshape(-1, 4)
    piece_ids = np.concatenate([f_id[untouched], extra[:, 0].astype(np.uint64)])
    lo = np.concatenate([f_lo[untouched], extra[:, 1].astype(np.int64)])
    hi = np.concatenate([f_hi[untouched], extra[:, 2].astype(np.int64)])
    owner = np.concatenate([f_id[untouched], extra[:, 3].astype(np.uint64)])
    order = np.argsort(piece_ids)
    return piece_ids[order], lo[order], hi[order], owner[order]


def _explore(sorted_leaf: np.ndarray, t_low: int) -> dict[str, np.ndarray]:
    """The tree of cells reached by splitting, from the faces down, every cell with more than t_low points.

    Returns flat arrays over its nodes: id uint64, lo, hi (points sorted_leaf[lo:hi]),
    parent (node index, -1 for faces) and expandable (non-leaf with > t_low points).
    """
    ids = s2cells.face_cell_ids()
    lo = np.searchsorted(sorted_leaf, s2cells.range_min(ids)).astype(np.int64)
    hi = np.append(lo[1:], sorted_leaf.size)
    parent = np.full(ids.size, -1, dtype=np.int64)
    parts = {"id": [], "lo": [], "hi": [], "parent": [], "expandable": []}
    n_seen = 0
    while ids.size:
        expandable = ((hi - lo) > t_low) & ((ids & np.uint64(1)) == 0)
        for key, value in zip(parts, (ids, lo, hi, parent, expandable)):
            parts[key].append(value)
        node = n_seen + np.flatnonzero(expandable)
        n_seen += ids.size
        children = s2cells.child_ids(ids[expandable])  # [m, 4]
        cuts = np.searchsorted(sorted_leaf, s2cells.range_min(children[:, 1:]).ravel()).reshape(-1, 3)
        edges = np.concatenate([lo[expandable, None], cuts, hi[expandable, None]], axis=1)
        ids, lo, hi = children.ravel(), edges[:, :-1].ravel(), edges[:, 1:].ravel()
        parent = np.repeat(node, 4)
    return {key: np.concatenate(value) for key, value in parts.items()}


def _sort_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids uint64 [n], the sorting permutation int64 [n]), stable.

    torch.sort is ~4x faster than np.argsort on a million 64-bit keys; torch
    has no uint64, so the ids are mapped monotonically to int64 by flipping the top bit.
    """
    sign = np.uint64(1 << 63)
    keys = torch.from_numpy((ids ^ sign).view(np.int64))
    values, order = torch.sort(keys, stable=True)
    return values.numpy().view(np.uint64) ^ sign, order.numpy()


def _check_points(lat_deg, lon_deg, what: str) -> tuple[np.ndarray, np.ndarray]:
    """1-D float64 lat, lon of equal length, finite, |lat| <= 90; ConfigError naming the first bad row."""
    lat = np.atleast_1d(np.asarray(lat_deg, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon_deg, dtype=np.float64))
    if lat.ndim != 1 or lat.shape != lon.shape:
        raise ConfigError(f"{what}: lat_deg and lon_deg must be 1-D of equal length, got {lat.shape} and {lon.shape}")
    if lat.size == 0:
        raise ConfigError(f"{what}: no points given")
    bad = ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"{what}: {int(bad.sum())} invalid coordinates (non-finite or |lat| > 90), "
                          f"first at row {row}: lat={lat[row]}, lon={lon[row]}")
    return lat, lon
