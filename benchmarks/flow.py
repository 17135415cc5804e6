"""Throughput of the flow head beside the MvMF at c = 2^13, in one run on one machine.

Prints, for each head: training samples/s (a step = forward + loss + backward + AdamW,
exactly ``geo.training.trainer.train_step``, at d = 1024, PLONK's embedding width, and the
head's default network), NLL evaluation rows/s (``forward`` + ``log_density_at`` under
no_grad: for the flow head an ODE solve with the exact divergence per row) and sampling
samples/s (``sample``; heads without one in this branch print n/a), then the flow / MvMF ratios.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/flow.py            # d = 1024, batch 1024
    python benchmarks/flow.py --quick                      # fewer rows and steps
    python benchmarks/flow.py --device cuda
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from geo.geometry import xyz_to_latlon
from geo.heads import create_head
from geo.sphere.partition import Partition
from geo.training.trainer import make_optimizer, train_step


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(name: str, head, d: int, batch: int, steps: int, eval_rows: int, n_samples: int, device) -> dict:
    torch.manual_seed(0)
    head = head.to(device)
    config = {"lr": 1e-4, "weight_decay": 0.0}
    optimizer = make_optimizer(head, config)
    x = torch.randn(batch, d, device=device)
    y = torch.nn.functional.normalize(torch.randn(batch, 3, device=device), dim=-1)
    lat_deg, lon_deg = xyz_to_latlon(y.double().cpu().numpy())
    targets = {"target_xyz": y, **{k: v.to(device) for k, v in head.row_targets(lat_deg, lon_deg).items()}}
    step_s = _timed(lambda: train_step(head, optimizer, x, targets, batch), steps)
    head.eval()
    xe, ye = x[:eval_rows], y[:eval_rows]
    with torch.no_grad():
        nll_s = _timed(lambda: head.log_density_at(head(xe), ye), 1)
        sample_s = None
        if hasattr(head, "sample"):
            rows = max(1, n_samples // 64)
            sample_s = _timed(lambda: head.sample(head(xe[:rows]), 64), 1) / (rows * 64)
    return {"name": name, "train_rows_s": batch / step_s, "nll_rows_s": eval_rows / nll_s,
            "samples_s": None if sample_s is None else 1.0 / sample_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--log2c", type=int, default=13)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--eval-rows", type=int, default=256)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_rows, args.samples = 2, 64, 64
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, d = {args.d}, batch {args.batch}")
    rng = np.random.default_rng(0)
    n_points = 4 * 2**args.log2c
    partition = Partition.build(np.degrees(np.arcsin(rng.uniform(-1, 1, n_points))), rng.uniform(-180, 180, n_points),
                                2**args.log2c)
    results = [
        measure("flow (width 128, depth 3, 2 pairs)", create_head("flow", feature_dim=args.d, partition=None), args.d,
                args.batch, args.steps, args.eval_rows, args.samples, device),
        measure(f"mvmf c=2^{args.log2c}", create_head("mvmf", feature_dim=args.d, partition=partition), args.d,
                args.batch, args.steps, args.eval_rows, args.samples, device),
    ]
    fmt = lambda v: "n/a" if v is None else f"{v:,.1f}"  # noqa: E731
    print(f"{'head':<28}{'train rows/s':>14}{'NLL rows/s':>14}{'samples/s':>14}")
    for r in results:
        print(f"{r['name']:<28}{fmt(r['train_rows_s']):>14}{fmt(r['nll_rows_s']):>14}{fmt(r['samples_s']):>14}")
    flow, mvmf = results
    ratio = lambda a, b: "n/a" if a is None or b is None else f"{a / b:.3g}"  # noqa: E731
    print(f"flow / mvmf: training {ratio(flow['train_rows_s'], mvmf['train_rows_s'])}, "
          f"NLL {ratio(flow['nll_rows_s'], mvmf['nll_rows_s'])}, sampling {ratio(flow['samples_s'], mvmf['samples_s'])}")


if __name__ == "__main__":
    main()
