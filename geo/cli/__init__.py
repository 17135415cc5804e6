"""The ``geo`` command line: a thin click layer over the library.

Each command only parses options, calls a library function and prints.
Library errors that are the user's doing (``GeoError`` and subclasses) are
shown as one clear message and a non-zero exit, without a traceback.
The commands live in one module per part of the package: ``cache`` (geo/cache),
``stage_one`` (geo/pipeline: extract, data earth), ``manifest`` (manifests of
datasets as distributed), ``training``
(geo/training: fit-head, evaluate, sweep), ``report`` (geo/reports: report,
baseline), ``predict`` (geo/inference) and ``endtoend`` (geo/endtoend: finetune), imported at the bottom so that they
register on ``cli``; ``options`` generates the options several commands share.
"""

from geo.cli.group import cli, main

# Imported for their side effect: each module adds its commands to ``cli``.
from geo.cli import cache, endtoend, manifest, predict, report, stage_one, training  # noqa: E402,F401

__all__ = ["cli", "main"]
