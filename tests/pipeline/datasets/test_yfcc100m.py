"""YFCC4k from YFCC100M's raw rows: both layouts give exactly the right ids, coordinates and skips."""

from __future__ import annotations

import gzip

import pytest
from click.testing import CliRunner

from support.datasets import (assert_coordinates, assert_same_pixels, read_written, write_yfcc100m, yfcc_hash,
                              yfcc_photo_id)
from geo.cli import cli
from geo.errors import ManifestError
from geo.pipeline.datasets import yfcc100m
from geo.pipeline.datasets.yfcc100m import read_yfcc100m


def _invoke(*args):
    return CliRunner().invoke(cli, ["manifest", *map(str, args)])


def _metadata(root, gz=False):
    return root / ("yfcc4k.tsv.gz" if gz else "yfcc4k.tsv")


def _kinds(skipped) -> dict[str, str]:
    """{id: kind of reason} of the skipped rows."""
    return {id_: reason.split(":")[0] for id_, reason in skipped}


@pytest.mark.parametrize("n_fields, gz, header", [(25, False, False), (23, False, False), (24, False, False),
                                                  (25, True, False), (23, True, True), (25, False, True)])
def test_both_layouts_plain_gzip_and_with_a_header(tmp_path, n_fields, gz, header):
    expected = write_yfcc100m(tmp_path, n_fields=n_fields, gz=gz, header=header)
    rows = read_yfcc100m(_metadata(tmp_path, gz), tmp_path / "yfcc4k")
    assert_coordinates(dict(zip(rows.ids, zip(rows.lat_deg, rows.lon_deg))), expected)
    assert len(expected) == 21 and expected[yfcc_photo_id(2)] == (-33.88, 151.22)  # lat from the latitude field
    # The unmatched image of row 33 keeps its file stem: the photo hash in the 25-field layout.
    stem_33 = yfcc_hash(33) if n_fields == 25 else yfcc_photo_id(33)
    assert _kinds(rows.skipped) == {yfcc_photo_id(5): "no image", yfcc_photo_id(30): "no metadata",
                                    stem_33: "no metadata", yfcc_photo_id(8): "no coordinates",
                                    yfcc_photo_id(9): "video"}
    reasons = dict(rows.skipped)
    line = 6 + header  # row 5 of the data
    assert reasons[yfcc_photo_id(5)].startswith(f"no image: line {line} of {_metadata(tmp_path, gz).name} has")
    assert reasons[yfcc_photo_id(8)] == f"no coordinates: line {9 + header} of {_metadata(tmp_path, gz).name} " \
                                        "has an empty longitude or latitude"
    # Images named by id (at the top and in a sub-folder) and, with 25 fields, by hash in abc/def/ folders.
    path_of = dict(zip(rows.ids, rows.paths))
    for i in (1, 3, 13):
        assert_same_pixels(path_of[yfcc_photo_id(i)], i)
    assert path_of[yfcc_photo_id(13)].endswith(f"{yfcc_hash(13)}.jpg" if n_fields == 25 else
                                               f"{yfcc_photo_id(13)}.jpg")


def test_cli_writes_a_test_set_and_lists_what_was_left_out(tmp_path):
    expected = write_yfcc100m(tmp_path)
    out = tmp_path / "yfcc4k.parquet"
    result = _invoke("yfcc4k", "--metadata", _metadata(tmp_path), "--images", tmp_path / "yfcc4k", "--out", out)
    assert result.exit_code == 0, result.output
    manifest, got, skipped = read_written(out)
    assert_coordinates(got, expected)
    assert manifest.split_counts() == {"train": 0, "val": 0, "test": 21}
    assert sorted(r["reason"].split(":")[0] for r in skipped) == [
        "no coordinates", "no image", "no metadata", "no metadata", "video"]
    assert "wrote 21 images" in result.output and "left out 5" in result.output
    assert_same_pixels(manifest.paths[manifest.ids.tolist().index(yfcc_photo_id(17))], 17)  # hash-named
    # yfcc26k is the same source.
    result = _invoke("yfcc26k", "--metadata", _metadata(tmp_path), "--images", tmp_path / "yfcc4k",
                     "--out", tmp_path / "yfcc26k.parquet")
    assert result.exit_code == 0, result.output
    assert read_written(tmp_path / "yfcc26k.parquet")[0].split_counts()["test"] == 21


def test_csv_and_metadata_are_mutually_exclusive(tmp_path):
    write_yfcc100m(tmp_path)
    csv_path = tmp_path / "yfcc4k_places365.csv"
    csv_path.write_text("IMG_ID,LAT,LON\n")
    out = tmp_path / "m.parquet"
    images = ("--images", tmp_path / "yfcc4k", "--out", out)
    for given in (("--csv", csv_path, "--metadata", _metadata(tmp_path)), ()):
        result = _invoke("yfcc4k", *given, *images)
        assert result.exit_code == 2
        assert "give exactly one of --csv (a places365 CSV) and --metadata" in result.output
    assert not out.exists()
    result = _invoke("mp16", "--metadata", _metadata(tmp_path), *images)  # MP-16 has no raw rows
    assert result.exit_code == 2 and "No such option '--metadata'" in result.output


@pytest.mark.parametrize("gz", [False, True])
def test_a_wrong_field_count_names_file_and_line_before_the_images_are_scanned(tmp_path, monkeypatch, gz):
    write_yfcc100m(tmp_path, gz=gz)
    path = _metadata(tmp_path, gz)
    lines = (gzip.decompress(path.read_bytes()) if gz else path.read_bytes()).decode().splitlines(keepends=True)
    lines[6] = lines[6].replace("\t", " ", 1)  # line 7: 24 fields
    lines[10] = lines[10].rstrip("\n") + "\textra\n"  # line 11: 26
    text = "".join(lines).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    monkeypatch.setattr(yfcc100m, "scan_images", lambda folder: pytest.fail("images scanned"))
    out = tmp_path / "m.parquet"
    result = _invoke("yfcc4k", "--metadata", path, "--images", tmp_path / "yfcc4k", "--out", out)
    assert result.exit_code == 2
    assert (f"{path}: 2 lines do not have the 25 tab-separated fields of line 1 (Multimedia Commons "
            "yfcc100m_dataset layout): line 7 has 24, line 11 has 26") in " ".join(result.output.split())
    assert not out.exists()
    # A first line of neither layout.
    path.write_bytes(b"1\t2\t3\n")
    with pytest.raises(ManifestError, match=r"yfcc4k\.tsv(\.gz)?: line 1 has 3 tab-separated fields"):
        read_yfcc100m(path, tmp_path / "yfcc4k")


@pytest.mark.parametrize("n_fields, lat_field, lon_field", [(25, 13, 12), (23, 11, 10)])
def test_swapped_latitude_and_longitude_fields_are_refused(tmp_path, n_fields, lat_field, lon_field):
    write_yfcc100m(tmp_path, n_fields=n_fields, swap=True)
    with pytest.raises(ManifestError) as error:
        read_yfcc100m(_metadata(tmp_path), tmp_path / "yfcc4k")
    message = str(error.value)
    assert f"column 'field {lat_field} (latitude)' leaves [-90, 90] (e.g. 151.22 in data row 3)" in message
    assert f"column 'field {lon_field} (longitude)' stays inside it" in message


def test_duplicate_photo_ids_are_refused_with_their_lines(tmp_path):
    write_yfcc100m(tmp_path / "rows", duplicate=3)
    with pytest.raises(ManifestError, match=rf"1 duplicate ids across the rows of .*yfcc4k\.tsv:\n  "
                                            rf"'{yfcc_photo_id(3)}' in line 4, line 25"):
        read_yfcc100m(_metadata(tmp_path / "rows"), tmp_path / "rows" / "yfcc4k")
    # One photo's image under both its id and its hash: which one is meant is unclear.
    write_yfcc100m(tmp_path / "images")
    images = tmp_path / "images" / "yfcc4k"
    (images / f"{yfcc_photo_id(13)}.jpg").write_bytes((images / f"{yfcc_hash(13)[:3]}/{yfcc_hash(13)[3:6]}/"
                                                                 f"{yfcc_hash(13)}.jpg").read_bytes())
    with pytest.raises(ManifestError, match=rf"(?s)1 duplicate ids across the images in .*'{yfcc_photo_id(13)}' in "
                                            rf".*/{yfcc_photo_id(13)}\.jpg, .*/{yfcc_hash(13)}\.jpg"):
        read_yfcc100m(_metadata(tmp_path / "images"), images)
