"""The field's protocol end to end: train on MP-16 as distributed, evaluate on Im2GPS3k and OSV-5M as distributed.

MP-16-layout fixture (MessagePack shards + places365 CSV) -> manifest -> extract (fine-tune) ->
fit-head (mvmf, softmax); Im2GPS3k (folder + CSV) and OSV-5M (zip shards + CSV) -> manifests ->
extract --like the training cache -> evaluate both runs on both -> one report showing three test sets.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

from support.datasets import write_mp16, write_osv5m, write_places365_folder
from geo.cli import cli

pytestmark = pytest.mark.slow


def _ok(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _hashes(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_on_mp16_evaluate_on_im2gps3k_and_osv5m(tmp_path):
    write_mp16(tmp_path / "mp16", n=60, no_image=(2,), no_metadata=(70,))
    write_places365_folder(tmp_path / "im", "im2gps3k")
    write_osv5m(tmp_path / "osv")
    _ok("manifest", "mp16", "--csv", tmp_path / "mp16" / "mp16_places365.csv", "--images", tmp_path / "mp16" / "shards",
        "--out", tmp_path / "mp16.parquet")
    _ok("manifest", "im2gps3k", "--csv", tmp_path / "im" / "im2gps3k_places365.csv", "--images",
        tmp_path / "im" / "im2gps3k", "--out", tmp_path / "im2gps3k.parquet")
    _ok("manifest", "osv5m", tmp_path / "osv", "--split", "test", "--out", tmp_path / "osv5m.parquet")
    tiny = ["--backbone", "resnet18", "--image-size", "32", "--batch-size", "8", "--precision", "fp32",
            "--workers", "1"]
    _ok("extract", tmp_path / "mp16.parquet", "--out", tmp_path / "mp16.h5", *tiny, "--finetune-epochs", "1")
    checkpoint = tmp_path / "mp16.checkpoints" / "backbone.pt"
    before = checkpoint.read_bytes()
    for name in ("im2gps3k", "osv5m"):
        _ok("extract", tmp_path / f"{name}.parquet", "--like", tmp_path / "mp16.h5", "--out", tmp_path / f"{name}.h5",
            "--workers", "1")
    assert checkpoint.read_bytes() == before  # no fine-tuning, nothing re-saved
    fit = ["--n-cells", "6", "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--precision", "fp32", "--quiet"]
    for head in ("mvmf", "softmax"):
        _ok("fit-head", tmp_path / "mp16.h5", "--head", head, *fit, "--out", tmp_path / "runs" / head)
    run = tmp_path / "runs" / "mvmf"
    own = {p: h for p, h in _hashes(run).items()}
    for head in ("mvmf", "softmax"):
        for name in ("im2gps3k", "osv5m"):
            _ok("evaluate", tmp_path / "runs" / head, "--cache", tmp_path / f"{name}.h5")
    assert {p: h for p, h in _hashes(run).items() if "eval" not in p.relative_to(run).parts} == own
    metrics = json.loads((run / "eval" / "osv5m" / "metrics.json").read_text())
    assert metrics["n"] == 23 and metrics["test_set"] == "osv5m" and metrics["cache_n_skipped"] == 0
    assert json.loads((run / "eval" / "im2gps3k" / "metrics.json").read_text())["n"] == 23

    _ok("report", tmp_path / "runs", "--out", tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    for name in ("mp16", "im2gps3k", "osv5m"):
        assert f"## Test set {name} " in md, name
    assert "| im2gps3k |" in md and "| osv5m |" in md and "Claims across test sets (direction only)" in md
