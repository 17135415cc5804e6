"""CacheWriter: append row blocks to a cache, resumably, under a temporary name.

The file is written as ``<path>.partial`` and renamed to ``path`` only by
``finalize()``, so a killed writer never leaves a file that looks complete.
Each ``write_block`` is a commit: the rows are written and flushed first, then
the block's record with its checksum (``geo.cache.commits``), and only then is
the root attribute ``rows_committed`` raised and flushed again. Rows beyond
``rows_committed`` (a block the process died in) are cut off when the next
writer reopens the ``.partial`` file, committed blocks that a failed write may
have damaged are verified against their checksums (and rewritten from the first
that does not match), and writing carries on from ``rows_done`` input rows. A
``.partial`` that HDF5 can no longer open or extend is rebuilt from its verified
committed rows. A full or failing disk stops the writer with a ``DiskError``
saying how many rows are committed. Before each block the writer checks that the
file system has room for it (``bytes_needed``): a write that HDF5 cannot finish
leaves the library holding dirty buffers it can never flush, and its clean-up at
interpreter exit then crashes (exit 139) — refusing the block beforehand keeps the
file and the library clean. The check is conservative (whole chunks plus a slack);
a disk filled by another process mid-write is still caught by the commit protocol.

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
    decode_strings,
    normalize_attr,
    partial_path,
    read_attr,
    read_countries,
    read_provenance,
)
from geo.cache.commits import COMMITS_DTYPE, block_digest, read_commits, stored_digest, verified_prefix
from geo.errors import CacheError, ConfigError, DiskError, GeoError, disk_error

# Room left for what a block's chunks do not count: HDF5 metadata (B-tree nodes, object headers,
# the global heap of the ids' strings) and the commit record. Generous next to a block's own bytes.
METADATA_SLACK_BYTES = 256 * 1024


def _new_chunk_bytes(dataset: h5py.Dataset, n_before: int, n_after: int) -> int:
    """File bytes HDF5 allocates when a chunked 1-D/2-D dataset grows from ``n_before`` to ``n_after`` rows.

    A chunk is allocated whole the first time a row of it is written, so growth costs the
    chunks newly touched, whatever fraction of them is filled.
    """
    rows = dataset.chunks[0]
    chunk_bytes = int(np.prod(dataset.chunks)) * dataset.dtype.itemsize
    return (-(-n_after // rows) - -(-n_before // rows)) * chunk_bytes


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path``."""
    stat = os.statvfs(path.parent if not path.is_dir() else path)
    return stat.f_bavail * stat.f_frsize


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
        self._file = None
        try:
            self._file = self._resume() if self.partial_path.exists() else self._create(self.partial_path)
        except GeoError:
            raise
        except Exception as err:
            raise disk_error(err, self.partial_path, "free space and rerun to resume") or err
        # Book-keeping mirrored in memory so it stays readable after close() / finalize().
        self._n_rows = int(self._file.attrs["rows_committed"])
        self._n_skipped = int(self._file.attrs["skipped_committed"])
        self._rows_done = int(self._file.attrs["rows_done"])

    # -- opening -------------------------------------------------------------

    def _create(self, where: Path) -> h5py.File:
        where.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(where, "w")
        d = self.feature_dim
        rows = chunk_rows(d, self.feature_dtype.itemsize)
        f.create_dataset("features", shape=(0, d), maxshape=(None, d), dtype=self.feature_dtype,
                         chunks=(rows, d))
        for name, dtype in ROW_DATASETS.items():
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(max(rows, 4096),))
        f["split"].attrs["names"] = list(SPLIT_NAMES)
        f.create_dataset("skipped", shape=(0,), maxshape=(None,), dtype=SKIPPED_DTYPE, chunks=(1024,))
        f.create_dataset("commits", shape=(0,), maxshape=(None,), dtype=COMMITS_DTYPE, chunks=(1024,))
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
        f.attrs["blocks_committed"] = 0
        f.attrs["complete"] = False
        f.flush()
        return f

    def _resume(self) -> h5py.File:
        where = self.partial_path
        if where.stat().st_size == 0:  # a disk that filled before the first byte: nothing to keep
            return self._create(where)
        try:
            f = h5py.File(where, "r+")
        except OSError:
            return self._rebuild()
        try:
            self._check_same_job(f)
        except Exception:
            f.close()
            raise
        try:
            self._rewind(f)
            # A file HDF5 can no longer extend fails here, not at the next block.
            f["features"].resize(f["features"].shape[0] + 1, axis=0)
            f["features"].resize(f["features"].shape[0] - 1, axis=0)
            f.flush()
        except Exception as err:
            f.close()
            if disk_error(err, where) is not None:
                raise
            return self._rebuild()
        return f

    def _rewind(self, f: h5py.File) -> None:
        """Cut rows beyond the commit mark, and back to the last block whose checksum matches."""
        if "blocks_committed" in f.attrs:  # older files have no checksums: trust the commit mark
            commits = read_commits(f)
            good = verified_prefix(f, commits)
            if good < len(commits) or good < int(f.attrs["blocks_committed"]):
                last = commits[good - 1] if good else np.zeros(1, COMMITS_DTYPE)[0]
                f.attrs["rows_committed"], f.attrs["skipped_committed"] = int(last["rows"]), int(last["skipped"])
                f.attrs["rows_done"], f.attrs["blocks_committed"] = int(last["rows_done"]), good
            if f["commits"].shape[0] != good:
                f["commits"].resize(good, axis=0)
        n, k = int(f.attrs["rows_committed"]), int(f.attrs["skipped_committed"])
        for name in ("features", *ROW_DATASETS):
            if f[name].shape[0] != n:
                f[name].resize(n, axis=0)
        if f["skipped"].shape[0] != k:
            f["skipped"].resize(k, axis=0)
        if "blocks_committed" not in f.attrs:  # written before checksums: its rows become one verified block
            f.create_dataset("commits", data=np.array([(n, k, int(f.attrs["rows_done"]),
                                                        stored_digest(f, 0, n, 0, k))], dtype=COMMITS_DTYPE),
                             maxshape=(None,), chunks=(1024,))
            f.attrs["blocks_committed"] = 1
        f.flush()

    def _rebuild(self) -> h5py.File:
        """A fresh ``.partial`` holding the old one's committed rows up to the first that does not verify.

        Used when HDF5 can no longer open or extend the file (a write that failed in the
        middle of its metadata). Nothing but this file is touched: the backbone and its
        checkpoints stay. A file too broken to read at all holds nothing to keep.
        """
        where, scratch = self.partial_path, self.partial_path.with_name(self.partial_path.name + ".rebuild")
        new = self._create(scratch)
        try:
            try:
                old = h5py.File(where, "r")
            except OSError:
                old = None
            if old is not None:
                with old:
                    self._check_same_job(old)
                    self._copy_verified(old, new)
            new.flush()
            new.close()
        except BaseException:
            new.close()
            scratch.unlink(missing_ok=True)
            raise
        os.replace(scratch, where)
        return h5py.File(where, "r+")

    def _copy_verified(self, old: h5py.File, new: h5py.File) -> None:
        """Append ``old``'s committed blocks to ``new`` in order, stopping at the first unreadable or wrong one."""
        try:
            commits = read_commits(old)
        except Exception:
            return
        previous = np.zeros(1, COMMITS_DTYPE)[0]
        for record in commits:
            a, b = int(previous["rows"]), int(record["rows"])
            k0, k1 = int(previous["skipped"]), int(record["skipped"])
            try:
                if stored_digest(old, a, b, k0, k1) != bytes(record["sha256"]):
                    return
                cols = {name: (old[name].asstr()[a:b] if name == "id" else old[name][a:b]) for name in ROW_DATASETS}
                table = old["skipped"][k0:k1]
            except Exception:  # unreadable: HDF5 lost this block
                return
            skipped = list(zip(decode_strings(table["id"]), decode_strings(table["reason"]))) if len(table) else []
            self._append(new, old["features"][a:b], cols, skipped,
                         int(record["rows_done"]) - int(previous["rows_done"]))
            previous = record

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
        skipped = [(str(i), str(r)) for i, r in skipped]
        consumed = b + len(skipped) if rows_consumed is None else int(rows_consumed)
        need = self.bytes_needed(b, ids, skipped)
        free = free_bytes(where)
        if free < need:  # refused before any byte is written: the file and HDF5 stay clean
            raise DiskError(f"no space left on device while writing {where}: {free / 2**20:.2f} MiB free, "
                            f"the next block needs up to {need / 2**20:.2f} MiB; {self._n_rows} rows committed; "
                            "free space and rerun to resume")
        try:
            self._append(f, x, cols, skipped, consumed)
        except Exception as err:
            self._abandon()  # the file's state in this process is unknown: the next writer verifies it
            readable = disk_error(err, where, f"{self._n_rows} rows committed; free space and rerun to resume")
            if readable is not None:
                raise readable from None
            raise

    def bytes_needed(self, b: int, ids: np.ndarray, skipped: list[tuple[str, str]]) -> int:
        """An upper bound of the file bytes appending a block of ``b`` rows (these ids, these skipped rows) takes.

        New chunks of every row dataset, the ids' and skipped rows' strings in the global heap
        (16 bytes of heap object header each) and ``METADATA_SLACK_BYTES``.
        """
        f, n, k = self._file, self._n_rows, self._n_skipped
        need = sum(_new_chunk_bytes(f[name], n, n + b) for name in ("features", *ROW_DATASETS))
        need += _new_chunk_bytes(f["skipped"], k, k + len(skipped))
        need += sum(len(str(i).encode()) + 16 for i in ids)
        need += sum(len(i.encode()) + len(r.encode()) + 32 for i, r in skipped)
        return need + METADATA_SLACK_BYTES

    def _append(self, f: h5py.File, x: np.ndarray, cols: dict, skipped: list[tuple[str, str]],
                consumed: int) -> None:
        """Write one checked block to ``f`` and commit it (data, flush, record, flush, commit mark, flush)."""
        skipped_rows = np.array(skipped, dtype=SKIPPED_DTYPE)
        n, k = int(f.attrs["rows_committed"]), int(f.attrs["skipped_committed"])
        b = x.shape[0]
        stored = {name: np.asarray(col, dtype=object) if name == "id" else np.asarray(col).astype(ROW_DATASETS[name])
                  for name, col in cols.items()}
        # Data first, flushed; the record and the commit mark only after, so a failure in between
        # leaves rows beyond the mark, which the next writer cuts off. The dataset handles stay open
        # until the flush: HDF5 writes a dataset's cached chunks when its last handle closes, and a
        # failure there (a full disk) is only printed by h5py, never raised, so a throwaway handle
        # per write would lose the error and commit rows that never reached the disk.
        ds = {name: f[name] for name in ("features", *ROW_DATASETS, "skipped", "commits")}
        ds["features"].resize(n + b, axis=0)
        ds["features"][n:n + b] = x
        for name, col in stored.items():
            ds[name].resize(n + b, axis=0)
            ds[name][n:n + b] = col
        if len(skipped_rows):
            ds["skipped"].resize(k + len(skipped_rows), axis=0)
            ds["skipped"][k:] = skipped_rows
        f.flush()
        digest = block_digest(x, stored, skipped)
        done = int(f.attrs["rows_done"]) + consumed
        m = int(f.attrs["blocks_committed"])
        ds["commits"].resize(m + 1, axis=0)
        ds["commits"][m] = np.array((n + b, k + len(skipped_rows), done, digest), dtype=COMMITS_DTYPE)
        f.flush()
        f.attrs["rows_committed"], f.attrs["skipped_committed"] = n + b, k + len(skipped_rows)
        f.attrs["rows_done"], f.attrs["blocks_committed"] = done, m + 1
        f.flush()
        if f is self._file:
            self._n_rows, self._n_skipped, self._rows_done = n + b, k + len(skipped_rows), done

    def _abandon(self) -> None:
        """Close after a failed write without letting HDF5's own error on close hide the first one."""
        try:
            self.close()
        except Exception:
            self._file = None

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
