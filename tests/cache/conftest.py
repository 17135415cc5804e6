"""Fixtures for the cache tests: a tiny valid cache and its input rows."""

import pytest
from support.caches import make_rows, write_cache


@pytest.fixture
def rows():
    return make_rows()


@pytest.fixture
def cache_path(tmp_path, rows):
    return write_cache(tmp_path / "cache.h5", rows)
