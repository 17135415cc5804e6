"""Throughput of the fit-head training step: float32 against the default precision, and the bf16 floor.

Prints, in one run:
- this machine's matmul rate (GFLOP/s) of a B x d x c product, bf16 and float32;
- for each head at d = 2048 and c = 2^13, 2^15 (and 2^17 when memory allows), at
  the default batch, on synthetic in-memory features, side by side: training
  samples/s with ``--precision fp32`` and with the default (``--precision auto``:
  bf16 where the CPU has it natively), their ratio, the bf16 floor and the
  default's share of it. A step is forward + loss + backward + AdamW, exactly
  ``geo.training.trainer.train_step``. The bf16 floor is measured in the same
  rounds: one plain bf16 ``F.linear`` forward + weight-gradient step on the same
  shapes (B x d x c), the two products a step cannot avoid (features need no gradient);
- the loss terms' share (forward + backward of ``head.loss`` on fixed logits);
- the MvMF / softmax step-time ratio at equal c for the default precision, and peak RSS.

The three timings of a head alternate round by round (floor, fp32 step, default step)
and each figure is the median over rounds, so a noisy machine affects them alike.
Importing geo puts tensors of 2 MiB and more on huge pages (see geo/__init__.py);
``THP_MEM_ALLOC_ENABLE=0 python benchmarks/fit_head.py`` measures without. As fit-head on a
CPU, the benchmark has glibc retain freed memory (``geo.devices.retain_freed_memory``;
``--malloc-default`` measures without).

Targets: issue 3: MvMF >= 50 % of the floor, softmax >= 60 %, MvMF step <= 1.3x softmax;
issue 22: on a CPU with native bf16, the default >= 2x float32 samples/s for both heads at
c = 2^13 and 2^15 (>= 50 % of the bf16 floor as a goal).

Usage:
    python benchmarks/fit_head.py --log2c 13 15   # the issue-22 table
    python benchmarks/fit_head.py                 # c = 2^13, 2^15 (2^17 if memory allows)
    python benchmarks/fit_head.py --quick         # c = 2^11 only, two timed rounds
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch

from geo.devices import cpu_supports_bf16, resolve_precision, retain_freed_memory
from geo.geometry import latlon_to_xyz
from geo.heads import create_head
from geo.sphere.partition import Partition
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


def make_step(name: str, partition, batch: int, d: int, precision: str):
    """A closure running one training step of a fresh head ``name`` at ``precision``, and its chunk size."""
    torch.manual_seed(0)
    c = partition.n_cells
    config = {"lr": 1e-4, "weight_decay": 0.0, "precision": precision}
    head = create_head(name, feature_dim=d, partition=partition,
                       matmul_dtype="bfloat16" if precision == "bf16" else None)
    head.train()
    optimizer = make_optimizer(head, config)
    chunk_rows = max(1, min(batch, FitConfig.max_memory_mb * 2**20 // (c * BYTES_PER_ROW_CELL)))
    rng = np.random.default_rng(0)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, batch)))
    lon = rng.uniform(-180, 180, batch)
    targets = {"target_xyz": torch.from_numpy(latlon_to_xyz(lat, lon).astype(np.float32))}
    targets.update({k: torch.as_tensor(v) for k, v in head.row_targets(lat, lon).items()})
    x = torch.randn(batch, d).to(torch.float16).to(feature_dtype(precision))  # as cached: float16, then converted
    return (lambda: train_step(head, optimizer, x, targets, chunk_rows)), head, targets, chunk_rows


def make_floor(batch: int, d: int, c: int):
    """A closure running the bf16 floor: ``F.linear`` forward and weight gradient of bf16 [B, d] x [c, d]."""
    x = torch.randn(batch, d).to(torch.bfloat16)
    w = (torch.randn(c, d) * d**-0.5).to(torch.bfloat16).requires_grad_()
    grad = (torch.randn(batch, c) / batch).to(torch.bfloat16)

    def floor_step():
        w.grad = None
        torch.nn.functional.linear(x, w).backward(grad)
    return floor_step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_head(name: str, partition, batch: int, d: int, precision: str, rounds: int) -> dict:
    """Median seconds of the bf16 floor, a float32 step and a ``precision`` step, alternated over ``rounds``
    (after one warm-up round), and the loss terms' seconds per batch."""
    fp32_step, _, _, _ = make_step(name, partition, batch, d, "fp32")
    step, head, targets, chunk_rows = make_step(name, partition, batch, d, precision)
    floor_step = make_floor(batch, d, partition.n_cells)
    times = {"floor": [], "fp32": [], "default": []}
    for i in range(rounds + 1):
        for key, fn in (("floor", floor_step), ("fp32", fp32_step), ("default", step)):
            times[key].append(timed(fn))
    # The loss terms alone (no matmul): forward + backward of head.loss on fixed logits.
    logits = torch.randn(chunk_rows, partition.n_cells, requires_grad=True)
    sub = {k: v[:chunk_rows] for k, v in targets.items()}
    loss_s = min(timed(lambda: [head.loss(logits, **sub).backward() for _ in range(-(-batch // chunk_rows))])
                 for _ in range(2))
    return {**{f"{k}_s": float(np.median(v[1:])) for k, v in times.items()}, "loss_s": loss_s,
            "chunk_rows": chunk_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="c = 2^11 only, two timed rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="the precision compared with float32 (default: auto, what fit-head uses)")
    parser.add_argument("--batch-size", type=int, default=FitConfig.batch_size)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per head (default 5, --quick 2)")
    parser.add_argument("--malloc-default", action="store_true",
                        help="leave glibc's malloc as it is (fit-head has it retain freed memory on a CPU)")
    parser.add_argument("--log2c", type=int, nargs="+", default=None, help="class counts as powers of 2 (default 13 15 17)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # as geo.training.trainer does for a CPU run (--malloc-default: glibc's default, big tensors mapped anew)
    retained = False if args.malloc_default else retain_freed_memory()
    d, batch = 2048, args.batch_size
    precision = resolve_precision(args.precision, torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 (AVX512-BF16/AMX): {cpu_supports_bf16()}, "
          f"huge pages for tensors (THP_MEM_ALLOC_ENABLE, set by geo): {os.environ.get('THP_MEM_ALLOC_ENABLE')}, "
          f"freed memory retained (geo.devices.retain_freed_memory): {retained}")

    c_rate = 2**11 if args.quick else 2**13
    rates = {p: matmul_gflops(batch, d, c_rate, dt, 3 if args.quick else 8)
             for p, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    print(f"matmul B x d x c = {batch} x {d} x {c_rate}: bf16 {rates['bf16']:.1f} GFLOP/s, "
          f"fp32 {rates['fp32']:.1f} GFLOP/s")
    print(f"default precision (--precision {args.precision}): {precision}; batch {batch}, d {d}")

    sizes = [2**k for k in args.log2c] if args.log2c else [2**11] if args.quick else [2**13, 2**15, 2**17]
    rounds = args.rounds or (2 if args.quick else 5)
    print(f"\n{'c':>7} {'head':>8} {'fp32 /s':>8} {precision + ' /s':>8} {'ratio':>6} {'floor s':>8} "
          f"{'of floor':>9} {'fp32 s':>7} {precision + ' s':>7} {'loss s':>7} {'chunk':>6}")
    for c in sizes:
        # Two heads (fp32 and default): W, its gradient, two Adam moments (float32) and a bf16 copy
        # each, plus about eight float32 [chunk, c] temporaries.
        chunk = max(1, min(batch, FitConfig.max_memory_mb * 2**20 // (c * BYTES_PER_ROW_CELL)))
        need = 2 * c * d * 4 * 4.5 + 8 * chunk * c * 4
        if need > 0.9 * available_bytes():
            print(f"{c:>7} skipped: needs ~{need / 2**30:.1f} GiB, {available_bytes() / 2**30:.1f} GiB available")
            continue
        rng = np.random.default_rng(c)
        n_points = max(4 * c, 100_000)
        partition = Partition.build(np.degrees(np.arcsin(rng.uniform(-1, 1, n_points))),
                                    rng.uniform(-180, 180, n_points), c)
        result = {}
        for name in ("softmax", "mvmf"):
            r = time_head(name, partition, batch, d, precision, rounds)
            result[name] = r
            print(f"{c:>7} {name:>8} {batch / r['fp32_s']:8.0f} {batch / r['default_s']:8.0f} "
                  f"{r['fp32_s'] / r['default_s']:5.2f}x {r['floor_s']:8.3f} {r['floor_s'] / r['default_s']:8.0%} "
                  f"{r['fp32_s']:7.3f} {r['default_s']:7.3f} {r['loss_s']:7.3f} {r['chunk_rows']:>6}", flush=True)
        ratio = result["mvmf"]["default_s"] / result["softmax"]["default_s"]
        print(f"{c:>7} MvMF / softmax step time ({precision}): {ratio:.2f}x")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS {peak_gib:.2f} GiB")
    print("targets: default >= 2x fp32 samples/s where bf16 is native (goal >= 50% of the bf16 floor); "
          "issue 3: MvMF >= 50% of floor, softmax >= 60%, MvMF step <= 1.3x softmax")


if __name__ == "__main__":
    main()
