"""`geo cache import` of a Parquet of MP-16's size: wall time, rows/s, peak RSS, and the read floor beside it.

Writes (streaming, one row group at a time) a Parquet of ``--rows`` random float32
embeddings of ``--dim`` values (list<float> column, as Hugging Face datasets store
them; ``--fixed`` for fixed_size_list) with id, lat, lon (geoclip's MP-16 photo
locations, drawn with replacement) and no split; then runs, as a user would,
``python -m geo cache import PARQUET --out CACHE --backbone bench --quiet`` in a
child process, and prints its wall time, rows/s and peak RSS. In the same run it
measures the floor an import cannot beat: one read of the file for its sha256 plus
one pyarrow read of the embedding column into float32 numpy blocks, and prints the
import's time over that floor. Prints figures only (asserts nothing).

Usage (MP-16: 4.7M x 768 float32 = 14.4 GB of Parquet and a 7.2 GB cache; needs ~22 GB of disk):
    python benchmarks/cache_import.py --rows 4700000 --dim 768 --dir /tmp/bench-import
    python benchmarks/cache_import.py --rows 1000000          # 3.1 GB + 1.5 GB
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geo.pipeline.earth import load_locations

REPO = Path(__file__).resolve().parents[1]


def write_parquet(path: Path, rows: int, dim: int, row_group_rows: int, fixed: bool, seed: int = 0) -> float:
    """The benchmark's Parquet, one row group at a time (never the whole table in memory); returns seconds."""
    rng = np.random.default_rng(seed)
    lat_all, lon_all, _ = load_locations()
    value_type = pa.list_(pa.float32(), dim) if fixed else pa.list_(pa.float32())
    schema = pa.schema([("id", pa.string()), ("lat", pa.float64()), ("lon", pa.float64()), ("embedding", value_type)])
    t = time.perf_counter()
    with pq.ParquetWriter(path, schema) as writer:
        for lo in range(0, rows, row_group_rows):
            b = min(row_group_rows, rows - lo)
            pick = rng.integers(len(lat_all), size=b)
            values = pa.array(rng.standard_normal(b * dim, dtype=np.float32))
            emb = (pa.FixedSizeListArray.from_arrays(values, dim) if fixed else
                   pa.ListArray.from_arrays(pa.array(np.arange(0, (b + 1) * dim, dim, dtype=np.int32)), values))
            ids = pa.array([f"mp16/{i:08d}.jpg" for i in range(lo, lo + b)])
            writer.write_table(pa.table([ids, pa.array(lat_all[pick]), pa.array(lon_all[pick]), emb], schema=schema),
                               row_group_size=row_group_rows)
    return time.perf_counter() - t


def read_floor(path: Path, block_rows: int) -> tuple[float, float]:
    """(seconds to sha256 the file, seconds to read the embedding column into float32 [b, d] numpy blocks)."""
    t = time.perf_counter()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    t_hash = time.perf_counter() - t
    t = time.perf_counter()
    pf = pq.ParquetFile(path, pre_buffer=False)  # as geo reads it (pre-buffered, every row group stays in memory)
    for batch in pf.iter_batches(batch_size=block_rows, columns=["embedding"]):
        col = batch.column(0)
        np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(col), -1)
    return t_hash, time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4_700_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--row-group-rows", type=int, default=65536)
    parser.add_argument("--block-rows", type=int, default=8192)
    parser.add_argument("--fixed", action="store_true", help="fixed_size_list<float>[dim] instead of list<float>")
    parser.add_argument("--dir", default="/tmp/bench-import")
    parser.add_argument("--keep", action="store_true", help="keep the Parquet and the cache")
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    src, out = folder / "embeddings.parquet", folder / "imported.h5"
    for stale in (out, out.with_name(out.name + ".partial")):
        stale.unlink(missing_ok=True)
    try:
        if not src.exists() or pq.ParquetFile(src).metadata.num_rows != args.rows:
            t_gen = write_parquet(src, args.rows, args.dim, args.row_group_rows, args.fixed)
            print(f"wrote {src} ({src.stat().st_size / 1e9:.2f} GB) in {t_gen:.0f} s")
        size_gb = src.stat().st_size / 1e9
        t_hash, t_read = read_floor(src, args.block_rows)
        command = [sys.executable, "-m", "geo", "cache", "import", str(src), "--out", str(out), "--backbone", "bench",
                   "--block-rows", str(args.block_rows), "--quiet"]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if done.returncode != 0:
            raise SystemExit(f"geo cache import failed ({done.returncode}):\n{done.stderr[-3000:]}")
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        floor = t_hash + t_read
        print(f"command: {' '.join(command[1:])}")
        print(f"source:  {args.rows:,} rows x {args.dim} float32, {size_gb:.2f} GB Parquet "
              f"({'fixed_size_list' if args.fixed else 'list'}, row groups of {args.row_group_rows:,})")
        print(f"import:  {wall:.1f} s wall, {args.rows / wall:,.0f} rows/s, "
              f"{size_gb / wall * 1e3:.0f} MB/s of Parquet, "
              f"peak RSS {peak_gib:.2f} GiB; cache {out.stat().st_size / 1e9:.2f} GB")
        print(f"floor:   sha256 {t_hash:.1f} s + pyarrow read to numpy {t_read:.1f} s = {floor:.1f} s; "
              f"import / floor = {wall / floor:.2f}")
        print(done.stdout.strip())
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
