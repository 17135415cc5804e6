"""Throughput of the fit-head training step against the matmul floor.

Prints, in one run:
- this machine's matmul rate (GFLOP/s) of a B x d x c product, bf16 and float32;
- training samples/s of each head at d = 2048 and c = 2^13, 2^15 (and 2^17 when
  memory allows), at the default batch, on synthetic in-memory features; a step is
  forward + loss + backward + AdamW, exactly ``geo.training.trainer.train_step``;
- the fraction of the floor reached: the floor is the time of the two B x d x c
  products a step needs (forward W x and the weight gradient; features need no
  gradient) at the measured matmul rate of the precision used;
- where the rest of the step goes (matmuls / vMF or cross-entropy terms / optimizer);
- the MvMF / softmax step-time ratio at equal c, and peak RSS.

Targets (issue 3): MvMF >= 50 % of the floor, softmax >= 60 %, MvMF step <= 1.3x softmax.

Usage:
    python benchmarks/fit_head.py            # c = 2^13, 2^15 (2^17 if memory allows)
    python benchmarks/fit_head.py --quick    # c = 2^11 only, two timed steps
    python benchmarks/fit_head.py --log2c 13 --precision fp32   # one size, float32 matmuls
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from geo.heads import create_head
from geo.sphere.partition import Partition
from geo.devices import cpu_supports_bf16
from geo.training.evaluate import feature_dtype
from geo.training.config import BYTES_PER_ROW_CELL, FitConfig
from geo.training.trainer import make_optimizer, train_step


def matmul_gflops(batch: int, d: int, c: int, dtype: torch.dtype, repeats: int) -> float:
    """Measured GFLOP/s of features [B, d] @ W.T [d, c] (F.linear, as the heads do)."""
    x = torch.randn(batch, d).to(dtype)
    w = torch.randn(c, d).to(dtype)
    torch.nn.functional.linear(x, w)  # warm-up: oneDNN picks and caches its kernel
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, w)
    return 2 * batch * d * c * repeats / (time.perf_counter() - start) / 1e9


def available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
    return info.get("MemAvailable", 0)


def time_head(name: str, partition, batch: int, d: int, precision: str, steps: int) -> dict:
    """Seconds per training step of head ``name`` (median of ``steps`` after one warm-up), with a breakdown."""
    torch.manual_seed(0)
    c = partition.n_cells
    config = {"lr": 1e-4, "weight_decay": 0.0, "precision": precision}
    head = create_head(name, feature_dim=d, partition=partition,
                       matmul_dtype="bfloat16" if precision == "bf16" else None)
    optimizer = make_optimizer(head, config)
    chunk_rows = max(1, min(batch, FitConfig.max_memory_mb * 2**20 // (c * BYTES_PER_ROW_CELL)))
    rng = np.random.default_rng(0)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, batch)))
    lon = rng.uniform(-180, 180, batch)
    from geo.geometry import latlon_to_xyz

    targets = {"target_xyz": torch.from_numpy(latlon_to_xyz(lat, lon).astype(np.float32))}
    if name == "softmax":
        targets["target_cell"] = torch.from_numpy(partition.assign(lat, lon))
    x = torch.randn(batch, d).to(torch.float16).to(feature_dtype(precision))  # as cached: float16, then converted
    times, opt_times = [], []
    for i in range(steps + 1):
        start = time.perf_counter()
        train_step(head, optimizer, x, targets, chunk_rows)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        optimizer.step()  # a second optimizer step, timed alone: the optimizer's share
        opt_times.append(time.perf_counter() - start)
    # The loss terms alone (no matmul): forward + backward of head.loss on fixed logits.
    logits = torch.randn(chunk_rows, c, requires_grad=True)
    sub = {k: v[:chunk_rows] for k, v in targets.items()}
    loss_times = []
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(-(-batch // chunk_rows)):
            head.loss(logits, **sub).backward()
        loss_times.append(time.perf_counter() - start)
    return {"step_s": float(np.median(times[1:])), "optimizer_s": float(np.median(opt_times[1:])),
            "loss_s": min(loss_times), "chunk_rows": chunk_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="c = 2^11 only, two timed steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--batch-size", type=int, default=FitConfig.batch_size)
    parser.add_argument("--log2c", type=int, nargs="+", default=None, help="class counts as powers of 2 (default 13 15 17)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d, batch = 2048, args.batch_size
    precision = args.precision if args.precision != "auto" else ("bf16" if cpu_supports_bf16() else "fp32")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, bf16 kernels: {cpu_supports_bf16()}")

    c_rate = 2**11 if args.quick else 2**13
    rates = {p: matmul_gflops(batch, d, c_rate, dt, 3 if args.quick else 8)
             for p, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    print(f"matmul B x d x c = {batch} x {d} x {c_rate}: bf16 {rates['bf16']:.1f} GFLOP/s, "
          f"fp32 {rates['fp32']:.1f} GFLOP/s")
    print(f"training precision (--precision {args.precision}): {precision}; batch {batch}, d {d}")

    sizes = [2**k for k in args.log2c] if args.log2c else [2**11] if args.quick else [2**13, 2**15, 2**17]
    steps = 2 if args.quick else 3
    print(f"\n{'c':>7} {'head':>8} {'step s':>8} {'samples/s':>10} {'floor s':>8} {'of floor':>9} "
          f"{'loss s':>7} {'adam s':>7} {'chunk':>6}")
    for c in sizes:
        # W, its gradient, two Adam moments (float32) and a bf16 copy, plus [chunk, c] temporaries.
        need = c * d * 4 * 4.5 + FitConfig.max_memory_mb * 2**20 * 2
        if need > 0.8 * available_bytes():
            print(f"{c:>7} skipped: needs ~{need / 2**30:.1f} GiB, {available_bytes() / 2**30:.1f} GiB available")
            continue
        rng = np.random.default_rng(c)
        n_points = max(4 * c, 100_000)
        start = time.perf_counter()
        partition = Partition.build(np.degrees(np.arcsin(rng.uniform(-1, 1, n_points))),
                                    rng.uniform(-180, 180, n_points), c)
        build_s = time.perf_counter() - start
        floor_s = 2 * (2 * batch * d * c) / (rates[precision] * 1e9)
        result = {}
        for name in ("softmax", "mvmf"):
            r = time_head(name, partition, batch, d, precision, steps)
            result[name] = r
            print(f"{c:>7} {name:>8} {r['step_s']:8.3f} {batch / r['step_s']:10.0f} {floor_s:8.3f} "
                  f"{floor_s / r['step_s']:8.0%} {r['loss_s']:7.3f} {r['optimizer_s']:7.3f} {r['chunk_rows']:>6}")
        ratio = result["mvmf"]["step_s"] / result["softmax"]["step_s"]
        print(f"{c:>7} MvMF / softmax step time: {ratio:.2f}x   (partition of {n_points} points: {build_s:.1f} s)")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS {peak_gib:.2f} GiB")
    print("targets: MvMF >= 50% of floor, softmax >= 60%, MvMF step <= 1.3x softmax")


if __name__ == "__main__":
    main()
