"""The layout of a ``geo-feature-cache/1`` file: names, dtypes, attributes.

One HDF5 file, readable with h5py alone:

=============  ==========================  =========================================
path           dtype, shape                meaning
=============  ==========================  =========================================
/features      float16 or float32, [n, d]  pooled backbone features, chunked by rows
/lat, /lon     float64, [n]                degrees; lat in [-90, 90], lon in [-180, 180]
/id            utf-8 string, [n]           the manifest id, unique
/split         uint8, [n]                  0 train, 1 val, 2 test (attr ``names``)
/country       int16, [n]                  index into root attr ``countries``
/skipped       compound (id, reason), [k]  input rows that could not be read
=============  ==========================  =========================================

Root attributes: ``schema``, ``feature_dim``, ``countries``, ``created``,
``geo_version``, the writer's provenance (``backbone``, ``weights``,
``image_size``, ``transform``, ``manifest_sha256`` ...), and the resumption
book-keeping ``rows_committed``, ``skipped_committed``, ``rows_done``,
``blocks_committed`` and ``complete``, with ``/commits`` (one record per block:
the counts after it and the sha256 of its rows, see ``geo.cache.commits``).
Rows beyond ``rows_committed`` are a half-written block and are dropped when a
write resumes; committed blocks a failed write may have damaged are verified
against their checksums.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

SCHEMA = "geo-feature-cache/1"
SPLIT_NAMES = ("train", "val", "test")
FEATURE_DTYPES = ("float16", "float32")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: float32 features beyond this cannot be served

# Per-row datasets (one entry per cached image) and their on-disk dtypes.
STR_DTYPE = h5py.string_dtype("utf-8")
ROW_DATASETS = {
    "lat": np.dtype("float64"),
    "lon": np.dtype("float64"),
    "id": STR_DTYPE,
    "split": np.dtype("uint8"),
    "country": np.dtype("int16"),
}
SKIPPED_DTYPE = np.dtype([("id", STR_DTYPE), ("reason", STR_DTYPE)])
REQUIRED_DATASETS = ("features", *ROW_DATASETS, "skipped")

# Root attributes that the writer owns; everything else at the root is provenance.
BOOKKEEPING_ATTRS = ("rows_committed", "skipped_committed", "rows_done", "blocks_committed", "complete")
RESERVED_ATTRS = ("schema", "feature_dim", "countries", "created", "geo_version", *BOOKKEEPING_ATTRS)


def partial_path(path: str | Path) -> Path:
    """The temporary name a cache is written under until it is complete: ``<path>.partial``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def is_partial_name(path: str | Path) -> bool:
    return Path(path).name.endswith(".partial")


def chunk_rows(feature_dim: int, itemsize: int) -> int:
    """Rows per HDF5 chunk of /features: about 1 MiB per chunk, so row blocks read whole chunks."""
    return int(np.clip((1 << 20) // max(1, feature_dim * itemsize), 1, 16384))


def normalize_attr(value):
    """The value as it reads back from an HDF5 attribute (so provenance compares equal after a round trip).

    str, bool, int and float are stored as they are; anything else (lists, dicts, None)
    is stored as its JSON text.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (str, bool, int, float)):
        return value
    return json.dumps(value, sort_keys=True)


def read_attr(attrs, key):
    """An attribute as a plain Python value (str, int, float, bool or list of those)."""
    value = attrs[key]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [v.decode("utf-8") if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v
                for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_provenance(f: h5py.File) -> dict:
    """Root attributes that are not the writer's own: the provenance dict given to the writer."""
    return {k: read_attr(f.attrs, k) for k in sorted(f.attrs) if k not in RESERVED_ATTRS}


def read_countries(f: h5py.File) -> list[str]:
    return [str(c) for c in read_attr(f.attrs, "countries")] if "countries" in f.attrs else []


def decode_strings(values) -> np.ndarray:
    """bytes or str objects -> numpy str array."""
    out = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    return np.array(out, dtype=str) if out else np.zeros(0, dtype=str)


def read_skipped(f: h5py.File, n: int | None = None) -> list[tuple[str, str]]:
    """The /skipped table as (id, reason) pairs (the first ``n`` rows if given)."""
    table = f["skipped"][:n] if n is not None else f["skipped"][:]
    return [(str(i), str(r)) for i, r in zip(decode_strings(table["id"]), decode_strings(table["reason"]))]
