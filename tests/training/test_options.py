"""Every bad option of fit-head and sweep is refused before any work, naming the option as typed.

The checks live in ``geo.training.config.check_options``; these tests drive the
CLI (what a user types) and check that nothing was written: no run folder, no
config.json, no sweep folder.
"""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from support.caches import make_location_cache
from geo.cli import cli
from geo.training.config import KAPPA0_RANGE, MIN_USEFUL_STEPS, FitConfig, check_options, few_steps_warning, selectable_metrics

ARGS = ["--batch-size", "64", "--epochs", "1", "--device", "cpu", "--precision", "fp32", "--quiet"]

# (options as typed, what the error must say)
BAD_OPTIONS = [
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--lr", "inf"], "--lr inf: must be a finite number"),
    (["--lr", "0"], "--lr 0.0: the learning rate must be > 0"),
    (["--lr", "-1e-3"], "--lr -0.001: the learning rate must be > 0"),
    (["--min-lr-fraction", "nan"], "--min-lr-fraction nan: must be a finite number"),
    (["--min-lr-fraction", "2"], "--min-lr-fraction 2.0: must be in [0, 1]"),
    (["--warmup-fraction", "inf"], "--warmup-fraction inf: must be a finite number"),
    (["--warmup-fraction", "1"], "--warmup-fraction 1.0: must be in [0, 1)"),
    (["--kappa0", "nan"], "--kappa0 nan: must be a finite number"),
    (["--kappa0=-50"], "--kappa0 -50.0: must be in [-13.8, 20.7]"),
    (["--kappa0", "100"], "--kappa0 100.0: must be in [-13.8, 20.7]"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be >= 0"),
    (["--weight-decay", "nan"], "--weight-decay nan: must be a finite number"),
    (["--select-by", "bogus"], "--select-by 'bogus': not a val metric of head 'mvmf'; choose one of: acc@1km"),
    (["--n-cells", "100000"], "--n-cells 100000: more cells than the"),
    (["--classes", "100000"], "--n-cells 100000: more cells than the"),
    (["--n-cells", "3"], "--n-cells 3: the partition starts from the 6 S2 faces"),
    (["--n-cells", "0"], "--n-cells 0: must be >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--eval-every", "-1"], "--eval-every -1: must be >= 0"),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(make_location_cache(tmp_path_factory.mktemp("cache") / "loc.h5", n=600))


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_fit_head_refuses_before_writing_anything(cache, tmp_path, options, message):
    out = tmp_path / "runs" / "r"
    result = CliRunner().invoke(cli, ["fit-head", cache, "--head", "mvmf", *ARGS, *options, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"Error: {message}" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # no run folder, no config.json


@pytest.mark.parametrize("options, message", [(["--lr", "nan,1e-3"], "--lr nan: must be a finite number"),
                                              (["--kappa0", "8,100"], "--kappa0 100.0: must be in"),
                                              (["--weight-decay", "-1"], "--weight-decay -1.0: must be >= 0"),
                                              (["--select-by", "bogus"], "--select-by 'bogus': not a val metric"),
                                              (["--classes", "24,100000"], "--n-cells 100000: more cells than")])
def test_sweep_refuses_before_writing_anything(cache, tmp_path, options, message):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli, ["sweep", cache, "--head", "mvmf", "--n-cells", "24", "--kappa0", "8",
                                      *ARGS, *options, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"Error: {message}" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_select_by_names_the_metrics_evaluation_gives(cache):
    """The selectable names are exactly the keys a val evaluation holds (nll_nats only with a density)."""
    from geo.metrics import summarize

    keys = set(summarize([1.0, 2.0], log_density=[0.0, 0.0], n_bootstrap=0)) - {"n", "ci"}
    assert set(selectable_metrics(True)) == keys
    assert set(selectable_metrics(False)) == keys - {"nll_nats"}
    check_options(FitConfig(head="mvmf", select_by="nll_nats"))
    check_options(FitConfig(head="softmax", select_by="acc@25km"))


def test_kappa0_range_is_the_tested_kappa_range_and_is_documented():
    # kappa = e^kappa0 from 1e-6 to 1e9 (the range tests/heads/test_mvmf_loss.py covers)
    assert math.exp(KAPPA0_RANGE[0]) == pytest.approx(1e-6) and math.exp(KAPPA0_RANGE[1]) == pytest.approx(1e9)
    check_options(FitConfig(kappa0=KAPPA0_RANGE[0]))
    check_options(FitConfig(kappa0=KAPPA0_RANGE[1]))
    help_text = " ".join(CliRunner().invoke(cli, ["fit-head", "--help"]).output.split())
    assert "[-13.8, 20.7]" in help_text and "1e-6 to 1e9" in help_text


def test_too_few_steps_warns_up_front_and_still_runs(cache, tmp_path):
    # 600 rows, 70 % train = ~420 rows at batch 1024 x 3 epochs = 3 steps: far under MIN_USEFUL_STEPS
    out = tmp_path / "few"
    result = CliRunner().invoke(
        cli, ["fit-head", cache, "--n-cells", "24", "--epochs", "3", "--device", "cpu", "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Warning: only 3 optimizer steps" in result.stderr
    assert "smaller --batch-size or more --epochs" in result.stderr
    # the threshold, both ways
    resolved = dict(total_steps=MIN_USEFUL_STEPS, n_train=1, batch_size=1, epochs=1)
    assert few_steps_warning(resolved) is None
    assert "99 optimizer steps" in few_steps_warning(dict(resolved, total_steps=MIN_USEFUL_STEPS - 1))
