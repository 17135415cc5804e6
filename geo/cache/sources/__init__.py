"""Readers of embeddings made elsewhere, for ``geo cache import`` (``geo.cache.importer``).

Three formats, each read in two streaming passes:

- ``ParquetSource``: one or more Parquet files (read in the order given) with an
  embedding column (list, large_list or fixed_size_list of floats) and columns
  id, lat, lon[, split].
- ``NpySource``: a ``.npy`` of [n, d] floats (read through a fresh memory map per
  block) and a metadata table (Parquet or CSV) with id, lat, lon[, split] in the
  same row order.
- ``WebDatasetSource``: tar shards (PLONK's OSV-5M StreetCLIP embeddings, for one)
  holding, per sample key, one ``.npy`` (the embedding, [d] or [1, d]) and one
  ``.json`` (``lat``/``lon`` or ``latitude``/``longitude``; optional ``id``, else the
  key is the id; optional ``split``).

``scan()`` reads every row's metadata (never an embedding's values: Parquet and CSV
columns are projected, tar members' ``.npy`` headers are read but not their data),
the width d, and the sha256 of the source files (streamed), and raises one
``ManifestError`` naming the file and rows of everything that makes the source
unusable. ``blocks(start, block_rows)`` then yields the embeddings of rows
``start, start + 1, ...`` as float32 [b, d] blocks, holding one block (and, for
Parquet, one row group's batch) at a time. Rows are numbered in file order across
all files; messages name them as "FILE row N" (0-based, Parquet and ``.npy``),
"FILE line N" (CSV, the header is line 1) or "SHARD sample N (key K)".
"""

from __future__ import annotations

from geo.cache.sources.common import Columns, Problems, SourceRows, expand_paths
from geo.cache.sources.npy import NpySource
from geo.cache.sources.parquet import ParquetSource
from geo.cache.sources.webdataset import WebDatasetSource
from geo.errors import ConfigError

__all__ = ["Columns", "NpySource", "ParquetSource", "Problems", "SourceRows", "WebDatasetSource", "open_source"]


def open_source(paths: list[str], *, fmt: str = "auto", metadata: str | None = None,
                columns: Columns | None = None):
    """The reader for ``paths`` (files or glob patterns); ``fmt`` auto: by the files' extension."""
    columns = columns or Columns()
    files = expand_paths(list(paths), "source")
    if fmt == "auto":
        suffixes = {p.suffix.lower() for p in files}
        kinds = {".parquet": "parquet", ".pq": "parquet", ".npy": "npy", ".tar": "webdataset"}
        found = {kinds.get(s) for s in suffixes}
        if len(found) != 1 or None in found:
            raise ConfigError(f"cannot tell the format of {', '.join(str(p) for p in files[:3])} from the "
                              "extension (.parquet, .npy, .tar); pass --format parquet|npy|webdataset")
        fmt = found.pop()
    if fmt != "npy" and metadata:
        raise ConfigError(f"--metadata is for a .npy source only (this source is {fmt})")
    if fmt == "parquet":
        return ParquetSource(files, columns)
    if fmt == "npy":
        if len(files) != 1:
            raise ConfigError(f"a .npy source is one file ({len(files)} given)")
        if not metadata:
            raise ConfigError(f"{files[0]}: a .npy source needs --metadata TABLE (Parquet or CSV with id, lat, lon"
                              "[, split] in the .npy's row order)")
        if columns.embedding:
            raise ConfigError("--embedding-column is for Parquet sources; a .npy holds only embeddings")
        table = expand_paths([metadata], "--metadata")[0]
        return NpySource(files[0], table, columns)
    if fmt == "webdataset":
        given = [name for name in ("id", "lat", "lon", "split", "embedding") if getattr(columns, name)]
        if given:
            raise ConfigError(f"--{given[0]}-column is for Parquet and .npy sources; WebDataset samples are read "
                              "from their .npy and .json members")
        return WebDatasetSource(files)
    raise ConfigError(f"--format {fmt!r}: choose auto, parquet, npy or webdataset")
