"""MP-16 as distributed: a folder of MessagePack shards ``shard_<N>.msg``.

Each shard is a stream of records (maps) with ``id`` (the CSV's IMG_ID, e.g.
``9f/a4/123.jpg``; str or bytes) and ``image`` (JPEG bytes). ``index_shards``
reads every shard once and returns, per id, the member path
``shard_<N>.msg#<byte offset of the record>`` that ``geo.pipeline.shards``
reads with one seek. A truncated or corrupt shard keeps the records before the
damage; the rest of that shard is reported, with the byte offset, not read.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm.auto import tqdm

from geo.pipeline.datasets.common import check_unique, natural_text_key
from geo.pipeline.shards import IMAGE_KEY, member_path

ID_KEYS = ("id", "IMG_ID", "img_id")


def natural_key(path: Path) -> tuple:
    return natural_text_key(path.name)


def list_shards(folder: str | os.PathLike) -> list[Path]:
    """The ``*.msg`` files of ``folder`` in natural order."""
    return sorted(Path(folder).glob("*.msg"), key=natural_key)


def _record_id(record: dict) -> str | None:
    for key in ID_KEYS:
        value = record.get(key)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, (str, int)) and str(value):
            return str(value)
    return None


def index_shards(folder: str | os.PathLike, *, progress: bool = True) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """``({id: member path}, problems [(shard or member, reason)])`` over every shard of ``folder``.

    Raises ManifestError listing ids found in more than one record.
    """
    import msgpack

    found: dict[str, str] = {}
    seen: list[tuple[str, str]] = []
    problems: list[tuple[str, str]] = []
    for shard in tqdm(list_shards(folder), desc="indexing shards", unit="shard", disable=not progress):
        shard = shard.resolve()
        size = shard.stat().st_size
        with open(shard, "rb") as handle:
            unpacker = msgpack.Unpacker(handle, raw=False, max_buffer_size=1 << 30)
            while True:
                offset = unpacker.tell()
                try:
                    record = unpacker.unpack()
                except msgpack.OutOfData:
                    if offset < size:
                        problems.append((str(shard), f"corrupt shard: truncated record at byte {offset} of {size}; "
                                                      "the rest of this shard is not read"))
                    break
                except Exception as err:  # msgpack raises several kinds on damaged bytes
                    problems.append((str(shard), f"corrupt shard: undecodable at byte {offset} ({err}); "
                                                  "the rest of this shard is not read"))
                    break
                where = member_path(str(shard), offset)
                id_ = _record_id(record) if isinstance(record, dict) else None
                if id_ is None:
                    problems.append((where, "corrupt record: no id"))
                    continue
                if not isinstance(record.get(IMAGE_KEY), (bytes, bytearray)):
                    problems.append((where, f"corrupt record: no {IMAGE_KEY!r} bytes (id {id_})"))
                    continue
                seen.append((id_, where))
                found.setdefault(id_, where)
    check_unique(seen, f"the shards of {folder}")
    return found, problems
