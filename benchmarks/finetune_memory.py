"""Peak memory of one `geo finetune` training step, per batch size: what batch fits a device.

Runs, for each ``--batch`` in its own process (so each peak is its own), two training
steps of ``geo.endtoend``'s step (backbone + head, the head's own loss, AdamW: the
second step has the optimizer's moments allocated) on a fixed synthetic batch, and
prints the process's peak memory: peak RSS on a CPU, ``torch.cuda.max_memory_allocated``
on CUDA. From two batch sizes it prints the per-image slope and the fixed part
(weights, gradients, AdamW moments, allocator), and the largest batch whose linear
projection fits ``--device-gb`` (default 141: one H200).

On a CPU the activations a step keeps are those a GPU keeps too (same graph, float32
here; a GPU's bf16 autocast keeps about half of them), so the CPU projection is an
upper bound of a float32 GPU step's needs, not a GPU measurement.

Usage:
    python benchmarks/finetune_memory.py                                  # WRN50, 224 px, MvMF c = 2^15, batch 8 and 24
    python benchmarks/finetune_memory.py --batch 8 --batch 24 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(args) -> dict:
    import numpy as np
    import torch

    from geo.endtoend.model import EndToEnd, freeze, head_loss_fn, make_optimizer
    from geo.geometry import latlon_to_xyz
    from geo.heads import create_head
    from geo.pipeline.backbone import create_backbone, placement
    from geo.pipeline.finetune import train_step
    from geo.sphere.partition import Partition
    from geo.training.evaluate import feature_dtype

    place = placement(args.device, args.precision)
    torch.manual_seed(0)
    model = place.to(create_backbone(args.backbone, "none", num_classes=16, seed=0, image_size=args.px)).train()
    rng = np.random.default_rng(0)
    lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1, 4 * args.cells))), rng.uniform(-180, 180, 4 * args.cells)
    head = create_head("mvmf", feature_dim=model.feature_dim, partition=Partition.build(lat, lon, args.cells),
                       matmul_dtype="bfloat16" if place.precision == "bf16" else None).to(place.device)
    freeze(model, None)
    net = EndToEnd(model, head, feature_dtype(place.precision)).train()
    optimizer = make_optimizer(net, {"lr": 1e-5, "weight_decay": 0.0})
    rows = rng.integers(0, len(lat), args.one)
    target = {"target_xyz": torch.from_numpy(latlon_to_xyz(lat[rows], lon[rows]).astype(np.float32)).to(place.device),
              **{k: t.to(place.device) for k, t in head.row_targets(lat[rows], lon[rows]).items()}}
    x = torch.randn(args.one, 3, args.px, args.px)
    seconds = []
    for _ in range(2):
        t = time.perf_counter()
        train_step(net, optimizer, x, target, place, loss_fn=head_loss_fn(head))
        seconds.append(time.perf_counter() - t)
    if place.device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    n_params = sum(p.numel() for p in net.parameters())
    return {"batch": args.one, "peak_gb": peak_gb, "step_s": seconds[-1], "params_m": n_params / 1e6,
            "device": str(place.device), "precision": place.precision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 8 and 24)")
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--px", type=int, default=224)
    parser.add_argument("--cells", type=int, default=32768)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device-gb", type=float, default=141.0, help="device memory to project onto (H200: 141)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one batch size
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    batches = args.batch or [8, 24]
    results = []
    for b in batches:
        cmd = [sys.executable, __file__, "--one", str(b), "--backbone", args.backbone, "--px", str(args.px),
               "--cells", str(args.cells), "--device", args.device, "--precision", args.precision]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        r = results[-1]
        print(f"batch {b}: peak {r['peak_gb']:.2f} GB, step {r['step_s']:.1f} s "
              f"({args.backbone} + MvMF c = {args.cells}, {r['params_m']:.1f} M parameters, {args.px} px, "
              f"{r['device']}, {r['precision']})", flush=True)
    if len(results) >= 2:
        (b0, g0), (b1, g1) = (results[0]["batch"], results[0]["peak_gb"]), (results[-1]["batch"], results[-1]["peak_gb"])
        slope = (g1 - g0) / (b1 - b0)
        fixed = g0 - slope * b0
        fits = int((args.device_gb - fixed) / slope) if slope > 0 else None
        print(f"per image {slope * 1024:.0f} MB, fixed {fixed:.2f} GB: a linear projection fits batch {fits} "
              f"in {args.device_gb:.0f} GB")


if __name__ == "__main__":
    main()
