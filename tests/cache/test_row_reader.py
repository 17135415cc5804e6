"""RowReader against h5py: the same features for scattered, repeated, unordered rows, direct or not."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from geo.cache.row_reader import RowReader
from support.caches import make_rows, write_cache


def _rows_to_read(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = rng.integers(0, n, 700)
    return np.concatenate([picked, picked[:50], [0, n - 1, n - 1]])  # repeats, both ends, no order


def test_a_written_cache_is_mapped_and_reads_what_h5py_reads(tmp_path):
    path = tmp_path / "c.h5"
    rows = make_rows(n=2500, d=512, seed=3, n_blocks=7)  # ~1 MB chunks of 1,024 rows: 3 chunks, the last partial
    write_cache(path, rows)
    with h5py.File(path, "r") as f:
        stored = f["features"][:]
        assert f["features"].chunks is not None and f["features"].chunks[0] < 2500  # several chunks
    want = _rows_to_read(2500, 0)
    with RowReader(path) as reader:
        assert reader.direct  # the page-cache path, not the fallback
        got = reader.read(want)
        assert got.dtype == stored.dtype and np.array_equal(got, stored[want])
        assert reader.read(np.array([], np.int64)).shape == (0, 512)
        with pytest.raises(IndexError, match="rows must be in"):
            reader.read([2500])


@pytest.mark.parametrize("layout", ["compressed", "shuffled", "contiguous", "row-split chunks"])
def test_other_layouts_read_the_same_values(tmp_path, layout):
    source = tmp_path / "c.h5"
    write_cache(source, make_rows(n=900, d=16, seed=4, n_blocks=3))
    path = tmp_path / "other.h5"
    shutil.copy(source, path)
    with h5py.File(path, "r+") as f:
        x = f["features"][:]
        del f["features"]
        kw = {"compressed": dict(chunks=(100, 16), compression="gzip"), "contiguous": {},
              "shuffled": dict(chunks=(100, 16), shuffle=True),  # the same size as the rows, other bytes
              "row-split chunks": dict(chunks=(64, 8))}[layout]
        f.create_dataset("features", data=x, **kw)
    want = _rows_to_read(900, 1)
    with RowReader(path) as reader:
        assert reader.direct == (layout == "contiguous")
        assert np.array_equal(reader.read(want), x[want])
