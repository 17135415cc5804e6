"""Small file utilities shared across the package: hashing, and atomic writes.

Every file geo writes whole (configs, checkpoints, predictions, reports,
manifests) goes through ``atomic_write``: the bytes go to a temporary file in
the same folder, are flushed and fsynced, then renamed over the final name.
A kill or a full disk leaves either the old file or the new one under the
final name, never a torn one, and the temporary file is removed on an error.
A full or failing disk (ENOSPC, EDQUOT, EIO) becomes a ``DiskError`` naming
the file and what to do, which the CLI prints as one line (exit 2).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from geo.errors import ConfigError, disk_error

TMP_SUFFIX = ".tmp"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (provenance of checkpoints and manifests)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file_sha256(path: str | os.PathLike, recorded: str, *, missing: str, changed: Callable[[str], str]) -> None:
    """Refuse a file that is gone or whose bytes are not those recorded (a backbone checkpoint, ...).

    ConfigError(``missing``) when ``path`` is no file; ConfigError(``changed(actual)``) when its
    sha256 is not ``recorded``, ``actual`` being the sha256 it has now.
    """
    if not Path(path).is_file():
        raise ConfigError(missing)
    actual = sha256_file(path)
    if actual != recorded:
        raise ConfigError(changed(actual))


def temporary_path(path: str | os.PathLike) -> Path:
    """Where ``atomic_write`` writes before the rename: ``path`` + ``.tmp`` in the same folder."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None,
                 newline: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; on success rename it to ``path`` (atomic on POSIX).

    ``mode`` is "wb" or "w" (text, then ``encoding`` defaults to utf-8). Usage::

        with atomic_write(out / "config.json", "w") as fh:
            fh.write(text)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing only ('w' or 'wb'), not {mode!r}")
    path = Path(path)
    tmp = temporary_path(path)
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    try:
        with open(tmp, mode, encoding=encoding, newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        readable = disk_error(err, path) if isinstance(err, Exception) else None
        if readable is not None:
            raise readable from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write utf-8 ``text`` to ``path`` atomically (see ``atomic_write``)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically.

    Serialised in memory first: torch's zip writer reports a full disk as an
    unreadable "enforce fail ... unexpected pos", where a plain write raises
    ENOSPC, which ``atomic_write`` turns into a readable ``DiskError``.
    """
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())
