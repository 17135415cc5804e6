"""`geo report` builds beside its final place and swaps in: a kill never leaves a partial or mixed report.

A kill is simulated faithfully: the report is built in a forked child that calls
``os._exit`` (no cleanup, no ``finally``) at the k-th file operation (an open for
writing or a rename), for k spread over the whole run. After each kill, the final
folder must hold exactly the old report or exactly the new one (or nothing, in the
two-rename window), byte for byte; the next report cleans up and succeeds.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest

import geo.files
import geo.reports.publish as publish
from geo.errors import GeoError
from geo.reports.build import build_report
from geo.reports.document import Section, Text, render_markdown
from support.runs import write_run


def _snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _runs(root: Path, acc: float) -> Path:
    for c in (16, 64):
        write_run(root / f"mvmf-c{c}", n_cells=c, kappa0=16.0, acc=[acc] * 5)
    return root


class _Killer:
    """Counts file operations; at the ``at``-th one, the process dies on the spot (like kill -9)."""

    def __init__(self, at: int | None):
        self.at, self.count = at, 0
        self.real_open, self.real_replace = open, os.replace

    def tick(self):
        self.count += 1
        if self.count == self.at:
            os._exit(9)

    def open(self, file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            self.tick()
        return self.real_open(file, mode, *args, **kwargs)

    def replace(self, src, dst):
        self.tick()
        return self.real_replace(src, dst)


def _report_with(killer: _Killer, runs: Path, out: Path, monkeypatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(geo.files, "open", killer.open, raising=False)
        patch.setattr(geo.files.os, "replace", killer.replace)  # the os module: publish's renames too
        build_report([runs], out, n_maps=0)


@pytest.mark.slow
def test_a_report_killed_at_any_point_is_old_or_new_never_partial(tmp_path, monkeypatch):
    old_runs, new_runs, out = _runs(tmp_path / "old", 0.2), _runs(tmp_path / "new", 0.6), tmp_path / "out"
    build_report([new_runs], tmp_path / "reference", n_maps=0)
    new = _snapshot(tmp_path / "reference")
    counter = _Killer(None)
    _report_with(counter, old_runs, out, monkeypatch)
    old = _snapshot(out)
    assert old != new and counter.count > 5
    points = sorted(random.Random(0).sample(range(1, counter.count + 1), min(6, counter.count)))
    points = sorted(set(points) | {counter.count - 1, counter.count})  # the two renames of the swap
    outcomes = []
    for at in points:
        pid = os.fork()
        if pid == 0:  # the child: report the new runs, die at operation `at`
            try:
                _report_with(_Killer(at), new_runs, out, monkeypatch)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 9, f"the child was not killed at operation {at}"
        now = _snapshot(out)
        assert now in (old, new, None), f"killed at operation {at}: a partial or mixed report under {out}"
        outcomes.append("old" if now == old else "new" if now == new else "none")
        _restore(out, old)  # the old report again, for the next kill
    assert "old" in outcomes  # kills before the swap keep the old report
    build_report([old_runs], out, n_maps=0)  # the next report cleans up the killed ones' scratch folders
    assert _snapshot(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old", "out", "reference"]


def _restore(folder: Path, files: dict[str, bytes]) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def test_a_folder_holding_other_files_is_refused_before_any_work(tmp_path):
    runs = _runs(tmp_path / "runs", 0.3)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(GeoError, match=r"--out .*out: holds files a report does not write \(notes.txt\)"):
        build_report([runs], tmp_path / "out", n_maps=0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def test_a_failed_report_leaves_the_old_one_and_no_scratch_folder(tmp_path, monkeypatch):
    runs = _runs(tmp_path / "runs", 0.3)
    build_report([runs], tmp_path / "out", n_maps=0)
    old = _snapshot(tmp_path / "out")
    with monkeypatch.context() as patch:
        patch.setattr(publish, "swap_in", lambda build, out: (_ for _ in ()).throw(OSError(28, "No space")))
        with pytest.raises(OSError):
            build_report([runs], tmp_path / "out", n_maps=0)
    assert _snapshot(tmp_path / "out") == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "runs"]


def test_report_md_escapes_names_ids_and_paths():
    name = '<img src=x onerror=alert(1)> [click](javascript:alert(1)) ![x](http://evil/p.png)'
    md = render_markdown("Report", [Section(f"Runs {name}", [Text(f"- run **{name}** (`{name}`)")])])
    assert "<" not in md and not re.search(r"(?<!\\)\]\(", md)  # no raw HTML, no link or image syntax
    assert "&lt;img src=x onerror=alert(1)&gt;" in md and "\\[click\\]" in md
    assert "- run **" in md  # bold and bullets survive
    assert render_markdown("R", [Section("S", [Text("see `geo report` and `a < b`")])]).count("`") == 2


def test_report_md_of_a_run_named_with_html(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs / "good", n_cells=16, kappa0=16.0, acc=[0.3] * 5)
    bad = runs / "<img src=x onerror=alert(1)>"  # listed among the skipped runs, by its path
    bad.mkdir()
    (bad / "config.json").write_text("{")
    build_report([runs], tmp_path / "out", n_maps=0)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    assert "&lt;img src=x" in (tmp_path / "out" / "index.html").read_text()
