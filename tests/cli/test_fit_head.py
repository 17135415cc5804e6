"""`geo fit-head` and `geo evaluate` through click's CliRunner."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from support.caches import make_location_cache
from geo.cli import cli
from geo.training.config import FitConfig

ARGS = ["--n-cells", "32", "--batch-size", "256", "--epochs", "2", "--lr", "0.05", "--device", "cpu",
        "--precision", "fp32", "--quiet"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(make_location_cache(tmp_path_factory.mktemp("cache") / "loc.h5", n=1500))


def test_fit_head_then_evaluate(cache, tmp_path):
    out = tmp_path / "runs" / "mvmf"
    result = CliRunner().invoke(cli, ["fit-head", cache, "--head", "mvmf", "--kappa0", "12", "--fixed-mu",
                                      *ARGS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "acc@750 km" in result.output and "GeoScore" in result.output and "NLL" in result.output
    assert "country acc" in result.output  # the CLI passes the offline country lookup
    assert "metrics.json" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["kappa0"] == 12.0 and config["train_mu"] is False and config["n_cells"] == 32
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["country_acc"] <= 1

    own = (out / "metrics.json").read_bytes()
    result = CliRunner().invoke(cli, ["evaluate", str(out), "--split", "val"])
    assert result.exit_code == 0, result.output
    assert "val split" in result.output and str(out / "eval" / "loc-val") in result.output
    assert json.loads((out / "eval" / "loc-val" / "metrics.json").read_text())["split"] == "val"
    assert (out / "metrics.json").read_bytes() == own  # the run's own test metrics stay
    result = CliRunner().invoke(cli, ["evaluate", str(out), "--cache", cache, "--name", "again"])
    assert result.exit_code == 0, result.output
    again = json.loads((out / "eval" / "again" / "metrics.json").read_text())
    assert again["test_set"] == "again" and again["acc@750km"] == metrics["acc@750km"]
    result = CliRunner().invoke(cli, ["evaluate", str(out), "--name", "../up"])
    assert result.exit_code == 2 and "--name '../up'" in result.output


def test_evaluate_several_runs_in_one_call(cache, tmp_path):
    runs = [tmp_path / "runs" / head for head in ("mvmf", "softmax")]
    for run in runs:
        result = CliRunner().invoke(cli, ["fit-head", cache, "--head", run.name, *ARGS, "--out", str(run)])
        assert result.exit_code == 0, result.output
    # a folder that is not a run is refused before anything is written
    result = CliRunner().invoke(cli, ["evaluate", *map(str, runs), str(tmp_path), "--cache", cache, "--name", "x"])
    assert result.exit_code == 2 and f"{tmp_path}: not a run directory" in result.output
    assert not any((run / "eval" / "x").exists() for run in runs)
    result = CliRunner().invoke(cli, ["evaluate", *map(str, runs), "--cache", cache, "--name", "x", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.count("wrote ") == 2 and "GeoScore" not in result.output
    for run in runs:
        again = json.loads((run / "eval" / "x" / "metrics.json").read_text())
        own = json.loads((run / "metrics.json").read_text())
        assert again["test_set"] == "x" and again["acc@750km"] == own["acc@750km"]


def test_user_errors_exit_2_with_a_message(cache, tmp_path):
    runner = CliRunner()
    # A mode the head does not offer (softmax offers "mode": its density is p(cell) / area, see test_softmax).
    result = runner.invoke(cli, ["fit-head", cache, "--head", "mvmf", "--predict", "centre", *ARGS,
                                 "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "Error: --predict centre is not available for head 'mvmf'" in result.output
    result = runner.invoke(cli, ["fit-head", cache, "--head", "planet", *ARGS, "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "known heads: flow, knn, mvmf, regression, softmax, softmax-hier, " in result.output
    assert runner.invoke(cli, ["fit-head", cache, "--head", "softmax", *ARGS, "--out", str(tmp_path / "c")]
                         ).exit_code == 0
    result = runner.invoke(cli, ["fit-head", cache, "--head", "softmax", *ARGS, "--seed", "1",
                                 "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "seed: 0 -> 1" in result.output and "--overwrite" in result.output


def test_cli_defaults_are_the_library_defaults():
    """`geo fit-head` with no options trains exactly what FitConfig() describes."""
    command = cli.commands["fit-head"]
    defaults = {p.name: p.default for p in command.params}
    for field in dataclasses.fields(FitConfig):
        assert field.name in defaults, f"fit-head has no option for {field.name}"
        assert defaults[field.name] == field.default, field.name


@pytest.mark.parametrize("name", ["fit-head", "evaluate"])
def test_help_has_an_example(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0 and "Example:" in result.output
