"""The dependency order of DESIGN.md: no import cycle anywhere, and the layering contract catches a back-edge.

``make test`` runs ``lint-imports`` (contracts in pyproject.toml) before pytest;
these tests check that the contracts mean something: an unmodified copy of the
package passes, a copy whose heads import training fails, and grimp's graph of
the package (function-level imports included) has no cycle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_no_import_cycle_anywhere():
    graph = grimp.build_graph("geo")
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain is not None:
                cycles.append(f"{module} -> {' -> '.join(chain)}")
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _lint_copy(tmp_path: Path, edit=None) -> subprocess.CompletedProcess:
    """``lint-imports`` on a copy of geo/ (edited by ``edit(root)``) with this repository's contracts."""
    shutil.copytree(REPO / "geo", tmp_path / "geo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    if edit is not None:
        edit(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_lint_imports_passes_on_the_package(tmp_path):
    result = _lint_copy(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_back_edge_from_heads_to_training_breaks_the_contract(tmp_path):
    def heads_import_training(root: Path) -> None:
        base = root / "geo" / "heads" / "base.py"
        base.write_text(base.read_text() + "\n\ndef _back_edge():\n    from geo.training import runs  # noqa: F401\n")

    result = _lint_copy(tmp_path, heads_import_training)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "geo.heads.base -> geo.training.runs" in result.stdout
