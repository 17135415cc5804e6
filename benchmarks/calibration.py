"""What calibration (HPD levels, credible areas) adds to an evaluation, on the demo's sizes.

Scores the test split of a synthetic cache shaped like ``make demo``'s small size (12,000 rows,
15 % test, 512-d features as resnet18 gives) with each head at the demo's largest c, once
without calibration (what geo evaluated before) and once with it, side by side in one process,
and prints seconds and the ratio. The heads are freshly initialised (Glorot W): the calibration's
cost does not depend on the weights (the MvMF's Monte Carlo draws 2,500 samples per image and
evaluates the c-component density at each; cell densities and single vMFs are exact).

Usage:
    python benchmarks/calibration.py                  # n = 12000, c = 256
    python benchmarks/calibration.py --n 30000 --cells 1024   # the medium demo
    python benchmarks/calibration.py --threads 1   # on a machine shared with other jobs (see below)

On a CPU shared with many other processes, torch's multi-threaded logsumexp can be 30x slower than
single-threaded (measured: 42 ms vs 1.2 ms for [2501, 256] at a load average of 20 on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from geo.cache.store import CacheWriter, FeatureCache
from geo.heads import create_head
from geo.sphere.partition import Partition
from geo.training.evaluate import evaluate_split


def make_cache(path: Path, n: int, d: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lon = rng.uniform(-180, 180, n)
    split = rng.choice(np.array([0, 1, 2], np.uint8), size=n, p=[0.7, 0.15, 0.15])
    with CacheWriter(path, feature_dim=d, countries=["XX"], provenance={"backbone": "synthetic"}) as writer:
        writer.write_block(features=rng.normal(size=(n, d)).astype(np.float16), ids=[f"img{i:06d}" for i in range(n)],
                           lat_deg=lat, lon_deg=lon, split=split, country=np.zeros(n, np.int16))
        writer.finalize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=12_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--cells", type=int, default=256)
    parser.add_argument("--heads", default="mvmf,softmax,vmf,vmf-mixture")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--logit-scale", type=float, default=1.0,
                        help="multiply the heads' W by this (> 1: peaked mixing weights, as after training)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo_like.h5"
        make_cache(path, args.n, args.dim)
        with FeatureCache(path) as cache:
            train = cache.split_rows("train")
            partition = Partition.build(cache.lat_deg[train], cache.lon_deg[train], args.cells)
            n_test = len(cache.split_rows("test"))
            print(f"test split: {n_test} rows, d = {args.dim}, c = {args.cells}; torch threads "
                  f"{torch.get_num_threads()}")
            for name in args.heads.split(","):
                head = create_head(name, feature_dim=args.dim, partition=partition)
                with torch.no_grad():
                    head.linear.weight.mul_(args.logit_scale)
                seconds = {}
                for calibration in (False, True):
                    start = time.perf_counter()
                    metrics, _ = evaluate_split(head, cache, "test", predict=head.default_predict(),
                                                device=torch.device("cpu"), feature_dtype=torch.float32,
                                                batch_size=512, n_bootstrap=1000, topk=5, calibration=calibration)
                    seconds[calibration] = time.perf_counter() - start
                extra = f"; coverage@95 {metrics['coverage@95']:.3f}" if "coverage@95" in metrics else ""
                print(f"{name:>12}: evaluate {seconds[False]:7.2f} s without calibration, {seconds[True]:7.2f} s "
                      f"with ({seconds[True] / seconds[False]:.1f}x; {1e3 * (seconds[True] - seconds[False]) / n_test:.2f}"
                      f" ms per image){extra}")


if __name__ == "__main__":
    main()
