"""Time of the MvMF head's density-mode prediction (``predict(mode="mode")``, paper eq. 6) on a
trained-looking mixture.

The head: c cells of a ``Partition`` built on clustered points (a few hundred "cities" with
Gaussian spreads of 5-300 km plus 20 % uniform points), so dense areas get many small cells;
each component's kappa matches its cell (log kappa = -log(area_sr) + N(1, 0.5): ~one kernel width
per cell radius, as training makes it), means at the cells' training-point means. Rows: logits of
a trained head's kind, -d^2 / (2 s^2) around a random training point (s = 30-1000 km) plus
Gaussian noise of 1-3 nats, so each row's weight is concentrated around one place with a long
tail over every cell.

Prints seconds of the first call (which builds the head's pair graph, kept until mu or kappa
change) and the best of the later ones, rows per second, and the density gained at the mode over
the densest component mean (mean and min over up to 64 rows; negative would be a miss). Run it against two checkouts (e.g.
before/after a change) in one command to compare, since the machine is noisy:

    python benchmarks/mode_search.py                  # c = 2^13 and 2^15, 256 rows
    python benchmarks/mode_search.py --log2c 15 --rows 512 --repeats 3
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from geo.heads import create_head
from geo.sphere.partition import Partition


def clustered_points(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(lat_deg, lon_deg) of n points: 80 % around 400 cities (spread 5-300 km), 20 % uniform."""
    n_city = 400
    city = rng.normal(size=(n_city, 3))
    city /= np.linalg.norm(city, axis=1, keepdims=True)
    spread_rad = np.exp(rng.uniform(np.log(5.0), np.log(300.0), n_city)) / 6371.0
    pick = rng.integers(0, n_city, int(0.8 * n))
    xyz = city[pick] + rng.normal(size=(len(pick), 3)) * spread_rad[pick, None]
    xyz = np.concatenate([xyz, rng.normal(size=(n - len(pick), 3))])
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    return np.degrees(np.arcsin(np.clip(xyz[:, 2], -1, 1))), np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0]))


def trained_looking(c: int, n_rows: int, seed: int):
    """(head, logits [n_rows, c]) as described in the module docstring."""
    rng = np.random.default_rng(seed)
    lat, lon = clustered_points(rng, max(8 * c, 200_000))
    partition = Partition.build(lat, lon, c)
    head = create_head("mvmf", feature_dim=8, partition=partition, mu_init="mean")
    log_kappa = -np.log(partition.areas_sr) + rng.normal(1.0, 0.5, c)
    with torch.no_grad():
        head.log_kappa.copy_(torch.from_numpy(log_kappa))
    mu = partition.means_xyz
    truth = np.radians(np.stack([lat, lon], 1)[rng.integers(0, len(lat), n_rows)])
    y = np.stack([np.cos(truth[:, 0]) * np.cos(truth[:, 1]), np.cos(truth[:, 0]) * np.sin(truth[:, 1]),
                  np.sin(truth[:, 0])], 1)
    s_rad = np.exp(rng.uniform(np.log(30.0), np.log(1000.0), n_rows)) / 6371.0
    sq = ((y[:, None, :] - mu[None]) ** 2).sum(-1)
    logits = -sq / (2 * s_rad[:, None] ** 2) + rng.normal(size=(n_rows, c)) * rng.uniform(1, 3, (n_rows, 1))
    return head, torch.from_numpy(logits.astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2c", type=int, nargs="*", default=[13, 15])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{'c':>7} {'rows':>5} {'first s':>8} {'s/call':>8} {'rows/s':>8} {'gain over best mean (nats)':>27}")
    for log2c in args.log2c:
        c = 2 ** log2c
        head, logits = trained_looking(c, args.rows, seed=log2c)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                lat, lon = head.predict(logits, mode="mode")
            times.append(time.perf_counter() - start)
        best = min(times[1:] or times)
        # density at the mode against the densest component mean (both by the head itself)
        lat_r, lon_r = np.radians(lat[:, 0].numpy()), np.radians(lon[:, 0].numpy())
        found = torch.from_numpy(np.stack([np.cos(lat_r) * np.cos(lon_r), np.cos(lat_r) * np.sin(lon_r),
                                           np.sin(lat_r)], 1))
        gains = []
        with torch.no_grad():
            mu = head.mu().double()
            for r in range(min(args.rows, 64)):
                at_mode = head.log_density(logits[r:r + 1], found[r:r + 1])[0, 0]
                at_means = head.log_density(logits[r:r + 1], mu)[0].max()
                gains.append(float(at_mode - at_means))
        print(f"{c:>7} {args.rows:>5} {times[0]:>8.3f} {best:>8.3f} {args.rows / best:>8.1f} "
              f"{np.mean(gains):>13.4f} (min {np.min(gains):.4f})")


if __name__ == "__main__":
    main()
