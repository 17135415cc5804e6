"""Features of arbitrary rows of a cache, read with ``os.pread`` through the operating system's page cache.

h5py reads a scattered row selection of a chunked dataset one chunk lookup at a time:
measured on a 4.7M x 768 float16 cache (chunks of 682 rows, uncompressed), 65,536 random rows
took 19 s (0.3 ms a row) and 1,000 rows 9.9 s. The cache writer stores features uncompressed,
so each chunk is a contiguous run of whole rows in the file: ``RowReader`` finds each chunk's
byte offset once (``H5Dchunk_iter``, ~0.03 s for 6,892 chunks) and reads the requested rows
with ``os.pread``, consecutive rows in one call. Not a memory map: the touched pages of a mapped file
count in the process's resident set (mapping that cache took a knn run from 6.9 to 10.7 GB peak RSS),
pages read with pread stay in the shared page cache. A dataset with filters (compression),
unallocated chunks or a byte order the reader cannot express is read with h5py instead, chunk
by chunk: the same values, only slower.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from geo.cache.reader import open_cache_file


class RowReader:
    """``read(rows)``: features ``[len(rows), d]`` (the stored dtype) of cache rows in the given order.

    ``rows`` may repeat and come in any order. ``direct`` says whether the page-cache path is
    in use (False: the h5py fallback). Close it (or use it as a context manager) when done.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open_cache_file(self.path)
        ds = self._file["features"]
        self.n_rows, self.feature_dim = (int(v) for v in ds.shape)
        self.dtype = ds.dtype
        self._ds = ds
        self._offsets: np.ndarray | None = None  # byte offset in the file of each chunk's first row
        self._chunk_rows = 0
        self._row_bytes = self.feature_dim * ds.dtype.itemsize
        self._fd = -1
        try:
            self._locate_chunks(ds)
        except (OSError, ValueError, AttributeError, RuntimeError):
            self._offsets = None  # fall back to h5py reads (same values)
        if self._offsets is not None:
            self._fd = os.open(self.path, os.O_RDONLY)

    @property
    def direct(self) -> bool:
        """Whether rows are read directly from the file (False: through h5py)."""
        return self._offsets is not None

    def _locate_chunks(self, ds: h5py.Dataset) -> None:
        if ds.id.get_create_plist().get_nfilters() or ds.dtype.byteorder not in ("=", "<", "|") or self.n_rows == 0:
            return  # compressed, shuffled or checksummed chunks are not the rows' bytes
        if ds.dtype.byteorder == "=" and not np.little_endian:
            return
        row_bytes = self._row_bytes
        file_bytes = self.path.stat().st_size
        if ds.chunks is None:  # contiguous: one run of every row
            offset = ds.id.get_offset()
            if offset is None or offset + self.n_rows * row_bytes > file_bytes:
                return
            self._chunk_rows = self.n_rows
            self._offsets = np.array([offset], dtype=np.int64)
            return
        if ds.chunks[1] != self.feature_dim:
            return  # chunks split rows: not a run of whole rows
        self._chunk_rows = int(ds.chunks[0])
        n_chunks = -(-self.n_rows // self._chunk_rows)
        offsets: dict[int, tuple[int, int, int]] = {}
        ds.id.chunk_iter(lambda info: offsets.__setitem__(
            int(info.chunk_offset[0]) // self._chunk_rows, (int(info.byte_offset), int(info.size), int(info.filter_mask))))
        full = self._chunk_rows * row_bytes
        if len(offsets) != n_chunks or any(size != full or mask for _, size, mask in offsets.values()):
            return  # unallocated or filtered chunks
        starts = np.array([offsets[c][0] for c in range(n_chunks)], dtype=np.int64)
        if int(starts.max()) + full > file_bytes:
            return  # a chunk ends past the end of the file
        self._offsets = starts

    def read(self, rows) -> np.ndarray:
        """Features of ``rows`` (int array, any order, repeats allowed): ``[len(rows), d]``, the stored dtype."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"{self.path}: rows must be in [0, {self.n_rows}), got {rows.min()}..{rows.max()}")
        out = np.empty((rows.size, self.feature_dim), dtype=self.dtype)
        if rows.size == 0:
            return out
        if self._offsets is not None:
            return self._pread(rows, out)
        chunk_rows = self._ds.chunks[0] if self._ds.chunks else self.n_rows
        chunk = rows // chunk_rows
        order = np.argsort(chunk, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk[order])) + 1
        for group in np.split(order, bounds):  # one slab read per chunk touched
            c = int(chunk[group[0]])
            local = rows[group] - c * chunk_rows
            lo = int(local.min())
            out[group] = self._ds[c * chunk_rows + lo:c * chunk_rows + int(local.max()) + 1][local - lo]
        return out

    def _pread(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(rows, return_inverse=True)
        offset = self._offsets[unique // self._chunk_rows] + (unique % self._chunk_rows) * self._row_bytes
        # runs of rows adjacent in the file: one read each
        breaks = np.flatnonzero(np.diff(offset) != self._row_bytes) + 1
        buffer = np.empty((unique.size, self.feature_dim), dtype=self.dtype)
        flat = buffer.view(np.uint8).reshape(-1)
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, unique.size]):
            want = (hi - lo) * self._row_bytes
            got = os.preadv(self._fd, [flat[lo * self._row_bytes:hi * self._row_bytes]], int(offset[lo]))
            if got != want:
                raise OSError(f"{self.path}: short read ({got} of {want} bytes at offset {int(offset[lo])})")
        out[:] = buffer[inverse.reshape(-1)]
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._offsets = None
        self._file.close()

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
