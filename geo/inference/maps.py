"""World maps of ``geo predict`` results: the predicted density with the top-k marked.

Drawn with the map code reports use (``geo.worldmap.density.pixel_log10_mass``: the
probability of each 1 deg pixel, log10, narrow vMF components put in the pixel of
their mean) on its world (``geo.worldmap.world.draw_world``), so a report and
``geo predict --map`` show densities the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from geo.files import atomic_write
from geo.worldmap.density import pixel_log10_mass
from geo.worldmap.world import draw_world

DECADES = 6  # colour range below the map's maximum


def prediction_figure(head, result) -> Figure:
    """One world map for one ``PredictionResult`` (which must carry ``.logits [c]``)."""
    log_mass = pixel_log10_mass(head, result.logits.float())
    finite = np.isfinite(log_mass)
    top = log_mass[finite].max() if finite.any() else 0.0
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    draw_world(ax)
    image = ax.imshow(np.ma.masked_less(log_mass - top, -DECADES), extent=(-180, 180, -90, 90), origin="lower",
                      cmap="inferno", vmin=-DECADES, vmax=0, alpha=0.85, zorder=2)
    for loc in result.locations[::-1]:  # the best guess drawn last, on top
        best = loc.rank == 1
        ax.plot(loc.lon_deg, loc.lat_deg, marker="x" if best else "+", color="red" if best else "cyan",
                markersize=10 if best else 8, mew=2, zorder=6)
        ax.annotate(str(loc.rank), (loc.lon_deg, loc.lat_deg), xytext=(4, 4), textcoords="offset points",
                    color="white", fontsize=7, zorder=7)
    if result.exif_lat_deg is not None:
        ax.plot(result.exif_lon_deg, result.exif_lat_deg, marker="*", color="lime", markersize=12,
                markeredgecolor="k", zorder=8)
    r50 = f", 50 % within {result.radius_50_km:,.0f} km" if result.radius_50_km is not None else ""
    ax.set_title(f"{Path(result.path).name}: {result.locations[0].place}{r50}", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.7, label="log10 pixel probability (relative to max)")
    return fig


def write_maps(head, results: Sequence, out: str | Path) -> list[Path]:
    """PNG maps of the readable results: ``out`` itself for one image, else ``<out stem>-<NNN>-<image stem>.png``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    good = [r for r in results if r.ok]
    written = []
    for n, result in enumerate(good, start=1):
        suffix = out.suffix or ".png"
        path = out if len(good) == 1 else out.with_name(f"{out.stem}-{n:03d}-{Path(result.path).stem}{suffix}")
        with atomic_write(path) as handle:
            prediction_figure(head, result).savefig(handle, format=suffix.lstrip(".") or "png", dpi=110,
                                                    bbox_inches="tight")
        written.append(path)
    return written
