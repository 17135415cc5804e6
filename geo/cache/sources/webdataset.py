"""WebDataset tar shards: per sample key one .npy (the embedding) and one .json (lat/lon[, id][, split])."""

from __future__ import annotations

import io
import json
import re
import tarfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from geo.cache.sources.common import (Problems, RowIndex, SourceRows, npy_header, rechunk, sha256_files,
                                      split_codes)
from geo.errors import ManifestError

# Keys of a WebDataset sample's .json.
JSON_LAT_KEYS, JSON_LON_KEYS = ("lat", "latitude"), ("lon", "lng", "longitude")
# A WebDataset member name: key = folder + file name up to its first dot; the rest is the extension.
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class _Sample:
    key: str
    npy: list  # TarInfo of members whose extension ends in "npy"
    json: list  # TarInfo of members whose extension ends in "json"


def _samples(tar: tarfile.TarFile) -> Iterator[_Sample]:
    """Consecutive members with the same key, as WebDataset groups them; other members are ignored."""
    current = None
    for member in tar:
        if not member.isfile():
            continue
        match = _MEMBER.match(member.name)
        if match is None:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = _Sample(key, [], [])
        if ext == "npy" or ext.endswith(".npy"):
            current.npy.append(member)
        elif ext == "json" or ext.endswith(".json"):
            current.json.append(member)
    if current is not None:
        yield current


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as err:
        raise ManifestError(f"{path}: cannot read as an (uncompressed) tar shard: {err}") from None


class _NpyHeaders:
    """Parses .npy headers, each distinct one once: every sample of a shard has the same header, and
    NumPy's own parser (``ast.literal_eval``) was half of a tar import's time."""

    def __init__(self):
        self.known: dict[bytes, tuple[tuple, bool, np.dtype]] = {}

    def read(self, handle) -> tuple[tuple, bool, np.dtype]:
        """(shape, fortran_order, dtype) of the .npy ``handle`` starts at; leaves ``handle`` at the data."""
        start = handle.read(10)  # magic (6 bytes), version (2), header length (2 in version 1, 4 after)
        if len(start) < 10 or start[:6] != b"\x93NUMPY":
            raise ValueError("no .npy magic string")
        if start[6] != 1:
            start += handle.read(2)
        length = int.from_bytes(start[8:10] if start[6] == 1 else start[8:12], "little")
        head = start + handle.read(length)
        if head not in self.known:
            if len(self.known) > 64:
                self.known.clear()
            self.known[head] = npy_header(io.BytesIO(head))
        return self.known[head]


def _json_number(meta: dict, keys: tuple[str, ...]) -> float:
    for key in keys:
        if key in meta and meta[key] is not None:
            try:
                return float(meta[key])
            except (TypeError, ValueError):
                return float("nan")
    return float("nan")


class WebDatasetSource:
    """Tar shards with one ``.npy`` and one ``.json`` per sample key; see the module docstring."""

    format = "webdataset"

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.keys: list[list[str]] = []
        self.index = None

    def where(self, row: int, key: str | None = None) -> str:
        if self.index is None:
            return f"sample {row}"
        i, r = self.index.locate(row)
        key = key if key is not None else (self.keys[i][r] if r < len(self.keys[i]) else None)
        return f"{self.paths[i]} sample {r}" + (f" (key {key!r})" if key is not None else "")

    def scan(self, hash_progress=None) -> SourceRows:
        ids, splits, counts, reasons = [], [], [], {}
        lat, lon = array("d"), array("d")  # 8 bytes a sample, not a Python float each
        problems = Problems(self.where)
        headers = _NpyHeaders()
        d = None
        first_d_at = None
        row = 0
        for path in self.paths:
            keys = []
            with _open_tar(path) as tar:
                try:
                    for sample in _samples(tar):
                        keys.append(sample.key)
                        here = f"{path} sample {len(keys) - 1} (key {sample.key!r})"
                        if len(sample.npy) > 1 or len(sample.json) > 1:
                            raise ManifestError(f"{here}: holds {len(sample.npy)} .npy and {len(sample.json)} .json "
                                                "members; expected one of each")
                        meta = {}
                        if sample.json:
                            try:
                                meta = json.loads(tar.extractfile(sample.json[0]).read())
                            except (ValueError, UnicodeDecodeError) as err:
                                raise ManifestError(f"{here}: its .json is not valid JSON ({err})") from None
                            if not isinstance(meta, dict):
                                raise ManifestError(f"{here}: its .json is not an object")
                        if sample.npy:
                            try:
                                shape, _, dtype = headers.read(tar.extractfile(sample.npy[0]))
                            except ValueError as err:
                                raise ManifestError(f"{here}: its .npy is not a NumPy array file ({err})") from None
                            one_row = len(shape) == 1 or (len(shape) == 2 and shape[0] == 1)
                            width = int(np.prod(shape)) if one_row else -1
                            if width < 1 or dtype.kind != "f":
                                raise ManifestError(f"{here}: its .npy holds {dtype} of shape {shape}; "
                                                    "expected floats of shape [d] or [1, d]")
                            if d is None:
                                d, first_d_at = width, here
                            elif width != d:
                                raise ManifestError(f"{here}: the embedding has {width} values, {first_d_at} has "
                                                    f"{d} (every embedding needs the same width)")
                        else:
                            reasons[row] = "the sample has no .npy embedding"
                        if not sample.json:
                            reasons.setdefault(row, "the sample has no .json metadata (no coordinates)")
                        ident = meta.get("id", sample.key)
                        ids.append("" if ident is None else str(ident).strip())
                        lat.append(_json_number(meta, JSON_LAT_KEYS))
                        lon.append(_json_number(meta, JSON_LON_KEYS))
                        splits.append(meta.get("split"))
                        row += 1
                except tarfile.TarError as err:
                    raise ManifestError(f"{path}: a broken tar shard after {len(keys)} samples: {err}") from None
            self.keys.append(keys)
            counts.append(len(keys))
        self.index = RowIndex(self.paths, counts)
        if row == 0:
            raise ManifestError(f"{', '.join(map(str, self.paths))}: no samples")
        if d is None:
            raise ManifestError(f"{', '.join(map(str, self.paths))}: no sample has a .npy embedding")
        problems.add(np.array([i == "" for i in ids], dtype=bool), "the id is empty")
        split = None
        given = np.array([s is not None for s in splits], dtype=bool)
        if given.any():
            problems.add(~given, "the .json has no split, other samples' do")
            split = split_codes(pa.array([None if s is None else str(s) for s in splits], pa.string()), 0, problems)
        problems.raise_if_any(f"{len(problems.items)} problem(s) in the shards' samples")
        return SourceRows(pa.chunked_array([pa.array(ids, pa.string())]), np.array(lat, np.float64),
                          np.array(lon, np.float64), split, d, list(self.paths),
                          sha256_files(self.paths, hash_progress),
                          split_from="the samples' .json 'split'" if split is not None else None, skip_reason=reasons)

    def blocks(self, start: int, block_rows: int, d: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        return rechunk(self._pieces(start, d), start, block_rows)

    def _pieces(self, start: int, d: int):
        row, headers = 0, _NpyHeaders()
        for path in self.paths:
            with _open_tar(path) as tar:
                for sample in _samples(tar):
                    if row < start:  # already imported: tarfile seeks past the data without reading it
                        row += 1
                        continue
                    x = np.full((1, d), np.nan, dtype=np.float32)
                    missing = np.array([not sample.npy])
                    if sample.npy:
                        handle = tar.extractfile(sample.npy[0])
                        shape, _, dtype = headers.read(handle)  # checked by scan(): floats, [d] or [1, d]
                        data = handle.read(d * dtype.itemsize)
                        if len(data) < d * dtype.itemsize:
                            raise ManifestError(f"{self.where(row, sample.key)}: its .npy is truncated "
                                                f"({len(data)} of {d * dtype.itemsize} bytes of data)")
                        with np.errstate(over="ignore"):
                            x[0] = np.frombuffer(data, dtype=dtype, count=d)
                    yield x, missing
                    row += 1


