"""WebDataset tar shards (PLONK and others): ``<key>.jpg`` beside ``<key>.json`` per sample.

Shards are given as one pattern with brace ranges, ``DIR/shard-{000000..000009}.tar``
(WebDataset's own notation; comma lists ``{a,b}`` too). Members are grouped by
key (the member name up to the first dot of its file name); the image is the
``.jpg``/``.jpeg``/``.png``/``.webp`` member and its coordinates come from the
``.json`` member's ``--lat-key``/``--lon-key`` fields (default ``lat``/``lon``,
then ``latitude``/``longitude``). The id is the key.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tarfile
from pathlib import Path

from geo.errors import ManifestError
from geo.pipeline.datasets.common import Rows, check_swapped, check_unique, coordinate_problem
from geo.pipeline.shards import member_path

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar``, ``a-001.tar``, ``a-002.tar`` (zero padding kept); ``{x,y}`` lists."""
    parts, choices, last = [], [], 0
    for match in _BRACE.finditer(pattern):
        parts.append(pattern[last:match.start()])
        body = match.group(1)
        ranged = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if ranged:
            lo, hi = ranged.groups()
            width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
            choices.append([str(i).zfill(width) for i in range(int(lo), int(hi) + 1)])
        else:
            choices.append(body.split(","))
        last = match.end()
    parts.append(pattern[last:])
    out = []
    for combo in itertools.product(*choices):
        out.append("".join(p + c for p, c in zip(parts, list(combo) + [""])))
    return out


def _split_key(name: str) -> tuple[str, str]:
    """(key, extension): the key is the name up to the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _coordinate(meta: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in meta:
            try:
                return key, float(meta[key])
            except (TypeError, ValueError):
                return key, float("nan")
    return None, None


def read_webdataset(pattern: str, *, lat_key: str | None = None, lon_key: str | None = None) -> Rows:
    """The usable samples of every shard matched by ``pattern``, in shard and member order."""
    shards = expand_braces(pattern)
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise ManifestError(f"{pattern}: {len(missing)} of {len(shards)} shards not found, e.g. {missing[0]}")
    lat_keys = (lat_key,) if lat_key else ("lat", "latitude")
    lon_keys = (lon_key,) if lon_key else ("lon", "lng", "longitude")
    rows, seen = Rows(), []
    found: list[tuple[str, str, float, float]] = []
    names = (None, None)
    for shard in shards:
        shard = str(Path(shard).resolve())
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for info in tar:
                    if info.isfile():
                        key, ext = _split_key(info.name)
                        samples.setdefault(key, {})[ext] = info
                metas = {key: tar.extractfile(m["json"]).read() for key, m in samples.items() if "json" in m}
        except (tarfile.TarError, OSError) as err:
            rows.skipped.append((shard, f"corrupt shard: {err}"))
            continue
        for key, members in samples.items():
            image = next((members[e] for e in IMAGE_SUFFIXES if e in members), None)
            if image is None:
                rows.skipped.append((key, f"no image: sample {key} of {shard} has no image member"))
                continue
            if key not in metas:
                rows.skipped.append((key, f"no metadata: sample {key} of {shard} has no .json member"))
                continue
            try:
                meta = json.loads(metas[key])
            except (ValueError, UnicodeDecodeError) as err:
                rows.skipped.append((key, f"bad metadata: {key}.json of {shard}: {err}"))
                continue
            lat_name, lat = _coordinate(meta, lat_keys) if isinstance(meta, dict) else (None, None)
            lon_name, lon = _coordinate(meta, lon_keys) if isinstance(meta, dict) else (None, None)
            if lat is None or lon is None:
                rows.skipped.append((key, f"no metadata: {key}.json of {shard} has no {'/'.join(lat_keys)} and "
                                          f"{'/'.join(lon_keys)} fields (see --lat-key, --lon-key)"))
                continue
            names = (lat_name, lon_name)
            seen.append((key, shard))
            found.append((member_path(shard, image.name), key, lat, lon))
    check_unique(seen, f"the shards of {pattern}")
    if found:
        check_swapped([f[2] for f in found], [f[3] for f in found], names[0], names[1], pattern)
    for where, key, lat, lon in found:
        problem = coordinate_problem(lat, lon)
        if problem:
            rows.skipped.append((key, problem))
        else:
            rows.add(key, where, lat, lon)
    return rows
