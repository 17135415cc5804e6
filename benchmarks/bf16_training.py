"""What bf16 training costs in accuracy: the same runs trained with --precision bf16 and fp32.

On a CPU with native bf16 the training step's products return bf16 (one rounding of
each logit and weight-gradient entry, ``geo.heads.base.TrainingBf16Linear``), while
every evaluation stays exact. This trains each head twice on one cache, same seed and
batches, once per precision, and prints the selected model's val and test metrics
side by side with their differences, the fraction of test images whose prediction is
the same, and each run's training time.

The cache: ``--rows`` rows (80/10/10 train/val/test) at real photo locations (geoclip's
100K MP-16 gallery, resampled with ~0.6 km jitter; a mixture of Gaussians without
geoclip), features d = 2048 float16 = a random projection of random Fourier features
of the location at scales from ~6000 km to ~10 km, plus N(0, 1) noise.

Usage:
    python benchmarks/bf16_training.py                       # 200k rows, c = 2048, 2 epochs
    python benchmarks/bf16_training.py --rows 400000 --n-cells 8192 --epochs 3 --keep /tmp/bf16
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from geo.devices import cpu_supports_bf16
from geo.geometry import latlon_to_xyz, xyz_to_latlon

METRICS = ["acc@1km", "acc@25km", "acc@200km", "acc@750km", "acc@2500km", "median_km", "geoscore", "nll_nats"]


def locations(n: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Unit vectors ``[n, 3]`` of realistic photo locations, and where they come from."""
    try:
        path = importlib.metadata.distribution("geoclip").locate_file("geoclip/model/gps_gallery/coordinates_100K.csv")
        table = np.loadtxt(str(path), delimiter=",", skiprows=1)
        centres, source = latlon_to_xyz(table[:, 0], table[:, 1]), f"geoclip gallery ({len(table)} locations)"
        spread = 1e-4
    except (importlib.metadata.PackageNotFoundError, FileNotFoundError, OSError):
        centres, source = rng.normal(size=(300, 3)), "300 random places (geoclip not installed)"
        spread = 150 / 6371
    y = centres[rng.integers(0, len(centres), n)]
    y = y / np.linalg.norm(y, axis=1, keepdims=True) + rng.normal(scale=spread, size=(n, 3))
    return y / np.linalg.norm(y, axis=1, keepdims=True), source


def make_cache(path: Path, n: int, d: int = 2048, seed: int = 0) -> str:
    from geo.cache.store import CacheWriter

    rng = np.random.default_rng(seed)
    y_all, source = locations(n, rng)
    scales = np.repeat([1.0, 8.0, 64.0, 600.0], 64)  # radians^-1: wavelengths ~6000 km to ~10 km
    directions = rng.normal(size=(3, scales.size)) * scales
    phases = rng.uniform(0, 2 * np.pi, scales.size)
    projection = (rng.normal(size=(2 * scales.size, d)) * 2.0 / np.sqrt(scales.size)).astype(np.float32)
    with CacheWriter(path, feature_dim=d, countries=["XX"], provenance={"backbone": "synthetic-fourier"},
                     overwrite=True) as writer:
        for start in range(0, n, 8192):
            y = y_all[start:start + 8192]
            b = len(y)
            angle = y @ directions + phases
            phi = np.concatenate([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)
            x = (phi @ projection + rng.normal(size=(b, d)).astype(np.float32)).astype(np.float16)
            lat, lon = xyz_to_latlon(y)
            lon = np.where(lon >= 180, lon - 360, lon)
            split = rng.choice(np.array([0, 1, 2], np.uint8), size=b, p=[0.8, 0.1, 0.1])
            writer.write_block(features=x, ids=[f"r{start + i:07d}" for i in range(b)], lat_deg=lat, lon_deg=lon,
                               split=split, country=np.zeros(b, np.int16))
        writer.finalize()
    return source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--n-cells", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--heads", default="mvmf,softmax")
    parser.add_argument("--keep", type=Path, default=None, help="keep the cache and runs here (default: a temp dir)")
    args = parser.parse_args()
    from geo.training.config import FitConfig
    from geo.training.fit import fit_head

    root = args.keep or Path(tempfile.mkdtemp(prefix="bf16-training-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        cache = root / f"cache-{args.rows}.h5"
        start = time.perf_counter()
        if cache.exists():  # --keep: a finished cache of the same size is reused (the generator is seeded)
            source = "an existing cache (reused)"
        else:
            source = make_cache(cache, args.rows)
        print(f"cache: {args.rows} rows at {source}, d 2048, ready in {time.perf_counter() - start:.0f} s; "
              f"native bf16: {cpu_supports_bf16()}")
        for head in args.heads.split(","):
            runs = {}
            for precision in ("fp32", "bf16"):
                out = root / f"{head}-{precision}"
                config = FitConfig(head=head, n_cells=args.n_cells, epochs=args.epochs, precision=precision,
                                   device="cpu", seed=0)
                start = time.perf_counter()
                fit_head(cache, config, out, overwrite=True, progress=False)
                seconds = time.perf_counter() - start
                lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
                best = max((ln for ln in lines if ln["best"]), key=lambda ln: ln["step"])
                runs[precision] = {"test": json.loads((out / "metrics.json").read_text()), "val": best,
                                   "pred": pq.read_table(out / "predictions.parquet").to_pydict(), "seconds": seconds}
            print(f"\n{head}, c = {args.n_cells}, {args.epochs} epochs, selected at step "
                  f"{runs['fp32']['val']['step']} (fp32) / {runs['bf16']['val']['step']} (bf16); "
                  f"fit-head wall time {runs['fp32']['seconds']:.0f} s (fp32) / {runs['bf16']['seconds']:.0f} s (bf16)")
            print(f"{'metric':>12} {'val fp32':>10} {'val bf16':>10} {'diff':>9}   {'test fp32':>10} {'test bf16':>10} "
                  f"{'diff':>9}")
            for m in METRICS:
                v32, v16 = runs["fp32"]["val"].get(f"val_{m}"), runs["bf16"]["val"].get(f"val_{m}")
                t32, t16 = runs["fp32"]["test"].get(m), runs["bf16"]["test"].get(m)
                if None in (v32, v16, t32, t16):
                    continue
                print(f"{m:>12} {v32:10.4f} {v16:10.4f} {v16 - v32:+9.4f}   {t32:10.4f} {t16:10.4f} {t16 - t32:+9.4f}")
            p32, p16 = runs["fp32"]["pred"], runs["bf16"]["pred"]
            same = np.mean((np.asarray(p32["pred_lat"]) == np.asarray(p16["pred_lat"]))
                           & (np.asarray(p32["pred_lon"]) == np.asarray(p16["pred_lon"])))
            print(f"{'':>12} test predictions identical: {same:.1%} of {len(p32['pred_lat'])}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
