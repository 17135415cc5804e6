"""The commit book-keeping of a cache being written: one record per block, with a checksum of its rows.

A block counts as committed only once its rows are written and flushed, its
record is appended to ``/commits`` and flushed, and then the root attributes
(``rows_committed``, ``skipped_committed``, ``rows_done``, ``blocks_committed``)
are raised and flushed: the commit mark comes last. A failed write (a full
disk, a kill) can still damage rows that were committed before it: HDF5 rewrites
whole chunks, and a chunk shared by the last committed block and the failed one
may never reach the disk. So a resumed write verifies, with the checksums here,
every block that shares a chunk with the end of the committed rows, and rewinds
to the last block that still matches (``verified_prefix``).

``/commits`` rows: ``rows``, ``skipped``, ``rows_done`` (the counts after the
block) and ``sha256`` (32 bytes) of the block's rows as stored.
"""

from __future__ import annotations

import hashlib

import h5py
import numpy as np

from geo.cache.schema import ROW_DATASETS, decode_strings

COMMITS_DTYPE = np.dtype([("rows", "<i8"), ("skipped", "<i8"), ("rows_done", "<i8"), ("sha256", "S32")])


def block_digest(features: np.ndarray, cols: dict[str, np.ndarray], skipped: list[tuple[str, str]]) -> bytes:
    """sha256 of one block as stored: features [b, d] in their storage dtype, the row columns, the skipped pairs."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(features).tobytes())
    for name, dtype in ROW_DATASETS.items():
        if name == "id":
            text = "\0".join(str(i) for i in cols[name])
            digest.update(len(cols[name]).to_bytes(8, "little") + text.encode("utf-8"))
        else:
            digest.update(np.ascontiguousarray(np.asarray(cols[name]).astype(dtype)).tobytes())
    for ident, reason in skipped:
        digest.update(b"\1" + str(ident).encode("utf-8") + b"\0" + str(reason).encode("utf-8"))
    return digest.digest()


def stored_digest(f: h5py.File, start: int, stop: int, skipped_start: int, skipped_stop: int) -> bytes:
    """``block_digest`` of rows [start, stop) and skipped entries [skipped_start, skipped_stop) as read from ``f``."""
    cols = {name: (f[name].asstr()[start:stop] if name == "id" else f[name][start:stop]) for name in ROW_DATASETS}
    table = f["skipped"][skipped_start:skipped_stop]
    skipped = list(zip(decode_strings(table["id"]), decode_strings(table["reason"]))) if len(table) else []
    return block_digest(f["features"][start:stop], cols, skipped)


def read_commits(f: h5py.File) -> np.ndarray:
    """The committed records (``blocks_committed`` of them; fewer if the file lost some)."""
    n = int(f.attrs.get("blocks_committed", 0))
    if "commits" not in f or n == 0:
        return np.zeros(0, COMMITS_DTYPE)
    return f["commits"][:n]


def verified_prefix(f: h5py.File, commits: np.ndarray) -> int:
    """How many leading blocks of ``commits`` hold exactly what was committed.

    Blocks ending within the last chunk's reach of the end (the longest chunk of any
    row dataset) are read back and checked; earlier ones were on disk before any
    chunk the failed write touched. A record that is not plausible (counts going
    backwards, beyond the datasets) fails like a wrong checksum.
    """
    if len(commits) == 0:
        return 0
    reach = max(f[name].chunks[0] for name in ("features", *ROW_DATASETS))
    reach_skipped = f["skipped"].chunks[0]
    end_rows, end_skipped = int(commits[-1]["rows"]), int(commits[-1]["skipped"])
    previous = np.zeros(1, COMMITS_DTYPE)[0]
    for i, record in enumerate(commits):
        start, stop = int(previous["rows"]), int(record["rows"])
        k0, k1 = int(previous["skipped"]), int(record["skipped"])
        plausible = (start <= stop <= f["features"].shape[0] and k0 <= k1 <= f["skipped"].shape[0]
                     and int(previous["rows_done"]) <= int(record["rows_done"]))
        if not plausible:
            return i
        if stop > end_rows - reach or k1 > end_skipped - reach_skipped:
            if stored_digest(f, start, stop, k0, k1) != bytes(record["sha256"]):
                return i
        previous = record
    return len(commits)


def content_sha256(f: h5py.File) -> str:
    """Hex sha256 naming a complete cache's content: its shape, dtype and every committed block's checksum.

    Built from the ``/commits`` records the writer stored (``block_digest`` of each block as
    written), so it costs O(blocks), not a read of the features: what a run that refers to a
    cache's rows (the knn head's gallery) records, and checks before reading them again.
    A file without commit records (not written by ``CacheWriter``) is hashed block by block
    from its rows as stored, the same digest its records would hold.
    """
    digest = hashlib.sha256()
    features = f["features"]
    digest.update(f"{features.shape[0]}x{features.shape[1]}:{features.dtype.str}".encode())
    commits = read_commits(f)
    if len(commits) and int(commits[-1]["rows"]) == features.shape[0]:
        for record in commits:
            digest.update(bytes(record["sha256"]))
        return digest.hexdigest()
    block = max(1, (64 << 20) // max(1, features.shape[1] * features.dtype.itemsize))
    n_skipped = f["skipped"].shape[0] if "skipped" in f else 0
    for start in range(0, features.shape[0], block):
        stop = min(start + block, features.shape[0])
        digest.update(stored_digest(f, start, stop, 0, n_skipped if stop == features.shape[0] else 0))
    return digest.hexdigest()
