"""The places365-style CSVs of MP-16, Im2GPS, Im2GPS3k, YFCC4k and YFCC26k, with their images.

CSV: ``IMG_ID,AUTHOR,LAT,LON,S3_Label,...`` (names case-insensitive; only IMG_ID,
LAT, LON are read; ``LATITUDE``/``LONGITUDE`` accepted too). Images
(``--images``): a folder of MessagePack shards (``*.msg``, MP-16 as distributed)
or a folder of files named by IMG_ID (relative paths allowed). The manifest holds
exactly the rows with both a CSV row and an image; CSV rows without an image and
images without a CSV row are counted and listed in the skipped file.
"""

from __future__ import annotations

import os
from pathlib import Path

from geo.errors import ManifestError
from geo.pipeline.datasets import msgpack_shards
from geo.pipeline.datasets.common import Rows, check_swapped, check_unique, match_rows
from geo.pipeline.manifest import _as_float, _as_text, _read_table, scan_images

_COLUMNS = {"id": ("img_id", "id"), "lat": ("lat", "latitude"), "lon": ("lon", "lng", "longitude")}


def _column(columns: dict[str, str], kind: str, csv_path: Path) -> str:
    for name in _COLUMNS[kind]:
        if name in columns:
            return columns[name]
    raise ManifestError(f"{csv_path}: no {kind} column (looked for {', '.join(_COLUMNS[kind])}; "
                        f"found {', '.join(columns.values())})")


def read_places365(csv_path: str | os.PathLike, images: str | os.PathLike, *, progress: bool = True) -> Rows:
    """The usable rows of a places365 CSV whose images lie in ``images`` (shards or files)."""
    csv_path, images = Path(csv_path), Path(images).resolve()
    if not csv_path.is_file():
        raise ManifestError(f"{csv_path}: CSV not found")
    if not images.is_dir():
        raise ManifestError(f"--images {images}: not a folder")
    table, _ = _read_table(csv_path)
    columns = {name.strip().lower(): name for name in table.column_names}
    id_col, lat_col, lon_col = (_column(columns, k, csv_path) for k in ("id", "lat", "lon"))
    ids = _as_text(table[id_col])
    lat, _ = _as_float(table[lat_col])
    lon, _ = _as_float(table[lon_col])
    check_swapped(lat, lon, lat_col, lon_col, csv_path)
    check_unique([(i, f"line {n + 2}") for n, i in enumerate(ids.tolist())], f"the rows of {csv_path}")

    rows = Rows()
    if msgpack_shards.list_shards(images):
        located, problems = msgpack_shards.index_shards(images, progress=progress)
        rows.skipped.extend(problems)
    else:
        located = {p.relative_to(images).as_posix(): str(p) for p in scan_images(images)}
    match_rows(rows, ids.tolist(), lat, lon, located, images=images, csv_name=csv_path.name)
    return rows
