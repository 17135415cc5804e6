"""The MvMF's Monte Carlo calibration summed over every component against ``geo.heads.mixture_points``' pruning.

Calibration (HPD level of the truth, 50 % / 95 % credible areas) evaluates each image's density at
2,501 points. Summed over every component that is 2,501 x c terms an image, and an image whose
weights are spread over all c components pays all of them. The neighbour lists sum only the
components near each point's nearest mean, with a bound on the rest below float64's resolution.
This script times both on the same images and the same draws (same generator seed), side by side,
and prints ms per image, the ratio, and how far apart the results are (HPD levels, areas).

The head: an MvMF at c = 2^log2c over the geoclip sample of real MP-16 photo locations (random
ones where geoclip is not installed), kappa = e^16 (the paper's initial kappa; what a trained
head keeps at large c), Glorot W on random features, so that every image spreads its weight over
all components (the expensive case), or a trained run with ``--run RUN --cache CACHE`` (its
test split's first images).

Usage:
    python benchmarks/mixture_points.py                       # c = 2^13, 16 images (every component) / 256
    python benchmarks/mixture_points.py --log2c 15 --images 8
    python benchmarks/mixture_points.py --run /work/scale/runs/mvmf-c8192 --cache /work/scale/test210k.h5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from geo.geometry import latlon_to_xyz
from geo.heads import create_head
from geo.sphere.partition import Partition
from scale import locations  # benchmarks/scale.py: geoclip's MP-16 photo locations (uniform without geoclip)


def synthetic(log2c: int, n_images: int, dim: int = 256):
    rng = np.random.default_rng(0)
    lat, lon, _, _, source = locations(200_000, rng)
    partition = Partition.build(lat, lon, 2**log2c)
    head = create_head("mvmf", feature_dim=dim, partition=partition, kappa0=16.0).eval()
    features = torch.from_numpy(rng.normal(size=(n_images, dim)).astype(np.float32))
    pick = rng.integers(0, len(lat), n_images)
    truth = torch.from_numpy(latlon_to_xyz(lat[pick], lon[pick]))
    with torch.no_grad():
        logits = head(features)
    return head, logits, truth, f"synthetic MvMF, c = {head.n_cells}, kappa = e^16, locations: {source}"


def trained(run: str, cache_path: str, n_images: int):
    from geo.cache.store import FeatureCache
    from geo.training.runs import load_head

    head = load_head(run).head.eval()
    with FeatureCache(cache_path) as cache:
        rows = cache.split_rows("test")[:n_images]
        features = torch.from_numpy(cache.load_features(rows).astype(np.float32))
        truth = torch.from_numpy(latlon_to_xyz(cache.lat_deg[rows], cache.lon_deg[rows]))
    with torch.no_grad():
        logits = head(features)
    return head, logits, truth, f"{run} on {cache_path}, c = {head.n_cells}"


def timed(head, logits, truth, samples: int, pruned: bool):
    head.__dict__.pop("_neighbour_cache", None)
    saved = head.max_chunk_bytes
    if not pruned:
        head.max_chunk_bytes = 0           # no neighbour lists: every component summed (per row)
    try:
        start = time.perf_counter()
        lists = head._neighbour_lists()
        built = time.perf_counter() - start
        start = time.perf_counter()
        hpd, areas = head.calibration(logits, truth, n_samples=samples, generator=torch.Generator().manual_seed(1))
        return hpd, areas, time.perf_counter() - start, built, lists
    finally:
        head.max_chunk_bytes = saved
        head.__dict__.pop("_neighbour_cache", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log2c", type=int, default=13)
    parser.add_argument("--images", type=int, default=16, help="images timed both ways")
    parser.add_argument("--pruned-images", type=int, default=256, help="images timed with the pruning alone")
    parser.add_argument("--samples", type=int, default=2500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run", default=None, help="a trained MvMF run instead of the synthetic head")
    parser.add_argument("--cache", default=None, help="the cache whose test split --run is scored on")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = max(args.images, args.pruned_images)
    head, logits, truth, what = trained(args.run, args.cache, n) if args.run else synthetic(args.log2c, n)
    print(f"{what}; {args.samples} samples an image; torch threads {torch.get_num_threads()}")
    weights = torch.softmax(logits.double(), -1)
    kept = (torch.sort(weights, -1, descending=True).values.cumsum(-1) < 1 - 1e-9).sum(-1) + 1
    print(f"components holding all but 1e-9 of an image's weight: median {int(kept.median())} of {head.n_cells}")
    k = args.images
    hpd_a, areas_a, whole_s, _, _ = timed(head, logits[:k], truth[:k], args.samples, pruned=False)
    hpd_b, areas_b, pruned_s, built_s, lists = timed(head, logits[:k], truth[:k], args.samples, pruned=True)
    if lists is None:
        print("no neighbour lists (components overlap too widely): both runs summed every component")
    else:
        print(f"neighbour lists: {lists.n_pairs:,} pairs ({lists.n_pairs / head.n_cells:.1f} a component), "
              f"built in {built_s:.2f} s (once per head)")
    print(f"every component: {1e3 * whole_s / k:9.1f} ms an image ({k} images)")
    print(f"pruned:          {1e3 * pruned_s / k:9.1f} ms an image ({k} images): {whole_s / pruned_s:.1f}x faster")
    print(f"same draws: max |HPD level difference| {float((hpd_a - hpd_b).abs().max()):.2e}, "
          f"max relative area difference {float(((areas_a - areas_b) / areas_a).abs().max()):.2e}")
    if args.pruned_images > k:
        m = args.pruned_images
        _, _, seconds, _, _ = timed(head, logits[:m], truth[:m], args.samples, pruned=True)
        print(f"pruned, {m} images: {1e3 * seconds / m:.1f} ms an image; 210,000 images (OSV-5M test) "
              f"would take {210_000 * seconds / m / 60:.0f} min at this rate")


if __name__ == "__main__":
    main()
