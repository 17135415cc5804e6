"""A [n, d] .npy of embeddings and a Parquet or CSV table of id, lat, lon[, split] in the same row order."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from geo.cache.sources.common import (SCAN_BATCH_ROWS, Columns, Meta, Problems, SourceRows, find_column,
                                      npy_header, sha256_files)
from geo.cache.sources.parquet import open_parquet
from geo.errors import ManifestError


def read_table_batches(path: Path) -> tuple[list[str], Iterator[pa.RecordBatch], bool]:
    """(column names, batches, is_csv) of a Parquet or CSV table (every CSV column read as text)."""
    with open(path, "rb") as handle:
        is_parquet = handle.read(4) == b"PAR1"
    try:
        if is_parquet:
            pf = open_parquet(path)
            return pf.schema_arrow.names, pf, False
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), None)
        if not header:
            raise ManifestError(f"{path}: empty file, expected a CSV header or Parquet data")
        return header, None, True
    except (UnicodeDecodeError, OSError) as err:
        raise ManifestError(f"{path}: cannot read as CSV or Parquet: {err}") from None


def _csv_batches(path: Path, header: list[str], columns: list[str]) -> Iterator[pa.RecordBatch]:
    options = pa_csv.ConvertOptions(column_types={name: pa.string() for name in header},
                                    include_columns=columns, strings_can_be_null=True)
    try:
        reader = pa_csv.open_csv(path, convert_options=options,
                                 read_options=pa_csv.ReadOptions(block_size=16 << 20))
        for batch in reader:
            yield batch
    except pa.ArrowInvalid as err:
        raise ManifestError(f"{path}: cannot read as CSV: {err}") from None


class NpySource:
    """A [n, d] ``.npy`` of embeddings and a table of id, lat, lon[, split] in the same row order."""

    format = "npy"

    def __init__(self, npy_path: Path, table_path: Path, columns: Columns):
        self.npy_path, self.table_path, self.given = npy_path, table_path, columns
        self.paths = [npy_path, table_path]
        try:
            with open(npy_path, "rb") as handle:
                shape, fortran, dtype = npy_header(handle)
                self.offset = handle.tell()
        except (ValueError, OSError) as err:
            raise ManifestError(f"{npy_path}: not a .npy file ({err})") from None
        if len(shape) != 2 or shape[1] < 1:
            raise ManifestError(f"{npy_path}: holds an array of shape {shape}; expected [n, d] (one embedding a row)")
        if dtype.kind != "f":
            raise ManifestError(f"{npy_path}: holds {dtype}, not floats")
        if fortran:
            raise ManifestError(f"{npy_path}: is stored in Fortran (column) order; rows could not be read in "
                                "blocks. Save it row-major: np.save(path, np.ascontiguousarray(x))")
        self.n, self.d, self.dtype = int(shape[0]), int(shape[1]), dtype
        expected = self.offset + self.n * self.d * dtype.itemsize
        if npy_path.stat().st_size < expected:
            raise ManifestError(f"{npy_path}: {npy_path.stat().st_size} bytes, but its header promises "
                                f"{self.n} x {self.d} {dtype} ({expected} bytes): the file is truncated")
        names, self._parquet, self.is_csv = read_table_batches(table_path)
        self.cols = {key: find_column(names, getattr(columns, key), key, table_path) for key in ("id", "lat", "lon")}
        self.cols["split"] = None if columns.split == "" else find_column(names, columns.split, "split", table_path,
                                                                          required=False)
        self.header = names

    def where(self, row: int) -> str:
        line = f"line {row + 2}" if self.is_csv else f"row {row}"
        return f"{self.table_path} {line} ({self.npy_path.name} row {row})"

    def scan(self, hash_progress=None) -> SourceRows:
        problems = Problems(self.where)
        meta = Meta()
        wanted = list(dict.fromkeys(c for c in self.cols.values() if c))
        batches = (_csv_batches(self.table_path, self.header, wanted) if self.is_csv
                   else self._parquet.iter_batches(batch_size=SCAN_BATCH_ROWS, columns=wanted))
        row = 0
        for batch in batches:
            meta.add(batch, self.cols, row, problems)
            row += batch.num_rows
        if row != self.n:
            raise ManifestError(f"{self.table_path} has {row} rows but {self.npy_path} holds {self.n} embeddings; "
                                "the table must list the .npy's rows in the same order")
        problems.raise_if_any(f"{len(problems.items)} problem(s) in {self.table_path}")
        ids, lat, lon, split = meta.columns()
        files = [self.npy_path, self.table_path]
        return SourceRows(ids, lat, lon, split, self.d, files, sha256_files(files, hash_progress),
                          split_from=f"column {self.cols['split']!r}" if split is not None else None)

    def blocks(self, start: int, block_rows: int, d: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        row_bytes = self.d * self.dtype.itemsize
        for lo in range(start, self.n, block_rows):
            b = min(block_rows, self.n - lo)
            # A fresh map per block: pages of finished blocks are unmapped, so RSS stays one block.
            view = np.memmap(self.npy_path, dtype=self.dtype, mode="r", offset=self.offset + lo * row_bytes,
                             shape=(b, self.d))
            with np.errstate(over="ignore"):
                x = np.array(view, dtype=np.float32)
            del view
            yield lo, x, np.zeros(b, dtype=bool)


