"""`geo extract` onto a real, small file system, run as a user runs it: a subprocess, its exit status, a rerun.

The in-process fault tests (test_extract_faults.py, tests/cache/test_writer_faults.py) inject the
error; they cannot see what happens after the command has printed its message, where a full disk
used to end in a segmentation fault (HDF5 flushing, at interpreter exit, a file it could not close).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.caches import file_content
from support.disk import resize_tmpfs, small_tmpfs
from support.images import write_dataset

REPO = Path(__file__).resolve().parents[2]
ERROR_STATUS = 2  # geo.cli.group.ERROR_STATUS, the documented status of every "Error: ..."
# resnet18 at 32 px: 512-d float16 rows, 1 MiB HDF5 chunks of 1024 rows; 1600 rows need two chunks.
EXTRACT = ["--backbone", "resnet18", "--image-size", "32", "--finetune-epochs", "0", "--batch-size", "256",
           "--workers", "0", "--device", "cpu", "--precision", "fp32"]
# The same command with the writer's free-space check switched off: the block is written and
# HDF5 itself meets ENOSPC in the middle of it (a disk filled by another process looks like this).
NO_PRECHECK = ("import sys, geo.cache.writer as w; w.free_bytes = lambda path: 1 << 62; "
               "from geo.cli import main; sys.argv[0] = 'geo'; main()")


def _geo(args, *, precheck=True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "geo"] if precheck else [sys.executable, "-c", NO_PRECHECK]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def _same_cache(a: Path, b: Path) -> None:
    ca, cb = file_content(a), file_content(b)
    assert sorted(ca) == sorted(cb)
    for key in set(ca) - {"@checkpoint_path"}:  # each run has its own checkpoint folder
        assert str(getattr(ca[key], "tolist", lambda: ca[key])()) == str(getattr(cb[key], "tolist", lambda: cb[key])()), key


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("full-disk")
    manifest = write_dataset(root / "images", 1600, size_px=32)
    reference = root / "reference.h5"
    done = _geo(["extract", manifest, "--out", reference, "--checkpoint-dir", root / "ref.ckpt", *EXTRACT])
    assert done.returncode == 0, done.stderr
    return manifest, reference


@pytest.mark.slow
@pytest.mark.parametrize("precheck", [True, False], ids=["free-space-check", "enospc-inside-hdf5"])
def test_a_full_disk_exits_with_the_error_status_and_the_rerun_ends_identical(tmp_path, dataset, precheck):
    manifest, reference = dataset
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "cache.h5"
        args = ["extract", manifest, "--out", out, "--checkpoint-dir", tmp_path / "ckpt", *EXTRACT]
        full = _geo(args, precheck=precheck)
        assert full.returncode == ERROR_STATUS, (full.returncode, full.stderr[-2000:])  # not 139 (SIGSEGV)
        assert "Error: no space left on device while writing" in full.stderr
        assert "rows committed; free space and rerun to resume" in full.stderr
        assert "Traceback" not in full.stderr.replace("Exception ignored", "") or not precheck
        assert not out.exists()  # nothing under the final name
        resize_tmpfs(disk, "16m")  # the user frees space
        rerun = _geo(args)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        _same_cache(reference, out)
        finished = _geo(args)  # and once more: a finished job is reported, not refused
        assert finished.returncode == 0 and "already complete" in finished.stdout, finished.stderr[-2000:]
