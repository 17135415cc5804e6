"""OSV-5M as distributed: ``<split>.csv`` and zip shards ``images/<split>/NN.zip``.

CSV columns (those read): ``id, latitude, longitude, country`` (ISO alpha-2). Zip
members are ``<id>.jpg``, at the top level or under a folder named after the
shard (both occur; the id is the member's file stem). Extracted copies
(``images/<split>/<NN>/<id>.jpg``, or any depth below ``images/<split>``) are read
when the split has no zip. OSV-5M has no validation file (its val is a seeded
sample of train), so ``--split`` is ``train`` or ``test``. The dataset's own
country labels go into the manifest's ``country`` column and are used by
``geo extract`` instead of geo's offline labels.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from geo.errors import ManifestError
from geo.pipeline.datasets.common import Rows, check_swapped, check_unique, match_rows
from geo.pipeline.datasets.msgpack_shards import natural_key
from geo.pipeline.manifest import _as_float, _as_text, _read_table, scan_images
from geo.pipeline.shards import member_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _locate(images: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """{id: path or zip member path} of every image of the split, and unreadable zips."""
    zips = sorted(images.glob("*.zip"), key=natural_key)
    seen: list[tuple[str, str]] = []
    problems: list[tuple[str, str]] = []
    if zips:
        for shard in zips:
            shard = shard.resolve()
            try:
                with zipfile.ZipFile(shard) as archive:
                    names = [n for n in archive.namelist() if n.lower().endswith(IMAGE_SUFFIXES)]
            except (zipfile.BadZipFile, OSError) as err:
                problems.append((str(shard), f"corrupt shard: {err}"))
                continue
            seen.extend((Path(n).stem, member_path(str(shard), n)) for n in names)
    else:
        seen.extend((p.stem, str(p.resolve())) for p in scan_images(images))
    check_unique(seen, f"the images of {images}")
    return dict(seen), problems


def read_osv5m(dataset_dir: str | os.PathLike, split: str) -> Rows:
    """The usable rows of OSV-5M's ``split`` ("train" or "test") under ``dataset_dir``."""
    root = Path(dataset_dir)
    if split not in ("train", "test"):
        raise ManifestError(f"--split {split!r}: OSV-5M has train.csv and test.csv (its val is a sample of train)")
    csv_path = root / f"{split}.csv"
    images = root / "images" / split
    if not csv_path.is_file():
        raise ManifestError(f"{csv_path}: not found (OSV-5M layout: {split}.csv beside images/{split}/)")
    if not images.is_dir():
        raise ManifestError(f"{images}: not found (OSV-5M layout: images/{split}/NN.zip or extracted folders)")
    table, _ = _read_table(csv_path)
    columns = {name.strip().lower(): name for name in table.column_names}
    missing = [c for c in ("id", "latitude", "longitude") if c not in columns]
    if missing:
        raise ManifestError(f"{csv_path}: missing columns {', '.join(missing)} (found {', '.join(table.column_names)})")
    ids = _as_text(table[columns["id"]]).tolist()
    lat, _ = _as_float(table[columns["latitude"]])
    lon, _ = _as_float(table[columns["longitude"]])
    check_swapped(lat, lon, columns["latitude"], columns["longitude"], csv_path)
    check_unique([(i, f"line {n + 2}") for n, i in enumerate(ids)], f"the rows of {csv_path}")
    country = _as_text(table[columns["country"]]).tolist() if "country" in columns else [""] * len(ids)

    located, problems = _locate(images)
    rows = Rows(country=[])
    rows.skipped.extend(problems)
    match_rows(rows, ids, lat, lon, located, images=images, csv_name=csv_path.name, country=country)
    return rows


def country_agreement(manifest) -> tuple[int, int]:
    """(rows whose dataset country equals geo's offline label, rows with a dataset country)."""
    import numpy as np

    from geo.pipeline.countries import country_codes

    if manifest.country is None:
        return 0, 0
    given = manifest.country != ""
    ours = np.asarray(country_codes(manifest.lat_deg[given], manifest.lon_deg[given])).astype(str)
    return int((ours == manifest.country[given]).sum()), int(given.sum())
