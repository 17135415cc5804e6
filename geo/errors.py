"""Errors that are the user's doing: bad input, bad options, refused runs.

The CLI prints them as one line and exits non-zero; everything else is a bug
and keeps its traceback. Messages name the file, dataset, row or option.
"""


class GeoError(Exception):
    """Base class for errors caused by input or options, shown without a traceback."""


class CacheError(GeoError):
    """A feature cache that is missing, malformed, or inconsistent."""


class ManifestError(GeoError):
    """A manifest with missing columns, bad rows, or missing files."""


class ConfigError(GeoError):
    """Options that cannot work together, or a run directory holding another configuration."""
