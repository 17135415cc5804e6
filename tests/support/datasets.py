"""Benchmark datasets in their publishers' layouts (../shared/BENCHMARKS.md), a few dozen real JPEGs each.

Every writer returns ``{id: (lat_deg, lon_deg)}`` of the rows that have both metadata
and an image: exactly what a reader must give back.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import tarfile
import zipfile

import msgpack
import numpy as np
import pytest
from PIL import Image

from geo.pipeline.images import load_rgb
from geo.pipeline.manifest import read_manifest
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


def yfcc_photo_id(i: int) -> str:
    return str(5_000_000_000 + 7919 * i)  # YFCC100M's ids are decimal, ~10 digits


def yfcc_hash(i: int) -> str:
    return hashlib.md5(yfcc_photo_id(i).encode()).hexdigest()  # 32 hex digits, like the dataset's hashes


def yfcc_place(i: int) -> tuple[float, float]:
    """(lat_deg, lon_deg): every third row near Sydney, so that swapped fields leave [-90, 90] and show."""
    return (round(-33.9 + 0.01 * i, 6), round(151.2 + 0.01 * i, 6)) if i % 3 == 2 else place(i)[:2]


def write_yfcc100m(root, *, n_fields=25, gz=False, header=False, n=24, no_image=(5,), no_metadata=(30, 33),
                   no_coordinates=(8,), videos=(9,), swap=False, duplicate=None):
    """``root/yfcc4k.tsv`` (``.tsv.gz`` when gz): raw YFCC100M rows, and ``root/yfcc4k/`` with their JPEGs.

    n_fields: 25 (Multimedia Commons), 23 (Webscope) or 24 (Webscope with a key). In the
    25-field layout rows ``i % 4 == 1`` have images named by photo hash, in Multimedia Commons'
    ``abc/def/<hash>.jpg`` folders; the others are named by photo id (every third in a sub-folder).
    Rows ``no_coordinates`` have empty longitude and latitude, ``videos`` marker 1 (both have an
    image); swap writes latitude into the longitude field and back; duplicate: a row index
    written again on the last line.
    """
    folder = root / "yfcc4k"
    folder.mkdir(parents=True)
    by_hash = n_fields == 25
    lines = []
    if header:
        names = ["line", "photoid", "hash", "usernsid", "usernick", "datetaken", "dateuploaded", "capturedevice",
                 "title", "description", "usertags", "machinetags", "longitude", "latitude", "accuracy", "pageurl",
                 "downloadurl", "licensename", "licenseurl", "serverid", "farmid", "secret", "secretoriginal",
                 "extensionoriginal", "marker"]
        lines.append(names)
    for i in [*range(n), *([duplicate] if duplicate is not None else [])]:
        lat, lon = ("", "") if i in no_coordinates else yfcc_place(i)
        lon_field, lat_field = (lat, lon) if swap else (lon, lat)
        id_ = yfcc_photo_id(i)
        # Fields never read hold numbers too (accuracy 16, farm 3), so a reader off by one field shows.
        lines.append([str(len(lines)), id_, yfcc_hash(i), f"{1000 + i}@N00", f"user+{i}", "2010-05-01 12:00:00.0",
                      "1272715200", "Canon+EOS+400D", f"title+{i}", "a+description%0Awith+lines", "paris,tour",
                      "", str(lon_field), str(lat_field), "16", f"http://www.flickr.com/photos/u/{id_}/",
                      f"http://farm3.staticflickr.com/2/{id_}_s.jpg", "Attribution License",
                      "http://creativecommons.org/licenses/by/2.0/", "2", "3", "abc", "def", "jpg",
                      "1" if i in videos else "0"])
    if n_fields != 25:
        lines = [[f for k, f in enumerate(fields) if k not in (0, 2)] for fields in lines]  # no line number, hash
    if n_fields == 24:
        lines = [fields + ["key"] for fields in lines]
    text = "".join("\t".join(fields) + "\n" for fields in lines).encode()
    path = root / ("yfcc4k.tsv.gz" if gz else "yfcc4k.tsv")
    path.write_bytes(gzip.compress(text) if gz else text)
    for i in [*range(n), *no_metadata]:
        if i in no_image:
            continue
        if by_hash and i % 4 == 1:
            name = f"{yfcc_hash(i)[:3]}/{yfcc_hash(i)[3:6]}/{yfcc_hash(i)}.jpg"
        else:
            name = f"sub/{yfcc_photo_id(i)}.jpg" if i % 3 == 0 else f"{yfcc_photo_id(i)}.jpg"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(jpeg(i))
    return {yfcc_photo_id(i): yfcc_place(i) for i in range(n)
            if i not in no_image and i not in no_coordinates and i not in videos}


def read_written(out):
    """(manifest, {id: (lat_deg, lon_deg)}, rows of OUT.skipped.csv as dicts) of what `geo manifest` wrote."""
    manifest = read_manifest(out)
    got = {i: (la, lo) for i, la, lo in zip(manifest.ids.tolist(), manifest.lat_deg, manifest.lon_deg)}
    with open(f"{out}.skipped.csv", newline="") as handle:
        skipped = list(csv.DictReader(handle))
    return manifest, got, skipped


def assert_coordinates(got: dict, expected: dict) -> None:
    """Exactly the expected ids, each with its coordinates."""
    assert sorted(got) == sorted(expected)
    for key, (lat, lon) in expected.items():
        assert got[key] == pytest.approx((lat, lon), abs=1e-12), key


def assert_same_pixels(path, i):
    """The manifest's path decodes to the very JPEG written for row i."""
    written = Image.open(io.BytesIO(jpeg(i))).convert("RGB")
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), np.asarray(written))
