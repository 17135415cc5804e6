"""Errors that are the user's doing: bad input, bad options, refused runs.

The CLI prints them as one line and exits non-zero; everything else is a bug
and keeps its traceback. Messages name the file, dataset, row or option.
A full or failing disk is the user's to fix too: ``disk_error`` turns the
OSError (or HDF5's / torch's wording of it) into a ``DiskError``.
"""

import re


class GeoError(Exception):
    """Base class for errors caused by input or options, shown without a traceback."""


class CacheError(GeoError):
    """A feature cache that is missing, malformed, or inconsistent."""


class ManifestError(GeoError):
    """A manifest with missing columns, bad rows, or missing files."""


class ConfigError(GeoError):
    """Options that cannot work together, or a run directory holding another configuration."""


class DiskError(GeoError):
    """A write failed for lack of space or a failing disk (ENOSPC, EDQUOT, EIO): the user's to fix, not a bug."""


# errno -> what the user is told; these are conditions of the machine, not bugs of geo.
_DISK_ERRNOS = {28: "no space left on device",          # ENOSPC
                122: "disk quota exceeded",             # EDQUOT (Linux)
                5: "input/output error (a failing disk or a lost network mount)"}  # EIO
# HDF5 and torch report a failed write in their own words; the errno is inside the text.
_ERRNO_IN_TEXT = re.compile(r"errno\s*=\s*(\d+)|\[Errno (\d+)\]")
_TEXT_MARKERS = {"No space left on device": 28, "Disk quota exceeded": 122}


def disk_errno(err: BaseException) -> int | None:
    """The errno of ``err`` when it is a full or failing disk (also inside HDF5's and torch's messages), else None."""
    code = getattr(err, "errno", None)
    if code in _DISK_ERRNOS:
        return code
    text = str(err)
    for match in _ERRNO_IN_TEXT.finditer(text):
        code = int(match.group(1) or match.group(2))
        if code in _DISK_ERRNOS:
            return code
    return next((code for marker, code in _TEXT_MARKERS.items() if marker in text), None)


def disk_error(err: BaseException, path, hint: str = "free space (or write elsewhere) and rerun the same command"
               ) -> DiskError | None:
    """A ``DiskError`` naming ``path`` and what to do when ``err`` is a full or failing disk, else None."""
    code = disk_errno(err)
    if code is None:
        return None
    return DiskError(f"{_DISK_ERRNOS[code]} while writing {path}: {hint}")


class WeightsError(GeoError):
    """Backbone weights that cannot be found, downloaded or loaded."""
