"""`geo cache info FILE` through click's CliRunner: valid, invalid and unfinished files."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
from support.caches import COUNTRIES, PROVENANCE, write_blocks
from click.testing import CliRunner

from geo.cache.store import CacheWriter, cache_info, partial_path
from geo.cli import cli


def _run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_info_on_a_valid_cache(cache_path, rows):
    result = _run("cache", "info", cache_path)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "schema:      geo-feature-cache/1" in out
    assert "rows:        300" in out
    assert "dim 16, float16" in out
    counts = np.bincount(rows.split, minlength=3)
    assert f"splits:      train {counts[0]}, val {counts[1]}, test {counts[2]}" in out
    per_country = np.bincount(rows.country, minlength=len(COUNTRIES))
    for code, count in zip(COUNTRIES, per_country):
        assert f"{code} {count}" in out
    for key, value in PROVENANCE.items():
        assert key in out and str(value) in out
    assert "skipped:     2 input rows" in out
    assert out.rstrip().endswith("verdict:     valid")
    assert out == cache_info(cache_path) + "\n"


def test_info_on_an_invalid_cache_lists_problems_and_fails(cache_path, tmp_path):
    bad = tmp_path / "bad.h5"
    shutil.copy(cache_path, bad)
    with h5py.File(bad, "r+") as f:
        f["lat"][12] = 123.0
    result = _run("cache", "info", bad)
    assert result.exit_code == 2
    assert "verdict:     INVALID (1 problem)" in result.output
    assert "/lat: row 12 has a latitude outside [-90, 90]" in result.output
    assert f"Error: {bad} is not a valid" in result.output


def test_info_on_an_unknown_schema(cache_path, tmp_path):
    bad = tmp_path / "bad.h5"
    shutil.copy(cache_path, bad)
    with h5py.File(bad, "r+") as f:
        f.attrs["schema"] = "someone-else/3"
    result = _run("cache", "info", bad)
    assert result.exit_code == 2
    assert "this geo reads only 'geo-feature-cache/1'" in result.output


def test_info_on_an_unfinished_write_says_so(tmp_path, rows):
    path = tmp_path / "c.h5"
    with CacheWriter(path, feature_dim=16, countries=COUNTRIES, provenance=PROVENANCE) as w:
        write_blocks(w, rows, [0, 1])
    with h5py.File(partial_path(path), "r+") as f:  # and a block that died before its commit
        f["features"].resize(130, axis=0)
    result = _run("cache", "info", partial_path(path))
    assert result.exit_code == 2
    assert "verdict:     INCOMPLETE, not a finished cache (0 problems in the committed rows)" in result.output
    assert "120 rows committed, 121 input rows done" in result.output
    result = _run("cache", "info", path)  # the final name does not exist yet
    assert result.exit_code == 2
    assert "no such cache file" in result.output and "c.h5.partial exists" in result.output


def test_cache_commands_have_help_with_an_example():
    for args in (["cache", "--help"], ["cache", "info", "--help"]):
        result = _run(*args)
        assert result.exit_code == 0 and "Example:" in result.output
