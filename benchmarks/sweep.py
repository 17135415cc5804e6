"""Wall time of `geo sweep` against the same heads trained one `geo fit-head` at a time, and of `geo report`.

Prints, in one run (measured side by side on the same machine):
- the wall time of one `geo sweep` of 9 heads (mvmf x c in {64, 256, 1024} x kappa0 in
  {8, 16}, softmax x the same 3 c) on a synthetic cache of realistic shape (d = 2048,
  20k train rows, float16 features carrying location);
- the wall time of the same 9 configurations trained by 9 `geo fit-head` subprocesses, one
  after another (what a user does without sweep), and the ratio (target >= 3x);
- whether the two give the same test metrics (they should: same seeds, same batches);
- the wall time of `geo report` over the 9 sweep runs (with density maps), and over 50
  synthetic run directories (tests/support/runs.py; no checkpoints, so no maps).

Usage:
    python benchmarks/sweep.py            # 20k train rows, 2 epochs
    python benchmarks/sweep.py --quick    # 5k train rows, 1 epoch
    python benchmarks/sweep.py --train-rows 50000 --epochs 3 --keep /tmp/bench
    python benchmarks/sweep.py --quick --heads all --n-cells 64,256   # one head of every family
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEADS, CLASSES, KAPPA0S = ["mvmf", "softmax"], [64, 256, 1024], [8.0, 16.0]


def make_cache(path: Path, *, n_train: int, d: int = 2048, n_places: int = 300, seed: int = 0) -> Path:
    """A cache of n_train / 0.8 rows (80/10/10 train/val/test) around ``n_places`` random places.

    Features = 3 * P y_place + N(0, 1) in float16, like a backbone that recognises a region.
    """
    from geo.cache.store import CacheWriter
    from geo.geometry import xyz_to_latlon

    rng = np.random.default_rng(seed)
    n = int(n_train / 0.8)
    centres = rng.normal(size=(n_places, 3))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    projection = rng.normal(size=(3, d)).astype(np.float32)
    with CacheWriter(path, feature_dim=d, countries=["XX"], provenance={"backbone": "synthetic-benchmark"},
                     overwrite=True) as writer:
        for start in range(0, n, 4096):
            b = min(4096, n - start)
            place = rng.integers(n_places, size=b)
            y = centres[place] + rng.normal(scale=150 / 6371, size=(b, 3))
            y /= np.linalg.norm(y, axis=1, keepdims=True)
            lat, lon = xyz_to_latlon(y)
            lon = np.where(lon >= 180, lon - 360, lon)
            x = (3 * centres[place].astype(np.float32) @ projection
                 + rng.normal(size=(b, d)).astype(np.float32)).astype(np.float16)
            split = rng.choice(np.array([0, 1, 2], np.uint8), size=b, p=[0.8, 0.1, 0.1])
            writer.write_block(features=x, ids=[f"r{start + i:07d}" for i in range(b)], lat_deg=lat, lon_deg=lon,
                               split=split, country=np.zeros(b, np.int16))
        writer.finalize()
    return path


def geo(*args: str) -> float:
    """Run `geo ARGS` as a subprocess (as a user would); returns its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "geo", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def make_report_runs(root: Path, n: int = 50) -> Path:
    """``n`` synthetic finished runs (heads x c x kappa0 x seeds) written by tests/support/runs.py."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.runs import base_config, write_summarized_run

    configs = [(h, c, k) for c in (64, 256, 1024, 4096, 16384) for h, ks in (("mvmf", (8.0, 12.0, 16.0)),
                                                                             ("softmax", (None,))) for k in ks]
    for i in range(n):
        head, c, kappa0 = configs[i % len(configs)]
        seed = i // len(configs)
        config = base_config(head, c, kappa0, seed=seed)
        write_summarized_run(root / f"{head}-c{c}-k{kappa0}-s{seed}", head=head, n_cells=c, kappa0=kappa0,
                             scale_km=3000 / np.log2(c) * (0.8 if head == "mvmf" else 1.0), seed=seed, config=config)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5k train rows, 1 epoch")
    parser.add_argument("--train-rows", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--keep", type=Path, default=None, help="Work here and keep the files (default: a temp dir).")
    parser.add_argument("--heads", default=",".join(HEADS),
                        help="Comma list of heads; 'all' = one of every registered head family.")
    parser.add_argument("--n-cells", default=",".join(map(str, CLASSES)), help="Comma list of c.")
    args = parser.parse_args()
    from geo.heads import head_class, list_heads
    from geo.training.sweep import run_name

    heads = list_heads() if args.heads == "all" else args.heads.split(",")
    classes = [int(c) for c in args.n_cells.split(",")]
    n_train = args.train_rows or (5000 if args.quick else 20000)
    epochs = args.epochs or (1 if args.quick else 2)
    work = args.keep or Path(tempfile.mkdtemp(prefix="geo-bench-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        cache = make_cache(work / "cache.h5", n_train=n_train)
        print(f"cache: {cache} ({n_train} train rows, d = 2048, float16), written in {time.perf_counter() - t0:.1f} s")
        common = ["--epochs", str(epochs), "--batch-size", str(args.batch_size), "--quiet"]
        # One run per (head, c), and per kappa0 for heads that sweep it (MvMF), as `geo sweep` names them.
        grid = [(head, c, kappa0) for head in heads for c in classes
                for kappa0 in (KAPPA0S if "kappa0" in head_class(head).sweep_options else [None])]
        n_heads = len(grid)
        print(f"{n_heads} heads: {', '.join(heads)} x c {classes} (x kappa0 {KAPPA0S} where swept); "
              f"{epochs} epoch(s) of batch {args.batch_size}")

        for d in ("sweep", "one-by-one"):
            shutil.rmtree(work / d, ignore_errors=True)
        t_sweep = geo("sweep", str(cache), "--head", ",".join(heads), "--n-cells", ",".join(map(str, classes)),
                      "--kappa0", ",".join(f"{k:g}" for k in KAPPA0S), *common, "--out", str(work / "sweep"))
        print(f"geo sweep (1 process, {n_heads} heads):     {t_sweep:8.1f} s")

        t_alone, names = 0.0, []
        for head, c, kappa0 in grid:
            name = run_name(head, c, {"kappa0": kappa0} if kappa0 is not None else None)
            extra = ["--kappa0", f"{kappa0:g}"] if kappa0 is not None else []
            t_alone += geo("fit-head", str(cache), "--head", head, "--n-cells", str(c), *extra, *common,
                           "--out", str(work / "one-by-one" / name))
            names.append(name)
        print(f"geo fit-head x {n_heads} (one after another): {t_alone:8.1f} s")
        print(f"sweep speed-up: {t_alone / t_sweep:.2f}x (target >= 3x)")

        same = 0
        for name in names:
            a, b = (json.loads((work / d / name / "metrics.json").read_text()) for d in ("sweep", "one-by-one"))
            same += all(a.get(k) == b.get(k) for k in ("acc@1km", "acc@25km", "acc@750km", "geoscore", "nll_nats"))
        print(f"identical test metrics (sweep vs fit-head): {same} of {len(names)} runs")

        t_report_sweep = geo("report", str(work / "sweep"), "--out", str(work / "report-sweep"))
        print(f"geo report over the {n_heads} sweep runs (with maps): {t_report_sweep:6.1f} s")
        runs50 = make_report_runs(work / "runs50")
        t_report = geo("report", str(runs50), "--out", str(work / "report-50"))
        print(f"geo report over 50 synthetic runs:            {t_report:6.1f} s")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
