"""`geo manifest` on a folder holding images it cannot open: each one in the skipped list, the scan goes on."""

from __future__ import annotations

import csv

from click.testing import CliRunner
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational as R

from geo.cli import cli

PARIS = {1: "N", 2: (R(48, 1), R(51, 1), R(24, 1)), 3: "E", 4: (R(2, 1), R(21, 1), R(8, 1))}


def _photo(path, size_px=8):
    exif = Image.Exif()
    exif[ExifTags.IFD.GPSInfo] = PARIS
    Image.new("RGB", (size_px, size_px)).save(path, exif=exif)


def test_a_decompression_bomb_and_an_unreadable_file_are_skipped_with_reasons(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    _photo(photos / "a.jpg")
    _photo(photos / "bomb.jpg", size_px=64)  # 4096 pixels: a bomb once the limit is 1000 (Pillow refuses > 2x)
    (photos / "torn.jpg").write_bytes((photos / "a.jpg").read_bytes()[:40])
    _photo(photos / "z.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    out = tmp_path / "m.parquet"
    result = CliRunner().invoke(cli, ["manifest", str(photos), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    with open(str(out) + ".skipped.csv", newline="") as handle:
        reasons = {row["path"]: row["reason"] for row in csv.DictReader(handle)}
    assert "decompression bomb" in reasons[str(photos / "bomb.jpg")]
    assert str(photos / "torn.jpg") in reasons
    assert out.is_file()  # a.jpg and z.jpg: the scan went on past both
