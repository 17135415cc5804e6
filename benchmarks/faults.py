"""Fault injection: kills at random points, full disks, bad inputs; prints the counts for the closing note.

Asserts nothing; prints how many trials were made and how many ended as they
should. Three parts:

- kills: ``geo extract``, ``fit-head``, ``sweep`` and ``report`` run as subprocesses
  (as a user runs them) and killed with SIGKILL after a random delay within
  the length of an uninterrupted run; the same command is then rerun to the end
  and its outputs compared with the uninterrupted run's (timings aside);
- disk full (simulated, in process): the cache writer at a random block and stage
  (data / commit record / commit mark, optionally losing the previous block's
  chunk), fit-head at a random checkpoint save; after "freeing space" the rerun
  must end equal to an uninterrupted run;
- bad inputs: every refused option and file of tests/training/test_options.py and
  a few more, through click's CliRunner: a clear "Error: ..." with exit 2, or a traceback;
- tmpfs: ``geo extract`` as a subprocess onto a real 2 MB tmpfs (root only) at a random
  batch size, with and without the writer's free-space check: the exit status must be 2
  (not 139), the message must say how many rows are committed, nothing may appear under the
  final name, and the rerun after growing the tmpfs must end identical.

A rerun that exits non-zero after a kill (a command that refuses to go on, e.g. "already
exists") is a failure: it is counted under "rerun refused" and its message printed.

Usage (small sizes, about 15 minutes on 2 busy cores):
    python benchmarks/faults.py [--kills 10] [--disk 10] [--seed 0] [--parts kills,disk,bad,tmpfs]
"""

from __future__ import annotations

import argparse
import errno
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from support.caches import (COUNTRIES, PROVENANCE, block_bounds, file_content, make_location_cache,  # noqa: E402
                            make_rows, write_blocks, write_cache)
from support.images import write_dataset  # noqa: E402

FIT = ["--n-cells", "24", "--batch-size", "128", "--epochs", "4", "--lr", "0.05", "--device", "cpu",
       "--precision", "fp32", "--quiet"]


# ---- comparisons of a rerun with the uninterrupted run ---------------------------------


def _cache_equal(a: Path, b: Path) -> bool:
    ca, cb = file_content(a), file_content(b)
    keys = set(ca) - {"@checkpoint_path"}
    return keys == set(cb) - {"@checkpoint_path"} and all(
        str(np.asarray(ca[k]).tolist()) == str(np.asarray(cb[k]).tolist()) for k in keys)


def _run_equal(a: Path, b: Path) -> bool:
    def metrics(folder):
        data = json.loads((folder / "metrics.json").read_text())
        data.pop("train_elapsed_s", None)
        return data

    try:
        return metrics(a) == metrics(b) and \
            (a / "predictions.parquet").read_bytes() == (b / "predictions.parquet").read_bytes()
    except FileNotFoundError:
        return False


def _sweep_equal(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.is_dir())
    return bool(names) and all(_run_equal(a / n, b / n) for n in names)


def _report_equal(a: Path, b: Path) -> bool:
    return all((b / n).is_file() and (a / n).read_bytes() == (b / n).read_bytes()
               for n in ("index.html", "report.md", "table.csv"))


# ---- kills -------------------------------------------------------------------------------


def _geo(args: list[str], *, kill_after_s: float | None = None, prefix: list[str] | None = None
         ) -> tuple[bool, int]:
    """Run `python -m geo ARGS` (or ``prefix`` + ARGS); with ``kill_after_s``, SIGKILL it then.
    Returns (was killed, exit code)."""
    process = subprocess.Popen([*(prefix or [sys.executable, "-m", "geo"]), *map(str, args)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after_s is None:
        _, err = process.communicate()
        if process.returncode != 0:
            print(f"    geo {' '.join(map(str, args[:1]))} exited {process.returncode}: {err.decode()[-500:]}")
        _geo.last_stderr = err.decode()
        return False, process.returncode
    try:
        process.wait(timeout=kill_after_s)
        return False, process.returncode
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True, -9


def kill_trials(name: str, make_args, same, reference: Path, duration_s: float, trials: int, root: Path,
                rng: random.Random) -> dict:
    """``trials`` kills of `geo NAME` at random points, each followed by a rerun compared with ``reference``."""
    counts = {"tried": 0, "killed mid-run": 0, "rerun ok": 0, "rerun refused": 0, "ended identical": 0}
    for i in range(trials):
        out = root / f"{name}-{i}"
        args = make_args(out)
        killed, _ = _geo(args, kill_after_s=rng.uniform(0.05, 1.0) * duration_s)
        counts["tried"] += 1
        counts["killed mid-run"] += killed
        _, code = _geo(args)
        counts["rerun ok"] += code == 0
        counts["rerun refused"] += code != 0  # a failure: the same command must finish what is missing
        counts["ended identical"] += code == 0 and same(reference, out)
    return counts


def kills(trials: int, root: Path, rng: random.Random, only: set[str] | None = None) -> dict[str, dict]:
    manifest = write_dataset(root / "images", 24, corrupt=(7,))
    cache = make_location_cache(root / "loc.h5", n=1500)
    extract = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "4", "--finetune-epochs", "1",
               "--workers", "0", "--precision", "fp32", "--device", "cpu"]
    commands = {
        "extract": (lambda out: ["extract", str(manifest), "--out", str(out) + ".h5", *extract],
                    lambda a, b: _cache_equal(Path(str(a) + ".h5"), Path(str(b) + ".h5"))),
        "fit-head": (lambda out: ["fit-head", str(cache), "--head", "mvmf", *FIT, "--out", str(out)], _run_equal),
        "sweep": (lambda out: ["sweep", str(cache), "--head", "mvmf,softmax", "--n-cells", "24", "--kappa0", "8,12",
                               *FIT[2:], "--out", str(out)], _sweep_equal),
    }
    results = {}
    for name, (make_args, same) in commands.items():
        if only and name not in only and not (name == "sweep" and "report" in only):
            continue
        reference = root / f"{name}-reference"
        start = time.perf_counter()
        _geo(make_args(reference))
        duration = time.perf_counter() - start
        results[name] = kill_trials(name, make_args, same, reference, duration, trials, root, rng)
        print(f"  {name:9s} {results[name]}  (uninterrupted run {duration:.1f} s)", flush=True)
    if only and "report" not in only:
        return results
    sweep_ref = root / "sweep-reference"
    report_args = lambda out: ["report", str(sweep_ref), "--out", str(out), "--n-maps", "0"]  # noqa: E731
    reference = root / "report-reference"
    start = time.perf_counter()
    _geo(report_args(reference))
    duration = time.perf_counter() - start
    results["report"] = kill_trials("report", report_args, _report_equal, reference, duration, trials, root, rng)
    print(f"  {'report':9s} {results['report']}  (uninterrupted run {duration:.1f} s)", flush=True)
    return results


# ---- disk full ---------------------------------------------------------------------------


def disk_trials(trials: int, root: Path, rng: random.Random) -> dict[str, dict]:
    import h5py

    import geo.files
    from geo.cache.store import CacheWriter, partial_path
    from geo.errors import DiskError
    from geo.training.config import FitConfig
    from geo.training.fit import fit_head
    from support.disk import FailingOpen

    rows = make_rows(n=600, n_blocks=10)
    reference = write_cache(root / "disk-ref.h5", rows)
    bounds = block_bounds(len(rows.ids), len(rows.skipped))
    cache_counts = {"tried": 0, "clear error": 0, "committed rows right": 0, "ended identical": 0}
    for i in range(trials):
        path = root / f"disk-{i}.h5"
        block, stage, lose_previous = rng.randrange(len(bounds)), rng.randrange(1, 4), rng.random() < 0.5
        writer = CacheWriter(path, feature_dim=16, countries=COUNTRIES, provenance=PROVENANCE)
        real_flush, calls = h5py.File.flush, []

        def flush(f):
            calls.append(1)
            if len(calls) == 3 * block + stage:
                if lose_previous and block > 0 and stage == 1:
                    lo, hi = bounds[block - 1]
                    f["features"][lo:hi] = 0
                    real_flush(f)
                raise OSError(f"Can't write data (file write failed: errno = {errno.ENOSPC}, "
                              "error message = 'No space left on device')")
            return real_flush(f)

        cache_counts["tried"] += 1
        h5py.File.flush = flush
        try:
            write_blocks(writer, rows, range(len(bounds)))
        except DiskError as err:
            cache_counts["clear error"] += "rows committed; free space and rerun to resume" in str(err)
        finally:
            h5py.File.flush = real_flush
            writer.close()
        with CacheWriter(path, feature_dim=16, countries=COUNTRIES, provenance=PROVENANCE) as w:
            n = w.n_rows
            with h5py.File(partial_path(path), "r") as f:
                cache_counts["committed rows right"] += bool(
                    np.array_equal(f["features"][:n], rows.features[:n].astype(np.float16)))
            consumed = np.cumsum([hi - lo + len(s) for (lo, hi), s in zip(bounds, rows.skipped)])
            first = int(np.searchsorted(consumed, w.rows_done, side="right"))
            write_blocks(w, rows, range(first, len(bounds)))
            w.finalize()
        cache_counts["ended identical"] += _cache_equal(reference, path)

    cache = make_location_cache(root / "disk-loc.h5", n=800)
    config = FitConfig(head="mvmf", n_cells=24, batch_size=128, epochs=3, lr=0.05, device="cpu", precision="fp32")
    whole = root / "disk-fit-reference"
    fit_head(cache, config, whole, progress=False)
    fit_counts = {"tried": 0, "clear error": 0, "ended identical": 0}
    for i in range(max(1, trials // 3)):
        run = root / f"disk-fit-{i}"
        target = rng.choice([("checkpoint.pt", rng.randint(1, 3)), ("metrics.json", 1), ("predictions.parquet", 1),
                             ("config.json", 1)])
        disk = FailingOpen(*target)
        real_open = getattr(geo.files, "open", None)
        geo.files.open = disk.open
        fit_counts["tried"] += 1
        try:
            fit_head(cache, config, run, progress=False)
        except DiskError as err:
            fit_counts["clear error"] += target[0] in str(err)
        finally:
            if real_open is None:
                del geo.files.open
            else:
                geo.files.open = real_open
        fit_head(cache, config, run, progress=False)
        fit_counts["ended identical"] += _run_equal(whole, run)
    return {"cache writer": cache_counts, "fit-head": fit_counts}


# ---- a real small disk -------------------------------------------------------------------


NO_PRECHECK = ("import sys, geo.cache.writer as w; w.free_bytes = lambda path: 1 << 62; "
               "from geo.cli import main; sys.argv[0] = 'geo'; main()")


def tmpfs_trials(trials: int, root: Path, rng: random.Random) -> dict:
    """``geo extract`` onto a real 2 MB tmpfs (needs root): exit status, message, final name, rerun."""
    import os

    if os.geteuid() != 0:
        print("  tmpfs: skipped (mounting needs root)")
        return {}
    manifest = write_dataset(root / "tmpfs-images", 1600, size_px=32)
    base = ["--backbone", "resnet18", "--image-size", "32", "--finetune-epochs", "0", "--workers", "0",
            "--device", "cpu", "--precision", "fp32"]
    counts = {"tried": 0, "exit 2": 0, "crashed (139)": 0, "clear message": 0, "nothing final": 0,
              "ended identical": 0}
    references = {}
    for i in range(trials):
        batch = rng.choice([64, 128, 256, 512])
        precheck = rng.random() < 0.5
        extract = [*base, "--batch-size", str(batch)]
        if batch not in references:
            references[batch] = root / f"tmpfs-ref-{batch}.h5"
            _geo(["extract", manifest, "--out", references[batch], "--checkpoint-dir", root / f"tmpfs-ref-{batch}", *extract])
        disk = root / f"tmpfs-{i}"
        disk.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]).returncode != 0:
            print("  tmpfs: skipped (this machine does not allow mounting a tmpfs)")
            return counts
        try:
            out = disk / "cache.h5"
            args = ["extract", manifest, "--out", out, "--checkpoint-dir", root / f"tmpfs-ckpt-{i}", *extract]
            _, code = _geo(args, prefix=None if precheck else [sys.executable, "-c", NO_PRECHECK])
            counts["tried"] += 1
            counts["exit 2"] += code == 2
            counts["crashed (139)"] += code in (139, -11)
            counts["clear message"] += "rows committed; free space and rerun to resume" in _geo.last_stderr
            counts["nothing final"] += not out.exists()
            subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
            _, code = _geo(args)
            counts["ended identical"] += code == 0 and _cache_equal(references[batch], out)
        finally:
            subprocess.run(["umount", "-l", str(disk)])
    return counts


# ---- bad inputs --------------------------------------------------------------------------


def bad_inputs(root: Path) -> dict:
    from click.testing import CliRunner

    from geo.cli import cli
    sys.path.insert(0, str(ROOT / "tests" / "training"))
    from test_options import BAD_OPTIONS

    cache = str(make_location_cache(root / "bad.h5", n=600))
    fit = ["--batch-size", "64", "--epochs", "1", "--device", "cpu", "--quiet"]
    cases = [["fit-head", cache, "--head", "mvmf", *fit, *options, "--out", str(root / "bad-run")]
             for options, _ in BAD_OPTIONS]
    cases += [["sweep", cache, "--head", "mvmf", "--n-cells", "24", *fit, *options, "--out", str(root / "bad-sweep")]
              for options in (["--lr", "nan"], ["--kappa0", "8,100"], ["--weight-decay", "-1"], ["--select-by", "x"],
                              ["--classes", "24,100000"], ["--min-lr-fraction", "nan"])]
    torn = root / "torn"
    torn.mkdir()
    (torn / "backbone.pt").write_bytes(b"PK\x03\x04 torn")
    manifest = write_dataset(root / "bad-images", 6)
    cases += [["extract", str(manifest), "--out", str(root / "x.h5"), "--backbone", "resnet18", "--image-size", "32",
               "--checkpoint-dir", str(torn), "--finetune-epochs", "0", "--workers", "0"],
              ["report", str(root / "nowhere"), "--out", str(root / "r")],
              ["fit-head", str(root / "bad-images" / "manifest.csv"), "--out", str(root / "r2")]]
    counts = {"tried": 0, "clear error (exit 2)": 0, "traceback": 0, "accepted": 0}
    for args in cases:
        result = CliRunner().invoke(cli, args)
        counts["tried"] += 1
        if result.exit_code == 2 and "Error:" in result.output:
            counts["clear error (exit 2)"] += 1
        elif result.exit_code == 0:
            counts["accepted"] += 1
            print(f"    accepted: geo {' '.join(args[:1] + args[-4:])}")
        else:
            counts["traceback"] += 1
            print(f"    traceback: geo {args[0]} ... ({type(result.exception).__name__}: {result.exception})")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="kills per command")
    parser.add_argument("--disk", type=int, default=10, help="disk-full trials of the cache writer (and of tmpfs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="kills,disk,bad,tmpfs")
    parser.add_argument("--commands", default="", help="kills: only these commands (extract,fit-head,sweep,report)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "bad" in parts:
            print(f"bad inputs: {bad_inputs(root)}", flush=True)
        if "disk" in parts:
            for name, counts in disk_trials(args.disk, root, rng).items():
                print(f"disk full, {name}: {counts}", flush=True)
        if "tmpfs" in parts:
            print(f"disk full, real 2 MB tmpfs: {tmpfs_trials(args.disk, root, rng)}", flush=True)
        if "kills" in parts:
            print("kills (SIGKILL at a random point, then the same command again):", flush=True)
            kills(args.kills, root, rng, set(args.commands.split(",")) if args.commands else None)


if __name__ == "__main__":
    main()
