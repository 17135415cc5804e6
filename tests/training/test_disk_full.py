"""A disk that fills during fit-head: one readable error, exit 2, no temporaries; the rerun ends identical."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import geo.files
from geo.cli import cli
from support.caches import make_location_cache
from support.disk import FailingOpen

ARGS = ["--head", "mvmf", "--n-cells", "24", "--batch-size", "128", "--epochs", "3", "--lr", "0.05",
        "--device", "cpu", "--precision", "fp32", "--quiet"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(make_location_cache(tmp_path_factory.mktemp("cache") / "loc.h5", n=800))


@pytest.fixture(scope="module")
def whole(cache, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert CliRunner().invoke(cli, ["fit-head", cache, *ARGS, "--out", str(out)]).exit_code == 0
    return out


@pytest.mark.parametrize("match, at", [("checkpoint.pt", 2), ("metrics.json", 1), ("predictions.parquet", 1)])
def test_full_disk_at_a_save_then_rerun_ends_identical(cache, whole, tmp_path, monkeypatch, match, at):
    run = tmp_path / "run"
    disk = FailingOpen(match, at)
    with monkeypatch.context() as patch:
        patch.setattr(geo.files, "open", disk.open, raising=False)
        result = CliRunner().invoke(cli, ["fit-head", cache, *ARGS, "--out", str(run)])
    assert disk.failures == 1
    assert result.exit_code == 2, result.output
    assert f"Error: no space left on device while writing {run / match}" in result.output
    assert "Traceback" not in result.output
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]

    result = CliRunner().invoke(cli, ["fit-head", cache, *ARGS, "--out", str(run)])  # space freed: resume
    assert result.exit_code == 0, result.output
    def metrics(folder):  # all but the wall-clock time
        return {k: v for k, v in json.loads((folder / "metrics.json").read_text()).items() if k != "train_elapsed_s"}

    assert metrics(run) == metrics(whole)
    assert (run / "predictions.parquet").read_bytes() == (whole / "predictions.parquet").read_bytes()
