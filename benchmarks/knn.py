"""Throughput of the knn head's exact top-k search against a plain float32 matmul + top-k floor.

Prints, measured side by side on the same machine and device:
- the floor: ``torch.topk(queries @ gallery.T, k)`` on the whole gallery at once (the fastest
  exact search when the [B, n] similarity matrix fits in memory);
- the knn head's forward (``geo.heads.knn.topk_cosine``: gallery blocks of ``block_rows`` rows,
  running top-k merged per block, memory O(B x block_rows)), plus the neighbours' locations;
- queries per second of both and the ratio head / floor (target >= 0.7), and whether both
  return the same neighbours.

Usage:
    python benchmarks/knn.py                         # n = 131072 gallery rows, d = 512, batch 2048
    python benchmarks/knn.py --n 1000000 --d 2048 --batch 8192 --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def best_of(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=131072, help="gallery rows")
    parser.add_argument("--d", type=int, default=512, help="feature width")
    parser.add_argument("--batch", type=int, default=2048, help="queries per call")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--block-rows", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from geo.heads import create_head
    from geo.heads.knn import topk_cosine

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    head = create_head("knn", feature_dim=args.d, k=args.k, block_rows=args.block_rows)
    head.fit_gallery(rng.standard_normal((args.n, args.d), dtype=np.float32),
                     np.degrees(np.arcsin(rng.uniform(-1, 1, args.n))), rng.uniform(-180, 180, args.n))
    head.to(device)
    gallery = head.gallery_features
    queries = torch.nn.functional.normalize(torch.randn(args.batch, args.d, device=device), dim=-1)

    with torch.no_grad():
        t_floor = best_of(lambda: torch.topk(queries @ gallery.T, args.k, dim=1), args.repeats, sync)
        t_head = best_of(lambda: head(queries), args.repeats, sync)
        same = torch.equal(torch.topk(queries @ gallery.T, args.k, dim=1).indices,
                           topk_cosine(queries, gallery, args.k, args.block_rows)[1])
    print(f"gallery {args.n} x {args.d} float32, batch {args.batch}, k {args.k}, device {device}, "
          f"block_rows {args.block_rows}")
    print(f"floor (matmul + top-k, whole gallery): {args.batch / t_floor:10.0f} queries/s ({t_floor:.3f} s)")
    print(f"knn head forward (blocked, exact):     {args.batch / t_head:10.0f} queries/s ({t_head:.3f} s)")
    print(f"ratio head / floor: {t_floor / t_head:.2f} (target >= 0.7); same neighbours: {same}")


if __name__ == "__main__":
    main()
