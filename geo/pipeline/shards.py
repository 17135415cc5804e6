"""Reading images where they lie: members of MessagePack, zip and tar shards.

Benchmark datasets come as shards (MP-16: MessagePack, OSV-5M: zip, WebDataset:
tar). A manifest row points into a shard with a ``path`` of the form
``CONTAINER#MEMBER``:

- ``shard_0.msg#12345``: the MessagePack record starting at byte 12345 of
  ``shard_0.msg`` (a map with the JPEG bytes under ``image``; the offset makes
  the read one seek);
- ``00.zip#00/123.jpg``: the member ``00/123.jpg`` of ``00.zip``;
- ``shard-000001.tar#abc.jpg``: the member ``abc.jpg`` of the tar file.

``CONTAINER`` is relative to the manifest's folder or absolute, like any path;
a path that names an existing file is always that file (a ``#`` in a file name
stays a file name). Open handles are kept per process (``_handles``, reset when
the process id changes), so every DataLoader worker and DDP rank opens its own
and none shares a file offset with another; manifests list members in shard
order, so each worker reads its shards sequentially.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
import zlib

SHARD_SUFFIXES = (".msg", ".zip", ".tar")
IMAGE_KEY = "image"  # the MessagePack record key holding the image bytes (MP-16's shards)


class MemberError(Exception):
    """A shard member that cannot be read; ``str(err)`` is the reason."""


def split_member(path: str) -> tuple[str, str] | None:
    """``(container, member)`` for a ``CONTAINER#MEMBER`` path into a shard, else None (a plain file)."""
    if "#" not in path or os.path.isfile(path):
        return None
    container, member = path.rsplit("#", 1)
    if not container.lower().endswith(SHARD_SUFFIXES) or not member:
        return None
    return container, member


def member_path(container: str, member: str | int) -> str:
    """The manifest path of ``member`` (a byte offset for ``.msg``, a name otherwise) of ``container``."""
    return f"{container}#{member}"


def exists(path: str) -> bool:
    """A plain file that exists, or a member path whose container exists (members are checked when read)."""
    parts = split_member(path)
    return os.path.isfile(parts[0]) if parts else os.path.isfile(path)


class _Handles:
    """Open containers of this process (never shared across a fork: see ``_handles``)."""

    def __init__(self):
        self.pid = os.getpid()
        self.files: dict[str, object] = {}

    def get(self, container: str):
        handle = self.files.get(container)
        if handle is None:
            handle = self.files[container] = _open(container)
        return handle


_STATE: _Handles | None = None


def _handles() -> _Handles:
    """This process's handles; a forked worker starts with none of its parent's open files in use."""
    global _STATE
    if _STATE is None or _STATE.pid != os.getpid():
        _STATE = _Handles()
    return _STATE


def _open(container: str):
    suffix = os.path.splitext(container)[1].lower()
    try:
        if suffix == ".zip":
            return zipfile.ZipFile(container)
        if suffix == ".tar":
            tar = tarfile.open(container, "r:")
            return tar, {info.name: info for info in tar.getmembers() if info.isfile()}
        return open(container, "rb")
    except FileNotFoundError:
        raise MemberError(f"shard not found: {container}") from None
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as err:
        raise MemberError(f"unreadable shard {container}: {err}") from None


def read_msgpack_record(handle, offset: int) -> dict:
    """The MessagePack record (a map) starting at byte ``offset`` of an open binary file."""
    import msgpack

    handle.seek(offset)
    unpacker = msgpack.Unpacker(handle, raw=False, max_buffer_size=1 << 30)
    try:
        record = unpacker.unpack()
    except msgpack.OutOfData:
        raise MemberError(f"truncated record at byte {offset}") from None
    except (ValueError, msgpack.UnpackException) as err:
        raise MemberError(f"corrupt record at byte {offset}: {err}") from None
    if not isinstance(record, dict):
        raise MemberError(f"record at byte {offset} is a {type(record).__name__}, not a map")
    return record


def read_member(path: str) -> bytes:
    """The bytes of the image a ``CONTAINER#MEMBER`` path points to. Raises MemberError(reason)."""
    container, member = split_member(path) or (None, None)
    if container is None:
        raise MemberError(f"not a shard member path: {path}")
    handle = _handles().get(container)
    suffix = os.path.splitext(container)[1].lower()
    try:
        if suffix == ".zip":
            return handle.read(member)
        if suffix == ".tar":
            tar, index = handle
            info = index.get(member)
            if info is None:
                raise MemberError(f"no member {member!r} in {container}")
            return tar.extractfile(info).read()
        if not member.isdigit():
            raise MemberError(f"{path}: a .msg member is a byte offset, got {member!r}")
        data = read_msgpack_record(handle, int(member)).get(IMAGE_KEY)
        if not isinstance(data, (bytes, bytearray)):
            raise MemberError(f"record at byte {member} of {container} has no {IMAGE_KEY!r} bytes")
        return bytes(data)
    except KeyError:
        raise MemberError(f"no member {member!r} in {container}") from None
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise MemberError(f"corrupt member {member!r} of {container}: {err}") from None
