"""Every stage at MP-16 size: wall time and peak RSS of each, run as a user runs it (the CLI in a subprocess).

Writes a cache of MP-16's size (4.7M rows x 768 float16 by default, ``--rows``, ``--dim``)
whose locations are geoclip's sample of 100K real MP-16 photo locations (resampled with
~0.6 km jitter; a clustered fallback without geoclip) and whose features carry the place:
``prototype[region] + 0.5 * signature[location] + 0.3 * noise`` (1024 regions; photos of one
location are near-duplicates, as retrieval galleries hold them). Splits: ``--val-rows`` val,
``--test-rows-in-cache`` test, the rest train. Then times, each in its own process:

  cache info      geo cache info (validates every feature)
  partition       the PlaNet partition of the train locations into 2^15 cells (a library call)
  fit mvmf        geo fit-head --head mvmf --n-cells 8192 --epochs 1 --batch-size 4096
  fit softmax     the same with --head softmax
  sweep           geo sweep --head mvmf,softmax --n-cells 8192 (both in one pass)
  knn exact       geo fit-head --head knn (streamed exact search, --max-memory-mb default)
  knn ivf         geo fit-head --head knn --knn-index ivf (index build + search + recall@16 vs exact on val)
  evaluate        geo evaluate RUN --cache test210k.h5 (a 210k-row test cache, OSV-5M test's size, its rows
                  drawn from the main cache's feature model: its metrics match the in-cache test split's)
  cache import    geo cache import of a Parquet of the same rows (only where the command exists)
  report          geo report of every run

and measures, in the same process as the table, the floor of exact retrieval: a float32
``queries @ gallery_block.T`` + ``topk`` over an in-memory block, as gallery rows x queries
per second; the knn run's search time (``knn_search_s`` in its metrics.json) is compared
with the floor's time for the same queries over the whole gallery.

Targets (2-core, 24 GiB machine, issue 21): knn exact over the 4.5M-row gallery at <= 4 GB
peak RSS and >= 0.7 of the floor; FAISS IVF >= 10x faster than exact at recall@16 >= 0.95;
no stage above 8 GB peak RSS; the knn run directory < 10 MB.

Usage:
    python benchmarks/scale.py                                   # full size (a long while; ~30 GB of disk)
    python benchmarks/scale.py --rows 200000 --dim 256 --test-rows 20000     # a smoke run
    python benchmarks/scale.py --stages info,knn-exact,knn-ivf,report       # a subset of stages
    python benchmarks/scale.py --keep --reuse --stages knn-ivf   # again on the kept cache (no rewrite)
    python benchmarks/scale.py --keep --reuse --stages fit-mvmf,evaluate --train-fraction 0.02  # a quick run to score
Files go under --dir (default /tmp/geo-scale), deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STAGES = ("info", "partition", "fit-mvmf", "fit-softmax", "sweep", "knn-exact", "knn-ivf", "evaluate", "import",
          "report")
N_REGIONS = 1024


def locations(n: int, rng: np.random.Generator, table: np.ndarray | None = None):
    """(lat_deg, lon_deg, location id, table, source): n photo locations drawn from ``table`` ([L, 2] degrees;
    default geoclip's MP-16 sample) with ~0.6 km jitter."""
    source = "the given locations"
    if table is None:
        try:
            path = importlib.metadata.distribution("geoclip").locate_file(
                "geoclip/model/gps_gallery/coordinates_100K.csv")
            table = np.loadtxt(str(path), delimiter=",", skiprows=1)
            source = f"geoclip's {len(table)} MP-16 photo locations"
        except (importlib.metadata.PackageNotFoundError, FileNotFoundError, OSError):
            table = np.column_stack([np.degrees(np.arcsin(rng.uniform(-0.9, 0.9, 20000))),
                                     rng.uniform(-180, 180, 20000)])
            source = "20000 random locations (geoclip not installed)"
    pick = rng.integers(0, len(table), n)
    lat = np.clip(table[pick, 0] + rng.normal(0, 0.005, n), -90, 90)
    lon = (table[pick, 1] + rng.normal(0, 0.005, n) + 180) % 360 - 180
    return lat, lon, pick, table, source + ", resampled with ~0.6 km jitter"


def feature_model(rng: np.random.Generator, n: int, d: int):
    """A cache's n row locations, then its place -> feature model, drawn from ``rng`` in this order.

    Returns ``(lat_deg [n], lon_deg [n], pick [n], source)`` and the model ``(table [L, 2], region [L],
    prototype [R, d], signature [L, d])``: a location's feature is ``prototype[region] + 0.5 * signature``
    plus noise. Replaying it with a cache's seed and row count gives that cache's model, so that a test
    cache written later draws its rows from the same distribution (``write_cache(model_of=...)``).
    """
    from geo.geometry import latlon_to_xyz

    lat, lon, pick, table, source = locations(n, rng)
    # every location belongs to the region of its nearest of N_REGIONS random centres; a location no
    # row picked keeps its own coordinates (a test cache sharing the model may pick it)
    loc_lat, loc_lon = table[:, 0].copy(), table[:, 1].copy()
    loc_lat[pick], loc_lon[pick] = lat, lon
    centres = rng.normal(size=(N_REGIONS, 3))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    region = np.argmax(latlon_to_xyz(loc_lat, loc_lon) @ centres.T, axis=1)
    prototype = rng.standard_normal((N_REGIONS, d), dtype=np.float32)
    signature = rng.standard_normal((len(table), d), dtype=np.float32)
    return (lat, lon, pick, source), (table, region, prototype, signature)


def write_cache(path: Path, n: int, d: int, n_val: int, n_test: int, seed: int,
                model_of: tuple[int, int] | None = None, block: int = 65536) -> str:
    """Write the synthetic MP-16-sized cache (float16) block by block; returns the locations' source.

    ``model_of = (seed, rows)``: the rows' features follow the model of the cache written with that
    seed and row count (a test cache of the train cache's distribution); default: the cache's own.
    """
    from geo.cache.store import CacheWriter

    rng = np.random.default_rng(seed)
    if model_of is None:
        (lat, lon, pick, source), (_, region, prototype, signature) = feature_model(rng, n, d)
    else:
        _, (table, region, prototype, signature) = feature_model(np.random.default_rng(model_of[0]), model_of[1], d)
        lat, lon, pick, _, source = locations(n, rng, table)
        source += f" (the feature model of the cache written with seed {model_of[0]}, {model_of[1]:,} rows)"
    split = np.zeros(n, np.uint8)
    held_out = rng.choice(n, n_val + n_test, replace=False)
    split[held_out[:n_val]], split[held_out[n_val:]] = 1, 2
    with CacheWriter(path, feature_dim=d, countries=["XX"], overwrite=True,
                     provenance={"backbone": f"synthetic-{d}", "weights": "none", "image_size": 0,
                                 "transform": "benchmarks/scale.py", "manifest_sha256": f"seed{seed}"}) as writer:
        for start in range(0, n, block):
            stop = min(start + block, n)
            p = pick[start:stop]
            x = prototype[region[p]] + 0.5 * signature[p] + 0.3 * rng.standard_normal((stop - start, d), np.float32)
            writer.write_block(features=x.astype(np.float16), ids=[f"mp16-{i:08d}" for i in range(start, stop)],
                               lat_deg=lat[start:stop], lon_deg=lon[start:stop], split=split[start:stop],
                               country=np.zeros(stop - start, np.int16))
        writer.finalize()
    return source


def write_parquet(cache_path: Path, out: Path, rows: int = 65536) -> None:
    """The cache's rows as the Parquet ``geo cache import`` reads: id, lat, lon, split, embedding (list<float32>)."""
    import h5py
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = np.array(["train", "val", "test"])
    with h5py.File(cache_path, "r") as f, pq.ParquetWriter(out, pa.schema([
            ("id", pa.string()), ("lat", pa.float64()), ("lon", pa.float64()), ("split", pa.string()),
            ("embedding", pa.list_(pa.float32(), f["features"].shape[1]))])) as writer:
        n, d = f["features"].shape
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            x = f["features"][start:stop].astype(np.float32)
            writer.write_table(pa.table({
                "id": pa.array(f["id"].asstr()[start:stop]), "lat": f["lat"][start:stop],
                "lon": f["lon"][start:stop], "split": pa.array(names[f["split"][start:stop]]),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)}))


def measure(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """Run ``cmd`` in a child process: (wall seconds, its peak RSS in GB, exit status); output to ``log``."""
    probe = log.with_suffix(".rss")
    wrapper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
               "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
               "sys.exit(rc)")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.call([sys.executable, "-c", wrapper, str(probe), *cmd], stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    rss_gb = int(probe.read_text()) * 1024 / 1e9 if probe.exists() else float("nan")  # ru_maxrss is KiB on Linux
    return wall, rss_gb, rc


def floor_rate(d: int, n_queries: int, k: int, block_rows: int = 131072, repeats: int = 2) -> float:
    """Gallery rows x queries per second of float32 ``queries @ block.T`` + ``topk`` (block in memory)."""
    import torch

    g = torch.nn.functional.normalize(torch.randn(block_rows, d), dim=1)
    q = torch.nn.functional.normalize(torch.randn(min(n_queries, 16384), d), dim=1)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.topk(q @ g.T, k, dim=1)
        best = min(best, time.perf_counter() - t0)
    return block_rows * q.shape[0] / best


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4_700_000, help="rows of the main cache (MP-16: 4.7M)")
    parser.add_argument("--dim", type=int, default=768, help="feature width")
    parser.add_argument("--val-rows", type=int, default=2000)
    parser.add_argument("--test-rows-in-cache", type=int, default=2000)
    parser.add_argument("--test-rows", type=int, default=210_000, help="rows of the separate test cache")
    parser.add_argument("--cells", type=int, default=8192, help="c of fit-head and sweep (2^13)")
    parser.add_argument("--train-fraction", type=float, default=1.0,
                        help="--train-fraction of the fit stages (1: the whole train split; a smaller one gives the "
                             "evaluate stage a run to score sooner)")
    parser.add_argument("--nprobe", type=int, default=32, help="--knn-nprobe of the IVF run")
    parser.add_argument("--rerank", type=int, default=4, help="--knn-rerank of the IVF run (1: no re-ranking)")
    parser.add_argument("--evaluate-runs", default="",
                        help="comma list of run names under DIR/runs that the evaluate stage scores on the test "
                             "cache (default: mvmf-c<cells> and knn-ivf, those present)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of: {', '.join(STAGES)}")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/geo-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a complete cache left in --dir by a --keep run with the same --rows, --dim, "
                             "--val-rows, --test-rows-in-cache and --seed (and its FAISS indexes) instead of "
                             "writing it again")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")
    root = args.dir
    root.mkdir(parents=True, exist_ok=True)
    cache, test_cache, runs, logs = root / "mp16.h5", root / "test210k.h5", root / "runs", root / "logs"
    logs.mkdir(exist_ok=True)
    geo = [sys.executable, "-m", "geo"]
    table: list[tuple[str, str, float, float, str]] = []

    def row(stage: str, what: str, wall: float, rss: float, note: str = "") -> None:
        table.append((stage, what, wall, rss, note))
        print(f"  {stage:<13} {wall:9.1f} s {rss:7.2f} GB  {note}", flush=True)

    print(f"scale benchmark: {args.rows:,} x {args.dim} float16, val {args.val_rows}, test in cache "
          f"{args.test_rows_in_cache}, test cache {args.test_rows:,}; {os.cpu_count()} CPUs; files in {root}",
          flush=True)
    try:
        t0 = time.perf_counter()
        made_with = {"rows": args.rows, "dim": args.dim, "val_rows": args.val_rows,
                     "test_rows_in_cache": args.test_rows_in_cache, "seed": args.seed}
        stamp = root / "mp16.params.json"
        if args.reuse and cache.exists() and stamp.exists() and json.loads(stamp.read_text()) == made_with:
            print(f"  reusing {cache} ({cache.stat().st_size / 1e9:.1f} GB, written by an earlier --keep run)",
                  flush=True)
        else:
            stamp.unlink(missing_ok=True)
            source = write_cache(cache, args.rows, args.dim, args.val_rows, args.test_rows_in_cache, args.seed)
            stamp.write_text(json.dumps(made_with))
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
            row("write cache", "CacheWriter", time.perf_counter() - t0, rss,
                f"{cache.stat().st_size / 1e9:.1f} GB; locations: {source}")
        n_train = args.rows - args.val_rows - args.test_rows_in_cache
        fits = {}

        if "info" in stages:
            wall, rss, rc = measure([*geo, "cache", "info", str(cache)], logs / "info.log")
            row("cache info", "geo cache info", wall, rss, f"exit {rc}")
        if "partition" in stages:
            code = ("import h5py, numpy as np, sys; from geo.sphere.partition import Partition; "
                    "f = h5py.File(sys.argv[1]); t = np.flatnonzero(f['split'][:] == 0); "
                    "lat, lon = f['lat'][:][t], f['lon'][:][t]; import time; t0 = time.perf_counter(); "
                    "p = Partition.build(lat, lon, 2**15); print(p.n_cells, time.perf_counter() - t0)")
            wall, rss, rc = measure([sys.executable, "-c", code, str(cache)], logs / "partition.log")
            row("partition", "2^15 cells", wall, rss, f"exit {rc}; {(logs / 'partition.log').read_text().strip()}")
        fit_common = ["--epochs", "1", "--batch-size", "4096", "--n-cells", str(args.cells),
                      "--train-fraction", str(args.train_fraction)]
        for head in ("mvmf", "softmax"):
            if f"fit-{head}" in stages:
                out = runs / f"{head}-c{args.cells}"
                wall, rss, rc = measure([*geo, "fit-head", str(cache), "--head", head, *fit_common, "--out", str(out),
                                         "--overwrite"], logs / f"fit-{head}.log")
                fits[head] = out
                what = f"c={args.cells}, 1 epoch" + (f" of {args.train_fraction:g} of train" if args.train_fraction < 1 else "")
                row(f"fit {head}", what, wall, rss, f"exit {rc}")
        if "sweep" in stages:
            wall, rss, rc = measure([*geo, "sweep", str(cache), "--head", "mvmf,softmax", "--n-cells", str(args.cells),
                                     "--kappa0", "16", "--epochs", "1", "--batch-size", "4096", "--out",
                                     str(root / "sweep"), "--overwrite"], logs / "sweep.log")
            row("sweep", f"mvmf+softmax c={args.cells}", wall, rss, f"exit {rc}")
        knn_metrics = {}
        for kind in ("exact", "ivf"):
            if f"knn-{kind}" not in stages:
                continue
            out = runs / f"knn-{kind}"
            extra = ["--knn-index", kind, "--knn-nprobe", str(args.nprobe), "--knn-rerank", str(args.rerank)] \
                if kind != "exact" else []
            wall, rss, rc = measure([*geo, "fit-head", str(cache), "--head", "knn", *extra, "--out", str(out),
                                     "--overwrite"], logs / f"knn-{kind}.log")
            m = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
            knn_metrics[kind] = dict(m, wall_s=wall, rss_gb=rss)
            note = f"exit {rc}; run dir {dir_mb(out):.2f} MB; search {m.get('knn_search_s', float('nan')):.1f} s"
            if kind != "exact":
                note += (f"; index build {m.get('knn_index_build_s', float('nan')):.1f} s, "
                         f"recall@16 vs exact on val {m.get('knn_recall@16', float('nan')):.4f}")
            row(f"knn {kind}", f"gallery {n_train:,}", wall, rss, note)
        if "evaluate" in stages:
            # the test rows follow the train cache's feature model: a head's test metrics mean something
            test_with = {"rows": args.test_rows, "dim": args.dim, "seed": args.seed + 1,
                         "model_of": [args.seed, args.rows]}
            test_stamp = root / "test210k.params.json"
            if not (args.reuse and test_cache.exists() and test_stamp.exists()
                    and json.loads(test_stamp.read_text()) == test_with):
                test_stamp.unlink(missing_ok=True)
                write_cache(test_cache, args.test_rows, args.dim, 0, args.test_rows, args.seed + 1,
                            model_of=(args.seed, args.rows))
                test_stamp.write_text(json.dumps(test_with))
            names = args.evaluate_runs.split(",") if args.evaluate_runs else [f"mvmf-c{args.cells}", "knn-ivf"]
            evaluated = [runs / n for n in names if (runs / n / "metrics.json").exists()]
            if not evaluated:
                row("evaluate", "no run to evaluate", 0.0, float("nan"), f"none of {', '.join(names)} in {runs}")
            for run in evaluated:
                wall, rss, rc = measure([*geo, "evaluate", str(run), "--cache", str(test_cache)],
                                        logs / f"evaluate-{run.name}.log")
                row("evaluate", f"{run.name} on {args.test_rows:,} rows", wall, rss, f"exit {rc}")
        if "import" in stages:
            help_rc = subprocess.call([*geo, "cache", "import", "--help"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            if help_rc != 0:
                print("  cache import  not available on this branch", flush=True)
                table.append(("cache import", "not available on this branch", float("nan"), float("nan"), ""))
            else:
                parquet = root / "mp16.parquet"
                write_parquet(cache, parquet)
                wall, rss, rc = measure([*geo, "cache", "import", str(parquet), "--out", str(root / "imported.h5"),
                                         "--backbone", f"synthetic-{args.dim}", "--overwrite"], logs / "import.log")
                row("cache import", f"Parquet {parquet.stat().st_size / 1e9:.1f} GB", wall, rss, f"exit {rc}")
                parquet.unlink(missing_ok=True)
        if "report" in stages:
            wall, rss, rc = measure([*geo, "report", str(runs), "--out", str(root / "report")], logs / "report.log")
            row("report", "geo report", wall, rss, f"exit {rc}")

        print("\n| stage | what | wall s | peak RSS GB | notes |\n|---|---|---|---|---|")
        for stage, what, wall, rss, note in table:
            print(f"| {stage} | {what} | {wall:.1f} | {rss:.2f} | {note} |")
        exact = knn_metrics.get("exact")
        if exact and exact.get("knn_search_s"):
            rate = floor_rate(args.dim, args.val_rows, 16)
            floor_s = exact["knn_search_queries"] * n_train / rate
            print(f"\nfloor (float32 matmul + top-k, in memory): {rate / 1e9:.2f} G row-queries/s -> "
                  f"{floor_s:.1f} s for knn exact's {exact['knn_search_queries']} queries over {n_train:,} rows; "
                  f"knn exact searched in {exact['knn_search_s']:.1f} s: {floor_s / exact['knn_search_s']:.2f} "
                  f"of the floor (target >= 0.7); peak RSS {exact['rss_gb']:.2f} GB (target <= 4)")
        ivf = knn_metrics.get("ivf")
        if exact and ivf and ivf.get("knn_search_s") and exact.get("knn_search_s"):
            # per query: exact's search time vs the index's (the IVF run's search time includes the exact
            # pass over val its recall needs: that share is taken out by the queries counted)
            exact_per_q = exact["knn_search_s"] / exact["knn_search_queries"]
            ivf_per_q = ivf["knn_index_search_s"] / max(1, ivf["knn_index_search_queries"])
            print(f"FAISS IVF: {exact_per_q / ivf_per_q:.1f}x faster per query than exact (target >= 10x) at "
                  f"recall@16 {ivf.get('knn_recall@16', float('nan')):.4f} (target >= 0.95); index built in "
                  f"{ivf['knn_index_build_s']:.1f} s")
        over = [r for r in table if r[3] == r[3] and r[3] > 8]
        print(f"stages above 8 GB peak RSS: {', '.join(r[0] for r in over) or 'none'}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            for p in (cache, test_cache):
                shutil.rmtree(Path(f"{p}.knn"), ignore_errors=True)


if __name__ == "__main__":
    main()
