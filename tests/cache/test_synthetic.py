"""geo.cache.synthetic: the known-density cache, its oracle against scipy, and the oracle gap in reports."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy.stats import vonmises_fisher

from geo.cache.store import FeatureCache
from geo.cache.synthetic import LEVELS, PATTERNS, oracle_path, sample_vmf, synthetic_rows, write_synthetic_cache
from geo.geometry import latlon_to_xyz

ANCHORS = (np.array([48.85, 40.71, 35.68, -33.87, 51.5, 52.52, 19.43, -23.55]),
           np.array([2.35, -74.0, 139.69, 151.21, -0.13, 13.4, -99.13, -46.63]))


def test_the_oracle_is_the_mixture_log_density_at_the_row():
    rows = synthetic_rows(*ANCHORS, n=300, feature_dim=16, seed=1)
    anchors = latlon_to_xyz(*ANCHORS)
    y = latlon_to_xyz(rows["lat_deg"], rows["lon_deg"])
    kappas = np.exp(np.array(list(LEVELS.values())))
    for i in range(0, 300, 7):
        mus = anchors[rows["neighbours"][rows["anchor"][i]]]
        kappa = kappas[rows["level"][i]]
        density = sum(w * math.exp(vonmises_fisher(mu, kappa).logpdf(y[i])) for w, mu in
                      zip(PATTERNS[rows["pattern"][i]], mus) if w > 0)
        assert rows["oracle_log_density"][i] == pytest.approx(math.log(density), abs=1e-9)


def test_vmf_draws_have_the_vmf_mean_resultant_length():
    rng = np.random.default_rng(0)
    mu = np.tile([[0.0, 0.6, 0.8]], (40000, 1))
    for kappa in (3.0, 200.0):
        y = sample_vmf(mu, np.full(40000, kappa), rng)
        z = y @ mu[0]
        expected = 1 / math.tanh(kappa) - 1 / kappa
        assert abs(z.mean() - expected) < 4 * z.std() / math.sqrt(40000)
        np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0)


def test_written_cache_and_oracle_gap_in_the_report(tmp_path):
    from geo.reports.build import build_report
    from geo.reports.oracle import oracle_gap
    from geo.reports.runs import read_run
    from geo.training.config import FitConfig
    from geo.training.fit import fit_head

    path = write_synthetic_cache(tmp_path / "synth.h5", *ANCHORS, n=1500, feature_dim=16, seed=2)
    with FeatureCache(path) as cache:
        assert cache.n_rows == 1500 and cache.feature_dim == 16
        ids = list(cache.ids)
    oracle = pq.read_table(oracle_path(path))
    assert oracle.column("id").to_pylist() == ids
    config = FitConfig(head="vmf-mixture", batch_size=256, epochs=2, lr=5e-2, precision="fp32", device="cpu")
    fit_head(path, config, tmp_path / "run", progress=False)
    run = read_run(tmp_path / "run")
    gap = oracle_gap(run)
    predictions = pq.read_table(tmp_path / "run" / "predictions.parquet")
    truth = dict(zip(ids, oracle.column("oracle_log_density").to_numpy()))
    expected = np.mean([truth[i] - lp for i, lp in zip(predictions.column("id").to_pylist(),
                                                        predictions.column("log_density").to_numpy())])
    assert gap["gap_nats"] == pytest.approx(expected, rel=1e-12) and gap["n"] == predictions.num_rows
    assert gap["ci"][0] < gap["gap_nats"] < gap["ci"][1]
    assert gap["gap_nats"] > 0  # two epochs of a small head are far from the truth
    result = build_report([tmp_path / "run"], tmp_path / "report", fmt="md", n_maps=0)
    text = (result.out_dir / "report.md").read_text()
    assert "NLL minus the oracle" in text and f"{gap['gap_nats']:.3f}" in text


def test_cli_data_synthetic(tmp_path):
    from click.testing import CliRunner

    from geo.cli import cli

    out = tmp_path / "s.h5"
    result = CliRunner().invoke(cli, ["data", "synthetic", "--out", str(out), "--n", "100", "--dim", "8"])
    assert result.exit_code == 0, result.output
    assert out.exists() and oracle_path(out).exists() and str(oracle_path(out)) in result.output
    again = CliRunner().invoke(cli, ["data", "synthetic", "--out", str(out), "--n", "100"])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = CliRunner().invoke(cli, ["data", "synthetic", "--out", str(tmp_path / "t.h5"), "--n", "3"])
    assert bad.exit_code == 2 and "--n must be >= 10" in bad.output
