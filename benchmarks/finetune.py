"""Where the demo's fine-tuning time goes: the training step, its memory format, and the loader.

The demo fine-tunes resnet18 from random init on 64 px earth patches, batch 64 (``geo extract
--finetune-epochs``); that stage is most of ``make demo``. This script measures one training
step (forward, cross-entropy, backward, Adam) of geo's own backbone in every combination of

  precision      fp32, and bf16 where this CPU runs it natively (``--precision`` forces one)
  memory format  nchw (contiguous) against nhwc (channels_last, oneDNN's preferred layout)
  feed           synthetic  a fixed batch in memory: the step alone
                 loader-w0  geo's training DataLoader in the main process (decode + augment, then step)
                 loader-w1  the same with one worker process (geo's default on 2 cores), which
                            competes with the step for the 2 cores
                 loader-w1-per-image-jitter  the same with torchvision's ColorJitter on every PIL
                            image, as geo did before the batched jitter (``BatchColorJitter``)

and the inference step of the feature dump (``extract``) per memory format, plus the loader's
CPU time per batch on its own. Configurations are interleaved in shuffled rounds (machines are
shared and noisy); each figure is the median ms per step over all rounds, warm-up steps left out.
The last column is geo's time over this one (> 1: faster than what geo does): geo's memory format
on this machine (``placement``) and the same feed (geo's loader-w1 for the per-image jitter row).

``--end-to-end`` measures instead the step of `geo finetune` (``geo.endtoend``): backbone and an
output head trained together with the head's own loss (MvMF, softmax over c cells), against the
bare backbone step (forward, cross-entropy on its country classifier, backward, Adam) at the
same batch, on geo's placement and a fixed synthetic batch; target: end-to-end / bare >= 0.9
in images per second.

Usage:
  python benchmarks/finetune.py                 # 3 rounds x 12 steps per configuration
  python benchmarks/finetune.py --quick         # 1 round x 6 steps
  python benchmarks/finetune.py --precision fp32
  python benchmarks/finetune.py --end-to-end [--cells 1024] [--backbone resnet18 --px 64 --batch 64]
  python benchmarks/finetune.py --end-to-end --device cuda --backbone wide_resnet50_2 --px 224 --batch 256 --cells 32768
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms as T

from geo.devices import autocast, cpu_supports_bf16
from geo.pipeline.backbone import Placement, create_backbone, placement
from geo.pipeline.earth import make_earth_dataset
from geo.pipeline.finetune import image_loader, train_step
from geo.pipeline.images import Preprocess
from geo.pipeline.manifest import read_manifest

BATCH, PX, CLASSES, WARMUP = 64, 64, 120, 2


def _model(place: Placement, train: bool):
    model = create_backbone("resnet18", "none", num_classes=CLASSES, seed=0, image_size=PX)
    model = place.to(model)
    return model.train(train)


def per_image_jitter(pre: Preprocess) -> T.Compose:
    """The training transform before batched jitter: torchvision's ColorJitter on every PIL image."""
    return T.Compose([T.RandomResizedCrop(pre.image_size, scale=(0.25, 1.0), antialias=True),
                      T.RandomHorizontalFlip(), T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
                      T.ToTensor(), T.Normalize(pre.mean, pre.std)])


def _batches(paths, feed: str, steps: int):
    """(images, labels) for ``steps`` batches: from a training loader (``FEEDS``), or one fixed batch."""
    if feed == "synthetic":
        x = torch.randn(BATCH, 3, PX, PX)
        for _ in range(steps):
            yield x, torch.randint(0, CLASSES, (BATCH,))
        return
    pre = create_backbone("resnet18", "none", num_classes=CLASSES, image_size=PX).preprocess.at_size(PX)
    workers = LOADER_WORKERS[feed]
    if feed.endswith("per-image-jitter"):
        loader = image_loader(paths[: BATCH * steps], per_image_jitter(pre), batch_size=BATCH, workers=workers)
    else:  # geo's: crop and flip per image, colour jitter + normalisation on the batch
        loader = image_loader(paths[: BATCH * steps], pre.train_transform(), batch_size=BATCH, workers=workers,
                              batch_transform=pre.train_batch_transform())
    for _, images, _ in loader:
        yield images, torch.randint(0, CLASSES, (len(images),))


# feed -> DataLoader workers
FEEDS = {"synthetic": None, "loader-w0": 0, "loader-w1": 1, "loader-w1-per-image-jitter": 1}
LOADER_WORKERS = {**FEEDS, "loader-w0-per-image-jitter": 0}


def train_steps(place: Placement, paths, feed: str, steps: int) -> list[float]:
    """Seconds per training step of ``geo.pipeline.finetune.train_step`` (the wait for the
    batch included), warm-up left out."""
    model = _model(place, train=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times, t = [], time.perf_counter()
    for images, labels in _batches(paths, feed, steps):
        train_step(model, optimizer, images, labels, place)
        now = time.perf_counter()
        times.append(now - t)
        t = now
    return times[WARMUP:]


@torch.inference_mode()
def inference_steps(place: Placement, steps: int) -> list[float]:
    """Seconds per feature-dump forward pass of one batch (eval mode), warm-up left out."""
    model = _model(place, train=False)
    x = torch.randn(BATCH, 3, PX, PX)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with autocast(place.device, place.precision):
            model.forward_features(place.inputs(x))
        times.append(time.perf_counter() - t)
    return times[WARMUP:]


def loader_cpu(paths, feed: str, steps: int) -> float:
    """CPU seconds per batch of decoding + augmenting in the main process (no model)."""
    torch.set_num_threads(1)
    try:
        t = time.process_time()
        n = sum(1 for _ in _batches(paths, feed, steps))
        return (time.process_time() - t) / max(n, 1)
    finally:
        torch.set_num_threads(THREADS)


THREADS = torch.get_num_threads()


def end_to_end_steps(place: Placement, kind: str, *, backbone: str, px: int, batch: int, cells: int,
                     steps: int) -> list[float]:
    """Seconds per step: ``bare`` (the backbone's country fine-tuning step) or ``mvmf`` / ``softmax``
    (`geo finetune`'s step: ``EndToEnd`` through ``geo.pipeline.finetune.train_step`` with the head's loss)."""
    import numpy as np

    from geo.endtoend.model import EndToEnd, freeze, head_loss_fn, make_optimizer
    from geo.training.evaluate import feature_dtype
    from geo.geometry import latlon_to_xyz
    from geo.heads import create_head
    from geo.sphere.partition import Partition

    torch.manual_seed(0)
    model = place.to(create_backbone(backbone, "none", num_classes=CLASSES, seed=0, image_size=px)).train()
    x = torch.randn(batch, 3, px, px)
    if kind == "bare":
        net, optimizer, target, loss_fn = model, torch.optim.Adam(model.parameters(), lr=1e-5), \
            torch.randint(0, CLASSES, (batch,), device=place.device), None
    else:
        rng = np.random.default_rng(0)
        lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1, 4 * cells))), rng.uniform(-180, 180, 4 * cells)
        head = create_head(kind, feature_dim=model.feature_dim, partition=Partition.build(lat, lon, cells),
                           matmul_dtype="bfloat16" if place.precision == "bf16" else None).to(place.device)
        freeze(model, None)
        net = EndToEnd(model, head, feature_dtype(place.precision)).train()
        optimizer = make_optimizer(net, {"lr": 1e-5, "weight_decay": 0.0})
        rows = rng.integers(0, len(lat), batch)
        target = {"target_xyz": torch.from_numpy(latlon_to_xyz(lat[rows], lon[rows]).astype(np.float32)).to(place.device),
                  **{k: t.to(place.device) for k, t in head.row_targets(lat[rows], lon[rows]).items()}}
        loss_fn = head_loss_fn(head)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        train_step(net, optimizer, x, target, place, loss_fn=loss_fn)
        if place.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times[WARMUP:]


def end_to_end_main(args) -> None:
    place = placement(args.device, "auto" if not args.precision else args.precision[0])
    print(f"torch {torch.__version__}, {THREADS} threads, device {place.device}, {place.precision}, "
          f"{args.backbone} at {args.px} px, batch {args.batch}, c = {args.cells}")
    rounds, steps = (1, 6) if args.quick else (args.rounds, args.steps)
    kinds = ["bare", "mvmf", "softmax"]
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    rng = random.Random(0)
    for r in range(rounds):
        order = kinds[:]
        rng.shuffle(order)
        for kind in order:
            samples[kind] += end_to_end_steps(place, kind, backbone=args.backbone, px=args.px, batch=args.batch,
                                              cells=args.cells, steps=steps)
        print(f"round {r + 1}/{rounds} done", flush=True)
    ms = {k: 1000 * statistics.median(v) for k, v in samples.items()}
    print("\n| step | ms/step | img/s | img/s over bare (target >= 0.9) |")
    print("|---|---|---|---|")
    for kind, value in ms.items():
        label = "bare backbone (country CE)" if kind == "bare" else f"end-to-end {kind} c={args.cells}"
        print(f"| {label} | {value:.0f} | {args.batch / value * 1000:.1f} | {ms['bare'] / value:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="steps per configuration per round (first 2 warm-up)")
    parser.add_argument("--quick", action="store_true", help="1 round of 6 steps")
    parser.add_argument("--precision", choices=["fp32", "bf16"], action="append",
                        help="precisions to measure (default: fp32, and bf16 where native)")
    parser.add_argument("--end-to-end", action="store_true", help="geo finetune's step against the bare backbone's")
    parser.add_argument("--backbone", default="resnet18", help="--end-to-end: backbone (the demo's by default)")
    parser.add_argument("--px", type=int, default=PX, help="--end-to-end: image side")
    parser.add_argument("--batch", type=int, default=BATCH, help="--end-to-end: images per step")
    parser.add_argument("--cells", type=int, default=1024, help="--end-to-end: c, the head's cells")
    parser.add_argument("--device", default="cpu", help="--end-to-end: cpu, cuda ...")
    args = parser.parse_args()
    if args.end_to_end:
        return end_to_end_main(args)
    rounds, steps = (1, 6) if args.quick else (args.rounds, args.steps)
    precisions = args.precision or (["fp32", "bf16"] if cpu_supports_bf16() else ["fp32"])
    chosen = placement("cpu", "auto")
    print(f"torch {torch.__version__}, {THREADS} threads, native bf16: {cpu_supports_bf16()}; "
          f"geo picks {chosen.precision} {'nhwc' if chosen.channels_last else 'nchw'} on this CPU")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_earth_dataset(Path(tmp) / "data", n=BATCH * steps + 200, size_px=PX, seed=0, progress=False)
        paths = [str(p) for p in read_manifest(manifest).paths]
        configs = [(kind, precision, fmt, feed)
                   for precision in precisions for fmt in ("nchw", "nhwc")
                   for kind, feeds in (("train", tuple(FEEDS)), ("extract", ("synthetic",)))
                   for feed in feeds]
        samples: dict[tuple, list[float]] = {c: [] for c in configs}
        rng = random.Random(0)
        for r in range(rounds):
            order = configs[:]
            rng.shuffle(order)
            for config in order:
                kind, precision, fmt, feed = config
                place = Placement(torch.device("cpu"), precision, fmt == "nhwc")
                if kind == "train":
                    samples[config] += train_steps(place, paths, feed, steps)
                else:
                    samples[config] += inference_steps(place, steps)
            print(f"round {r + 1}/{rounds} done", flush=True)
        cpu = {feed: loader_cpu(paths, feed, min(steps, 8)) for feed in ("loader-w0", "loader-w0-per-image-jitter")}
    ms = {c: 1000 * statistics.median(v) for c, v in samples.items()}
    print(f"\nloader alone, 1 thread, CPU per batch of {BATCH} (decode + augment): "
          f"geo's {1000 * cpu['loader-w0']:.0f} ms, per-image jitter {1000 * cpu['loader-w0-per-image-jitter']:.0f} ms")
    print("\n| step | precision | format | feed | ms/step | img/s | geo's / this |")
    print("|---|---|---|---|---|---|---|")
    for (kind, precision, fmt, feed), value in ms.items():
        picked = (kind, precision, "nhwc" if chosen.channels_last else "nchw",
                  "loader-w1" if feed.endswith("per-image-jitter") else feed)
        ref = ms.get(picked)
        ratio = f"{ref / value:.2f}x" if ref else "-"
        print(f"| {kind} | {precision} | {fmt} | {feed} | {value:.0f} | {BATCH / value * 1000:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
