"""A cache write that meets a full disk: committed rows are never wrong, and the rerun ends equal to an uninterrupted write.

The disk is filled portably: ``h5py.File.flush`` raises HDF5's own wording of
ENOSPC at a chosen flush of a chosen block (the data, the commit record, the
commit mark). A failed data flush can also lose a chunk that the previous,
committed block shares (what HDF5 did in the fault-injection run: a committed
block read back as zeros); the fake flush does that too, and the resumed writer
must find it by its checksum and write that block again.
"""

from __future__ import annotations

import errno

import h5py
import numpy as np
import pytest
from support.caches import (COUNTRIES, PROVENANCE, assert_same_content, block_bounds, file_content, make_rows,
                            write_blocks, write_cache)

from geo.cache.store import CacheWriter, partial_path
from geo.errors import DiskError

STAGES = {"data": 1, "record": 2, "mark": 3}  # the flushes of one block, in order
H5_ENOSPC = ("Can't write data (file write failed: time = now, filename = 'c.h5.partial', file descriptor = 5, "
             f"errno = {errno.ENOSPC}, error message = 'No space left on device', buf = 0x1, total write size = 8)")


def _writer(path, rows):
    return CacheWriter(path, feature_dim=rows.features.shape[1], countries=COUNTRIES, provenance=PROVENANCE)


def _finish(path, rows):
    """The rerun after space is freed: resume, check the committed rows, write the rest, finalize."""
    with _writer(path, rows) as w:
        _assert_committed_rows_right(partial_path(path), rows, w.n_rows)
        bounds = block_bounds(len(rows.ids), len(rows.skipped))
        consumed = np.cumsum([hi - lo + len(s) for (lo, hi), s in zip(bounds, rows.skipped)])
        first = int(np.searchsorted(consumed, w.rows_done, side="right"))
        assert first == 0 or consumed[first - 1] == w.rows_done  # resumes at a block boundary
        write_blocks(w, rows, range(first, len(bounds)))
        w.finalize()


def _three_blocks_written(tmp_path):
    """(rows, the uninterrupted cache, the path of a cache left unfinished after 3 of its 5 blocks)."""
    rows = make_rows()
    reference = write_cache(tmp_path / "ref.h5", rows)
    path = tmp_path / "c.h5"
    with _writer(path, rows) as w:
        write_blocks(w, rows, [0, 1, 2])
    return rows, reference, path


def _assert_committed_rows_right(partial, rows, n):
    with h5py.File(partial, "r") as f:
        assert int(f.attrs["rows_committed"]) == n
        np.testing.assert_array_equal(f["features"][:n], rows.features[:n].astype(np.float16))
        np.testing.assert_array_equal(f["lat"][:n], rows.lat_deg[:n])
        assert f["id"].asstr()[:n].tolist() == rows.ids[:n]


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("block", [0, 2])
def test_disk_full_at_a_block_then_rerun_ends_equal(tmp_path, monkeypatch, block, stage):
    rows = make_rows()
    reference = write_cache(tmp_path / "ref.h5", rows)
    path = tmp_path / "c.h5"
    bounds = block_bounds(len(rows.ids), len(rows.skipped))
    w = _writer(path, rows)
    real_flush, calls = h5py.File.flush, []

    def flush(f):
        calls.append(1)
        if len(calls) == 3 * block + STAGES[stage]:
            if stage == "data" and block > 0:  # the shared chunk of the previous, committed block is lost
                lo, hi = bounds[block - 1]
                f["features"][lo:hi] = 0
                f["lat"][lo:hi] = 0
                real_flush(f)
            raise OSError(H5_ENOSPC)
        return real_flush(f)

    with monkeypatch.context() as patch:
        patch.setattr(h5py.File, "flush", flush)
        with pytest.raises(DiskError) as caught:
            write_blocks(w, rows, range(len(bounds)))
    committed = bounds[block][0]
    assert str(caught.value) == (f"no space left on device while writing {partial_path(path)}: {committed} rows "
                                 "committed; free space and rerun to resume")
    w.close()
    assert not path.exists()  # nothing named like the final file
    _finish(path, rows)
    assert_same_content(reference, path)


def test_a_partial_hdf5_can_no_longer_extend_is_rebuilt_from_its_committed_rows(tmp_path, monkeypatch):
    rows, reference, path = _three_blocks_written(tmp_path)
    real_resize, failures = h5py.Dataset.resize, []

    def resize(ds, *args, **kw):
        if not failures:  # the first extension after reopening, as h5py reports it
            failures.append(1)
            raise OSError("Unable to synchronously change a dataset's dimensions (addr overflow, address = 1, "
                          "size = 2, eoa = 1)")
        return real_resize(ds, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(h5py.Dataset, "resize", resize)
        with _writer(path, rows) as w:
            assert failures and (w.n_rows, w.rows_done) == (180, 181)  # every committed row kept
    assert not partial_path(path).with_name(partial_path(path).name + ".rebuild").exists()
    _finish(path, rows)
    assert_same_content(reference, path)


@pytest.mark.parametrize("keep_fraction", [0.0, 0.3, 0.7, 0.95])
def test_a_truncated_partial_keeps_only_verified_rows_and_ends_equal(tmp_path, keep_fraction):
    """A real torn file (cut short, as a full disk leaves it): rebuilt or restarted, never wrong."""
    rows, reference, path = _three_blocks_written(tmp_path)
    partial = partial_path(path)
    with open(partial, "r+b") as handle:
        handle.truncate(int(partial.stat().st_size * keep_fraction))
    _finish(path, rows)  # checks the rows the resumed writer keeps
    assert_same_content(reference, path)


def test_the_first_block_case_resumes(tmp_path, monkeypatch):
    """A disk full on the first block, and the .partial left shrunk: the rerun starts it again and ends equal."""
    rows = make_rows()
    reference = write_cache(tmp_path / "ref.h5", rows)
    path = tmp_path / "c.h5"
    w = _writer(path, rows)
    with monkeypatch.context() as patch:
        patch.setattr(h5py.File, "flush", lambda f: (_ for _ in ()).throw(OSError(H5_ENOSPC)))
        with pytest.raises(DiskError, match=": 0 rows committed; free space and rerun to resume"):
            write_blocks(w, rows, [0])
    w.close()
    with open(partial_path(path), "r+b") as handle:
        handle.truncate(700)
    _finish(path, rows)
    assert_same_content(reference, path)


def test_a_partial_written_before_checksums_resumes_and_ends_equal(tmp_path):
    rows, reference, path = _three_blocks_written(tmp_path)
    with h5py.File(partial_path(path), "r+") as f:  # as geo wrote it before /commits existed
        del f["commits"]
        del f.attrs["blocks_committed"]
    _finish(path, rows)
    with h5py.File(path, "r") as f:
        assert int(f.attrs["blocks_committed"]) == 3  # one record for the old rows, then one per block
        assert f["commits"]["rows"].tolist() == [180, 240, 300]
    assert file_content(path)["features"].tolist() == file_content(reference)["features"].tolist()


def test_the_space_bound_covers_what_each_block_really_adds_to_the_file(tmp_path):
    # Wide rows and many blocks, so chunks of every dataset get allocated along the way.
    rows = make_rows(n=6000, d=512, n_blocks=12)
    bounds = block_bounds(len(rows.ids), len(rows.skipped))
    with _writer(tmp_path / "c.h5", rows) as w:
        for b, (lo, hi) in enumerate(bounds):
            need = w.bytes_needed(hi - lo, rows.ids[lo:hi], rows.skipped[b])
            before = partial_path(tmp_path / "c.h5").stat().st_size
            write_blocks(w, rows, [b])
            grown = partial_path(tmp_path / "c.h5").stat().st_size - before
            assert grown <= need, (b, grown, need)
            # ... and is not absurdly loose (a bound that refused a disk with room would be a defect too).
            assert need <= grown + 2 * (1 << 20) + 512 * 1024, (b, grown, need)


def test_a_block_that_cannot_fit_is_refused_before_any_byte_is_written(tmp_path, monkeypatch):
    rows, reference, path = _three_blocks_written(tmp_path)
    content = partial_path(path).read_bytes()
    monkeypatch.setattr("geo.cache.writer.free_bytes", lambda where: 1000)
    with _writer(path, rows) as w:
        with pytest.raises(DiskError, match=r"no space left on device while writing .*c\.h5\.partial: .*MiB free, "
                                            r"the next block needs up to .*MiB; 180 rows committed; free space"):
            write_blocks(w, rows, [3])
    assert partial_path(path).read_bytes() == content  # untouched: HDF5 never saw the block
    monkeypatch.undo()
    _finish(path, rows)
    assert_same_content(reference, path)
