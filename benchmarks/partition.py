"""Benchmark: the adaptive S2 partition of 1,000,000 points into 2^15 cells vs a per-point s2sphere loop.

Points: geoclip's 100K GPS gallery (real photo locations) resampled to n with
small jitter when geoclip is installed, else a mixture of 200 Gaussians on
the sphere with widths from 30 m to 600 km (clustered like photo locations).

The s2sphere figure is the per-point cost of
``CellId.from_lat_lng(LatLng.from_degrees(lat, lon)).id()`` measured on a
subsample and extrapolated to n points; it is a lower bound for an
s2sphere-based partition, which would also have to count and split.

Usage: python benchmarks/partition.py [--n 1000000] [--cells 32768] [--sample 20000] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import time

import numpy as np
import s2sphere
import torch

from geo.sphere.partition import Partition


def clustered_points(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(lat_deg [n], lon_deg [n], description) of a realistic, clustered point set."""
    rng = np.random.default_rng(seed)
    try:
        path = importlib.metadata.distribution("geoclip").locate_file("geoclip/model/gps_gallery/coordinates_100K.csv")
        table = np.loadtxt(str(path), delimiter=",", skiprows=1)
        centres_xyz = _xyz(table[:, 0], table[:, 1])
        pick = rng.integers(0, len(table), n)
        spread = np.full(n, 1e-4)  # ~0.6 km jitter around each gallery location
        source = f"geoclip gallery ({len(table)} locations) resampled with 0.6 km jitter"
    except (importlib.metadata.PackageNotFoundError, FileNotFoundError, OSError):
        k = 200
        centres_xyz = rng.normal(size=(k, 3))
        pick = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, 0.5)))
        spread = (10 ** rng.uniform(-3.3, -1.0, k))[pick]
        source = "mixture of 200 Gaussians on the sphere (widths 30 m to 600 km)"
    p = centres_xyz[pick] / np.linalg.norm(centres_xyz[pick], axis=1, keepdims=True)
    p = p + rng.normal(size=(n, 3)) * spread[:, None]
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    return np.degrees(np.arcsin(np.clip(p[:, 2], -1, 1))), np.degrees(np.arctan2(p[:, 1], p[:, 0])), source


def _xyz(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    lat, lon = np.radians(lat_deg), np.radians(lon_deg)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--cells", type=int, default=2**15)
    parser.add_argument("--sample", type=int, default=20_000, help="points for the s2sphere loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the sort); 1 = single core like the loop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lat, lon, source = clustered_points(args.n)
    print(f"points: {args.n:,} from {source}; cells: {args.cells:,}; torch threads: {args.threads}")

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        partition = Partition.build(lat, lon, args.cells)
        times.append(time.perf_counter() - start)
    ours_s = min(times)
    print(f"geo Partition.build: {ours_s:.3f} s (best of {args.repeats}: "
          f"{', '.join(f'{t:.3f}' for t in times)}); {partition.n_cells} cells, "
          f"levels {partition.levels.min()}..{partition.levels.max()}, "
          f"empty cells {int((partition.counts == 0).sum())}")

    sample = np.random.default_rng(1).choice(args.n, size=min(args.sample, args.n), replace=False)
    pairs = list(zip(lat[sample].tolist(), lon[sample].tolist()))
    start = time.perf_counter()
    for a, b in pairs:
        s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(a, b)).id()
    per_point_s = (time.perf_counter() - start) / len(pairs)
    loop_s = per_point_s * args.n
    print(f"s2sphere loop: {per_point_s * 1e6:.2f} us/point on {len(pairs):,} points, "
          f"extrapolated to {args.n:,} points: {loop_s:.2f} s (leaf ids only)")
    print(f"ratio: {loop_s / ours_s:.1f}x (target >= 50x)")


if __name__ == "__main__":
    main()
