"""Checks that a cache file holds what schema ``geo-feature-cache/1`` promises.

``find_problems(f)`` returns one readable line per problem, naming the dataset,
the first offending row and how many rows offend. Features are checked in row
blocks, so a cache larger than memory is validated by streaming it.
"""

from __future__ import annotations

import h5py
import numpy as np

from geo.cache.schema import (
    FEATURE_DTYPES,
    FLOAT16_MAX,
    REQUIRED_DATASETS,
    ROW_DATASETS,
    SCHEMA,
    SPLIT_NAMES,
    decode_strings,
    read_attr,
    read_countries,
)

_BLOCK_BYTES = 32 << 20  # features are read this many bytes at a time


def _rows(count: int) -> str:
    return f"{count} row{'s' if count != 1 else ''}"


def _first(mask: np.ndarray, what: str, dataset: str, offset: int = 0) -> str | None:
    """'/dataset: row R <what> (k rows)' for the first True in mask, or None."""
    bad = np.flatnonzero(mask)
    if bad.size == 0:
        return None
    return f"/{dataset}: row {int(bad[0]) + offset} {what} ({_rows(bad.size)})"


def check_schema(f: h5py.File) -> str | None:
    """A problem line if the root ``schema`` attribute is missing or unknown, else None."""
    if "schema" not in f.attrs:
        return f"root attribute 'schema' is missing (expected {SCHEMA!r}); not a geo feature cache"
    schema = read_attr(f.attrs, "schema")
    if schema != SCHEMA:
        return f"root attribute 'schema' is {schema!r}; this geo reads only {SCHEMA!r}"
    return None


def check_features(ds: h5py.Dataset, n_rows: int) -> list[str]:
    """NaN / inf rows, and float32 values that float16 serving would turn into inf; streamed in blocks."""
    block = max(1, _BLOCK_BYTES // max(1, ds.shape[1] * ds.dtype.itemsize))
    first_bad = first_big = None
    n_bad = n_big = 0
    for start in range(0, n_rows, block):
        x = ds[start:min(start + block, n_rows)]
        finite = np.isfinite(x).all(axis=1)
        bad = np.flatnonzero(~finite)
        if bad.size and first_bad is None:
            first_bad = start + int(bad[0])
        n_bad += bad.size
        if x.dtype != np.float16:
            big = np.flatnonzero(finite & (np.abs(x) > FLOAT16_MAX).any(axis=1))
            if big.size and first_big is None:
                first_big = start + int(big[0])
            n_big += big.size
    problems = []
    if n_bad:
        problems.append(f"/features: row {first_bad} has NaN or infinite values ({_rows(n_bad)})")
    if n_big:
        problems.append(f"/features: row {first_big} has values beyond the float16 range "
                        f"(|x| > {FLOAT16_MAX:g}), which the reader cannot serve ({_rows(n_big)})")
    return problems


def check_rows(f: h5py.File, n_rows: int) -> list[str]:
    """lat/lon ranges, unique ids, split codes and country indices of the first n_rows rows."""
    problems = []
    lat = f["lat"][:n_rows]
    lon = f["lon"][:n_rows]
    problems.append(_first(~((lat >= -90) & (lat <= 90)),
                           "has a latitude outside [-90, 90] degrees", "lat"))
    problems.append(_first(~((lon >= -180) & (lon <= 180)),
                           "has a longitude outside [-180, 180] degrees", "lon"))

    ids = decode_strings(f["id"][:n_rows])
    problems.append(_first(ids == "", "has an empty id", "id"))
    if ids.size:
        _, first_index = np.unique(ids, return_index=True)
        repeated = np.ones(ids.size, dtype=bool)
        repeated[first_index] = False  # every row but the first occurrence of its id
        if repeated.any():
            row = int(np.flatnonzero(repeated)[0])
            problems.append(f"/id: row {row} repeats id {str(ids[row])!r} of row "
                            f"{int(np.flatnonzero(ids == ids[row])[0])} "
                            f"({_rows(int(repeated.sum())).replace(' row', ' duplicate row')})")

    split = f["split"][:n_rows]
    problems.append(_first(split >= len(SPLIT_NAMES),
                           f"has a split code outside 0..{len(SPLIT_NAMES) - 1} ({', '.join(SPLIT_NAMES)})",
                           "split"))
    n_countries = len(read_countries(f))
    country = f["country"][:n_rows].astype(np.int64)
    problems.append(_first((country < 0) | (country >= n_countries),
                           f"has a country index outside 0..{n_countries - 1} "
                           f"(root attribute 'countries' lists {n_countries})", "country"))
    return [p for p in problems if p]


def find_problems(f: h5py.File, n_rows: int | None = None) -> list[str]:
    """Every problem found in an open cache file (empty list = valid).

    n_rows: check only the first n_rows rows (an unfinished file's committed rows);
    default: all rows of /features.
    """
    problem = check_schema(f)
    if problem:
        return [problem]  # an unknown layout: nothing else can be trusted
    problems = [f"dataset /{name} is missing" for name in REQUIRED_DATASETS if name not in f]
    for key in ("feature_dim", "countries"):
        if key not in f.attrs:
            problems.append(f"root attribute {key!r} is missing")
    if problems:
        return problems

    features = f["features"]
    if features.ndim != 2:
        return [f"/features has shape {features.shape}; expected [rows, feature_dim]"]
    if features.dtype.name not in FEATURE_DTYPES:
        problems.append(f"/features has dtype {features.dtype}; expected one of {', '.join(FEATURE_DTYPES)}")
    feature_dim = int(read_attr(f.attrs, "feature_dim"))
    if features.shape[1] != feature_dim:
        problems.append(f"/features has {features.shape[1]} columns but root attribute feature_dim is {feature_dim}")
    unfinished = n_rows is not None  # rows past the committed count are a half-written block, not a fault
    if n_rows is None:
        n_rows = features.shape[0]
    for name in ("features", *ROW_DATASETS):
        length = f[name].shape[0] if f[name].ndim else 0
        if length < n_rows:
            problems.append(f"/{name}: row {length} is missing: /{name} has {length} rows "
                            f"but /features has {n_rows} ({_rows(n_rows - length)})")
        elif length > n_rows and not unfinished:
            problems.append(f"/{name}: row {n_rows} is extra: /{name} has {length} rows "
                            f"but /features has {n_rows} ({_rows(length - n_rows)})")
    if problems:
        return problems  # row checks assume aligned datasets

    names = read_attr(f["split"].attrs, "names") if "names" in f["split"].attrs else None
    if names is not None and list(names) != list(SPLIT_NAMES):
        problems.append(f"/split attribute 'names' is {names}; expected {list(SPLIT_NAMES)}")
    if features.dtype.name in FEATURE_DTYPES:
        problems += check_features(features, n_rows)
    problems += check_rows(f, n_rows)
    return problems
