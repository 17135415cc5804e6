"""Every bad input gets a CacheError naming the file, the dataset, the first offending row and the count.

The bad files are made with h5py directly, from a valid cache.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

import geo.cache.validate as validate_module
from geo.cache.store import FeatureCache
from geo.errors import CacheError


def _corrupt(cache_path, tmp_path, edit):
    bad = tmp_path / "bad.h5"
    shutil.copy(cache_path, bad)
    with h5py.File(bad, "r+") as f:
        edit(f)
    return bad


def _set(name, rows, value):
    def edit(f):
        for r in rows:
            f[name][r] = value
    return edit


def _dup_ids(f):
    f["id"][200] = f["id"].asstr()[3]
    f["id"][250] = f["id"].asstr()[3]


def _bad_country(f):
    f["country"][11] = 4  # 4 countries listed: indices 0..3
    f["country"][12] = -1


CASES = [
    # (edit, expected fragments of the message)
    (_set("features", [137, 150], np.nan), ["/features: row 137", "NaN or infinite", "(2 rows)"]),
    (_set("features", [299], np.inf), ["/features: row 299", "(1 row)"]),
    (_set("lat", [42, 43, 44], 91.0), ["/lat: row 42", "outside [-90, 90]", "(3 rows)"]),
    (_set("lat", [8], np.nan), ["/lat: row 8", "(1 row)"]),
    (_set("lon", [7], -181.0), ["/lon: row 7", "outside [-180, 180]", "(1 row)"]),
    (_dup_ids, ["/id: row 200 repeats id 'img/0/00003.jpg' of row 3", "(2 duplicate rows)"]),
    (_set("split", [10], 5), ["/split: row 10", "split code outside 0..2", "(1 row)"]),
    (_bad_country, ["/country: row 11", "outside 0..3", "(2 rows)"]),
    (lambda f: f["lon"].resize(297, axis=0), ["/lon: row 297 is missing", "297 rows", "/features has 300"]),
    (lambda f: f["id"].resize(301, axis=0), ["/id: row 300 is extra"]),
    (lambda f: f.__delitem__("country"), ["dataset /country is missing"]),
    (lambda f: f.attrs.__delitem__("schema"), ["'schema' is missing"]),
    (lambda f: f.attrs.__setitem__("schema", "geo-feature-cache/99"), ["'geo-feature-cache/99'"]),
]


@pytest.mark.parametrize("edit, fragments", CASES,
                         ids=["nan", "inf", "lat", "lat-nan", "lon", "dup-id", "split", "country",
                              "short", "long", "missing-dataset", "no-schema", "unknown-schema"])
def test_bad_file_is_refused_with_file_dataset_and_row(cache_path, tmp_path, edit, fragments):
    bad = _corrupt(cache_path, tmp_path, edit)
    with pytest.raises(CacheError) as err:
        FeatureCache(bad)
    message = str(err.value)
    assert str(bad) in message
    for fragment in fragments:
        assert fragment in message


def test_all_problems_are_listed_at_once(cache_path, tmp_path):
    def edit(f):
        f["lat"][5] = -95.0
        f["split"][6] = 9
    with pytest.raises(CacheError) as err:
        FeatureCache(_corrupt(cache_path, tmp_path, edit))
    assert "/lat: row 5" in str(err.value) and "/split: row 6" in str(err.value)


def test_feature_check_streams_in_row_blocks(cache_path, tmp_path, monkeypatch):
    """With 3-row blocks (16 float16 values a row), the first bad row and the count are still exact."""
    monkeypatch.setattr(validate_module, "_BLOCK_BYTES", 3 * 16 * 2)
    bad = _corrupt(cache_path, tmp_path, _set("features", [100, 101, 200, 298], -np.inf))
    with h5py.File(bad, "r") as f:
        assert validate_module.check_features(f["features"], 300) == \
            ["/features: row 100 has NaN or infinite values (4 rows)"]


def test_float32_values_beyond_float16_are_flagged(tmp_path):
    from support.caches import make_rows, write_cache
    path = write_cache(tmp_path / "c.h5", make_rows(n=50), feature_dtype="float32")
    with h5py.File(path, "r+") as f:
        f["features"][17, 3] = 7e4
    with pytest.raises(CacheError, match=r"/features: row 17 has values beyond the float16 range"):
        FeatureCache(path)


def test_validate_false_skips_the_content_checks_but_not_the_schema(cache_path, tmp_path):
    bad = _corrupt(cache_path, tmp_path, _set("lat", [1], 100.0))
    with FeatureCache(bad, validate=False) as cache:
        assert cache.validate() == ["/lat: row 1 has a latitude outside [-90, 90] degrees (1 row)"]
    unknown = _corrupt(cache_path, tmp_path, lambda f: f.attrs.__setitem__("schema", "other/2"))
    with pytest.raises(CacheError, match="'other/2'"):
        FeatureCache(unknown, validate=False)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(CacheError, match=r"nope\.h5: no such cache file"):
        FeatureCache(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(CacheError, match=r"text\.h5: not a readable HDF5 file"):
        FeatureCache(tmp_path / "text.h5")
