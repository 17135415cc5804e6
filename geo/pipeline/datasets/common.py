"""What every dataset reader shares: coordinate checks, split rules, the manifest and skipped files."""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geo.errors import ConfigError, ManifestError
from geo.pipeline.manifest import SPLIT_NAMES, Manifest, assign_splits, read_manifest, write_manifest

MAX_LISTED = 20


@dataclass
class Rows:
    """Rows found by a reader: one entry per usable image, plus what was left out and why.

    paths: absolute file paths or shard member paths (``CONTAINER#MEMBER``).
    skipped: (id or path, reason); the reason's text before ":" is its kind (counted in the summary).
    """

    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    lat_deg: list[float] = field(default_factory=list)
    lon_deg: list[float] = field(default_factory=list)
    country: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, id_: str, path: str, lat: float, lon: float, country: str | None = None) -> None:
        self.ids.append(id_)
        self.paths.append(path)
        self.lat_deg.append(lat)
        self.lon_deg.append(lon)
        if self.country is not None:
            self.country.append(country or "")


def check_swapped(lat_deg: np.ndarray, lon_deg: np.ndarray, lat_name: str, lon_name: str, source) -> None:
    """Refuse swapped coordinate columns: "latitude" leaves ±90 while "longitude" stays inside it.

    (An early GeoEstimation CSV had LAT and LON swapped; PIGEON stores (lng, lat).)
    """
    lat, lon = np.asarray(lat_deg, np.float64), np.asarray(lon_deg, np.float64)
    finite = np.isfinite(lat) & np.isfinite(lon)
    if not finite.any():
        return
    if np.abs(lat[finite]).max() > 90.0 and np.abs(lon[finite]).max() <= 90.0:
        row = int(np.flatnonzero(finite & (np.abs(lat) > 90.0))[0])
        raise ManifestError(
            f"{source}: column {lat_name!r} leaves [-90, 90] (e.g. {lat[row]} in data row {row + 1}) while "
            f"column {lon_name!r} stays inside it: the latitude and longitude columns look swapped; "
            "fix the file (or name the columns) and run again")


def coordinate_problem(lat: float, lon: float) -> str | None:
    """The reason a (lat, lon) pair cannot be used, or None."""
    if not (np.isfinite(lat) and np.isfinite(lon)):
        return "bad coordinates: not numbers"
    if abs(lat) > 90.0 or abs(lon) > 180.0:
        return f"bad coordinates: lat {lat}, lon {lon} out of range"
    return None


def check_unique(ids_with_source: list[tuple[str, str]], what: str) -> None:
    """ManifestError listing every id that occurs in more than one place (``(id, where)`` pairs)."""
    where: dict[str, list[str]] = {}
    for id_, source in ids_with_source:
        where.setdefault(id_, []).append(source)
    repeated = {k: v for k, v in where.items() if len(v) > 1}
    if repeated:
        lines = [f"{k!r} in {', '.join(v)}" for k, v in sorted(repeated.items())[:MAX_LISTED]]
        more = f"\n  ... and {len(repeated) - MAX_LISTED} more" if len(repeated) > MAX_LISTED else ""
        raise ManifestError(f"{len(repeated)} duplicate ids across {what}:\n  " + "\n  ".join(lines) + more)


def natural_text_key(text: str) -> tuple:
    """``shard_2`` before ``shard_10`` (digit runs compare as numbers)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def shard_order(path: str) -> tuple:
    """Sort key of a manifest path: container (naturally), then the member's byte offset or name."""
    container, _, member = path.rpartition("#") if "#" in path else (path, "", "")
    return natural_text_key(container), int(member) if member.isdigit() else 0, member


def match_rows(rows: Rows, ids: list[str], lat_deg, lon_deg, located: dict[str, str], *, images, csv_name: str,
               country: list[str] | None = None, row_names: list[str] | None = None) -> None:
    """Add to ``rows`` every metadata row that has an image in ``located`` ({id: path}), in shard order.

    Rows without an image, images without a row, and bad coordinates go to ``rows.skipped``.
    row_names: how each row is named in a reason (default ``CSV line N``: the header is line 1).
    """
    kept = []
    for i, id_ in enumerate(ids):
        name = row_names[i] if row_names is not None else f"CSV line {i + 2}"
        where = located.get(id_)
        if where is None:
            rows.skipped.append((id_, f"no image: {name} has no image in {images}"))
            continue
        problem = coordinate_problem(float(lat_deg[i]), float(lon_deg[i]))
        if problem:
            rows.skipped.append((id_, f"{problem} ({name})"))
            continue
        kept.append((where, id_, float(lat_deg[i]), float(lon_deg[i]), country[i].upper() if country else None))
    kept.sort(key=lambda r: shard_order(r[0]))  # each worker then reads its shards front to back
    for where, id_, lat, lon, code in kept:
        rows.add(id_, where, lat, lon, code)
    listed = set(ids)
    rows.skipped.extend((id_, f"no metadata: image {where} has no row in {csv_name}")
                        for id_, where in located.items() if id_ not in listed)


def split_codes(ids: list[str], split: str | None, *, default: str | None) -> np.ndarray:
    """Split codes per row: every row in ``split`` (train/val/test) or, for "hash", hashed 80/10/10.

    ``default`` is the dataset's kind: "test" for a test set, "hash" for a training set.
    """
    split = split or default or "hash"
    if split == "hash":
        return assign_splits(ids)
    if split not in SPLIT_NAMES:
        raise ConfigError(f"--split {split!r}: choose train, val, test or hash")
    return np.full(len(ids), SPLIT_NAMES.index(split), dtype=np.uint8)


def write_dataset_manifest(out: str | os.PathLike, rows: Rows, *, split: np.ndarray,
                           source: str) -> tuple[Manifest, dict[str, int]]:
    """Write the manifest (Parquet) and ``<out>.skipped.csv`` (id, reason); return it read back and counts.

    Paths under the manifest's folder are stored relative to it (the dataset can move with it).
    Counts: {"rows": kept, then one entry per kind of skip}.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped_path = out.with_name(out.name + ".skipped.csv")
    with open(skipped_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "reason"])
        writer.writerows(rows.skipped)
    if not rows.ids:
        raise ManifestError(f"{source}: no image has both metadata and pixels ({len(rows.skipped)} left out, "
                            f"reasons in {skipped_path})")
    base = out.parent.resolve()
    paths = []
    for p in rows.paths:
        full = Path(p).resolve() if "#" not in p else Path(p)
        paths.append(full.relative_to(base).as_posix() if full.is_relative_to(base) else str(full))
    write_manifest(out, ids=rows.ids, paths=paths, lat_deg=np.array(rows.lat_deg), lon_deg=np.array(rows.lon_deg),
                   split=split, country=rows.country)
    counts = {"rows": len(rows.ids), **Counter(reason.split(":")[0] for _, reason in rows.skipped)}
    return read_manifest(out), counts
