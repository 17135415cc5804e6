"""YFCC4k (or YFCC26k) as raw rows of YFCC100M's metadata file, with a folder of its JPEGs.

YFCC100M's metadata is tab-separated, one photo or video per line, no header,
plain or gzip-compressed. Two layouts, told apart by the number of fields per
line (0-based field numbers; only the starred fields are read):

- 25 fields, Multimedia Commons' ``yfcc100m_dataset``: 0 line number, 1 photo id*,
  2 photo hash*, 3 user NSID, 4 user nickname, 5 date taken, 6 date uploaded,
  7 capture device, 8 title, 9 description, 10 user tags, 11 machine tags,
  12 longitude*, 13 latitude*, 14 accuracy, 15 page URL, 16 download URL,
  17 license name, 18 license URL, 19 server id, 20 farm id, 21 secret,
  22 secret original, 23 extension original, 24 marker* (0 photo, 1 video);
- 23 fields, Yahoo Webscope's original release (24 where a copy appends a "key"):
  the same without line number and hash: 0 photo id*, 1 user NSID, ...,
  9 machine tags, 10 longitude*, 11 latitude*, 12 accuracy, ..., 22 marker*.

Longitude comes before latitude in both (degrees). A first line whose longitude
and latitude fields are words (``longitude``) is a header and skipped. Rows
without coordinates and videos are skipped with their reason.

Images (``--images``): a folder, searched recursively, of files named by photo id
or, in the 25-field layout, by photo hash (Multimedia Commons names its copies so).
The manifest's ids are photo ids; rows without an image and images without a row
are counted and listed in the skipped file, as for the places365 CSVs.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geo.errors import ManifestError
from geo.pipeline.datasets.common import MAX_LISTED, Rows, check_swapped, check_unique, match_rows
from geo.pipeline.manifest import scan_images


@dataclass(frozen=True)
class Layout:
    """Where the fields this reader needs stand in one layout (0-based field numbers)."""

    name: str
    n_fields: tuple[int, ...]
    id: int
    hash: int | None
    lon: int
    lat: int
    marker: int


MULTIMEDIA_COMMONS = Layout("Multimedia Commons yfcc100m_dataset", (25,), id=1, hash=2, lon=12, lat=13, marker=24)
WEBSCOPE = Layout("Yahoo Webscope", (23, 24), id=0, hash=None, lon=10, lat=11, marker=22)
LAYOUTS = {n: layout for layout in (MULTIMEDIA_COMMONS, WEBSCOPE) for n in layout.n_fields}


@dataclass
class Metadata:
    """The photos of a metadata file that have coordinates, in file order, and the rows left out.

    lat_deg, lon_deg: float64 [n] (NaN where a field is not a number: reported by ``match_rows``).
    lines: 1-based line number of each row. id_of_hash: {photo hash: photo id} of every row
    (empty in the Webscope layout). skipped: (photo id, reason) of videos and rows without coordinates.
    """

    layout: Layout
    ids: list[str]
    lat_deg: np.ndarray
    lon_deg: np.ndarray
    lines: list[int]
    id_of_hash: dict[str, str]
    skipped: list[tuple[str, str]]


def _open_text(path: Path):
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"  # the magic number, so a misnamed file reads too
    # Titles and descriptions are free text; the fields read are ASCII, so bad bytes elsewhere may stay.
    # newline="\n": a stray carriage return inside a field must not split its line.
    opener = gzip.open if gzipped else open
    return opener(path, "rt", encoding="utf-8", errors="replace", newline="\n")


def _degrees(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _split_lines(path: Path) -> tuple[Layout, list[tuple[int, list[str]]]]:
    """The layout and (line number, fields) of every data line; ManifestError on a wrong field count."""
    records = []
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if line:  # blank lines (an editor's trailing one) carry no row
                records.append((number, line.split("\t")))
    if not records:
        raise ManifestError(f"{path}: empty file, expected YFCC100M metadata rows")
    first_line, first = records[0][0], len(records[0][1])
    layout = LAYOUTS.get(first)
    if layout is None:
        raise ManifestError(f"{path}: line {first_line} has {first} tab-separated fields; YFCC100M metadata has "
                            "25 (Multimedia Commons) or 23 (Yahoo Webscope; 24 with a key)")
    wrong = [(number, len(fields)) for number, fields in records if len(fields) != first]
    if wrong:
        listed = ", ".join(f"line {number} has {n}" for number, n in wrong[:MAX_LISTED])
        more = f", ... and {len(wrong) - MAX_LISTED} more" if len(wrong) > MAX_LISTED else ""
        raise ManifestError(f"{path}: {len(wrong)} lines do not have the {first} tab-separated fields of line "
                            f"{first_line} ({layout.name} layout): {listed}{more}")
    lon_text, lat_text = records[0][1][layout.lon].strip(), records[0][1][layout.lat].strip()
    if lon_text and lat_text and math.isnan(_degrees(lon_text)) and math.isnan(_degrees(lat_text)):
        records = records[1:]  # a header ("longitude", "latitude")
    return layout, records


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The photos of a YFCC100M metadata file (either layout, plain or gzip)."""
    path = Path(path)
    layout, records = _split_lines(path)
    ids = [fields[layout.id].strip() for _, fields in records]
    lon = np.array([_degrees(fields[layout.lon]) for _, fields in records], dtype=np.float64)
    lat = np.array([_degrees(fields[layout.lat]) for _, fields in records], dtype=np.float64)
    check_swapped(lat, lon, f"field {layout.lat} (latitude)", f"field {layout.lon} (longitude)", path)
    check_unique([(id_, f"line {number}") for id_, (number, _) in zip(ids, records)], f"the rows of {path}")

    kept, skipped = [], []
    for i, (number, fields) in enumerate(records):
        where = f"line {number} of {path.name}"
        if fields[layout.marker].strip() == "1":
            skipped.append((ids[i], f"video: {where} is a video (marker 1)"))
        elif not fields[layout.lon].strip() or not fields[layout.lat].strip():
            skipped.append((ids[i], f"no coordinates: {where} has an empty longitude or latitude"))
        else:
            kept.append(i)
    id_of_hash = ({fields[layout.hash].strip(): id_ for id_, (_, fields) in zip(ids, records)}
                  if layout.hash is not None else {})
    return Metadata(layout=layout, ids=[ids[i] for i in kept], lat_deg=lat[kept], lon_deg=lon[kept],
                    lines=[records[i][0] for i in kept], id_of_hash=id_of_hash, skipped=skipped)


def _locate_images(metadata: Metadata, images: Path) -> dict[str, str]:
    """{photo id: path} of the images under ``images``, named by photo id or photo hash.

    An image of no row keeps its file stem as key (``match_rows`` lists it); images of rows
    skipped already (videos, no coordinates) are left out, as their row's reason covers them.
    """
    # Photo ids are decimal and hashes 32 hex digits, so a stem is never read as the wrong one.
    named = [(metadata.id_of_hash.get(p.stem, p.stem), str(p)) for p in scan_images(images)]
    check_unique(named, f"the images in {images} (named by photo id or hash)")
    skipped = {id_ for id_, _ in metadata.skipped}
    return {id_: where for id_, where in named if id_ not in skipped}


def read_yfcc100m(metadata_path: str | os.PathLike, images: str | os.PathLike) -> Rows:
    """The usable rows of a YFCC100M metadata file whose JPEGs lie in ``images``."""
    metadata_path, images = Path(metadata_path), Path(images).resolve()
    if not metadata_path.is_file():
        raise ManifestError(f"{metadata_path}: metadata file not found")
    if not images.is_dir():
        raise ManifestError(f"--images {images}: not a folder")
    metadata = read_metadata(metadata_path)  # a malformed file fails before the folder is scanned
    rows = Rows(skipped=list(metadata.skipped))
    match_rows(rows, metadata.ids, metadata.lat_deg, metadata.lon_deg, _locate_images(metadata, images),
               images=images, csv_name=metadata_path.name,
               row_names=[f"line {n} of {metadata_path.name}" for n in metadata.lines])
    return rows
