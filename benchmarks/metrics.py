"""Throughput of geo.metrics on one million predictions (prints figures; asserts nothing).

Usage: python benchmarks/metrics.py [--n 1000000]
"""

import argparse
import time

import numpy as np

from geo import geometry, metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    lat1, lat2 = rng.uniform(-90, 90, (2, args.n))
    lon1, lon2 = rng.uniform(-180, 180, (2, args.n))
    codes = np.array(["FR", "DE", "US", "XX"])
    pred_c, true_c = codes[rng.integers(0, 4, args.n)], codes[rng.integers(0, 4, args.n)]
    logp = rng.normal(-5, 2, args.n)

    t = time.perf_counter()
    dist_km = geometry.great_circle_km(lat1, lon1, lat2, lon2)
    t_dist = time.perf_counter() - t
    t = time.perf_counter()
    metrics.summarize(dist_km, pred_country=pred_c, true_country=true_c, log_density=logp, n_bootstrap=0)
    t_sum = time.perf_counter() - t
    t = time.perf_counter()
    metrics.summarize(dist_km[:10_000], n_bootstrap=1000)
    t_boot = time.perf_counter() - t
    print(f"great-circle distances, n={args.n:,}: {t_dist:.3f} s ({args.n / t_dist / 1e6:.1f} M/s)")
    print(f"all point metrics (acc@5 scales, median, mean, GeoScore, country, NLL), n={args.n:,}: {t_sum:.3f} s")
    print(f"summarize with 1000 bootstrap replicates, n=10,000: {t_boot:.3f} s")


if __name__ == "__main__":
    main()
