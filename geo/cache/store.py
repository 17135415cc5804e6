"""The HDF5 feature cache (schema ``geo-feature-cache/1``): the public API in one place.

Writer, reader, validation and summary live in their own modules beside this one:

- ``schema.py``   layout, names, attribute helpers
- ``writer.py``   CacheWriter: resumable, committed row blocks under ``<path>.partial``
- ``reader.py``   FeatureCache: validate on open, serve float16 features by split
- ``validate.py`` the checks behind ``FeatureCache.validate`` and ``geo cache info``
- ``info.py``     cache_info: the text ``geo cache info FILE`` prints

Any tool can read a cache with h5py alone::

    with h5py.File("cache.h5") as f:
        x = f["features"][:1000]; ids = f["id"].asstr()[:1000]; lat = f["lat"][:1000]
"""

from geo.cache.info import cache_info, cache_report
from geo.cache.reader import FeatureCache, default_memory_budget_bytes
from geo.cache.schema import SCHEMA, SPLIT_NAMES, partial_path
from geo.cache.writer import CacheWriter

__all__ = [
    "SCHEMA",
    "SPLIT_NAMES",
    "CacheWriter",
    "FeatureCache",
    "cache_info",
    "cache_report",
    "default_memory_budget_bytes",
    "partial_path",
]
