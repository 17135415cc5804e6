"""A full disk, simulated portably: file objects whose writes raise ENOSPC once a budget of bytes is spent."""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path


class FullDisk:
    """Budget of bytes shared by every file opened through ``open``; past it, writes raise ENOSPC.

    Install with ``monkeypatch.setattr(module, "open", FullDisk(n).open, raising=False)`` in the
    module whose writes should fail (``geo.files`` for every atomic write).
    """

    def __init__(self, capacity_bytes: int):
        self.left = capacity_bytes
        self.failures = 0

    def open(self, file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)
        if not any(c in mode for c in "wax+"):
            return handle
        disk, write = self, handle.write

        def limited_write(data):
            size = len(data.encode() if isinstance(data, str) else memoryview(data).cast("B"))
            if size > disk.left:
                disk.failures += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
            disk.left -= size
            return write(data)

        handle.write = limited_write
        return handle


class FailingOpen:
    """The ``at``-th file opened for writing whose name contains ``match`` raises ENOSPC at its first write.

    Every other file is written normally: the disk "fills" exactly at one chosen save
    (the 2nd checkpoint, the report's index.html ...).
    """

    def __init__(self, match: str, at: int = 1):
        self.match, self.at, self.seen, self.failures = match, at, 0, 0

    def open(self, file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)
        if not any(c in mode for c in "wax+") or self.match not in os.path.basename(str(file)):
            return handle
        self.seen += 1
        if self.seen == self.at:
            def refuse(data):
                self.failures += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))

            handle.write = refuse
        return handle


@contextlib.contextmanager
def small_tmpfs(where, size: str):
    """A real tmpfs of ``size`` (e.g. "2m") mounted at ``where`` for the block; skips the test where mounting is not allowed.

    A real file system fills as a user's disk does: the kernel's ENOSPC, HDF5's own handling of it,
    and whatever the interpreter does at exit, none of which an injected error reaches.
    """
    import pytest

    where = Path(where)
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8); this machine has neither")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def resize_tmpfs(where, size: str) -> None:
    """Grow (or shrink) a tmpfs mounted by ``small_tmpfs``: "freeing space" as a user would."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True, capture_output=True)
