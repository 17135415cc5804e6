"""CacheWriter / FeatureCache: round trip, resumption, serving by split (in memory and streamed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from support.caches import COUNTRIES, PROVENANCE, assert_same_content, make_rows, write_blocks, write_cache

from geo.cache.store import SCHEMA, SPLIT_NAMES, CacheWriter, FeatureCache, partial_path
from geo.errors import CacheError, ConfigError


def _writer(path, rows, **kw):
    return CacheWriter(path, feature_dim=rows.features.shape[1], countries=COUNTRIES,
                       provenance=PROVENANCE, **kw)


# -- round trip ----------------------------------------------------------------


@pytest.mark.parametrize("feature_dtype", ["float16", "float32"])
def test_round_trip_gives_back_every_row(tmp_path, feature_dtype):
    rows = make_rows(n=257, d=24, seed=1)
    path = write_cache(tmp_path / "c.h5", rows, feature_dtype=feature_dtype)
    assert path == tmp_path / "c.h5" and not partial_path(path).exists()
    with FeatureCache(path) as cache:
        assert cache.schema == SCHEMA
        assert (cache.n_rows, cache.feature_dim) == (257, 24)
        assert cache.feature_dtype == np.dtype(feature_dtype)
        assert cache.countries == COUNTRIES
        assert cache.provenance == PROVENANCE
        assert cache.ids.tolist() == rows.ids
        np.testing.assert_array_equal(cache.lat_deg, rows.lat_deg)
        np.testing.assert_array_equal(cache.lon_deg, rows.lon_deg)
        np.testing.assert_array_equal(cache.split, rows.split)
        np.testing.assert_array_equal(cache.country, rows.country)
        assert cache.skipped == [s for block in rows.skipped for s in block]
        # any order, with repeats; float16 either way
        picked = np.array([200, 3, 3, 256, 0, 77])
        got = cache.load_features(picked)
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, rows.features[picked].astype(np.float16))
        for code, name in enumerate(SPLIT_NAMES):
            np.testing.assert_array_equal(cache.split_rows(name), np.flatnonzero(rows.split == code))


def test_file_is_readable_with_plain_h5py(cache_path, rows):
    with h5py.File(cache_path, "r") as f:
        assert f.attrs["schema"] == SCHEMA
        assert int(f.attrs["feature_dim"]) == 16
        assert list(f.attrs["countries"]) == COUNTRIES
        for key, value in PROVENANCE.items():
            assert f.attrs[key] == value
        assert {"created", "geo_version"} <= set(f.attrs)
        assert f["features"].dtype == np.float16 and f["features"].chunks is not None
        np.testing.assert_array_equal(f["features"][:], rows.features.astype(np.float16))
        assert f["id"].asstr()[:].tolist() == rows.ids
        assert f["lat"].dtype == np.float64 and f["country"].dtype == np.int16 and f["split"].dtype == np.uint8
        assert list(f["split"].attrs["names"]) == list(SPLIT_NAMES)
        table = f["skipped"][:]
        assert [(i.decode(), r.decode()) for i, r in table[["id", "reason"]].tolist()] == \
            [s for block in rows.skipped for s in block]


def test_rows_done_counts_written_and_skipped(tmp_path, rows):
    with _writer(tmp_path / "c.h5", rows) as w:
        write_blocks(w, rows, [0, 1])
        assert w.n_rows == 120
        assert w.rows_done == 120 + 1  # block 1 skipped one input row
        w.write_block(features=rows.features[120:130], ids=rows.ids[120:130], lat_deg=rows.lat_deg[120:130],
                      lon_deg=rows.lon_deg[120:130], split=rows.split[120:130], country=rows.country[120:130],
                      rows_consumed=15)
        assert w.rows_done == 136


# -- resumption ----------------------------------------------------------------


def test_resume_after_exception_matches_uninterrupted_write(tmp_path, rows):
    reference = write_cache(tmp_path / "ref.h5", rows)
    path = tmp_path / "c.h5"
    with pytest.raises(RuntimeError), _writer(path, rows) as w:
        write_blocks(w, rows, [0, 1])
        raise RuntimeError("killed")
    assert partial_path(path).exists() and not path.exists()
    with pytest.raises(CacheError, match="unfinished"):
        FeatureCache(path)
    with _writer(path, rows) as w:
        assert (w.n_rows, w.rows_done) == (120, 121)
        write_blocks(w, rows, [2, 3, 4])
        w.finalize()
    assert_same_content(reference, path)


def test_resume_drops_a_half_written_block(tmp_path, rows):
    reference = write_cache(tmp_path / "ref.h5", rows)
    path = tmp_path / "c.h5"
    w = _writer(path, rows)
    write_blocks(w, rows, [0, 1, 2])
    w.close()  # dropped without finalize
    # A block that died after its data but before its commit: rows and a skipped entry beyond the counts.
    with h5py.File(partial_path(path), "r+") as f:
        for name in ("features", "lat", "lon", "id", "split", "country", "skipped"):
            f[name].resize(f[name].shape[0] + 7, axis=0)
        f["features"][-7:] = np.nan
        f["id"][-7:] = ["junk"] * 7
    with _writer(path, rows) as w:
        assert w.n_rows == 180
        write_blocks(w, rows, [3, 4])
        w.finalize()
    assert_same_content(reference, path)


def test_resume_after_process_killed_mid_block(tmp_path, rows):
    """A real kill: the child exits without closing the file while a block is half written."""
    reference = write_cache(tmp_path / "ref.h5", rows)
    path = tmp_path / "c.h5"
    np.savez(tmp_path / "rows.npz", features=rows.features, lat=rows.lat_deg, lon=rows.lon_deg,
             split=rows.split, country=rows.country, ids=np.array(rows.ids))
    child = textwrap.dedent(f"""
        import os, numpy as np
        from geo.cache.store import CacheWriter
        r = np.load({str(tmp_path / 'rows.npz')!r})
        w = CacheWriter({str(path)!r}, feature_dim=16, countries={COUNTRIES!r}, provenance={PROVENANCE!r})
        bounds = {[(60 * b, 60 * b + 60) for b in range(2)]!r}
        skipped = [[], [("bad/1.jpg", "cannot identify image file")]]
        for (lo, hi), sk in zip(bounds, skipped):
            w.write_block(features=r["features"][lo:hi], ids=r["ids"][lo:hi].tolist(), lat_deg=r["lat"][lo:hi],
                          lon_deg=r["lon"][lo:hi], split=r["split"][lo:hi], country=r["country"][lo:hi], skipped=sk)
        f = w._file  # start block 2 by hand and die before its commit
        f["features"].resize(150, axis=0)
        f["features"][120:150] = r["features"][120:150]
        os._exit(9)
    """)
    assert subprocess.run([sys.executable, "-c", child]).returncode == 9
    assert not path.exists()
    with _writer(path, rows) as w:
        assert (w.n_rows, w.rows_done) == (120, 121)
        write_blocks(w, rows, [2, 3, 4])
        w.finalize()
    assert_same_content(reference, path)


@pytest.mark.parametrize("change, named", [
    ({"provenance": {**PROVENANCE, "weights": "ffff"}}, ["'weights'", "ab12ab12", "ffff"]),
    ({"feature_dim": 32}, ["feature_dim 16", "32"]),
    ({"countries": ["FR", "US"]}, ["countries", "'JP'", "['FR', 'US']"]),
])
def test_resume_refuses_a_different_job(tmp_path, rows, change, named):
    path = tmp_path / "c.h5"
    with _writer(path, rows) as w:
        write_blocks(w, rows, [0])
    kw = {"feature_dim": 16, "countries": COUNTRIES, "provenance": PROVENANCE, **change}
    with pytest.raises(CacheError, match="cannot resume") as err:
        CacheWriter(path, **kw)
    for text in [str(partial_path(path)), *named]:
        assert text in str(err.value)
    with CacheWriter(path, overwrite=True, **kw) as w:  # overwrite starts again
        assert (w.n_rows, w.rows_done) == (0, 0)


def test_complete_file_is_refused_unless_overwrite(cache_path, rows):
    with pytest.raises(CacheError, match="already exists"):
        _writer(cache_path, rows)
    other = make_rows(n=50, seed=7, n_blocks=1)
    write_cache(cache_path, other, overwrite=True)
    with FeatureCache(cache_path) as cache:
        assert cache.ids.tolist() == other.ids


def test_write_block_refuses_bad_rows(tmp_path, rows):
    with _writer(tmp_path / "c.h5", rows) as w:
        write_blocks(w, rows, [0])
        good = dict(features=rows.features[60:70], ids=rows.ids[60:70], lat_deg=rows.lat_deg[60:70],
                    lon_deg=rows.lon_deg[60:70], split=rows.split[60:70], country=rows.country[60:70])
        for key, index, value, text in [("features", 3, np.inf, "/features: row 63"),
                                        ("features", 4, 1e6, "/features: row 64"),  # inf as float16
                                        ("lat_deg", 2, 90.5, "/lat: row 62"),
                                        ("lon_deg", 5, -180.01, "/lon: row 65"),
                                        ("ids", 6, rows.ids[61], "/id: row 66"),
                                        ("split", 1, 3, "/split: row 61"),
                                        ("country", 0, 4, "/country: row 60")]:
            bad = {k: np.array(v, copy=True) for k, v in good.items()}
            bad[key][index] = value
            with pytest.raises(CacheError) as err:
                w.write_block(**bad)
            assert text in str(err.value) and "c.h5.partial" in str(err.value)
        assert w.n_rows == 60  # nothing of the refused blocks was committed
        with pytest.raises(CacheError, match="shape"):
            w.write_block(**{**good, "features": rows.features[60:70, :8]})


def test_finalize_refuses_duplicate_ids_across_blocks_and_empty_caches(tmp_path, rows):
    dup = make_rows(seed=0)
    dup.ids[200] = dup.ids[5]
    with _writer(tmp_path / "d.h5", dup) as w:
        write_blocks(w, dup, range(5))
        with pytest.raises(CacheError, match=r"/id: row 200 repeats id 'img/0/00005.jpg'"):
            w.finalize()
    assert not (tmp_path / "d.h5").exists()
    with _writer(tmp_path / "e.h5", rows) as w, pytest.raises(CacheError, match="no rows"):
        w.finalize()


def test_bad_options_are_config_errors(tmp_path, rows):
    with pytest.raises(ConfigError, match="feature_dtype"):
        _writer(tmp_path / "c.h5", rows, feature_dtype="int8")
    with pytest.raises(ConfigError, match="reserved"):
        CacheWriter(tmp_path / "c.h5", feature_dim=16, countries=COUNTRIES, provenance={"schema": "x"})


# -- serving -------------------------------------------------------------------


def _collect(cache, split, batch_size, **kw):
    batches = list(cache.iter_batches(split, batch_size, **kw))
    return np.concatenate([r for r, _ in batches]), np.concatenate([x for _, x in batches]), batches


@pytest.mark.parametrize("budget", [None, 1000], ids=["in-memory", "streamed"])
def test_every_row_of_a_split_is_served_once_per_epoch(tmp_path, budget):
    rows = make_rows(n=400, d=16, seed=3)
    path = write_cache(tmp_path / "c.h5", rows)
    with FeatureCache(path, memory_budget_bytes=budget) as cache:
        assert cache.fits_in_memory("train") is (budget is None)
        train = np.flatnonzero(rows.split == 0)
        orders = []
        for epoch in range(2):
            got_rows, got_x, batches = _collect(cache, "train", 32, shuffle=True, seed=5, epoch=epoch)
            assert [len(r) for r, _ in batches[:-1]] == [32] * (len(batches) - 1)
            assert len(batches[-1][0]) == train.size - 32 * (len(batches) - 1)
            np.testing.assert_array_equal(np.sort(got_rows), train)  # each row exactly once
            assert got_x.dtype == np.float16
            np.testing.assert_array_equal(got_x, rows.features[got_rows].astype(np.float16))
            again, _, _ = _collect(cache, "train", 32, shuffle=True, seed=5, epoch=epoch)
            np.testing.assert_array_equal(again, got_rows)  # deterministic given (seed, epoch)
            orders.append(got_rows)
        assert not np.array_equal(orders[0], orders[1])
        assert not np.array_equal(orders[0], train)  # shuffled
        plain, _, _ = _collect(cache, "val", 10, shuffle=False)
        np.testing.assert_array_equal(plain, np.flatnonzero(rows.split == 1))


def test_streaming_reads_float32_files_as_float16(tmp_path):
    rows = make_rows(n=300, d=64, seed=4)
    path = write_cache(tmp_path / "c.h5", rows, feature_dtype="float32")
    with FeatureCache(path, memory_budget_bytes=4096) as cache:
        got_rows, got_x, _ = _collect(cache, "test", 7, shuffle=True, seed=1)
        np.testing.assert_array_equal(np.sort(got_rows), np.flatnonzero(rows.split == 2))
        np.testing.assert_array_equal(got_x, rows.features[got_rows].astype(np.float16))


def test_an_empty_split_that_is_needed_is_an_error(tmp_path):
    rows = make_rows(n=100, seed=2)
    rows.split[rows.split == 2] = 1
    path = write_cache(tmp_path / "c.h5", rows)
    with FeatureCache(path) as cache:
        with pytest.raises(CacheError, match=r"c\.h5: /split has no 'test' rows"):
            cache.split_rows("test")
        with pytest.raises(CacheError, match="unknown split 'dev'"):
            list(cache.iter_batches("dev", 8, shuffle=False))
