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
from geo.heads import s2cells
from geo.heads.s2cells import leaf_cell_ids  # noqa: F401  (re-exported: part of the contract)

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
        order = np.argsort(leaf)
        sorted_leaf = leaf[order]

        pieces = _split_densest(sorted_leaf, n_cells)
        piece_ids = np.array([p[0] for p in pieces], dtype=np.uint64)
        piece_lo = np.array([p[1] for p in pieces], dtype=np.int64)
        piece_hi = np.array([p[2] for p in pieces], dtype=np.int64)
        # A piece is its own cell unless it is one of the remainder's children.
        owner = np.array([p[3] for p in pieces], dtype=np.uint64)
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
        xyz_sorted = xyz[order]
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


def _split_densest(sorted_leaf: np.ndarray, n_cells: int) -> list[tuple[int, int, int, int]]:
    """The splitting loop on sorted leaf ids.

    Returns pieces (piece id, lo, hi, owner id), sorted by piece id, with the
    points sorted_leaf[lo:hi] inside the piece and owner the id of the cell it
    belongs to (itself, except for the remainder's children).
    """
    faces = [int(f) for f in s2cells.face_cell_ids()]
    bounds = np.searchsorted(sorted_leaf, s2cells.range_min(s2cells.face_cell_ids())).tolist() + [sorted_leaf.size]
    heap: list[tuple[int, int, int, int]] = []  # (-count, id, lo, hi): densest first, then smallest id
    done: list[tuple[int, int, int, int]] = []  # (id, lo, hi, owner)
    for f, lo, hi in zip(faces, bounds[:-1], bounds[1:]):
        heapq.heappush(heap, (lo - hi, f, lo, hi))
    n_now = len(faces)
    while n_now < n_cells:
        if not heap or heap[0][0] == 0:
            raise ConfigError(
                f"n_cells={n_cells} cannot be reached: after {n_now} cells every cell holding training points "
                f"is a level-30 S2 leaf (many identical coordinates?)")
        _, cid, lo, hi = heapq.heappop(heap)
        if cid & 1:  # a leaf cannot split; it stays a cell
            done.append((cid, lo, hi, cid))
            continue
        low_bit = cid & -cid
        child_span = low_bit >> 1  # leaf-id span of each child
        first_min = cid - low_bit + 1
        cuts = np.searchsorted(sorted_leaf[lo:hi], np.array(
            [first_min + child_span, first_min + 2 * child_span, first_min + 3 * child_span], dtype=np.uint64))
        edges = [lo, lo + int(cuts[0]), lo + int(cuts[1]), lo + int(cuts[2]), hi]
        children = [(edges[k] - edges[k + 1], cid - low_bit + (2 * k + 1) * (low_bit >> 2), edges[k], edges[k + 1])
                    for k in range(4)]
        need = n_cells - n_now
        if need >= 3:
            for child in children:
                heapq.heappush(heap, child)
            n_now += 3
        else:  # partial last split: the `need` densest children become cells, the rest stay as one
            ranked = sorted(children)
            for child in ranked[:need]:
                heapq.heappush(heap, child)
            done.extend((child_id, clo, chi, cid) for _, child_id, clo, chi in ranked[need:])
            n_now += need
    done.extend((cid, lo, hi, cid) for _, cid, lo, hi in heap)
    done.sort()
    return done


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
