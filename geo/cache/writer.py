"""CacheWriter: append row blocks to a cache, resumably, under a temporary name.

The file is written as ``<path>.partial`` and renamed to ``path`` only by
``finalize()``, so a killed writer never leaves a file that looks complete.
Each ``write_block`` is a commit: the rows are written and flushed first, and
only then is the root attribute ``rows_committed`` raised and flushed again.
Rows beyond ``rows_committed`` (a block the process died in) are cut off when
the next writer reopens the ``.partial`` file, and writing carries on from
``rows_done`` input rows.

Example:
    with CacheWriter("cache.h5", feature_dim=2048, countries=codes, provenance=prov) as w:
        for block in blocks_from(manifest, start=w.rows_done):
            w.write_block(features=..., ids=..., lat_deg=..., lon_deg=..., split=..., country=...)
        w.finalize()
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from geo.version import __version__
from geo.cache.schema import (
    FEATURE_DTYPES,
    RESERVED_ATTRS,
    ROW_DATASETS,
    SCHEMA,
    SKIPPED_DTYPE,
    SPLIT_NAMES,
    chunk_rows,
    normalize_attr,
    partial_path,
    read_attr,
    read_countries,
    read_provenance,
)
from geo.errors import CacheError, ConfigError


class CacheWriter:
    """Append-only writer of a ``geo-feature-cache/1`` file.

    path: the final file name; rows go to ``<path>.partial`` until ``finalize()``.
    feature_dim: d, the width of /features.
    countries: ISO alpha-2 codes; /country holds indices into this list.
    provenance: backbone, weights, image_size, transform, manifest_sha256 ...; written as
        root attributes and compared when resuming (str/int/float/bool as is, other values as JSON).
    feature_dtype: "float16" (default) or "float32" storage for /features.
    overwrite: replace a complete ``path`` (at finalize) and discard an unfinished ``.partial``.

    Leaving the ``with`` block (by an exception or without ``finalize()``) closes the
    file and keeps the ``.partial`` for a later writer to resume.
    """

    def __init__(self, path: str | Path, *, feature_dim: int, countries: Sequence[str],
                 provenance: dict, feature_dtype: str = "float16", overwrite: bool = False):
        self.path = Path(path)
        self.partial_path = partial_path(self.path)
        self.feature_dim = int(feature_dim)
        self.countries = [str(c) for c in countries]
        self.feature_dtype = np.dtype(feature_dtype)
        if self.feature_dtype.name not in FEATURE_DTYPES:
            raise ConfigError(f"feature_dtype {feature_dtype!r} is not one of {', '.join(FEATURE_DTYPES)}")
        if self.feature_dim < 1:
            raise ConfigError(f"feature_dim must be positive, got {feature_dim}")
        reserved = sorted(set(provenance) & set(RESERVED_ATTRS))
        if reserved:
            raise ConfigError(f"provenance keys {reserved} are reserved for the cache's own attributes")
        self.provenance = {str(k): normalize_attr(v) for k, v in provenance.items()}

        if self.path.exists() and not overwrite:
            raise CacheError(f"{self.path} already exists (a complete cache); "
                             "use overwrite=True (--overwrite) to replace it")
        if self.partial_path.exists() and overwrite:
            self.partial_path.unlink()
        self._file = self._resume() if self.partial_path.exists() else self._create()
        # Book-keeping mirrored in memory so it stays readable after close() / finalize().
        self._n_rows = int(self._file.attrs["rows_committed"])
        self._n_skipped = int(self._file.attrs["skipped_committed"])
        self._rows_done = int(self._file.attrs["rows_done"])

    # -- opening -------------------------------------------------------------

    def _create(self) -> h5py.File:
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.partial_path, "w")
        d = self.feature_dim
        rows = chunk_rows(d, self.feature_dtype.itemsize)
        f.create_dataset("features", shape=(0, d), maxshape=(None, d), dtype=self.feature_dtype,
                         chunks=(rows, d))
        for name, dtype in ROW_DATASETS.items():
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(max(rows, 4096),))
        f["split"].attrs["names"] = list(SPLIT_NAMES)
        f.create_dataset("skipped", shape=(0,), maxshape=(None,), dtype=SKIPPED_DTYPE, chunks=(1024,))
        f.attrs["schema"] = SCHEMA
        f.attrs["feature_dim"] = d
        f.attrs["countries"] = self.countries
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        f.attrs["geo_version"] = __version__
        for key, value in self.provenance.items():
            f.attrs[key] = value
        f.attrs["rows_committed"] = 0
        f.attrs["skipped_committed"] = 0
        f.attrs["rows_done"] = 0
        f.attrs["complete"] = False
        f.flush()
        return f

    def _resume(self) -> h5py.File:
        where = self.partial_path
        try:
            f = h5py.File(where, "r+")
        except OSError as err:
            raise CacheError(f"{where}: the unfinished cache cannot be reopened ({err}); "
                             "use overwrite=True (--overwrite) to start again") from err
        try:
            self._check_same_job(f)
            n, k = int(f.attrs["rows_committed"]), int(f.attrs["skipped_committed"])
            # Drop the block a killed writer was in the middle of.
            for name in ("features", *ROW_DATASETS):
                if f[name].shape[0] != n:
                    f[name].resize(n, axis=0)
            if f["skipped"].shape[0] != k:
                f["skipped"].resize(k, axis=0)
            f.flush()
        except Exception:
            f.close()
            raise
        return f

    def _check_same_job(self, f: h5py.File) -> None:
        """CacheError naming both values when the .partial was made by a different job."""
        where = self.partial_path
        diffs = []
        if f.attrs.get("schema") != SCHEMA or "rows_committed" not in f.attrs:
            diffs.append(f"schema {read_attr(f.attrs, 'schema') if 'schema' in f.attrs else None!r} "
                         f"(resumable {SCHEMA!r} expected)")
        else:
            old_dim = int(f.attrs["feature_dim"])
            if old_dim != self.feature_dim:
                diffs.append(f"feature_dim {old_dim} in the file, {self.feature_dim} now")
            old_dtype = f["features"].dtype.name
            if old_dtype != self.feature_dtype.name:
                diffs.append(f"feature dtype {old_dtype} in the file, {self.feature_dtype.name} now")
            old_countries = read_countries(f)
            if old_countries != self.countries:
                diffs.append(f"countries {old_countries} in the file, {self.countries} now")
            old = read_provenance(f)
            for key in sorted(set(old) | set(self.provenance)):
                if old.get(key) != self.provenance.get(key):
                    diffs.append(f"provenance {key!r} is {old.get(key)!r} in the file, "
                                 f"{self.provenance.get(key)!r} now")
        if diffs:
            raise CacheError(f"{where}: cannot resume this unfinished cache, it was written by a "
                             f"different job: {'; '.join(diffs)}. Use overwrite=True (--overwrite) "
                             "to discard it and start again")

    # -- state ---------------------------------------------------------------

    @property
    def rows_done(self) -> int:
        """Input rows consumed so far (written + skipped): where the next block starts."""
        return self._rows_done

    @property
    def n_rows(self) -> int:
        """Rows committed to /features so far."""
        return self._n_rows

    # -- writing -------------------------------------------------------------

    def write_block(self, *, features, ids, lat_deg, lon_deg, split, country,
                    skipped: Sequence[tuple[str, str]] = (), rows_consumed: int | None = None) -> None:
        """Validate, append and commit one block of b rows.

        features [b, d] (any float dtype; stored as feature_dtype), ids [b] str,
        lat_deg / lon_deg [b] degrees, split [b] uint8 codes (0 train, 1 val, 2 test),
        country [b] int16 indices into ``countries``; skipped: (id, reason) pairs of input rows
        that could not be read; rows_consumed: input rows this block covers
        (default b + len(skipped)). The block is resume-safe once this returns.
        """
        if self._file is None:
            raise CacheError(f"{self.partial_path}: the writer is closed")
        f, where = self._file, self.partial_path
        n = self.n_rows
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise CacheError(f"{where}: /features block has shape {x.shape}; expected [b, {self.feature_dim}]")
        b = x.shape[0]
        with np.errstate(over="ignore"):  # values beyond float16 become inf and are refused below
            x = x.astype(self.feature_dtype)
        ids = np.asarray([str(i) for i in ids], dtype=object)
        cols = {"lat": np.asarray(lat_deg, dtype=np.float64), "lon": np.asarray(lon_deg, dtype=np.float64),
                "id": ids, "split": np.asarray(split), "country": np.asarray(country)}
        for name, col in cols.items():
            if col.shape != (b,):
                raise CacheError(f"{where}: /{name} block has shape {col.shape}; /features block has {b} rows")

        def refuse(mask, what, name):
            bad = np.flatnonzero(mask)
            if bad.size:
                raise CacheError(f"{where}: /{name}: row {n + int(bad[0])} (row {int(bad[0])} of this block, "
                                 f"id {str(ids[bad[0]])!r}) {what} ({bad.size} of the block's rows)")

        refuse(~np.isfinite(x).all(axis=1),
               f"has NaN or infinite features (as {self.feature_dtype.name})", "features")
        refuse(~((cols["lat"] >= -90) & (cols["lat"] <= 90)), "has a latitude outside [-90, 90]", "lat")
        refuse(~((cols["lon"] >= -180) & (cols["lon"] <= 180)), "has a longitude outside [-180, 180]", "lon")
        refuse(ids == "", "has an empty id", "id")
        _, first = np.unique(ids.astype(str), return_index=True) if b else (None, np.arange(0))
        repeated = np.ones(b, dtype=bool)
        repeated[first] = False
        refuse(repeated, "repeats an id from earlier in the block", "id")
        refuse((cols["split"] < 0) | (cols["split"] >= len(SPLIT_NAMES)),
               f"has a split code outside 0..{len(SPLIT_NAMES) - 1}", "split")
        refuse((cols["country"] < 0) | (cols["country"] >= len(self.countries)),
               f"has a country index outside 0..{len(self.countries) - 1}", "country")
        skipped_rows = np.array([(str(i), str(r)) for i, r in skipped], dtype=SKIPPED_DTYPE)
        consumed = b + len(skipped_rows) if rows_consumed is None else int(rows_consumed)

        # Data first, flushed; the commit (rows_committed) only after, so a kill in between
        # leaves rows that the next writer cuts off.
        f["features"].resize(n + b, axis=0)
        f["features"][n:n + b] = x
        for name, col in cols.items():
            f[name].resize(n + b, axis=0)
            f[name][n:n + b] = col.astype(ROW_DATASETS[name]) if name != "id" else col
        k = self._n_skipped
        if len(skipped_rows):
            f["skipped"].resize(k + len(skipped_rows), axis=0)
            f["skipped"][k:] = skipped_rows
        f.flush()
        f.attrs["rows_committed"] = n + b
        f.attrs["skipped_committed"] = k + len(skipped_rows)
        f.attrs["rows_done"] = self._rows_done + consumed
        f.flush()
        self._n_rows, self._n_skipped, self._rows_done = n + b, k + len(skipped_rows), self._rows_done + consumed

    def finalize(self) -> Path:
        """Check the whole file (unique ids, at least one row), mark it complete and rename it to ``path``."""
        if self._file is None:
            raise CacheError(f"{self.partial_path}: the writer is closed")
        f, where = self._file, self.partial_path
        if self.n_rows == 0:
            raise CacheError(f"{where}: no rows were written (skipped: {self._n_skipped}); "
                             "refusing to finish an empty cache")
        ids = np.asarray(f["id"].asstr()[:], dtype=str)
        _, first = np.unique(ids, return_index=True)
        if first.size != ids.size:
            repeated = np.ones(ids.size, dtype=bool)
            repeated[first] = False
            row = int(np.flatnonzero(repeated)[0])
            raise CacheError(f"{where}: /id: row {row} repeats id {str(ids[row])!r} "
                             f"({ids.size - first.size} duplicate row(s)); the file is left unfinished, "
                             "use overwrite=True (--overwrite) to write it again")
        f.attrs["complete"] = True
        f.flush()
        self.close()
        os.replace(self.partial_path, self.path)
        return self.path

    def close(self) -> None:
        """Close the file; an unfinished ``.partial`` stays for resumption."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
