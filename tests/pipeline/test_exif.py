"""EXIF GPS parsing: a real geotagged photo from Debian and photos written with known tags."""

from pathlib import Path

import pytest
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational as R

from geo.pipeline.exif import NoGPSError, gps_from_ifd, read_gps

GOEXIF = Path("/usr/share/gocode/src/github.com/rwcarlsen/goexif/exif")
needs_goexif = pytest.mark.skipif(
    not (GOEXIF / "sample1.jpg").is_file(),
    reason="real geotagged samples absent: apt-get install golang-github-rwcarlsen-goexif-dev")


def dms(deg, minutes, seconds):
    """Independent reference: degrees from D/M/S."""
    return deg + minutes / 60 + seconds / 3600


def write_photo(path, gps: dict) -> Path:
    exif = Image.Exif()
    exif[ExifTags.IFD.GPSInfo] = gps
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, exif=exif)
    return path


@needs_goexif
def test_real_photo_beijing():
    lat, lon = read_gps(GOEXIF / "sample1.jpg")
    # The file stores 39 deg 54' 56" N, 116 deg 23' 27" E (39.9156 N 116.3908 E).
    assert lat == pytest.approx(dms(39, 54, 56), abs=1e-9)
    assert lon == pytest.approx(dms(116, 23, 27), abs=1e-9)
    assert (round(lat, 4), round(lon, 4)) == (39.9156, 116.3908)


@needs_goexif
def test_real_photo_with_gps_as_strings_is_rejected_with_reason():
    with pytest.raises(NoGPSError, match="malformed GPSLatitude"):
        read_gps(GOEXIF / "samples" / "geodegrees_as_string.jpg")


@needs_goexif
def test_real_photo_without_gps():
    with pytest.raises(NoGPSError, match="no GPS"):
        read_gps(GOEXIF / "samples" / "f1-exif.jpg")


@pytest.mark.parametrize("lat_ref, lon_ref, sign_lat, sign_lon", [
    ("N", "E", 1, 1), ("S", "W", -1, -1), ("S", "E", -1, 1), ("N", "W", 1, -1)])
def test_written_photo_hemispheres(tmp_path, lat_ref, lon_ref, sign_lat, sign_lon):
    photo = write_photo(tmp_path / "p.jpg", {
        1: lat_ref, 2: (R(33, 1), R(52, 1), R(1234, 100)),
        3: lon_ref, 4: (R(151, 1), R(12, 1), R(3, 1))})
    lat, lon = read_gps(photo)
    assert lat == pytest.approx(sign_lat * dms(33, 52, 12.34), abs=1e-9)
    assert lon == pytest.approx(sign_lon * dms(151, 12, 3), abs=1e-9)


def test_written_photo_zero_denominator(tmp_path):
    for seconds in (R(0, 0), R(5, 0)):
        photo = write_photo(tmp_path / "z.jpg", {
            1: "N", 2: (R(33, 1), R(52, 1), seconds), 3: "E", 4: (R(1, 1), R(2, 1), R(3, 1))})
        with pytest.raises(NoGPSError, match="zero denominator in GPSLatitude"):
            read_gps(photo)


def test_written_photo_missing_refs(tmp_path):
    photo = write_photo(tmp_path / "m.jpg", {2: (R(33, 1), R(52, 1), R(1, 1)),
                                             4: (R(1, 1), R(2, 1), R(3, 1))})
    with pytest.raises(NoGPSError, match="missing GPSLatitudeRef"):
        read_gps(photo)


def test_written_photo_out_of_range(tmp_path):
    photo = write_photo(tmp_path / "o.jpg", {1: "N", 2: (R(95, 1), R(0, 1), R(0, 1)),
                                             3: "E", 4: (R(1, 1), R(2, 1), R(3, 1))})
    with pytest.raises(NoGPSError, match="GPSLatitude out of range"):
        read_gps(photo)


def test_not_an_image_and_no_exif(tmp_path):
    (tmp_path / "x.jpg").write_text("hello")
    with pytest.raises(NoGPSError, match="not an image"):
        read_gps(tmp_path / "x.jpg")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(NoGPSError, match="no GPS"):
        read_gps(tmp_path / "plain.png")


def test_ifd_value_forms():
    # (num, den) tuples as old Pillow / other callers give them, bytes refs with a NUL.
    lat, lon = gps_from_ifd({1: b"S\x00", 2: ((10, 1), (30, 1), (0, 1)), 3: "w ", 4: ((20, 1), (15, 1), (36, 10))})
    assert (lat, lon) == (pytest.approx(-10.5), pytest.approx(-dms(20, 15, 3.6)))
    # Decimal degrees in one rational.
    assert gps_from_ifd({1: "N", 2: (R(4_512_345, 100_000),), 3: "E", 4: R(7, 2)}) == (
        pytest.approx(45.12345), pytest.approx(3.5))
    # 180 E wraps to -180 (the convention everywhere in geo).
    assert gps_from_ifd({1: "N", 2: (R(1, 1),), 3: "E", 4: (R(180, 1),)})[1] == -180.0


@pytest.mark.parametrize("gps, reason", [
    ({}, "no GPS data"),
    ({1: "N", 3: "E"}, "no GPSLatitude/GPSLongitude"),
    ({1: "N", 2: "12,34,56", 3: "E", 4: (R(1, 1),)}, "malformed GPSLatitude: a string"),
    ({1: "N", 2: (R(1, 1),), 3: "E", 4: ("a", "b", "c")}, "malformed GPSLongitude"),
    ({1: "N", 2: (R(1, 1), R(2, 1), R(3, 1), R(4, 1)), 3: "E", 4: (R(1, 1),)}, "expected 1-3"),
    ({1: "N", 2: (R(1, 1), R(75, 1), R(0, 1)), 3: "E", 4: (R(1, 1),)}, "minutes/seconds above 60"),
    ({1: "N", 2: (R(-1, 1),), 3: "E", 4: (R(1, 1),)}, "non-negative"),
    ({1: "Q", 2: (R(1, 1),), 3: "E", 4: (R(1, 1),)}, "malformed GPSLatitudeRef"),
    ({1: "N", 2: (R(1, 1),), 4: (R(1, 1),)}, "missing GPSLongitudeRef"),
    ({1: "N", 2: (R(1, 1),), 3: "E", 4: (R(181, 1),)}, "GPSLongitude out of range"),
    ({1: "N", 2: (R(0, 1),), 3: "E", 4: (R(0, 1),)}, "exactly 0,0"),
    ({9: "V", 1: "N", 2: (R(1, 1),), 3: "E", 4: (R(1, 1),)}, "void"),
])
def test_bad_ifds_give_reasons(gps, reason):
    with pytest.raises(NoGPSError, match=reason):
        gps_from_ifd(gps)
