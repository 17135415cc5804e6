"""`geo cache ...`: inspect feature caches (geo/cache)."""

from __future__ import annotations

import click

from geo.cli.group import cli


# ---- cache (geo/cache) ------------------------------------------------------


@cli.group("cache")
def cache_group():
    """Inspect HDF5 feature caches (schema geo-feature-cache/1).

    \b
    Example:
      geo cache info cache.h5
    """


@cache_group.command("info")
@click.argument("file", type=click.Path(dir_okay=False))
def cache_info_command(file):
    """Print a cache's schema, rows per split and country, feature dim, provenance and validity.

    Validates the whole file (reads every feature once). Exits with status 2 when the
    file is invalid or unfinished (a FILE.partial left by an interrupted write says how
    many rows it holds so far).

    \b
    Example:
      geo cache info cache.h5
      geo cache info cache.h5.partial
    """
    from geo.cache.store import cache_report
    from geo.errors import CacheError

    text, ok = cache_report(file)
    click.echo(text)
    if not ok:
        raise CacheError(f"{file} is not a valid, complete feature cache (see the verdict above)")
