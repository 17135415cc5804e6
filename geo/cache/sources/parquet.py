"""Parquet files holding an embedding list column and id, lat, lon[, split]."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geo.cache.sources.common import (SCAN_BATCH_ROWS, Columns, Meta, Problems, RowIndex, SourceRows, find_column,
                                      rechunk, sha256_files)
from geo.errors import ManifestError


def open_parquet(path: Path) -> pq.ParquetFile:
    """The file, read without pre-buffering: pre-buffered, ``iter_batches`` keeps every row group it has
    read in memory until the end (measured: 24 MiB more Arrow memory per 8192 x 768 batch, all of a 14 GB
    file), where unbuffered it holds one batch."""
    try:
        return pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as err:
        raise ManifestError(f"{path}: cannot read as Parquet: {err}") from None


def _embedding_type(field_type: pa.DataType, column: str, path: Path) -> None:
    ok = (pa.types.is_list(field_type) or pa.types.is_large_list(field_type)
          or pa.types.is_fixed_size_list(field_type)) and pa.types.is_floating(field_type.value_type)
    if not ok:
        raise ManifestError(f"{path}: column {column!r} is {field_type}, not a list of floats "
                            "(list<float>, list<double>, fixed_size_list<float>[d])")


def list_embeddings(array: pa.Array, d: int, first_row: int, where: Callable[[int], str]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A list column's rows as (float32 [m, d] with NaN rows for nulls, missing bool [m]).

    Raises ManifestError naming the first row whose width is not d (ragged widths).
    Null values inside a list read as NaN.
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    m = len(array)
    missing = array.is_null().to_numpy(zero_copy_only=False).astype(bool)
    if pa.types.is_fixed_size_list(array.type):
        if array.type.list_size != d:
            raise ManifestError(f"{where(first_row)}: the embedding has {array.type.list_size} values, "
                                f"the first row's has {d} (every embedding needs the same width)")
    else:
        lengths = pc.list_value_length(array).fill_null(d).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != d)
        if bad.size:
            raise ManifestError(f"{where(first_row + int(bad[0]))}: the embedding has {int(lengths[bad[0]])} values, "
                                f"the first row's has {d} (every embedding needs the same width; "
                                f"{bad.size} such rows in this batch)")
    values = array.flatten().to_numpy(zero_copy_only=False)  # only the non-null rows' values
    with np.errstate(over="ignore"):
        if not missing.any():
            return values.reshape(m, d).astype(np.float32, copy=False), missing
        out = np.full((m, d), np.nan, dtype=np.float32)
        out[~missing] = values.reshape(-1, d)
    return out, missing


class ParquetSource:
    """Embeddings and metadata in the same Parquet file(s); see the module docstring."""

    format = "parquet"

    def __init__(self, paths: list[Path], columns: Columns):
        self.paths, self.given = paths, columns
        self.files = [open_parquet(p) for p in paths]
        self.names: list[dict] = []
        for path, pf in zip(paths, self.files):
            names = pf.schema_arrow.names
            cols = {key: find_column(names, getattr(columns, key), key, path)
                    for key in ("id", "lat", "lon", "embedding")}
            cols["split"] = None if columns.split == "" else find_column(names, columns.split, "split", path,
                                                                         required=False)
            _embedding_type(pf.schema_arrow.field(cols["embedding"]).type, cols["embedding"], path)
            self.names.append(cols)
        has_split = {bool(c["split"]) for c in self.names}
        if len(has_split) > 1:
            raise ManifestError(f"some files have a split column and some do not "
                                f"({', '.join(str(p) for p, c in zip(paths, self.names) if not c['split'])} lack it)")
        self.index = RowIndex(paths, [pf.metadata.num_rows for pf in self.files])

    def where(self, row: int) -> str:
        i, r = self.index.locate(row)
        return f"{self.paths[i]} row {r}"

    def _feature_dim(self) -> int:
        for i, (pf, cols) in enumerate(zip(self.files, self.names)):
            field_type = pf.schema_arrow.field(cols["embedding"]).type
            if pa.types.is_fixed_size_list(field_type):
                return int(field_type.list_size)
            for batch in pf.iter_batches(batch_size=1024, columns=[cols["embedding"]]):
                lengths = pc.list_value_length(batch.column(0)).drop_null().to_numpy(zero_copy_only=False)
                if lengths.size:
                    if int(lengths[0]) < 1:
                        raise ManifestError(f"{self.paths[i]}: the first embedding is empty")
                    return int(lengths[0])
        raise ManifestError(f"{', '.join(map(str, self.paths))}: no row has an embedding")

    def scan(self, hash_progress=None) -> SourceRows:
        problems = Problems(self.where)
        meta = Meta()
        for i, (pf, cols) in enumerate(zip(self.files, self.names)):
            wanted = [c for c in (cols["id"], cols["lat"], cols["lon"], cols["split"]) if c]
            row = int(self.index.starts[i])
            for batch in pf.iter_batches(batch_size=SCAN_BATCH_ROWS, columns=list(dict.fromkeys(wanted))):
                meta.add(batch, cols, row, problems)
                row += batch.num_rows
        problems.raise_if_any(f"{len(problems.items)} problem(s) in the source's metadata")
        d = self._feature_dim()
        ids, lat, lon, split = meta.columns()
        return SourceRows(ids, lat, lon, split, d, list(self.paths), sha256_files(self.paths, hash_progress),
                          split_from=f"column {self.names[0]['split']!r}" if split is not None else None)

    def blocks(self, start: int, block_rows: int, d: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        return rechunk(self._pieces(start, block_rows, d), start, block_rows)

    def _pieces(self, start: int, batch_rows: int, d: int):
        if start >= int(self.index.starts[-1]):
            return
        first_file, local = self.index.locate(start)
        for i in range(first_file, len(self.files)):
            pf, column = self.files[i], self.names[i]["embedding"]
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            if not sum(sizes):
                continue
            # Start at the row group holding the first row still to import; skip the rows before it there.
            bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            skip = local if i == first_file else 0
            g = int(np.searchsorted(bounds, skip, side="right") - 1)
            skip -= int(bounds[g])
            row = int(self.index.starts[i] + bounds[g])
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=range(g, len(sizes)), columns=[column]):
                col = batch.column(0)
                if skip >= len(col):
                    skip, row = skip - len(col), row + len(col)
                    continue
                if skip:
                    col, row, skip = col.slice(skip), row + skip, 0
                yield list_embeddings(col, d, row, self.where)
                row += len(col)


