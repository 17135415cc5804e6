"""The knn head's gallery, read from the run's cache: what a run records about it, and the check before each use.

A retrieval run never copies its gallery. ``gallery_record`` (called by
``resolve_config``, stored as ``config["gallery"]``) names the cache (absolute
path), the rows (the train split, or its ``train_fraction`` subset drawn with the
run's seed; their count and the sha256 of their indices) and the cache's content
hash (``geo.cache.commits.content_sha256``: a hash of the checksums the writer
stored per block, so O(blocks), not a read of the features). ``attach_gallery``
gives a head a :class:`CacheGallery` over those rows (``fit_head`` and its
resumption, ``load_head`` for ``geo evaluate``, ``geo predict`` and reports), after
checking that the cache is there and unchanged: otherwise a ``CacheError``
naming the path and both hashes. With ``knn_index`` other than "exact" it also
opens (or builds once) the FAISS index over the gallery (``geo.training.knn_index``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from geo.cache.commits import content_sha256
from geo.cache.reader import open_cache_file
from geo.cache.row_reader import RowReader
from geo.cache.schema import SPLIT_NAMES
from geo.errors import CacheError
from geo.training.subsets import train_subset

GALLERY_SPLIT = "train"


def rows_sha256(rows: np.ndarray) -> str:
    """Hex sha256 of file row indices (int64, little-endian): names a gallery's rows in a few bytes."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype="<i8").tobytes()).hexdigest()


def gallery_rows(split: np.ndarray, train_fraction: float, seed: int) -> np.ndarray:
    """Sorted file rows of the gallery: the ``train_fraction`` subset (seed ``seed``) of the train split."""
    rows = np.flatnonzero(np.asarray(split) == SPLIT_NAMES.index(GALLERY_SPLIT)).astype(np.int64)
    return train_subset(rows, train_fraction, seed)


def gallery_record(cache, cache_path: Path, train_fraction: float, seed: int) -> dict:
    """What a retrieval run records of its gallery (config.json's ``gallery``), from an open ``FeatureCache``."""
    rows = gallery_rows(cache.split, train_fraction, seed)
    return {"cache_path": str(Path(cache_path).resolve()), "cache_sha256": cache.content_sha256(),
            "split": GALLERY_SPLIT, "train_fraction": float(train_fraction), "seed": int(seed),
            "n_rows": int(rows.size), "rows_sha256": rows_sha256(rows)}


class CacheGallery:
    """A ``geo.heads.knn.Gallery`` over rows of a cache file, checked against a run's ``gallery`` record.

    Holds the rows and their locations (float64, ``[n]``); features are read block by block
    from the file (float16 as stored) on every ``blocks`` call, never kept.
    """

    def __init__(self, record: dict):
        self.record = dict(record)
        self.path = Path(record["cache_path"])
        expected = record["cache_sha256"]
        if not self.path.exists():
            raise CacheError(f"{self.path}: the knn gallery's cache is missing (the run recorded content sha256 "
                             f"{expected}); restore it there, or refit the run on another cache")
        with open_cache_file(self.path) as f:
            actual = content_sha256(f)
            if actual != expected:
                raise CacheError(f"{self.path}: the knn gallery's cache has changed since the run was made: "
                                 f"the run recorded content sha256 {expected}, the file has {actual}; "
                                 "restore the original cache, or refit the run on this one")
            self.rows = gallery_rows(f["split"][:], record["train_fraction"], record["seed"])
            if rows_sha256(self.rows) != record["rows_sha256"]:
                raise CacheError(f"{self.path}: the knn gallery's rows ({record['n_rows']} rows of the "
                                 f"{record['split']} split) cannot be drawn again from this cache")
            self.lat_deg = f["lat"][:][self.rows].astype(np.float64)
            self.lon_deg = f["lon"][:][self.rows].astype(np.float64)
            self.feature_dim = int(f["features"].shape[1])
            self.feature_bytes = int(f["features"].dtype.itemsize)
        self.n_rows = int(self.rows.size)
        self.sha256 = expected
        self._reader: RowReader | None = None  # opened by the first read_rows

    def read_rows(self, positions: np.ndarray) -> np.ndarray:
        """Features ``[len(positions), d]`` (as stored) of gallery rows by position (0 .. n_rows - 1), any order.

        Through a ``geo.cache.row_reader.RowReader`` opened on first use (the page cache, not h5py's
        per-chunk lookups): what re-ranking an index's candidates reads.
        """
        if self._reader is None:
            self._reader = RowReader(self.path)
        return self._reader.read(self.rows[np.asarray(positions, dtype=np.int64)])

    def blocks(self, max_rows: int) -> Iterator[np.ndarray]:
        """Features ``[b, d]`` (as stored) of consecutive gallery rows, ``b <= max_rows``, in row order.

        A block whose rows are dense in the file is one contiguous read; sparse ones are
        read in contiguous slabs of at most ``max_rows`` file rows each.
        """
        max_rows = max(1, int(max_rows))
        rows = self.rows
        with open_cache_file(self.path) as f:
            ds = f["features"]
            for pos in range(0, rows.size, max_rows):
                picked = rows[pos:pos + max_rows]
                first, last = int(picked[0]), int(picked[-1]) + 1
                if last - first == picked.size:  # contiguous rows: no selection copy
                    yield ds[first:last]
                elif last - first <= 2 * max_rows:
                    yield ds[first:last][picked - first]
                else:
                    parts, i = [], 0
                    while i < picked.size:
                        start = int(picked[i])
                        end = int(np.searchsorted(picked, start + max_rows, side="left"))
                        parts.append(ds[start:start + max_rows][picked[i:end] - start])
                        i = end
                    yield np.concatenate(parts)


def attach_gallery(head, config: dict, *, progress: bool = False) -> dict:
    """Give a retrieval ``head`` its gallery from the run ``config`` (and its index); returns the index's facts.

    The returned dict (``{}`` for exact search) goes into the run's metrics.json:
    ``knn_index``, ``knn_index_path``, ``knn_index_build_s`` (``geo.training.knn_index``).
    """
    record = config.get("gallery")
    if not record:
        raise CacheError(f"the run's config.json records no knn gallery (written by a geo that kept the gallery "
                         f"in the checkpoint); refit it with geo fit-head --head {config.get('head')}")
    gallery = CacheGallery(record)
    kind = config.get("knn_index") or "exact"
    if kind == "exact":
        head.fit_gallery(gallery)
        return {}
    from geo.training.knn_index import open_or_build_index  # FAISS only when asked for

    search, facts = open_or_build_index(gallery, kind, nprobe=int(config.get("knn_nprobe") or 32),
                                        rerank=int(config.get("knn_rerank") or 1),
                                        k=head.max_k, progress=progress)
    head.fit_gallery(gallery, search=search)
    return facts
