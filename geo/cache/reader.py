"""FeatureCache: open, validate and serve a ``geo-feature-cache/1`` file by split.

Per-row metadata (ids, lat/lon, split, country) is small and read into memory on
open. Features are served as float16: a split whose features fit
``memory_budget_bytes`` is loaded once and batched from memory; a larger split
is streamed in contiguous row blocks of the file, so a cache larger than RAM
works. Shuffling is deterministic given (seed, epoch): in memory, one
permutation of the split; streamed, a permutation of the blocks and one within
each block.

Example:
    with FeatureCache("cache.h5") as cache:
        for rows, x in cache.iter_batches("train", 4096, shuffle=True, seed=0, epoch=3):
            ...   # rows int64 [b] file rows; x float16 [b, d]
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from geo.cache.commits import content_sha256
from geo.cache.schema import (
    SPLIT_NAMES,
    chunk_rows,
    decode_strings,
    is_partial_name,
    partial_path,
    read_attr,
    read_countries,
    read_provenance,
    read_skipped,
)
from geo.cache.validate import check_schema, find_problems
from geo.errors import CacheError

_MAX_BLOCK_BYTES = 64 << 20  # a streamed block never holds more than this


def default_memory_budget_bytes() -> int:
    """A quarter of the RAM available now (1 GiB if the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def open_cache_file(path: str | Path) -> h5py.File:
    """h5py.File(path, "r"), with a CacheError naming the file when it cannot be opened."""
    path = Path(path)
    if not path.exists():
        hint = (f"; an unfinished {partial_path(path).name} exists, rerun the command that writes it to resume"
                if partial_path(path).exists() else "")
        raise CacheError(f"{path}: no such cache file{hint}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise CacheError(f"{path}: not a readable HDF5 file ({err})") from err


class FeatureCache:
    """Reader of a complete cache file; see the module docstring.

    memory_budget_bytes: float16 bytes a split may take to be held in memory
        (default: a quarter of the available RAM); larger splits are streamed.
    validate: check the whole file on open (streams the features once) and raise
        CacheError listing every problem; the schema is always checked.
    """

    def __init__(self, path: str | Path, *, memory_budget_bytes: int | None = None, validate: bool = True):
        self.path = Path(path)
        self.memory_budget_bytes = (default_memory_budget_bytes() if memory_budget_bytes is None
                                    else int(memory_budget_bytes))
        self._file = open_cache_file(self.path)
        try:
            self._open()
            if validate:
                problems = self.validate()
                if problems:
                    raise CacheError(f"{self.path}: invalid feature cache:\n  " + "\n  ".join(problems))
            self._read_rows()
        except Exception:
            self.close()
            raise

    def _open(self) -> None:
        f = self._file
        problem = check_schema(f)
        if problem:
            raise CacheError(f"{self.path}: {problem}")
        if is_partial_name(self.path) or not f.attrs.get("complete", True):
            raise CacheError(f"{self.path}: an unfinished cache ({int(f.attrs.get('rows_committed', 0))} rows "
                             "committed); rerun the command that writes it to resume")
        for name in ("features", "lat", "lon", "id", "split", "country"):
            if name not in f:
                raise CacheError(f"{self.path}: dataset /{name} is missing")
        self.schema: str = read_attr(f.attrs, "schema")
        self.feature_dim: int = int(f["features"].shape[1])
        self.n_rows: int = int(f["features"].shape[0])
        self.feature_dtype: np.dtype = f["features"].dtype
        self.countries: list[str] = read_countries(f)
        self.provenance: dict = read_provenance(f)
        self.created: str | None = read_attr(f.attrs, "created") if "created" in f.attrs else None
        self.geo_version: str | None = read_attr(f.attrs, "geo_version") if "geo_version" in f.attrs else None

    def _read_rows(self) -> None:
        f = self._file
        self.ids: np.ndarray = decode_strings(f["id"][:])
        self.lat_deg: np.ndarray = f["lat"][:].astype(np.float64)
        self.lon_deg: np.ndarray = f["lon"][:].astype(np.float64)
        self.split: np.ndarray = f["split"][:].astype(np.uint8)
        self.country: np.ndarray = f["country"][:].astype(np.int16)
        self.skipped: list[tuple[str, str]] = read_skipped(f) if "skipped" in f else []
        self._in_memory: dict[str, np.ndarray] = {}

    def content_sha256(self) -> str:
        """Hex sha256 naming the file's content (``geo.cache.commits.content_sha256``: O(blocks), no feature read)."""
        return content_sha256(self._file)

    def validate(self) -> list[str]:
        """Every problem in the file, one line each naming dataset and first row (empty = valid)."""
        return find_problems(self._file)

    # -- rows ------------------------------------------------------------------

    def split_rows(self, split: str) -> np.ndarray:
        """Sorted int64 file rows of a split ("train", "val", "test"); CacheError if it is empty."""
        if split not in SPLIT_NAMES:
            raise CacheError(f"{self.path}: unknown split {split!r}; known: {', '.join(SPLIT_NAMES)}")
        rows = np.flatnonzero(self.split == SPLIT_NAMES.index(split)).astype(np.int64)
        if rows.size == 0:
            raise CacheError(f"{self.path}: /split has no {split!r} rows (code {SPLIT_NAMES.index(split)}); "
                             f"this command needs them")
        return rows

    def load_features(self, rows) -> np.ndarray:
        """float16 [len(rows), d] features of the given file rows (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise CacheError(f"{self.path}: /features: row index out of range 0..{self.n_rows - 1}")
        unique, inverse = np.unique(rows, return_inverse=True)
        return self._read_sorted(unique)[inverse]

    def _read_sorted(self, rows: np.ndarray) -> np.ndarray:
        """float16 features of sorted unique rows, read chunk-aligned slab by slab."""
        ds = self._file["features"]
        out = np.empty((rows.size, self.feature_dim), dtype=np.float16)
        slab = self._block_rows(_MAX_BLOCK_BYTES)
        pos = 0
        while pos < rows.size:
            start = int(rows[pos])
            stop = min(start + slab, self.n_rows)
            end = int(np.searchsorted(rows, stop, side="left"))
            picked = rows[pos:end]
            if picked.size * 8 >= stop - start:  # dense enough: one contiguous read beats scattered ones
                out[pos:end] = ds[start:stop][picked - start]
            else:
                out[pos:end] = ds[picked]
            pos = end
        return out

    def _block_rows(self, max_bytes: int) -> int:
        """Rows per read: at most max_bytes of float16, whole chunks when a chunk fits."""
        row_bytes = self.feature_dim * 2
        rows = max(1, min(max_bytes, _MAX_BLOCK_BYTES) // row_bytes)
        chunk = (self._file["features"].chunks or (chunk_rows(self.feature_dim, 2),))[0]
        return rows - rows % chunk if rows >= chunk else rows

    # -- serving ---------------------------------------------------------------

    def fits_in_memory(self, split: str) -> bool:
        """True when the split's float16 features fit memory_budget_bytes (the budget is per split)."""
        return self.split_rows(split).size * self.feature_dim * 2 <= self.memory_budget_bytes

    def iter_batches(self, split: str, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                     rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (rows int64 [b], features float16 [b, d]) covering the split once.

        Every batch has batch_size rows but the last. Deterministic given (seed, epoch, rows).
        ``rows``: sorted file rows of a subset of the split to cover instead of the whole
        split (a ``--train-fraction`` subset); the whole split's rows give the whole split's batches.
        """
        if batch_size < 1:
            raise CacheError(f"batch_size must be positive, got {batch_size}")
        split_rows = self.split_rows(split)
        picked = self._positions(split, split_rows, rows)
        rows = split_rows if picked is None else split_rows[picked]
        rng = np.random.default_rng([seed, epoch])
        if self.fits_in_memory(split):
            if split not in self._in_memory:  # the whole split once, shared by every subset of it
                self._in_memory[split] = self._read_sorted(split_rows)
            features = self._in_memory[split]
            order = rng.permutation(rows.size) if shuffle else np.arange(rows.size)
            for i in range(0, rows.size, batch_size):
                take = order[i:i + batch_size]
                yield rows[take], features[take if picked is None else picked[take]]
            return
        yield from self._stream(rows, batch_size, shuffle, rng)

    def _positions(self, split: str, split_rows: np.ndarray, rows: np.ndarray | None) -> np.ndarray | None:
        """Positions of ``rows`` (sorted, unique) in ``split_rows``; None for the whole split."""
        if rows is None:
            return None
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0 or np.any(np.diff(rows) <= 0):
            raise CacheError(f"{self.path}: rows of a {split!r} subset must be non-empty, sorted and unique")
        positions = np.searchsorted(split_rows, rows)
        if positions[-1] >= split_rows.size or np.any(split_rows[np.minimum(positions, split_rows.size - 1)] != rows):
            raise CacheError(f"{self.path}: the rows given are not all rows of the {split!r} split")
        return None if rows.size == split_rows.size else positions

    def _stream(self, rows: np.ndarray, batch_size: int, shuffle: bool,
                rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches from contiguous file blocks; a quarter of the budget per block, leftovers carried over."""
        ds = self._file["features"]
        block = self._block_rows(self.memory_budget_bytes // 4)
        starts = np.arange(0, self.n_rows, block)
        # File blocks that hold rows of this split, as [lo, hi) positions into rows.
        bounds = np.searchsorted(rows, np.append(starts, self.n_rows))
        blocks = [(int(s), int(lo), int(hi)) for s, lo, hi in zip(starts, bounds[:-1], bounds[1:]) if hi > lo]
        if shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        carry_rows = np.zeros(0, dtype=np.int64)
        carry_x = np.zeros((0, self.feature_dim), dtype=np.float16)
        for start, lo, hi in blocks:
            picked = rows[lo:hi]
            x = ds[start:min(start + block, self.n_rows)][picked - start].astype(np.float16)
            if shuffle:
                order = rng.permutation(picked.size)
                picked, x = picked[order], x[order]
            carry_rows = np.concatenate([carry_rows, picked])
            carry_x = np.concatenate([carry_x, x])
            n_full = carry_rows.size // batch_size * batch_size
            for i in range(0, n_full, batch_size):
                yield carry_rows[i:i + batch_size], carry_x[i:i + batch_size]
            carry_rows, carry_x = carry_rows[n_full:], carry_x[n_full:]
        if carry_rows.size:
            yield carry_rows, carry_x

    # -- lifetime --------------------------------------------------------------

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        n, d = getattr(self, "n_rows", "?"), getattr(self, "feature_dim", "?")
        return f"FeatureCache({str(self.path)!r}, n_rows={n}, feature_dim={d})"
