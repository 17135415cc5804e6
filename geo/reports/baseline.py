"""The trivial baseline every head must beat: always predict the densest training cell.

For each c, the adaptive partition of the train split is built exactly as the
heads build it, and every test image is predicted at the normalised mean of the
training points of the cell holding the most of them. Printed by the demo next
to the heads' figures.

``geo baseline CACHE --n-cells 16,64,256 [--split test]`` prints it.
"""

from __future__ import annotations

import numpy as np

from geo.cache.store import FeatureCache
from geo.geometry import great_circle_km, xyz_to_latlon
from geo.sphere.partition import Partition
from geo.metrics import DISTANCE_SCALES_KM, accuracy_key, summarize


def densest_cell_baseline(cache_path, n_cells, split: str = "test") -> dict[int, dict]:
    """``{c: metrics}`` (geo.metrics.summarize, no bootstrap) of predicting the densest train cell's mean."""
    results = {}
    with FeatureCache(cache_path, validate=False) as cache:
        train, rows = cache.split_rows("train"), cache.split_rows(split)
        for c in n_cells:
            partition = Partition.build(cache.lat_deg[train], cache.lon_deg[train], int(c))
            lat, lon = xyz_to_latlon(partition.means_xyz[int(np.argmax(partition.counts))])
            dist_km = great_circle_km(cache.lat_deg[rows], cache.lon_deg[rows], lat, lon)
            results[int(c)] = summarize(dist_km, n_bootstrap=0)
    return results


def format_baseline(results: dict[int, dict], split: str = "test") -> str:
    """The table ``geo baseline`` prints: accuracy (%) at each scale and the median km, one line per c."""
    lines = [f"baseline: always the densest training cell's mean ({split} split)",
             "   c  " + "  ".join(f"@{x:>4g} km" for x in DISTANCE_SCALES_KM) + "   median km"]
    for c, m in results.items():
        accs = "  ".join(f"{100 * m[accuracy_key(x)]:7.1f}" for x in DISTANCE_SCALES_KM)
        lines.append(f"{c:>5d}  {accs}   {m['median_km']:9.0f}")
    return "\n".join(lines)
