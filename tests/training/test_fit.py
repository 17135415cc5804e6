"""fit_head / evaluate_run end to end on a small generated cache whose features carry location."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from support.caches import CITIES, make_location_cache
from geo.errors import CacheError, ConfigError
from geo.geometry import latlon_to_xyz, xyz_to_latlon
from geo.heads import head_class, list_heads, register_head
from geo.training.evaluate import evaluate_run
from geo.heads.mvmf import MvMFHead
from geo.training import runs
from geo.training.config import FitConfig
from geo.training.fit import fit_head
from geo.training.runs import load_head
from geo.training.trainer import TrainingError, lr_at, train_step
from support.sphere import haversine_km

# Small and fast: 32 cells, a few epochs of 256-row batches over ~2000 training rows.
FAST = dict(n_cells=32, batch_size=256, epochs=4, lr=5e-2, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_location_cache(tmp_path_factory.mktemp("cache") / "loc.h5")


def _mean_baseline_acc750(cache_path) -> float:
    """acc@750km of predicting the normalised mean training location for every test image."""
    from geo.cache.store import FeatureCache

    with FeatureCache(cache_path) as c:
        train, test = c.split_rows("train"), c.split_rows("test")
        mean = latlon_to_xyz(c.lat_deg[train], c.lon_deg[train]).mean(0)
        lat, lon = xyz_to_latlon(mean / np.linalg.norm(mean))
        return float(np.mean(haversine_km(c.lat_deg[test], c.lon_deg[test], lat, lon) <= 750))


@pytest.mark.parametrize("head, options", [
    ("mvmf", {}), ("softmax", {"n_cells": 128}), ("softmax", {"predict": "mean"}),
    ("softmax", {"n_cells": 128, "label_smoothing_km": 300.0}),
    ("softmax-hier", {"n_cells": 128}), ("vmf", {"epochs": 15}), ("regression", {"epochs": 15}),
    ("knn", {"epochs": 1}), ("knn", {"epochs": 1, "predict": "nn", "knn_k": 4}), ("vmf-mixture", {"epochs": 15, "mixture_components": 4, "predict": "mode"}),
])
def test_heads_beat_the_mean_baseline(cache, tmp_path, head, options):
    # Softmax predicts at cell centres: it needs cells small enough around the cities.
    metrics = fit_head(cache, FitConfig(head=head, **dict(FAST, **options)), tmp_path / head, progress=False)
    baseline = _mean_baseline_acc750(cache)
    assert baseline < 0.2  # 12 cities across the globe: the mean location is near none of them
    assert metrics["acc@750km"] > baseline + 0.5
    assert metrics["split"] == "test" and set(metrics["ci"]) >= {"acc@750km", "geoscore"}
    # predictions.parquet: the documented columns, distances that agree with an independent haversine
    table = pq.read_table(tmp_path / head / "predictions.parquet").to_pydict()
    assert list(table) == ["id", "lat", "lon", "pred_lat", "pred_lon", "dist_km", "topk_lat", "topk_lon",
                           "topk_prob", "log_density", "hpd_level", "area50_km2", "area95_km2"]
    dist = haversine_km(*(np.array(table[k]) for k in ("lat", "lon", "pred_lat", "pred_lon")))
    np.testing.assert_allclose(table["dist_km"], dist, rtol=1e-9, atol=1e-6)
    assert np.mean(np.array(table["dist_km"]) <= 750) == pytest.approx(metrics["acc@750km"])
    probs = np.array(table["topk_prob"])
    assert probs.shape[1] == min(5, load_head(tmp_path / head).head.max_k) and np.all(np.diff(probs, axis=1) <= 0) and np.all(probs.sum(1) <= 1 + 1e-6)
    # the NLL in metrics.json is the mean of the per-row log densities
    assert metrics["nll_nats"] == pytest.approx(-np.mean(table["log_density"]), rel=1e-9)
    # calibration: coverage@95 is the fraction of rows whose HPD level is <= 0.95; the 95 % region is the larger
    hpd = np.array(table["hpd_level"])
    assert np.all((hpd >= 0) & (hpd <= 1))
    assert metrics["coverage@95"] == pytest.approx(np.mean(hpd <= 0.95))
    assert metrics["area95_km2"] == pytest.approx(np.median(table["area95_km2"]))
    assert np.all(np.array(table["area95_km2"]) >= np.array(table["area50_km2"]))
    assert 0 <= metrics["calibration_error"] <= 0.5 and "calibration_error" in metrics["ci"]


def _strip(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("train_elapsed_s", "elapsed_s", "knn_search_s", "knn_index_search_s")}


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(cache, tmp_path):
    config = FitConfig(head="mvmf", eval_every=5, **FAST)
    whole = fit_head(cache, config, tmp_path / "whole", progress=False)

    def kill_at_step_13(step, loss):
        if step == 13:
            raise KeyboardInterrupt  # like ^C: after the checkpoint of step 10, steps 11-13 are lost

    with pytest.raises(KeyboardInterrupt):
        fit_head(cache, config, tmp_path / "killed", progress=False, callback=kill_at_step_13)
    assert not (tmp_path / "killed" / "metrics.json").exists()  # nothing presented as a result
    steps_logged = [json.loads(s)["step"] for s in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == [5, 10]
    resumed = fit_head(cache, config, tmp_path / "killed", progress=False)

    assert _strip(resumed) == _strip(whole)
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    for key, value in a["head_state"].items():
        assert torch.equal(value, b["head_state"][key]), key
    log_a = [_strip(json.loads(s)) for s in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    log_b = [_strip(json.loads(s)) for s in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert log_a == log_b


def test_a_different_configuration_is_refused_unless_overwrite(cache, tmp_path):
    fit_head(cache, FitConfig(head="softmax", **dict(FAST, epochs=1)), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match=r"lr: 0.05 -> 0.01") as err:
        fit_head(cache, FitConfig(head="softmax", **dict(FAST, epochs=1, lr=0.01)), tmp_path / "run", progress=False)
    assert "1 keys differ" in str(err.value)
    metrics = fit_head(cache, FitConfig(head="softmax", **dict(FAST, epochs=1, lr=0.01)), tmp_path / "run",
                       progress=False, overwrite=True)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 0.01
    assert metrics["n"] > 0


def test_a_run_written_before_the_added_options_still_resumes(cache, tmp_path):
    """config.json of geo 0.1 lacks the options added since (train fraction, mixture K, ...): such a
    run is the same configuration while those keep their defaults, and different once one changes."""
    from geo.training.config import implied_by_older_runs

    first = fit_head(cache, FitConfig(head="mvmf", **dict(FAST, epochs=1)), tmp_path / "run", progress=False)
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    added = set(implied_by_older_runs(config))
    assert added <= set(config)
    path.write_text(json.dumps({k: v for k, v in config.items() if k not in added}))
    again = fit_head(cache, FitConfig(head="mvmf", **dict(FAST, epochs=1)), tmp_path / "run", progress=False)
    assert again["acc@750km"] == first["acc@750km"] and again["median_km"] == first["median_km"]
    with pytest.raises(ConfigError, match=r"train_fraction: 1.0 -> 0.5"):
        fit_head(cache, FitConfig(head="mvmf", train_fraction=0.5, **dict(FAST, epochs=1)), tmp_path / "run",
                 progress=False)


def test_config_json_holds_every_option_and_checkpoint_loads_weights_only(cache, tmp_path):
    config = FitConfig(head="mvmf", kappa0=10.0, train_kappa=False, mu_init="mean", **dict(FAST, epochs=1))
    fit_head(cache, config, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    for field in dataclasses.fields(FitConfig):
        assert field.name in saved, field.name
    assert saved["format"] == "geo-run/1" and saved["predict"] == "argmax" and saved["kappa0"] == 10.0
    assert saved["cache_provenance"] == {"backbone": "synthetic"}
    assert saved["head_options"]["mu_init"] == "mean"
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == saved["total_steps"] and checkpoint["config"]["kappa0"] == 10.0
    # kappa frozen: log kappa never moved from kappa0
    assert torch.all(checkpoint["head_state"]["log_kappa"] == 10.0)
    assert {"head_state", "partition", "optimizer", "best", "rng", "epoch", "batch_in_epoch"} <= set(checkpoint)


_NAN_HEAD = "test-nan-after-3-steps"
if _NAN_HEAD not in list_heads():
    @register_head(_NAN_HEAD)
    class _NanHead(MvMFHead):
        """An MvMF head whose loss turns NaN from its 4th training call on."""

        calls = 0

        def loss(self, logits, target_xyz):
            type(self).calls += 1
            loss = super().loss(logits, target_xyz)
            return loss * math.nan if type(self).calls > 3 else loss


def test_nan_loss_stops_with_step_ids_and_last_checkpoint(cache, tmp_path):
    head_class(_NAN_HEAD).calls = 0
    with pytest.raises(TrainingError) as err:
        fit_head(cache, FitConfig(head=_NAN_HEAD, eval_every=2, **FAST), tmp_path / "run", progress=False)
    message = str(err.value)
    assert "at step 4" in message and "ids img" in message
    assert str(tmp_path / "run" / "checkpoint.pt") in message
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 2


def test_bad_input_is_refused_with_a_clear_error(tmp_path, cache):
    no_val = make_location_cache(tmp_path / "noval.h5", n=400, splits=(0, 2))
    with pytest.raises(CacheError, match="needs a val split"):
        fit_head(no_val, FitConfig(**FAST), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="--predict centre is not available for head 'mvmf'"):
        fit_head(cache, FitConfig(head="mvmf", predict="centre", **FAST), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="unknown head 'nope'.*mvmf.*softmax"):
        fit_head(cache, FitConfig(head="nope", **FAST), tmp_path / "c", progress=False)
    with pytest.raises(ConfigError):
        fit_head(cache, FitConfig(head="mvmf", **dict(FAST, n_cells=10**6)), tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()  # nothing half-written, not even an empty folder


def test_evaluate_run_reproduces_the_final_metrics_and_checks_provenance(cache, tmp_path):
    run = tmp_path / "run"
    final = fit_head(cache, FitConfig(head="mvmf", **dict(FAST, epochs=2)), run, progress=False)
    again = evaluate_run(run)
    assert {k: again[k] for k in ("n", "acc@750km", "geoscore", "nll_nats", "ci")} == \
        {k: final[k] for k in ("n", "acc@750km", "geoscore", "nll_nats", "ci")}
    assert again["test_set"] == "loc" and Path(again["eval_dir"]) == run / "eval" / "loc"
    val = evaluate_run(run, split="val", n_bootstrap=0)
    assert val["split"] == "val" and json.loads((run / "eval" / "loc-val" / "metrics.json").read_text())["split"] == "val"
    assert json.loads((run / "metrics.json").read_text())["split"] == "test"
    other = make_location_cache(tmp_path / "other.h5", n=400, provenance={"backbone": "resnet18"})
    with pytest.raises(ConfigError, match="backbone: 'synthetic' -> 'resnet18'"):
        evaluate_run(run, cache_path=other)
    assert evaluate_run(run, cache_path=other, allow_other_provenance=True, n_bootstrap=0)["n"] > 0
    assert (run / "eval" / "other" / "predictions.parquet").is_file()
    with pytest.raises(ConfigError, match="--predict centre is not available for head 'mvmf'"):
        evaluate_run(run, predict="centre")


def test_fit_without_scoring_keeps_the_selected_head_and_writes_no_scores(cache, tmp_path):
    config = FitConfig(head="mvmf", select_by="nll_nats", **dict(FAST, epochs=3))
    val = fit_head(cache, config, tmp_path / "bare", progress=False, score=False)
    assert not (tmp_path / "bare" / "metrics.json").exists()
    assert not (tmp_path / "bare" / "predictions.parquet").exists()
    lines = runs.read_jsonl(tmp_path / "bare" / "metrics.jsonl")
    assert val["nll_nats"] == min(line["val_nll_nats"] for line in lines)
    # The checkpoint's selected head is the one a scored run of the same configuration selects and scores.
    fit_head(cache, config, tmp_path / "scored", progress=False)
    val_again = evaluate_run(tmp_path / "bare", split="val", n_bootstrap=0)
    assert val_again["nll_nats"] == pytest.approx(val["nll_nats"], rel=1e-6)
    assert evaluate_run(tmp_path / "bare", n_bootstrap=0)["nll_nats"] == pytest.approx(
        json.loads((tmp_path / "scored" / "metrics.json").read_text())["nll_nats"], rel=1e-6)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_evaluate_leaves_the_run_files_byte_identical(cache, tmp_path):
    """Another test set (same features, other manifest) goes to RUN/eval/NAME; the run's files stay."""
    run = tmp_path / "run"
    fit_head(cache, FitConfig(head="softmax", **dict(FAST, epochs=1)), run, progress=False)
    before = _hashes(run)
    provenance = json.loads((run / "config.json").read_text())["cache_provenance"]
    second = make_location_cache(tmp_path / "second.h5", n=300, seed=5,
                                 provenance=dict(provenance, manifest_sha256="ef56" * 16, like_cache="x.h5"))
    metrics = evaluate_run(run, cache_path=second, n_bootstrap=10)  # manifest keys differ: accepted
    assert metrics["test_set"] == "second" and metrics["cache_path"] == str(second)
    evaluate_run(run, cache_path=second, split="val", name="second-val", n_bootstrap=0)
    after = _hashes(run)
    assert {k: v for k, v in after.items() if not k.startswith("eval/")} == before
    assert sorted(k for k in after if k.startswith("eval/")) == [
        "eval/second-val/metrics.json", "eval/second-val/predictions.parquet",
        "eval/second/metrics.json", "eval/second/predictions.parquet"]
    assert runs.list_evaluations(run) == [run / "eval" / "second", run / "eval" / "second-val"]


def test_learning_rate_schedule_is_linear_warmup_then_cosine():
    config = {"lr": 1.0, "warmup_steps": 10, "total_steps": 110, "min_lr_fraction": 0.1}
    assert [lr_at(s, config) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(60, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, config) == pytest.approx(0.1)


def test_chunked_step_equals_one_whole_batch_step():
    """Chunking the batch (to bound [B, c] memory) gives the whole-batch gradient and step."""

    class Part:  # the attributes an MvMF head reads
        centres_xyz = latlon_to_xyz(np.array(CITIES)[:, 0], np.array(CITIES)[:, 1])
        means_xyz = centres_xyz
        n_cells = len(CITIES)

    torch.manual_seed(0)
    features = torch.randn(50, 8, dtype=torch.float64)
    target = torch.nn.functional.normalize(torch.randn(50, 3, dtype=torch.float64), dim=1)
    results = []
    for chunk in (50, 7):
        torch.manual_seed(1)
        head = MvMFHead(8, Part(), kappa0=3.0).double()
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
        loss = train_step(head, optimizer, features, {"target_xyz": target}, chunk)
        results.append((float(loss), [p.detach().clone() for p in head.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_calibrating_head_is_calibrated_on_val_before_selection(cache, tmp_path):
    # The regression head declares needs_calibration: its kappa is the MLE on the val split of the
    # selected weights, saved with them (no `if name ==` anywhere in the trainer).
    from geo.cache.store import FeatureCache
    from geo.heads.regression import fit_log_kappa

    fit_head(cache, FitConfig(head="regression", **dict(FAST, epochs=2)), tmp_path / "run", progress=False)
    head = load_head(tmp_path / "run").head
    with FeatureCache(cache) as c:
        val = c.split_rows("val")
        out = head(torch.from_numpy(c.load_features(np.sort(val)).astype(np.float32))).detach().double().numpy()
        y = latlon_to_xyz(c.lat_deg[np.sort(val)], c.lon_deg[np.sort(val)])
    s = np.mean(0.5 * np.sum((out - y) ** 2, axis=1))
    assert float(head.log_kappa) == pytest.approx(fit_log_kappa(s), abs=1e-5)
    assert float(head.log_kappa) != 0.0  # not the uncalibrated kappa = 1


def test_a_head_capping_its_val_rows_is_scored_on_one_seeded_subset(cache, tmp_path, monkeypatch):
    # Head.val_rows_cap: every val evaluation of a run scores the same seeded subset of that many
    # rows (the flow head's rows each cost ODE solves); the final test scoring stays whole.
    from geo.cache.store import FeatureCache
    from geo.training.evaluate import evaluate_split
    from geo.training.trainer import val_rows

    monkeypatch.setattr(MvMFHead, "val_rows_cap", 50)
    config = FitConfig(head="mvmf", select_by="nll_nats", **dict(FAST, epochs=2))
    fit_head(cache, config, tmp_path / "run", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / runs.METRICS_LOG_FILE).read_text().splitlines()]
    assert len(lines) == 2 and all(line["val_n"] == 50 for line in lines)
    saved = json.loads((tmp_path / "run" / runs.CONFIG_FILE).read_text())
    with FeatureCache(cache) as c:
        subset = val_rows(c, saved, 50)
        assert subset is not None and len(subset) == 50 and np.all(np.diff(subset) > 0)
        assert set(subset) <= set(c.split_rows("val").tolist())
        assert np.array_equal(subset, val_rows(c, saved, 50))  # a function of the seed alone
        assert not np.array_equal(subset, val_rows(c, dict(saved, seed=saved["seed"] + 1), 50))
        assert val_rows(c, saved, len(c.split_rows("val"))) is None  # a cap the split fits: the whole split
        n_test = len(c.split_rows("test"))
        # the selected (last) evaluation's NLL is the mean over exactly those 50 rows
        head = load_head(tmp_path / "run").head
        metrics, _ = evaluate_split(head, c, "val", predict="argmax", device=torch.device("cpu"),
                                    feature_dtype=torch.float32, batch_size=16, subset_rows=subset)
    best = min(lines, key=lambda line: line["val_nll_nats"])
    assert metrics["n"] == 50 and metrics["nll_nats"] == pytest.approx(best["val_nll_nats"], rel=1e-6)
    assert json.loads((tmp_path / "run" / runs.METRICS_FILE).read_text())["n"] == n_test
