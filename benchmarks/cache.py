"""Feature-cache throughput: write, open + validate, one epoch in memory, one epoch streamed.

Prints figures only (asserts nothing). Usage:
    python benchmarks/cache.py [--rows 40000] [--dim 2048] [--stream-budget-mb 32]
"""

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from geo.cache.store import CacheWriter, FeatureCache


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--block-rows", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--stream-budget-mb", type=int, default=32)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, d = args.rows, args.dim
    mib = n * d * 2 / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        # one block of features generated up front, so the write time is the cache's alone
        block = rng.normal(size=(args.block_rows, d)).astype(np.float16)
        t = time.perf_counter()
        with CacheWriter(path, feature_dim=d, countries=["FR", "US", "XX"],
                         provenance={"backbone": "benchmark", "weights": "0" * 64}) as writer:
            for start in range(0, n, args.block_rows):
                b = min(args.block_rows, n - start)
                writer.write_block(features=block[:b],
                                   ids=[f"row{start + i}" for i in range(b)],
                                   lat_deg=rng.uniform(-90, 90, b), lon_deg=rng.uniform(-180, 180, b),
                                   split=rng.choice(3, size=b, p=[0.8, 0.1, 0.1]).astype(np.uint8),
                                   country=rng.integers(0, 3, b).astype(np.int16))
            writer.finalize()
        t_write = time.perf_counter() - t

        t = time.perf_counter()
        cache = FeatureCache(path)
        t_open = time.perf_counter() - t
        n_train = len(cache.split_rows("train"))

        def epoch(c, e):
            t0 = time.perf_counter()
            rows = sum(len(r) for r, _ in c.iter_batches("train", args.batch_size, shuffle=True, seed=0, epoch=e))
            assert rows == n_train
            return time.perf_counter() - t0

        t_first, t_mem = epoch(cache, 0), epoch(cache, 1)
        cache.close()
        streamed = FeatureCache(path, memory_budget_bytes=args.stream_budget_mb << 20, validate=False)
        assert not streamed.fits_in_memory("train")
        t_stream = epoch(streamed, 0)
        streamed.close()
    train_mib = n_train * d * 2 / 2**20
    print(f"cache: {n:,} rows x {d} float16 = {mib:.0f} MiB; train split {n_train:,} rows = {train_mib:.0f} MiB")
    print(f"write (row blocks of {args.block_rows}):   {t_write:6.2f} s  {mib / t_write:7.0f} MiB/s")
    print(f"open + full validation:        {t_open:6.2f} s  {mib / t_open:7.0f} MiB/s")
    print(f"train epoch, in memory (first, loads): {t_first:6.2f} s")
    print(f"train epoch, in memory (later):        {t_mem:6.2f} s  {train_mib / t_mem:7.0f} MiB/s")
    print(f"train epoch, streamed ({args.stream_budget_mb} MiB budget): {t_stream:6.2f} s  {train_mib / t_stream:7.0f} MiB/s"
          f"  (streamed / in-memory first epoch: {t_stream / t_first:.2f})")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
