"""Build a report folder beside its final place and swap it in, so no kill leaves a partial or mixed report.

``geo report --out OUT`` writes every file into ``.OUT.building-PID`` (a hidden
sibling on the same filesystem), then renames OUT away to ``.OUT.old-PID``,
renames the new folder to OUT, and deletes the old one. A kill at any point
leaves either the complete old report, or the complete new one, or (between
the two renames, a window of two system calls) no OUT at all, never a torn
``index.html`` or an old ``index.html`` beside a new ``table.csv``. Leftover
hidden folders of a killed run are deleted by the next report into OUT.

OUT may hold only what a report writes (``REPORT_NAMES``): the whole folder is
replaced, so a folder holding other files is refused rather than emptied.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from geo.errors import GeoError

REPORT_NAMES = ("index.html", "report.md", "figures", "table.csv", "table.parquet")
_BUILDING, _OLD = "building", "old"


def _scratch(out_dir: Path, kind: str) -> Path:
    return out_dir.with_name(f".{out_dir.name}.{kind}-{os.getpid()}")


def _leftovers(out_dir: Path) -> list[Path]:
    return [p for kind in (_BUILDING, _OLD) for p in out_dir.parent.glob(f".{out_dir.name}.{kind}-*")]


@contextlib.contextmanager
def building(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder to write the report into; on success it becomes ``out_dir``.

    Raises GeoError before anything is written when ``out_dir`` exists and holds files a
    report does not write. On an error the new folder is deleted and ``out_dir`` is untouched.
    """
    out_dir = check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in _leftovers(out_dir):  # a killed earlier report's scratch folders
        shutil.rmtree(stale, ignore_errors=True)
    build = _scratch(out_dir, _BUILDING)
    build.mkdir()
    try:
        yield build
        swap_in(build, out_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` made absolute; GeoError when it exists and holds files a report does not write."""
    out_dir = Path(os.path.abspath(out_dir))
    if out_dir.exists():
        if not out_dir.is_dir():
            raise GeoError(f"--out {out_dir}: exists and is not a folder")
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in REPORT_NAMES)
        if foreign:
            raise GeoError(f"--out {out_dir}: holds files a report does not write ({', '.join(foreign[:5])}"
                           f"{' ...' if len(foreign) > 5 else ''}); the report replaces the whole folder, "
                           "so give a new or empty folder")
    return out_dir


def swap_in(build: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the finished folder ``build`` (two renames), then delete the old report."""
    old = _scratch(out_dir, _OLD)
    if out_dir.exists():
        os.replace(out_dir, old)
    try:
        os.replace(build, out_dir)
    except BaseException:
        if old.exists():  # put the old report back under its name
            os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
