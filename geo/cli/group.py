"""The ``geo`` click group, and the error handling every command shares."""

from __future__ import annotations

import sys

import click

from geo.version import __version__
from geo.errors import GeoError, disk_error


class _Group(click.Group):
    """A group that turns ``GeoError`` into ``Error: ...`` and exit code 2.

    So does a full or failing disk met by a writer that did not name its file
    itself (``geo.errors.disk_error``): the user can act on it, a traceback helps nobody.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GeoError as err:
            click.echo(f"Error: {err}", err=True)
            sys.exit(2)
        except Exception as err:
            readable = disk_error(err, getattr(err, "filename", None) or "the output")
            if readable is None:
                raise
            click.echo(f"Error: {readable}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geo")
def cli():
    """geo: predict where on earth an image was taken.

    \b
    Stage one:  geo extract MANIFEST --out cache.h5
    Stage two:  geo fit-head cache.h5 --head mvmf --out runs/NAME
    Inspect:    geo cache info cache.h5
    """


def main():
    cli()
