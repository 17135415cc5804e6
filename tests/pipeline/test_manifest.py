"""Manifests: formats, validation of every problem kind, paths, splits, the folder builder."""

import csv
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational as R

from geo.cli import cli
from geo.errors import ConfigError, ManifestError
from geo.pipeline.manifest import (MAX_LISTED_PROBLEMS, SPLIT_NAMES, assign_splits,
                                   build_manifest_from_folder, read_manifest, split_uniform)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def touch_images(folder, names):
    for name in names:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(target)


def test_csv_relative_and_absolute_paths(tmp_path):
    touch_images(tmp_path / "img", ["a.jpg", "b.jpg"])
    manifest_path = write_csv(tmp_path / "m.csv", ["id", "path", "lat", "lon", "split"], [
        ["a", "img/a.jpg", "48.85", "2.35", "train"],
        ["b", str(tmp_path / "img" / "b.jpg"), "-33.9", "180", "test"]])
    m = read_manifest(manifest_path)
    assert m.ids.tolist() == ["a", "b"]
    assert m.paths.tolist() == [str((tmp_path / "img/a.jpg").resolve()), str(tmp_path / "img" / "b.jpg")]
    assert m.lat_deg.dtype == np.float64 and m.lat_deg.tolist() == [48.85, -33.9]
    assert m.lon_deg.tolist() == [2.35, -180.0]  # 180 wraps to -180
    assert m.split.dtype == np.uint8 and m.split.tolist() == [0, 2]
    assert m.sha256 == hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    assert m.path == manifest_path.resolve()


def test_parquet_with_numeric_columns_and_case_insensitive_names(tmp_path):
    touch_images(tmp_path, ["x.png"])
    pq.write_table(pa.table({"ID": ["x"], "Path": ["x.png"], "LAT": [1.5], "LON": [-2.5]}), tmp_path / "m.parquet")
    m = read_manifest(tmp_path / "m.parquet")
    assert (m.ids.tolist(), m.lat_deg.tolist(), m.lon_deg.tolist()) == (["x"], [1.5], [-2.5])


def test_mp16_format_with_images_root(tmp_path):
    touch_images(tmp_path / "images", ["3f/1a/123.jpg", "00/00/9.jpg"])
    manifest_path = write_csv(tmp_path / "mp16.csv", ["IMG_ID", "AUTHOR", "LAT", "LON"], [
        ["3f/1a/123.jpg", "someone", "35.0", "139.0"], ["00/00/9.jpg", "other", "-1", "-2"]])
    with pytest.raises(ManifestError, match="image file not found"):
        read_manifest(manifest_path)  # default root: the manifest's folder
    m = read_manifest(manifest_path, images_root=tmp_path / "images")
    assert m.ids.tolist() == ["3f/1a/123.jpg", "00/00/9.jpg"]
    assert m.paths[0] == str((tmp_path / "images/3f/1a/123.jpg").resolve())
    assert m.split.tolist() == assign_splits(m.ids, 0.1, 0.1).tolist()


def test_missing_columns_named(tmp_path):
    path = write_csv(tmp_path / "m.csv", ["id", "lat", "longitude"], [["a", "1", "2"]])
    with pytest.raises(ManifestError, match=r"m\.csv: missing columns path, lon"):
        read_manifest(path)


def test_every_problem_row_reported(tmp_path):
    touch_images(tmp_path, ["ok.jpg"])
    rows = [
        ["a", "ok.jpg", "1", "2", "train"],      # line 2: fine
        ["b", "ok.jpg", "north", "2", "train"],  # line 3: non-numeric lat
        ["c", "ok.jpg", "NaN", "2", "val"],      # line 4: NaN
        ["d", "ok.jpg", "91", "-181", "test"],   # line 5: both out of range
        ["a", "ok.jpg", "1", "2", "train"],      # line 6: duplicate of line 2
        ["e", "gone.jpg", "1", "2", "train"],    # line 7: missing file
        ["f", "ok.jpg", "1", "2", "holdout"],    # line 8: unknown split
        ["", "ok.jpg", "1", "", "train"],        # line 9: empty id, empty lon
    ]
    path = write_csv(tmp_path / "m.csv", ["id", "path", "lat", "lon", "split"], rows)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}: 9 problems in 7 rows")
    for expected in ["line 3: lat is not a number: 'north'", "line 4: lat is NaN",
                     "line 5: lat 91.0 outside [-90, 90]", "line 5: lon -181.0 outside [-180, 180]",
                     "line 6: duplicate id 'a' (first at line 2)", "line 7: image file not found:",
                     "line 8: unknown split 'holdout'", "line 9: empty id", "line 9: lon is not a number: ''"]:
        assert expected in message
    assert "line 2:" not in message
    assert len(info.value.problems) == 9


def test_many_problems_capped_and_written_to_file(tmp_path):
    rows = [[f"id{i}", "x.jpg", "100", "0"] for i in range(50)]
    path = write_csv(tmp_path / "m.csv", ["id", "path", "lat", "lon"], rows)
    with pytest.raises(ManifestError) as info:
        read_manifest(path, check_files=False)
    message = str(info.value)
    assert message.count("outside [-90, 90]") == MAX_LISTED_PROBLEMS
    report = tmp_path / "m.csv.problems.txt"
    assert f"and {50 - MAX_LISTED_PROBLEMS} more; full list in {report}" in message
    assert len(report.read_text().splitlines()) == 50


def test_parquet_rows_are_zero_based_and_nulls_reported(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "path": ["a.jpg", "b.jpg"], "lat": [1.0, None],
                             "lon": [2.0, 3.0]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="row 1: lat is not a number"):
        read_manifest(tmp_path / "m.parquet", check_files=False)


def test_not_a_manifest(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ManifestError, match="empty file"):
        read_manifest(tmp_path / "empty.csv")


def test_split_hash_reference_and_determinism():
    ids = [f"photo_{i}.jpg" for i in range(20_000)]
    u = split_uniform(ids)
    # Independent recomputation of the documented rule for a few ids.
    for k in (0, 17, 19_999):
        word = int(hashlib.sha256(ids[k].encode()).hexdigest()[:16], 16)
        assert u[k] == pytest.approx(word / 2**64, rel=1e-15)
    codes = assign_splits(ids, 0.2, 0.1)
    fractions = np.bincount(codes, minlength=3) / len(ids)
    # Binomial standard error ~0.003: five of them of slack.
    assert fractions == pytest.approx([0.7, 0.2, 0.1], abs=0.015)
    # Order and subset independent.
    perm = np.random.default_rng(0).permutation(len(ids))
    assert (assign_splits([ids[i] for i in perm], 0.2, 0.1) == codes[perm]).all()
    assert (assign_splits(ids[:100], 0.2, 0.1) == codes[:100]).all()
    # Growing one fraction only moves train rows into that split.
    more_test = assign_splits(ids, 0.2, 0.2)
    assert ((more_test == codes) | ((codes == 0) & (more_test == 2))).all()
    more_val = assign_splits(ids, 0.3, 0.1)
    assert ((more_val == codes) | ((codes == 0) & (more_val == 1))).all()
    assert (more_test != codes).any() and (more_val != codes).any()
    assert set(assign_splits(ids[:50], 0.0, 0.0).tolist()) == {0}


def test_bad_fractions():
    with pytest.raises(ConfigError, match="exceeds 1"):
        assign_splits(["a"], 0.6, 0.5)
    with pytest.raises(ConfigError, match="val_fraction"):
        assign_splits(["a"], -0.1, 0.1)


def test_split_names_match_cache_schema():
    from geo.cache import store

    assert SPLIT_NAMES == store.SPLIT_NAMES


def _photo(path, gps):
    exif = Image.Exif()
    if gps is not None:
        exif[ExifTags.IFD.GPSInfo] = gps
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path, exif=exif)


def _folder(tmp_path):
    photos = tmp_path / "photos"
    _photo(photos / "paris.jpg", {1: "N", 2: (R(48, 1), R(51, 1), R(24, 1)), 3: "E", 4: (R(2, 1), R(21, 1), R(8, 1))})
    _photo(photos / "trip" / "sydney.JPG", {1: "S", 2: (R(33, 1), R(52, 1), R(0, 1)),
                                            3: "E", 4: (R(151, 1), R(12, 1), R(36, 1))})
    _photo(photos / "trip" / "nogps.jpg", None)
    _photo(photos / "trip" / "badref.jpg", {2: (R(1, 1),), 4: (R(1, 1),)})
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    (photos / "notes.txt").write_text("ignored")
    return photos


def test_build_manifest_from_folder(tmp_path):
    photos = _folder(tmp_path)
    out = tmp_path / "out" / "manifest.parquet"
    manifest, skipped = build_manifest_from_folder(photos, out, progress=False)
    assert manifest.ids.tolist() == ["paris.jpg", "trip/sydney.JPG"]
    assert manifest.lat_deg == pytest.approx([48 + 51 / 60 + 24 / 3600, -(33 + 52 / 60)])
    assert manifest.lon_deg == pytest.approx([2 + 21 / 60 + 8 / 3600, 151 + 12 / 60 + 36 / 3600])
    reasons = dict(skipped)
    assert set(reasons) == {str(photos / n) for n in ["broken.jpg", "trip/badref.jpg", "trip/nogps.jpg"]}
    assert "not an image" in reasons[str(photos / "broken.jpg")]
    with open(str(out) + ".skipped.csv", newline="") as handle:
        assert [tuple(r) for r in csv.reader(handle)][1:] == skipped
    not_recursive, _ = build_manifest_from_folder(photos, tmp_path / "top.parquet", recursive=False, progress=False)
    assert not_recursive.ids.tolist() == ["paris.jpg"]
    # Paths under the manifest's folder are stored relative: the pair can move together.
    inside, _ = build_manifest_from_folder(photos, photos / "m.parquet", progress=False)
    assert pq.read_table(photos / "m.parquet")["path"].to_pylist() == ["paris.jpg", "trip/sydney.JPG"]


def test_build_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="not a folder"):
        build_manifest_from_folder(tmp_path / "nope", tmp_path / "m.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no image files"):
        build_manifest_from_folder(tmp_path / "empty", tmp_path / "m.parquet")
    _photo(tmp_path / "nogps" / "a.jpg", None)
    with pytest.raises(ManifestError, match="none of 1 photos"):
        build_manifest_from_folder(tmp_path / "nogps", tmp_path / "m.parquet", progress=False)
    assert (tmp_path / "m.parquet.skipped.csv").is_file()


def test_cli_manifest(tmp_path):
    photos = _folder(tmp_path)
    out = tmp_path / "m.parquet"
    result = CliRunner().invoke(cli, ["manifest", str(photos), "--out", str(out), "--test-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    assert "wrote 2 photos" in result.output and "skipped 3 photos" in result.output
    assert read_manifest(out).split_counts()["train"] + read_manifest(out).split_counts()["test"] + \
        read_manifest(out).split_counts()["val"] == 2
    bad = CliRunner().invoke(cli, ["manifest", str(photos), "--out", str(out), "--val-fraction", "2"])
    assert bad.exit_code == 2 and "Error: val_fraction must be in [0, 1]" in bad.output
    assert "Example:" in CliRunner().invoke(cli, ["manifest", "--help"]).output
