"""Manifests: the list of (id, image path, lat, lon, split) that stage one reads.

Accepted files (CSV or Parquet; column names are case-insensitive):

- ``id, path, lat, lon[, split][, country]`` -- ``path`` relative to the manifest's
  folder, or absolute, a file or a member of a shard (``CONTAINER#MEMBER``, see
  ``geo.pipeline.shards``); ``split`` one of train / val / test; ``country`` a
  dataset's own ISO alpha-2 label (OSV-5M's), used instead of geo's offline one.
- MP-16 style ``IMG_ID, LAT, LON`` (more columns are ignored): the id is
  ``IMG_ID`` and the image is ``IMG_ID`` relative to ``images_root`` (default:
  the manifest's folder).

The whole file is validated before any work starts. Every problem row is
reported -- missing columns, empty ids or paths, non-numeric / NaN / out-of-range
coordinates, duplicate ids, missing files, unknown split names -- in one
``ManifestError`` whose message names the file and the first
``MAX_LISTED_PROBLEMS`` rows; the full list is on ``err.problems`` and, when
longer than that, written to ``<manifest>.problems.txt`` (or the temp folder
when the manifest's folder is read-only). Rows are "line N" of a CSV (the
header is line 1) and "row N" (0-based) of a Parquet file.

Without a split column, rows are assigned deterministically by a hash of the
id (``assign_splits``): the same id always lands in the same split, whatever
the order or size of the manifest.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from geo.files import atomic_write, atomic_write_text, sha256_file
from geo.errors import ConfigError, DiskError, ManifestError
from geo.pipeline import shards

SPLIT_NAMES = ("train", "val", "test")  # codes 0, 1, 2; the same as geo.cache.store.SPLIT_NAMES
MAX_LISTED_PROBLEMS = 20


@dataclass
class Manifest:
    """A validated manifest; all arrays have one entry per row, in file order.

    ids: str [n] (unique); paths: absolute str [n]; lat_deg, lon_deg: float64 [n]
    (lon wrapped into [-180, 180)); split: uint8 [n] codes into ``SPLIT_NAMES``;
    path: the manifest file; sha256: hex digest of the manifest file's bytes.
    """

    ids: np.ndarray
    paths: np.ndarray
    lat_deg: np.ndarray
    lon_deg: np.ndarray
    split: np.ndarray
    path: Path
    sha256: str
    country: np.ndarray | None = None  # str [n] the dataset's own ISO codes ("" = none), or None

    def __len__(self) -> int:
        return len(self.ids)

    def split_counts(self) -> dict[str, int]:
        """Rows per split name, e.g. {"train": 80, "val": 10, "test": 10}."""
        counts = np.bincount(self.split, minlength=len(SPLIT_NAMES))
        return {name: int(counts[code]) for code, name in enumerate(SPLIT_NAMES)}


def split_uniform(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per id: the first 8 bytes of sha256(id, utf-8) / 2**64."""
    words = [int.from_bytes(hashlib.sha256(str(i).encode("utf-8")).digest()[:8], "big") for i in ids]
    # uint64 -> float64 rounds; 2**64 - 1 could round up to 1.0, so clip below 1.
    return np.minimum(np.array(words, dtype=np.uint64).astype(np.float64) / 2.0**64, np.nextafter(1.0, 0.0))


def assign_splits(ids: Sequence[str] | np.ndarray, val_fraction: float = 0.1,
                  test_fraction: float = 0.1) -> np.ndarray:
    """Split codes uint8 [n] (0 train, 1 val, 2 test) from a hash of each id.

    u = split_uniform(id): test if u < test_fraction, val if u >= 1 - val_fraction,
    else train. Deterministic and independent of row order, so adding rows to a
    manifest never moves the old ones; growing one fraction only moves train rows
    into that split (val and test never trade rows).
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {value}")
    if val_fraction + test_fraction > 1.0:
        raise ConfigError(f"val_fraction + test_fraction = {val_fraction + test_fraction} exceeds 1")
    u = split_uniform(ids)
    codes = np.zeros(len(u), dtype=np.uint8)
    codes[u >= 1.0 - val_fraction] = 1
    codes[u < test_fraction] = 2
    return codes


def _read_table(path: Path) -> tuple[pa.Table, bool]:
    """The file as a table (CSV: every column a string) and whether it is a CSV."""
    with open(path, "rb") as handle:
        is_parquet = handle.read(4) == b"PAR1"
    try:
        if is_parquet:
            return pq.read_table(path), False
        with open(path, newline="", encoding="utf-8-sig") as handle:
            header = next(csv.reader(handle), None)
        if not header:
            raise ManifestError(f"{path}: empty file, expected a CSV header or Parquet data")
        # Read every column as text so that bad values are reported per row, not as a parse failure.
        options = pa_csv.ConvertOptions(column_types={name: pa.string() for name in header},
                                        strings_can_be_null=False)
        return pa_csv.read_csv(path, convert_options=options), True
    except (pa.ArrowInvalid, UnicodeDecodeError, OSError) as err:
        raise ManifestError(f"{path}: cannot read as CSV or Parquet: {err}") from None


def _as_text(column: pa.ChunkedArray) -> np.ndarray:
    """A column as a numpy str array, nulls as ""; whitespace stripped."""
    values = column.cast(pa.string()).to_pylist()
    return np.array(["" if v is None else v.strip() for v in values], dtype=str)


def _as_float(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values [n], parse-ok bool [n]); unparsable and null entries are NaN and not ok."""
    if pa.types.is_floating(column.type) or pa.types.is_integer(column.type):
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        ok = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        return np.where(ok, values, np.nan), ok
    text = _as_text(column)
    try:  # fast path: every entry parses
        return text.astype(np.float64), np.ones(len(text), dtype=bool)
    except ValueError:
        pass
    values, ok = np.full(len(text), np.nan), np.zeros(len(text), dtype=bool)
    for i, entry in enumerate(text):
        try:
            values[i], ok[i] = float(entry), True
        except ValueError:
            pass
    return values, ok


class _Problems:
    """Collects (row, message) pairs and raises one ManifestError naming them."""

    def __init__(self, path: Path, is_csv: bool):
        self.path, self.is_csv, self.items = path, is_csv, []

    def where(self, row: int) -> str:
        return f"line {row + 2}" if self.is_csv else f"row {row}"

    def add(self, rows: np.ndarray, message) -> None:
        for row in np.flatnonzero(rows) if rows.dtype == bool else rows:
            self.items.append((int(row), message(int(row)) if callable(message) else message))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        self.items.sort(key=lambda item: item[0])
        lines = [f"{self.where(row)}: {message}" for row, message in self.items]
        n_rows = len({row for row, _ in self.items})
        text = f"{self.path}: {len(lines)} problems in {n_rows} rows:\n  " + "\n  ".join(
            lines[:MAX_LISTED_PROBLEMS])
        if len(lines) > MAX_LISTED_PROBLEMS:
            report = _write_problems(self.path, lines)
            text += f"\n  ... and {len(lines) - MAX_LISTED_PROBLEMS} more; full list in {report}"
        err = ManifestError(text)
        err.problems = lines
        raise err


def _write_problems(path: Path, lines: list[str]) -> Path:
    for target in (path.with_name(path.name + ".problems.txt"),
                   Path(tempfile.gettempdir()) / (path.name + ".problems.txt")):
        try:
            atomic_write_text(target, "\n".join(lines) + "\n")
            return target
        except (OSError, DiskError):
            continue
    return Path("(could not be written)")


def read_manifest(path: str | os.PathLike, *, val_fraction: float = 0.1, test_fraction: float = 0.1,
                  check_files: bool = True, images_root: str | os.PathLike | None = None) -> Manifest:
    """Read and validate a manifest (formats: module docstring).

    Args:
        path: CSV or Parquet file (detected from its content).
        val_fraction, test_fraction: used only when the file has no split column.
        check_files: also require that every image file exists.
        images_root: folder that relative image paths (and MP-16 ``IMG_ID``s) are
            relative to; default the manifest's folder.
    Raises:
        ManifestError: every problem, with its row (see module docstring).
        ConfigError: fractions outside [0, 1] or summing above 1.
    """
    path = Path(path)
    assign_splits([], val_fraction, test_fraction)  # bad fractions fail before the file is read
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    table, is_csv = _read_table(path)
    columns = {name.strip().lower(): name for name in table.column_names}
    mp16 = "path" not in columns and "img_id" in columns
    required = ("img_id", "lat", "lon") if mp16 else ("id", "path", "lat", "lon")
    missing = [name for name in required if name not in columns]
    if missing:
        raise ManifestError(
            f"{path}: missing columns {', '.join(missing)} (found: {', '.join(table.column_names)}); "
            "expected id,path,lat,lon[,split] or MP-16 style IMG_ID,LAT,LON")
    problems = _Problems(path, is_csv)
    ids = _as_text(table[columns["img_id" if mp16 else "id"]])
    rel_paths = ids if mp16 else _as_text(table[columns["path"]])
    problems.add(ids == "", "empty id")
    if not mp16:
        problems.add(rel_paths == "", "empty path")

    for name, limit in (("lat", 90.0), ("lon", 180.0)):
        values, ok = _as_float(table[columns[name]])
        raw = _as_text(table[columns[name]]) if not ok.all() else None
        problems.add(~ok, lambda row, n=name, r=raw: f"{n} is not a number: {str(r[row])!r}")
        problems.add(ok & np.isnan(values), f"{name} is NaN")
        problems.add(ok & ~np.isnan(values) & (np.abs(values) > limit),
                     lambda row, n=name, v=values, l=limit: f"{n} {v[row]} outside [-{l:g}, {l:g}]")
        if name == "lat":
            lat_deg = values
        else:
            lon_deg = values

    _check_duplicates(ids, problems)

    root = Path(images_root) if images_root is not None else path.parent
    root = root.resolve()
    abs_paths = np.array([p if os.path.isabs(p) else str(root / p) for p in rel_paths.tolist()], dtype=str)
    if check_files:
        exists = np.array([rel == "" or shards.exists(full)
                           for rel, full in zip(rel_paths.tolist(), abs_paths.tolist())], dtype=bool)
        problems.add(~exists, lambda row: f"image file not found: {abs_paths[row]}")

    if "split" in columns:
        names = np.char.lower(_as_text(table[columns["split"]]))
        known = np.isin(names, SPLIT_NAMES)
        problems.add(~known, lambda row: f"unknown split {str(names[row])!r} (expected train, val or test)")
        split = np.zeros(len(ids), dtype=np.uint8)
        for code, name in enumerate(SPLIT_NAMES):
            split[names == name] = code
    else:
        split = None
    problems.raise_if_any()
    if len(ids) == 0:
        raise ManifestError(f"{path}: the manifest has no rows")
    if split is None:
        split = assign_splits(ids, val_fraction, test_fraction)
    country = np.char.upper(_as_text(table[columns["country"]])) if "country" in columns else None
    return Manifest(ids=ids, paths=abs_paths, lat_deg=lat_deg.astype(np.float64),
                    lon_deg=np.where(lon_deg >= 180.0, lon_deg - 360.0, lon_deg), split=split,
                    path=path.resolve(), sha256=sha256_file(path), country=country)


def _check_duplicates(ids: np.ndarray, problems: _Problems) -> None:
    """Report every repeat of an id, naming where it first appeared."""
    _, first, inverse, counts = np.unique(ids, return_index=True, return_inverse=True, return_counts=True)
    repeated = (counts[inverse] > 1) & (first[inverse] != np.arange(len(ids))) & (ids != "")
    problems.add(repeated, lambda row: f"duplicate id {str(ids[row])!r} (first at {problems.where(first[inverse[row]])})")


def write_manifest(path: str | os.PathLike, *, ids: Sequence[str], paths: Sequence[str],
                   lat_deg: np.ndarray, lon_deg: np.ndarray, split: np.ndarray,
                   country: Sequence[str] | None = None) -> None:
    """Write a Parquet manifest with columns id, path, lat, lon, split (names, not codes)[, country]."""
    columns = {
        "id": pa.array(list(ids), pa.string()),
        "path": pa.array(list(paths), pa.string()),
        "lat": pa.array(np.asarray(lat_deg, np.float64)),
        "lon": pa.array(np.asarray(lon_deg, np.float64)),
        "split": pa.array([SPLIT_NAMES[c] for c in np.asarray(split)], pa.string()),
    }
    if country is not None:
        columns["country"] = pa.array([str(c) for c in country], pa.string())
    with atomic_write(path) as handle:
        pq.write_table(pa.table(columns), handle)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".heic", ".heif")


def scan_images(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (by extension, case-insensitive; hidden files skipped), sorted.

    HEIC/HEIF files are listed only when Pillow has a plugin for them (pillow-heif).
    """
    from PIL import Image

    readable = {ext.lower() for ext in Image.registered_extensions()}
    extensions = {ext for ext in IMAGE_EXTENSIONS if ext in readable or ext not in (".heic", ".heif")}
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in Path(folder).glob(pattern)
                  if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith("."))


def build_manifest_from_folder(folder: str | os.PathLike, out_path: str | os.PathLike, *,
                               val_fraction: float = 0.1, test_fraction: float = 0.1,
                               recursive: bool = True, progress: bool = True,
                               ) -> tuple[Manifest, list[tuple[str, str]]]:
    """Read the EXIF GPS of every photo under ``folder`` and write a Parquet manifest.

    ids are the photos' paths relative to ``folder`` (posix); ``path`` is relative
    to the manifest's folder when the photo lies under it, else absolute; splits
    come from ``assign_splits``. Every photo without a usable position is listed
    in ``<out_path>.skipped.csv`` (columns path, reason), written even when empty.

    Returns:
        (the manifest as read back by ``read_manifest``, skipped [(path, reason)]).
    Raises:
        ManifestError: ``folder`` is not a folder, holds no image files, or no photo
            has a usable GPS position (the skipped list is written first).
    """
    from tqdm import tqdm

    from geo.pipeline.exif import NoGPSError, read_gps

    folder, out_path = Path(folder), Path(out_path)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not a folder")
    assign_splits([], val_fraction, test_fraction)  # validate the fractions before the scan
    photos = scan_images(folder, recursive=recursive)
    if not photos:
        raise ManifestError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})"
                            + ("" if recursive else " at its top level (try --recursive)"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_dir = out_path.parent.resolve()
    kept, lat_deg, lon_deg, skipped = [], [], [], []
    for photo in tqdm(photos, desc="reading EXIF GPS", unit="photo", disable=not progress):
        try:
            lat, lon = read_gps(photo)
        except NoGPSError as err:
            skipped.append((str(photo), str(err)))
            continue
        kept.append(photo)
        lat_deg.append(lat)
        lon_deg.append(lon)
    skipped_path = out_path.with_name(out_path.name + ".skipped.csv")
    with atomic_write(skipped_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows(skipped)
    if not kept:
        raise ManifestError(f"{folder}: none of {len(photos)} photos has a usable EXIF GPS position "
                            f"(reasons in {skipped_path})")
    ids = [p.relative_to(folder).as_posix() for p in kept]
    paths = []
    for photo in kept:
        full = photo.resolve()
        paths.append(full.relative_to(out_dir).as_posix() if full.is_relative_to(out_dir) else str(full))
    write_manifest(out_path, ids=ids, paths=paths, lat_deg=np.array(lat_deg), lon_deg=np.array(lon_deg),
                   split=assign_splits(ids, val_fraction, test_fraction))
    return read_manifest(out_path), skipped
