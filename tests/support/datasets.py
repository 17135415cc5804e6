"""Benchmark datasets in their publishers' layouts (../shared/BENCHMARKS.md), a few dozen real JPEGs each.

Every writer returns ``{id: (lat_deg, lon_deg)}`` of the rows that have both metadata
and an image: exactly what a reader must give back.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import msgpack
import numpy as np
from PIL import Image

from support.images import PLACES

PLACES365_HEADER = "IMG_ID,AUTHOR,LAT,LON,S3_Label,S16_Label,S365_Label,Prob_indoor,Prob_natural,Prob_urban"
OSV_HEADER = ("id,latitude,longitude,thumb_original_url,country,sequence,captured_at,lon_bin,lat_bin,cell,region,"
              "sub-region,city,land_cover,road_index,drive_side,climate,soil,dist_sea,quadtree_10_1000,"
              "unique_region,unique_sub-region,unique_city,unique_country,creator_username,creator_id")


def jpeg(i: int, size_px: int = 40) -> bytes:
    """A real JPEG (tinted noise), different per i."""
    rng = np.random.default_rng(i)
    tint = np.array([60 * (i % 4), 255 - 60 * (i % 4), 128])
    pixels = np.clip(rng.normal(0, 40, (size_px, size_px, 3)) + tint, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def place(i: int) -> tuple[float, float, str]:
    lat, lon, code = PLACES[i % len(PLACES)]
    return round(lat + 0.01 * i, 6), round(lon + 0.01 * i, 6), code  # east: Rome - 0.01 i is the Vatican


def _places365_csv(path, ids, swap=False):
    lines = [PLACES365_HEADER]
    for i, id_ in ids:
        lat, lon, _ = place(i)
        a, b = (lon, lat) if swap else (lat, lon)
        lines.append(f"{id_},author{i},{a},{b},0,1,2,0.1,0.5,0.4")
    path.write_text("\n".join(lines) + "\n")


def write_mp16(root, *, n=30, n_shards=3, no_image=(2, 11), no_metadata=(40, 41), corrupt_tail=False):
    """``root/mp16_places365.csv`` and ``root/shards/shard_<k>.msg`` (records {id, image}).

    CSV rows ``no_image`` have no record; records ``no_metadata`` have no CSV row;
    ``corrupt_tail`` cuts the last shard mid-record (its last record is lost).
    """
    (root / "shards").mkdir(parents=True)
    ids = {i: f"{i % 7:02x}/{(3 * i) % 11:02x}/{1000 + i}.jpg" for i in list(range(n)) + list(no_metadata)}
    _places365_csv(root / "mp16_places365.csv", [(i, ids[i]) for i in range(n)])
    in_shards = [i for i in ids if i not in no_image]
    for k in range(n_shards):
        with open(root / "shards" / f"shard_{k}.msg", "wb") as handle:
            for i in in_shards[k::n_shards]:
                handle.write(msgpack.packb({"id": ids[i], "image": jpeg(i)}, use_bin_type=True))
    lost = None
    if corrupt_tail:
        last = root / "shards" / f"shard_{n_shards - 1}.msg"
        data = last.read_bytes()
        last.write_bytes(data[:-100])
        lost = in_shards[n_shards - 1::n_shards][-1]
    return {ids[i]: place(i)[:2] for i in range(n) if i not in no_image and i != lost}


def write_places365_folder(root, name="im2gps3k", *, n=24, no_image=(5,), no_metadata=(30,), swap=False):
    """``root/<name>_places365.csv`` and ``root/<name>/<IMG_ID>`` files."""
    folder = root / name
    folder.mkdir(parents=True)
    ids = {i: f"{i}_{1000 + 7 * i}_a{i}.jpg" for i in list(range(n)) + list(no_metadata)}
    _places365_csv(root / f"{name}_places365.csv", [(i, ids[i]) for i in range(n)], swap=swap)
    for i, id_ in ids.items():
        if i not in no_image:
            (folder / id_).write_bytes(jpeg(i))
    return {ids[i]: place(i)[:2] for i in range(n) if i not in no_image}


def write_osv5m(root, split="test", *, n=24, zipped=True, no_image=(3,), wrong_country=(4,), corrupt_member=None):
    """OSV-5M: ``root/<split>.csv`` (all its columns) and ``images/<split>/00.zip`` (members under ``00/``),
    ``01.zip`` (members at the top level), or the extracted ``images/<split>/<NN>/<id>.jpg``."""
    images = root / "images" / split
    images.mkdir(parents=True)
    lines = [OSV_HEADER]
    for i in range(n):
        lat, lon, code = place(i)
        code = "BR" if i in wrong_country else code
        lines.append(f"{9000000 + i},{lat},{lon},http://x/{i}.jpg,{code},s{i},2020,0,0,0,r,sr,c,lc,0,right,cl,so,1.0,"
                     f"0,ur,usr,uc,{code},user{i},{i}")
    (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    members = {k: [i for i in range(n) if i % 2 == k and i not in no_image] for k in (0, 1)}
    for k, rows in members.items():
        if zipped:
            with zipfile.ZipFile(images / f"{k:02d}.zip", "w") as archive:
                for i in rows:
                    name = f"{k:02d}/{9000000 + i}.jpg" if k == 0 else f"{9000000 + i}.jpg"
                    data = jpeg(i)
                    if i == corrupt_member:
                        archive.writestr(zipfile.ZipInfo(name), data[: len(data) // 3] + b"\x00" * 64)
                    else:
                        archive.writestr(name, data)
        else:
            (images / f"{k:02d}").mkdir()
            for i in rows:
                (images / f"{k:02d}" / f"{9000000 + i}.jpg").write_bytes(jpeg(i))
    return {str(9000000 + i): place(i)[:2] for i in range(n) if i not in no_image}


def write_webdataset(root, *, n=24, n_shards=3, no_json=(6,), lat_key="lat", lon_key="lon", duplicate=False):
    """``root/shard-00000{k}.tar``: per sample ``<key>.jpg`` and ``<key>.json`` ({lat_key, lon_key})."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for k in range(n_shards):
        with tarfile.open(root / f"shard-{k:06d}.tar", "w") as tar:
            for i in range(k, n, n_shards):
                key = f"sample{i:04d}" if not (duplicate and i == n - 1) else "sample0000"
                members = {f"{key}.jpg": jpeg(i)}
                lat, lon, _ = place(i)
                if i not in no_json:
                    members[f"{key}.json"] = json.dumps({lat_key: lat, lon_key: lon, "caption": "x"}).encode()
                    expected[key] = (lat, lon)
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return expected
