"""Each reader on a fixture in the publisher's layout gives exactly the right ids and coordinates."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from support.datasets import (assert_coordinates, assert_same_pixels, read_written, write_mp16, write_osv5m,
                              write_places365_folder, write_webdataset)
from geo.cli import cli
from geo.errors import ManifestError
from geo.pipeline.datasets.places365 import read_places365
from geo.pipeline.datasets.webdataset import expand_braces, read_webdataset
from geo.pipeline.images import ImageError, load_rgb
from geo.pipeline.manifest import read_manifest


def _invoke(*args):
    result = CliRunner().invoke(cli, ["manifest", *map(str, args)])
    return result


def test_mp16_messagepack_shards(tmp_path):
    expected = write_mp16(tmp_path)
    out = tmp_path / "mp16.parquet"
    result = _invoke("mp16", "--csv", tmp_path / "mp16_places365.csv", "--images", tmp_path / "shards", "--out", out)
    assert result.exit_code == 0, result.output
    manifest, got, skipped = read_written(out)
    assert_coordinates(got, expected)
    reasons = sorted(r["reason"].split(":")[0] for r in skipped)
    assert reasons == ["no image"] * 2 + ["no metadata"] * 2
    assert "wrote 28 images" in result.output and "left out 4" in result.output
    assert set(manifest.split_counts()) == {"train", "val", "test"} and manifest.split_counts()["train"] > 14
    # Rows point into the shards, in shard order (shard, then byte offset), and decode to the JPEG written.
    members = [p.rsplit("#", 1) for p in manifest.paths.tolist()]
    assert all(c.endswith(".msg") for c, _ in members)
    keys = [(c, int(m)) for c, m in members]
    assert keys == sorted(keys)
    row = manifest.ids.tolist().index("00/00/1000.jpg")
    assert_same_pixels(manifest.paths[row], 0)


def test_mp16_corrupt_shard_keeps_the_rest_and_duplicates_are_refused(tmp_path):
    expected = write_mp16(tmp_path / "a", corrupt_tail=True)
    rows = read_places365(tmp_path / "a" / "mp16_places365.csv", tmp_path / "a" / "shards", progress=False)
    assert set(rows.ids) == set(expected)
    assert any(r.startswith("corrupt shard: truncated record") for _, r in rows.skipped)
    # The same record in two shards.
    write_mp16(tmp_path / "b")
    shards = tmp_path / "b" / "shards"
    (shards / "shard_3.msg").write_bytes((shards / "shard_0.msg").read_bytes())
    with pytest.raises(ManifestError, match=r"(?s)10 duplicate ids across the shards.*shard_0\.msg#0.*shard_3\.msg#0"):
        read_places365(tmp_path / "b" / "mp16_places365.csv", shards, progress=False)


@pytest.mark.parametrize("name", ["im2gps3k", "im2gps", "yfcc4k", "yfcc26k"])
def test_places365_test_sets_with_a_folder(tmp_path, name):
    expected = write_places365_folder(tmp_path, name)
    out = tmp_path / f"{name}.parquet"
    result = _invoke(name, "--csv", tmp_path / f"{name}_places365.csv", "--images", tmp_path / name, "--out", out)
    assert result.exit_code == 0, result.output
    manifest, got, skipped = read_written(out)
    assert_coordinates(got, expected)
    assert manifest.split_counts() == {"train": 0, "val": 0, "test": len(expected)}
    assert sorted(r["reason"].split(":")[0] for r in skipped) == ["no image", "no metadata"]
    assert_same_pixels(manifest.paths[manifest.ids.tolist().index("0_1000_a0.jpg")], 0)


def test_swapped_latitude_and_longitude_columns_are_refused(tmp_path):
    # Latitudes of ~41-52 and longitudes down to -3.7 .. 13.4: swapped, LAT holds no value beyond 90
    # unless a longitude is > 90; so place the swap where it shows: add a far-east row.
    write_places365_folder(tmp_path, "im2gps", swap=True)
    path = tmp_path / "im2gps_places365.csv"
    path.write_text(path.read_text() + "99_x.jpg,a,139.69,35.69,0,1,2,0.1,0.5,0.4\n")
    result = _invoke("im2gps", "--csv", path, "--images", tmp_path / "im2gps", "--out", tmp_path / "m.parquet")
    assert result.exit_code == 2
    assert "column 'LAT' leaves [-90, 90]" in result.output and "column 'LON' stays inside it" in result.output
    assert not (tmp_path / "m.parquet").exists()


@pytest.mark.parametrize("zipped", [True, False])
def test_osv5m_zip_shards_and_extracted_folders(tmp_path, zipped):
    expected = write_osv5m(tmp_path / "osv", zipped=zipped)
    out = tmp_path / "osv_test.parquet"
    result = _invoke("osv5m", tmp_path / "osv", "--split", "test", "--out", out)
    assert result.exit_code == 0, result.output
    manifest, got, skipped = read_written(out)
    assert_coordinates(got, expected)
    assert manifest.split_counts()["test"] == len(expected) == 23
    assert [r["reason"].split(":")[0] for r in skipped] == ["no image"]
    # OSV-5M's own labels are kept; one was made wrong on purpose: 22 of 23 agree with geo's.
    codes = dict(zip(manifest.ids.tolist(), manifest.country.tolist()))
    assert codes["9000004"] == "BR" and codes["9000000"] == "FR"
    assert "agree with geo's offline labels on 22 of 23 images" in result.output
    assert all(("#" in p) == zipped for p in manifest.paths.tolist())
    assert_same_pixels(manifest.paths[manifest.ids.tolist().index("9000001")], 1)  # top-level member of 01.zip
    assert_same_pixels(manifest.paths[manifest.ids.tolist().index("9000002")], 2)  # 00/ member of 00.zip


def test_corrupt_zip_member_is_skipped_with_its_reason(tmp_path):
    write_osv5m(tmp_path / "osv", corrupt_member=6)
    result = _invoke("osv5m", tmp_path / "osv", "--out", tmp_path / "m.parquet")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "m.parquet")
    bad = manifest.paths[manifest.ids.tolist().index("9000006")]
    with pytest.raises(ImageError, match="corrupt"):
        load_rgb(bad)
    assert_same_pixels(manifest.paths[manifest.ids.tolist().index("9000008")], 8)  # its neighbours read fine


def test_webdataset_tars(tmp_path):
    expected = write_webdataset(tmp_path / "wds")
    out = tmp_path / "wds.parquet"
    pattern = f"{tmp_path}/wds/shard-{{000000..000002}}.tar"
    result = _invoke("webdataset", pattern, "--split", "test", "--out", out)
    assert result.exit_code == 0, result.output
    manifest, got, skipped = read_written(out)
    assert_coordinates(got, expected)
    assert len(got) == 23
    assert [r["id"] for r in skipped] == ["sample0006"] and skipped[0]["reason"].startswith("no metadata")
    assert_same_pixels(manifest.paths[manifest.ids.tolist().index("sample0004")], 4)
    # Other JSON field names; duplicates across shards.
    other = write_webdataset(tmp_path / "gps", lat_key="gps_lat", lon_key="gps_lon", no_json=())
    rows = read_webdataset(f"{tmp_path}/gps/shard-{{000000..000002}}.tar", lat_key="gps_lat", lon_key="gps_lon")
    assert_coordinates(dict(zip(rows.ids, zip(rows.lat_deg, rows.lon_deg))), other)
    write_webdataset(tmp_path / "dup", duplicate=True)
    with pytest.raises(ManifestError, match="(?s)1 duplicate ids.*'sample0000' in .*shard-000000.tar, .*shard-000002.tar"):
        read_webdataset(f"{tmp_path}/dup/shard-{{000000..000002}}.tar")


def test_brace_expansion():
    assert expand_braces("d/s-{000008..000011}.tar") == [f"d/s-{i:06d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
