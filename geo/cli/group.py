"""The ``geo`` click group, and the error handling every command shares."""

from __future__ import annotations

import os
import sys

import click

from geo.cache.handles import open_hdf5_files
from geo.version import __version__
from geo.errors import GeoError, disk_error

ERROR_STATUS = 2  # every refused input, option or full disk: "Error: ..." and this exit status


def _exit_with_error(status: int = ERROR_STATUS):
    """Exit with ``status``, also when a failed write left HDF5 holding a file it cannot close.

    HDF5's clean-up at interpreter exit would crash on such a file (SIGSEGV, status 139,
    after the clear message); ``os._exit`` skips it. Committed cache blocks are on disk and
    verified by the next run, so nothing of value is in those buffers.
    """
    if open_hdf5_files():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


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
            _exit_with_error()
        except Exception as err:
            readable = disk_error(err, getattr(err, "filename", None) or "the output")
            if readable is None:
                raise
            click.echo(f"Error: {readable}", err=True)
            _exit_with_error()


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
