"""What the source readers share: columns, the scan's result, problem lists, hashing, row bookkeeping."""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geo.cache.schema import SPLIT_NAMES
from geo.errors import ConfigError, ManifestError

MAX_LISTED_PROBLEMS = 20
SCAN_BATCH_ROWS = 1 << 16
HASH_BLOCK_BYTES = 8 << 20

# Column names tried, in order and case-insensitively, when an option does not name one.
DEFAULT_COLUMNS = {"id": ("id",), "lat": ("lat", "latitude"), "lon": ("lon", "lng", "longitude"),
                   "split": ("split",), "embedding": ("embedding",)}



@dataclass
class Columns:
    """Column names given by options (None: the ``DEFAULT_COLUMNS`` candidates; split "" = ignore the column)."""

    id: str | None = None
    lat: str | None = None
    lon: str | None = None
    split: str | None = None
    embedding: str | None = None


@dataclass
class SourceRows:
    """What ``scan()`` found: one entry per input row, in order.

    ids: utf-8 strings [n] (arrow, compact for millions of rows); lat_deg / lon_deg:
    float64 [n] degrees as given (NaN where missing); split: uint8 [n] codes, or None
    when the source has no split; skip_reason: rows that cannot be imported whatever
    their embedding (row -> reason); feature_dim: d; files: every file read;
    sha256: hex digest of the source files (one file: its sha256; several: the sha256
    of their "DIGEST  NAME" lines); split_from: where the split came from.
    """

    ids: pa.ChunkedArray
    lat_deg: np.ndarray
    lon_deg: np.ndarray
    split: np.ndarray | None
    feature_dim: int
    files: list[Path]
    sha256: str
    split_from: str | None = None
    skip_reason: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.lat_deg)


class Problems:
    """Collects (row, message) pairs and raises one ManifestError naming the first ``MAX_LISTED_PROBLEMS``."""

    def __init__(self, where: Callable[[int], str]):
        self.where, self.items = where, []

    def add(self, rows, message) -> None:
        """``rows``: a bool mask or row numbers; ``message``: text or row -> text."""
        rows = np.asarray(rows)
        for row in (np.flatnonzero(rows) if rows.dtype == bool else rows)[:MAX_LISTED_PROBLEMS]:
            self.items.append((int(row), message(int(row)) if callable(message) else message))

    def raise_if_any(self, what: str) -> None:
        if not self.items:
            return
        self.items.sort(key=lambda item: item[0])
        lines = [f"{self.where(row)}: {message}" for row, message in self.items[:MAX_LISTED_PROBLEMS]]
        more = f"\n  ... and more (the first {MAX_LISTED_PROBLEMS} are listed)" \
            if len(self.items) > MAX_LISTED_PROBLEMS else ""
        raise ManifestError(f"{what}:\n  " + "\n  ".join(lines) + more)



# ---- helpers ----------------------------------------------------------------


def expand_paths(patterns: list[str], what: str) -> list[Path]:
    """Paths and glob patterns -> existing files, each pattern's matches sorted by name, in the order given."""
    out: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f"{what} {pattern!r}: no file matches")
            out.extend(matches)
        else:
            path = Path(pattern).expanduser()
            if not path.is_file():
                raise ConfigError(f"{what} {pattern}: no such file")
            out.append(path)
    resolved = [p.resolve() for p in out]
    seen = set()
    for path in resolved:
        if path in seen:
            raise ConfigError(f"{what}: {path} is given twice")
        seen.add(path)
    return resolved


def sha256_files(paths: list[Path], progress: Callable[[int], None] | None = None) -> str:
    """sha256 of one file's bytes, or of the "DIGEST  NAME" lines of several; streamed in 8 MiB reads."""
    lines = []
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(HASH_BLOCK_BYTES), b""):
                digest.update(block)
                if progress is not None:
                    progress(len(block))
        lines.append(f"{digest.hexdigest()}  {path.name}\n")
    if len(lines) == 1:
        return lines[0].split()[0]
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def find_column(names: list[str], given: str | None, key: str, path: Path, *, required: bool = True) -> str | None:
    """The table column for ``key`` (given name, else the defaults), matched case-insensitively."""
    candidates = (given,) if given else DEFAULT_COLUMNS[key]
    lower = {name.lower(): name for name in names}
    for candidate in candidates:
        if candidate in names:
            return candidate
        if candidate.lower() in lower:
            return lower[candidate.lower()]
    if required or given:
        option = f"--{key}-column"
        raise ManifestError(f"{path}: no {key} column {' or '.join(repr(c) for c in candidates)} "
                            f"(columns: {', '.join(names)}); name it with {option}")
    return None


def text_column(array: pa.Array) -> pa.Array:
    """Any column as utf-8 strings (integers as their digits), whitespace stripped."""
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        array = array.cast(pa.string())
    return pc.utf8_trim_whitespace(array.cast(pa.string()))


def float_column(array: pa.Array, name: str, first_row: int, problems: Problems) -> np.ndarray:
    """float64 [n] of a numeric or text column; null and empty entries are NaN, unparsable ones are problems."""
    if pa.types.is_floating(array.type) or pa.types.is_integer(array.type) or pa.types.is_decimal(array.type):
        return array.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    text = text_column(array).to_pylist()
    values = np.full(len(text), np.nan)
    for i, entry in enumerate(text):
        if entry is None or entry == "" or entry.lower() in ("nan", "null", "none"):
            continue
        try:
            values[i] = float(entry)
        except ValueError:
            problems.add([first_row + i], f"{name} is not a number: {entry!r}")
    return values


def split_codes(array: pa.Array, first_row: int, problems: Problems) -> np.ndarray:
    """uint8 [n] codes of a split column: names train / val / test (any case) or the codes 0 / 1 / 2."""
    if pa.types.is_integer(array.type):
        values = array.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False)
        bad = (values < 0) | (values >= len(SPLIT_NAMES))
        problems.add(np.flatnonzero(bad) + first_row,
                     lambda row: f"split {array[row - first_row].as_py()!r} is not 0, 1 or 2 (train, val, test)")
        return np.where(bad, 0, values).astype(np.uint8)
    names = [None if v is None else v.lower() for v in text_column(array).to_pylist()]
    codes = np.zeros(len(names), dtype=np.uint8)
    for i, name in enumerate(names):
        if name in SPLIT_NAMES:
            codes[i] = SPLIT_NAMES.index(name)
        elif name in ("0", "1", "2"):
            codes[i] = int(name)
        else:
            problems.add([first_row + i], f"split {name!r} is not train, val or test (or 0, 1, 2)")
    return codes


@dataclass
class Meta:
    """Metadata columns accumulated batch by batch."""

    ids: list = field(default_factory=list)
    lat: list = field(default_factory=list)
    lon: list = field(default_factory=list)
    split: list = field(default_factory=list)

    def add(self, batch: pa.RecordBatch | pa.Table, names: dict, first_row: int, problems: Problems) -> None:
        ids = text_column(batch.column(names["id"]))
        problems.add(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False)) + first_row, "the id is missing")
        problems.add(np.flatnonzero(pc.equal(ids, "").fill_null(False).to_numpy(zero_copy_only=False)) + first_row,
                     "the id is empty")
        self.ids.append(ids)
        self.lat.append(float_column(batch.column(names["lat"]), "lat", first_row, problems))
        self.lon.append(float_column(batch.column(names["lon"]), "lon", first_row, problems))
        if names.get("split"):
            self.split.append(split_codes(batch.column(names["split"]), first_row, problems))

    def columns(self) -> tuple[pa.ChunkedArray, np.ndarray, np.ndarray, np.ndarray | None]:
        ids = pa.chunked_array(self.ids, type=pa.string())
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
        return (ids, cat(self.lat).astype(np.float64), cat(self.lon).astype(np.float64),
                cat(self.split).astype(np.uint8) if self.split else None)


class RowIndex:
    """Global row -> (file number, row within the file), for messages and for seeking."""

    def __init__(self, files: list[Path], counts: list[int]):
        self.files = files
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def locate(self, row: int) -> tuple[int, int]:
        i = int(np.searchsorted(self.starts, row, side="right") - 1)
        i = min(max(i, 0), len(self.files) - 1)
        return i, row - int(self.starts[i])


def rechunk(pieces: Iterator[tuple[np.ndarray, np.ndarray]], start: int, block_rows: int
             ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(embeddings [m, d], missing [m]) pieces -> (first row, [block_rows, d], missing) blocks.

    Every block but the last has block_rows rows.
    """
    held, held_missing, n_held, row = [], [], 0, start
    for x, missing in pieces:
        if not held and len(x) == block_rows:  # aligned pieces pass through without a copy
            yield row, x, missing
            row += block_rows
            continue
        held.append(x)
        held_missing.append(missing)
        n_held += len(x)
        while n_held >= block_rows:
            x_all, m_all = np.concatenate(held), np.concatenate(held_missing)
            yield row, x_all[:block_rows], m_all[:block_rows]
            row += block_rows
            n_held -= block_rows
            held, held_missing = ([x_all[block_rows:]], [m_all[block_rows:]]) if n_held else ([], [])
    if n_held:
        yield row, np.concatenate(held), np.concatenate(held_missing)


def npy_header(handle) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy whose bytes ``handle`` starts at; leaves it at the data."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(handle)
    return np.lib.format._read_array_header(handle, version)  # 3.0 (utf-8 field names): no public reader
