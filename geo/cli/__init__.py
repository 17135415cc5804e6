"""The ``geo`` command line: a thin click layer over the library.

Each command only parses options, calls a library function and prints.
Library errors that are the user's doing (``GeoError`` and subclasses) are
shown as one clear message and a non-zero exit, without a traceback.
The commands live in one module per part of the package (cache, stage_one,
stage_two, predict), imported at the bottom so that they register on ``cli``.
"""

from __future__ import annotations

import sys

import click

from geo import __version__
from geo.errors import GeoError


class _Group(click.Group):
    """A group that turns ``GeoError`` into ``Error: ...`` and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GeoError as err:
            click.echo(f"Error: {err}", err=True)
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


# Imported for their side effect: each module adds its commands to ``cli``.
from geo.cli import cache, predict, stage_one, stage_two  # noqa: E402,F401
