"""Extraction from shards against extraction from plain files (target: shards >= 0.95x files).

Writes N real-content JPEGs (Blue Marble patches, as benchmarks/extract.py) once as plain
files and once packed in MP-16-style MessagePack shards (and OSV-5M-style zip shards),
builds the manifests with geo's readers, then times ``extract_rows`` (decode + transform +
backbone + HDF5 write) on each, alternating, best of ``--repeats``. Prints images/s and
the ratio shards / files.

Usage:
  python benchmarks/shards.py                  # resnet18, 512 JPEGs at 256 px, 1 worker
  python benchmarks/shards.py --quick          # 128 JPEGs
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import msgpack
import numpy as np

from benchmarks.extract import write_jpegs  # noqa: E402 (run from the repository root)
from geo.cache.store import CacheWriter
from geo.pipeline.backbone import create_backbone, placement
from geo.pipeline.datasets.common import Rows, write_dataset_manifest
from geo.pipeline.extract import extract_rows
from geo.pipeline.manifest import read_manifest


def pack(files_manifest: Path, root: Path, n_shards: int) -> tuple[Path, Path]:
    """The plain files as MessagePack shards and as zip shards; returns the two manifests."""
    plain = read_manifest(files_manifest)
    (root / "msg").mkdir()
    (root / "zip").mkdir()
    msg_rows, zip_rows = Rows(), Rows()
    order = np.array_split(np.arange(len(plain.ids)), n_shards)
    for k, rows in enumerate(order):
        msg_path, zip_path = root / "msg" / f"shard_{k}.msg", root / "zip" / f"{k:02d}.zip"
        with open(msg_path, "wb") as handle, zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as archive:
            for i in rows:
                data = Path(plain.paths[i]).read_bytes()
                offset = handle.tell()
                handle.write(msgpack.packb({"id": plain.ids[i], "image": data}, use_bin_type=True))
                name = f"{k:02d}/{plain.ids[i]}.jpg"
                archive.writestr(name, data)
                for target, path in ((msg_rows, f"{msg_path}#{offset}"), (zip_rows, f"{zip_path}#{name}")):
                    target.add(str(plain.ids[i]), path, float(plain.lat_deg[i]), float(plain.lon_deg[i]))
    split = np.zeros(len(plain.ids), np.uint8)
    out = []
    for name, rows in (("msg", msg_rows), ("zip", zip_rows)):
        write_dataset_manifest(root / f"{name}.parquet", rows, split=split, source=name)
        out.append(root / f"{name}.parquet")
    return out[0], out[1]


def time_extract(manifest_path: Path, model, place, args, cache: Path) -> float:
    manifest = read_manifest(manifest_path)
    n = len(manifest.ids)
    with CacheWriter(cache, feature_dim=model.feature_dim, countries=["XX"], provenance={"bench": 1},
                     overwrite=True) as writer:
        start = time.perf_counter()
        extract_rows(model, manifest, range(n), np.zeros(n, np.int16), writer, place, image_size=args.image_size,
                     batch_size=args.batch_size, workers=args.workers, show_progress=False, decode="draft")
        elapsed = time.perf_counter() - start
        writer.finalize()
    return n / elapsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--n-images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_images, args.repeats = 128, 2
    place = placement("cpu", "fp32")
    model = place.to(create_backbone(args.backbone, "none", num_classes=8)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        files = write_jpegs(tmp / "img", args.n_images, args.image_size * 2)
        msg, zipped = pack(files, tmp, args.shards)
        best = {"files": 0.0, "msgpack shards": 0.0, "zip shards": 0.0}
        for _ in range(args.repeats):  # alternate, so load from other processes hits all alike
            for label, manifest in (("files", files), ("msgpack shards", msg), ("zip shards", zipped)):
                best[label] = max(best[label], time_extract(manifest, model, place, args, tmp / "c.h5"))
        print(f"{args.backbone}, {args.n_images} JPEGs of {args.image_size * 2} px -> {args.image_size} px, "
              f"{args.workers} workers, fp32, best of {args.repeats}")
        for label, value in best.items():
            print(f"{label:15} {value:8.1f} img/s   ratio to files {value / best['files']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
