"""Coarser PlaNet partitions nested in a finer one, derived from the fine partition alone.

``coarser_cells(partition, n_coarse)`` replays the greedy construction of
``Partition.build`` (split the densest cell, ties to the smaller id) on the fine
partition's own cells and counts: the count of any S2 cell is the sum of the
counts of the fine cells inside it. Because the greedy choice depends only on
the current counts, the construction with fewer cells is a prefix of the one
with more, so the result is what ``Partition.build(train points, n_coarse)``
gives when ``n_coarse = 6 + 3k`` (no partial last split), and every fine cell
lies in exactly one coarse cell. Nothing but the fine partition (saved with
every run) is needed: a hierarchical head is rebuilt from a run's state.
"""

from __future__ import annotations

import heapq

import numpy as np

from geo.sphere import s2cells


def reachable_cells(n_cells: int) -> int:
    """The largest 6 + 3k <= ``n_cells`` (at least 6): a cell count reached by whole splits."""
    return max(s2cells.NUM_FACES, s2cells.NUM_FACES + 3 * ((int(n_cells) - s2cells.NUM_FACES) // 3))


def coarser_cells(partition, n_coarse: int) -> tuple[np.ndarray, int]:
    """``(coarse index int64 [c] of every fine cell, number of coarse cells)`` for ``reachable_cells(n_coarse)``.

    ``partition`` needs ``cell_ids`` (uint64 [c], increasing) and ``counts`` (int64 [c]);
    a fine cell that is a "remainder" (it keeps its parent's id) is never split here.
    """
    fine = np.asarray(partition.cell_ids, dtype=np.uint64)
    cum = np.concatenate([[0], np.cumsum(np.asarray(partition.counts, dtype=np.int64))])
    fine_set = set(fine.tolist())
    target = reachable_cells(n_coarse)

    def count(cell: np.uint64) -> int:  # points in the fine cells whose ids lie in the S2 cell's range
        low = s2cells.range_min(np.array([cell], np.uint64))[0]
        high = low + 2 * (s2cells.lsb(np.array([cell], np.uint64))[0] - np.uint64(1))
        return int(cum[np.searchsorted(fine, high, side="right")] - cum[np.searchsorted(fine, low, side="left")])

    heap = [(-count(f), int(f)) for f in s2cells.face_cell_ids()]
    heapq.heapify(heap)
    kept: list[int] = []  # cells that may not be split (fine cells themselves, leaves)
    while len(heap) + len(kept) < target and heap:
        neg, cell = heapq.heappop(heap)
        if cell in fine_set or s2cells.cell_levels(np.array([cell], np.uint64))[0] == s2cells.MAX_LEVEL:
            kept.append(cell)
            continue
        for child in s2cells.child_ids(np.array([cell], np.uint64))[0]:
            heapq.heappush(heap, (-count(child), int(child)))
    coarse = np.sort(np.array([c for _, c in heap] + kept, dtype=np.uint64))
    # Each fine id lies in the range of exactly one coarse cell: the last one starting at or before it.
    starts = s2cells.range_min(coarse)
    return np.searchsorted(starts, fine, side="right").astype(np.int64) - 1, len(coarse)
