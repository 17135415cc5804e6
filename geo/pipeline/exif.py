"""EXIF GPS -> (lat_deg, lon_deg), with a reason for every photo it cannot use.

EXIF stores a position in the GPSInfo IFD (tag 0x8825) as unsigned
degrees/minutes/seconds rationals (``GPSLatitude`` = tag 2, ``GPSLongitude`` =
tag 4) plus hemisphere references (``GPSLatitudeRef`` "N"/"S" = tag 1,
``GPSLongitudeRef`` "E"/"W" = tag 3). Pillow hands the rationals over as
``IFDRational`` (older files or callers: ``(numerator, denominator)`` tuples),
and broken writers put strings, too few or too many values, or zero
denominators there.

Rules (each rejection carries a short reason, used in ``<manifest>.skipped.csv``):

- 1 to 3 values per coordinate (degrees[, minutes[, seconds]]) are accepted;
  each must be a finite, non-negative number; minutes and seconds must be < 60
  (60 exactly is accepted: rounding writers produce it).
- A zero denominator is rejected (``0/0`` is "unknown" in EXIF, not 0).
- A missing or unknown hemisphere reference is rejected: guessing "N"/"E"
  would put a southern or western photo thousands of km away.
- ``GPSStatus`` = "V" (void measurement) is rejected.
- Exactly (0, 0) is rejected: it is the placeholder many cameras write without
  a fix, not a photo taken in the Gulf of Guinea.
- The result must lie in lat [-90, 90], lon [-180, 180]; longitude is then
  wrapped into [-180, 180).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

from PIL import ExifTags, Image, UnidentifiedImageError

from geo.errors import GeoError

GPS_STATUS, GPS_LAT_REF, GPS_LAT, GPS_LON_REF, GPS_LON = 9, 1, 2, 3, 4


class NoGPSError(GeoError):
    """A photo without a usable EXIF GPS position; ``str(err)`` is the reason."""


def _ref(value: Any, name: str, allowed: str) -> str:
    """Normalise a hemisphere reference ('N', b'N\\x00', ' s ') to one upper-case letter."""
    if value is None:
        raise NoGPSError(f"missing {name} (hemisphere unknown)")
    if isinstance(value, bytes):
        value = value.decode("latin-1", errors="replace")
    if not isinstance(value, str):
        raise NoGPSError(f"malformed {name}: {value!r}")
    letter = value.strip("\x00 \t").upper()
    if len(letter) != 1 or letter not in allowed:
        raise NoGPSError(f"malformed {name}: {value!r} (expected one of {', '.join(allowed)})")
    return letter


def _rational(value: Any, name: str) -> float:
    """One EXIF rational as a float: IFDRational, (num, den) tuple, int or float."""
    if hasattr(value, "numerator") and hasattr(value, "denominator"):  # IFDRational, Fraction, int
        num, den = value.numerator, value.denominator
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, (int, float)) for v in value
    ):
        num, den = value
    elif isinstance(value, float):
        num, den = value, 1
    else:
        raise NoGPSError(f"malformed {name}: {value!r} is not a rational")
    if den == 0:
        raise NoGPSError(f"zero denominator in {name}")
    out = float(num) / float(den)
    if not math.isfinite(out) or out < 0:
        raise NoGPSError(f"malformed {name}: value {out!r} is not a finite non-negative number")
    return out


def _dms_deg(value: Any, name: str) -> float:
    """Degrees from an EXIF (degrees, minutes, seconds) sequence of 1-3 rationals."""
    if value is None:
        raise NoGPSError(f"missing {name}")
    if isinstance(value, (str, bytes)):
        raise NoGPSError(f"malformed {name}: a string {value!r}, not rationals")
    if hasattr(value, "numerator") or (isinstance(value, tuple) and len(value) == 2
                                       and all(isinstance(v, int) for v in value)):
        # A single rational (decimal degrees), not a (deg, min, sec) sequence. A bare
        # (num, den) pair of ints is read as one rational, never as (deg, min).
        value = (value,)
    if not isinstance(value, (tuple, list)) or not 1 <= len(value) <= 3:
        raise NoGPSError(f"malformed {name}: expected 1-3 rationals, got {value!r}")
    parts = [_rational(v, name) for v in value]
    if any(p > 60.0 for p in parts[1:]):
        raise NoGPSError(f"malformed {name}: minutes/seconds above 60 in {parts}")
    return sum(p / 60.0**i for i, p in enumerate(parts))


def gps_from_ifd(gps: Mapping[int, Any]) -> tuple[float, float]:
    """(lat_deg, lon_deg) from a GPSInfo IFD mapping tag number -> value.

    Raises:
        NoGPSError: the position is missing, malformed or out of range (message = reason).
    """
    if not gps:
        raise NoGPSError("no GPS data in EXIF")
    status = gps.get(GPS_STATUS)
    if isinstance(status, bytes):
        status = status.decode("latin-1", errors="replace")
    if isinstance(status, str) and status.strip("\x00 ").upper() == "V":  # other values: ignored
        raise NoGPSError("GPSStatus is V (void measurement)")
    if gps.get(GPS_LAT) is None and gps.get(GPS_LON) is None:
        raise NoGPSError("no GPSLatitude/GPSLongitude in EXIF")
    lat = _dms_deg(gps.get(GPS_LAT), "GPSLatitude")
    lon = _dms_deg(gps.get(GPS_LON), "GPSLongitude")
    lat_ref = _ref(gps.get(GPS_LAT_REF), "GPSLatitudeRef", "NS")
    lon_ref = _ref(gps.get(GPS_LON_REF), "GPSLongitudeRef", "EW")
    if lat > 90.0:
        raise NoGPSError(f"GPSLatitude out of range: {lat:.6f} deg")
    if lon > 180.0:
        raise NoGPSError(f"GPSLongitude out of range: {lon:.6f} deg")
    if lat == 0.0 and lon == 0.0:
        raise NoGPSError("GPS is exactly 0,0 (placeholder written without a fix)")
    lat_deg = -lat if lat_ref == "S" else lat
    lon_deg = -lon if lon_ref == "W" else lon
    if lon_deg >= 180.0:  # 180 E == 180 W -> -180 (no modulo: it perturbs other values in the last bit)
        lon_deg -= 360.0
    return lat_deg, lon_deg


def read_gps(path: str | os.PathLike) -> tuple[float, float]:
    """(lat_deg, lon_deg) of a photo from its EXIF GPS tags (only the header is read).

    Raises:
        NoGPSError: the file is not an image Pillow reads, has no EXIF, or its GPS
            position is unusable; ``str(err)`` says why.
    """
    try:
        with Image.open(path) as image:
            gps = image.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    except UnidentifiedImageError:
        raise NoGPSError("not an image Pillow can read") from None
    except Image.DecompressionBombError as err:  # Pillow refuses to open it; one file, not the whole scan
        raise NoGPSError(f"refused as a possible decompression bomb: {err}") from None
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError) as err:
        # Pillow raises all of these on damaged headers / EXIF blocks.
        raise NoGPSError(f"cannot read EXIF: {type(err).__name__}: {err}") from None
    return gps_from_ifd(gps)
