"""Reading run directories: discovery, tolerance, skipped reasons, cache checks; the table exports."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from geo.training import runs as run_files
from geo.metrics import DISTANCE_SCALES_KM, summarize
from geo.reports import tables
from geo.reports.runs import SCALES_KM, ReportError, check_caches, find_runs, read_run
from support.runs import PROVENANCE, base_config, write_run, write_summarized_run


def test_scales_are_the_metrics_scales():
    assert SCALES_KM == DISTANCE_SCALES_KM


def test_run_dir_and_sweep_dirs_two_levels_down(tmp_path):
    write_run(tmp_path / "single", n_cells=16)
    write_run(tmp_path / "sweep" / "group" / "a", n_cells=64)
    write_run(tmp_path / "sweep" / "b", head="softmax", n_cells=64, kappa0=None)
    runs, skipped = find_runs([tmp_path / "single", tmp_path / "sweep", tmp_path / "single"])
    assert not skipped
    assert [(r.head, r.n_cells) for r in runs] == [("mvmf", 16), ("mvmf", 64), ("softmax", 64)]
    assert runs[2].kappa0 is None  # κ0 means nothing for softmax even though config.json has a default


def test_metrics_and_history_are_read_as_written(tmp_path):
    run_dir = write_summarized_run(tmp_path / "r", head="mvmf", n_cells=64, kappa0=12.0, scale_km=500, seed=3)
    # The numbers must be summarize's own for the same errors.
    rng = np.random.default_rng(3)
    dist_km = rng.exponential(500, size=200)
    expected = summarize(dist_km, log_density=rng.normal(-5, 1, size=200), n_bootstrap=0)
    run = read_run(run_dir)
    assert run.metric("nll_nats") == pytest.approx(expected["nll_nats"])
    assert run.metric("acc@750km") == pytest.approx(expected["acc@750km"])
    assert run.metric("median_km") == pytest.approx(expected["median_km"])
    lo, hi = run.ci("acc@750km")
    assert lo <= run.metric("acc@750km") <= hi
    assert run.kappa0 == 12.0 and run.predict == "argmax" and run.split == "test"
    # metrics.jsonl flattens val metrics as val_<key>; the dict-valued val_ci is dropped.
    assert [h["step"] for h in run.history] == [10, 20, 30]
    assert run.history[0]["val"]["acc@750km"] == pytest.approx(0.1) and "ci" not in run.history[0]["val"]
    assert run.best_val() == 3000.0  # val geoscore, max over the history


def test_torn_last_line_of_metrics_jsonl_is_ignored(tmp_path):
    run_dir = write_run(tmp_path / "r")
    with open(run_dir / run_files.METRICS_LOG_FILE, "a") as fh:
        fh.write('{"step": 40, "train_lo')
    assert len(read_run(run_dir).history) == 3


@pytest.mark.parametrize("damage, reason", [
    (lambda d: (d / "metrics.json").unlink(), "incomplete: missing metrics.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "corrupt: config.json is not valid JSON"),
    (lambda d: (d / "config.json").write_text(json.dumps(dict(base_config("mvmf", 16, 16), format="geo-run/2"))),
     "unknown format 'geo-run/2'"),
    (lambda d: (d / "metrics.json").write_text(json.dumps({"acc@1km": 0.1})), "corrupt: metrics.json lacks acc@25km"),
])
def test_bad_run_dirs_are_skipped_with_the_reason(tmp_path, damage, reason):
    write_run(tmp_path / "good")
    damage(write_run(tmp_path / "bad"))
    runs, skipped = find_runs([tmp_path, tmp_path / "missing"])
    assert [r.name for r in runs] == ["good"]
    assert [s.path.name for s in skipped] == ["bad", "missing"]
    assert skipped[0].reason.startswith(reason) and skipped[1].reason == "does not exist"


def test_mixed_caches_refused_unless_allowed_then_labelled(tmp_path):
    write_run(tmp_path / "a")
    other = base_config("mvmf", 64, 16, cache_path="/data/other.h5", provenance=dict(PROVENANCE, weights="ff" * 32))
    write_run(tmp_path / "b", config=other)
    # Same provenance except the creation time: the same features, not mixed.
    same = base_config("mvmf", 256, 16, provenance=dict(PROVENANCE, created="2027-01-01"))
    write_run(tmp_path / "c", config=same)
    runs, _ = find_runs([tmp_path])
    with pytest.raises(ReportError, match="different feature caches.*--allow-mixed-caches"):
        check_caches(runs, allow_mixed=False)
    assert all(r.cache_label is None for r in runs)
    labels = check_caches(runs, allow_mixed=True)
    assert len(labels) == 2
    assert runs[0].cache_label == runs[2].cache_label != runs[1].cache_label
    assert "other.h5" in labels[runs[1].cache_label]
    assert "cache" in tables.to_markdown(runs).splitlines()[0]


def test_table_marks_best_per_column_and_exports_numbers(tmp_path):
    write_run(tmp_path / "a", n_cells=16, acc=[0.1, 0.2, 0.3, 0.4, 0.5], nll=4.0)
    write_run(tmp_path / "b", n_cells=64, acc=[0.2, 0.1, 0.3, 0.4, 0.6], nll=6.0)
    write_run(tmp_path / "s", head="softmax", n_cells=64, kappa0=None, acc=[0.0, 0.0, 0.1, 0.2, 0.3])
    runs, _ = find_runs([tmp_path])
    md = tables.to_markdown(runs).splitlines()
    a, b, s = (line.split(" | ") for line in md[2:])
    assert a[4] == "10.0 [9.0, 11.0]" and b[4] == "**20.0 [19.0, 21.0]**"  # @1 km
    assert a[5].startswith("**20.0") and b[5] == "10.0 [9.0, 11.0]"  # @25 km
    assert a[6].startswith("**30.0") and b[6].startswith("**30.0")  # ties are all marked
    nll = md[0].split(" | ").index("NLL (nats)")
    assert a[nll].startswith("**4.00") and s[nll].strip(" |") == "–"  # lower NLL is better; softmax has none
    # calibration columns: none in these runs' metrics.json (scored before calibration existed)
    assert s[-1].strip(" |") == "–" and "cov@95 (%)" in md[0] and "calib. err (%)" in md[0]
    assert "2^4" in a[1] and "2^6" in b[1]
    html = tables.to_html(runs)
    assert html.count("<strong>") == sum(line.count("**") // 2 for line in md)

    csv_path, parquet_path = tables.write_exports(runs, tmp_path)
    table = pq.read_table(parquet_path).to_pylist()
    assert pacsv.read_csv(csv_path).num_rows == 3
    assert table[1]["acc@2500km"] == 0.6 and table[1]["acc@2500km_lo"] == pytest.approx(0.59)
    assert table[2]["kappa0"] is None and table[2]["nll_nats"] is None
