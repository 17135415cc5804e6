"""`geo report` with several test sets: every evaluation of every run, a table per test set, side by side."""

from __future__ import annotations

import csv

from geo.metrics import DISTANCE_SCALES_KM, accuracy_key
from geo.reports.build import build_report
from geo.reports.testsets import collect_test_sets
from geo.reports.runs import find_runs
from geo.training import runs as run_files
from support.runs import write_run


def write_eval(run_dir, name, acc, *, n=300, skipped=7, cache_path=None, half_width=0.01):
    folder = run_files.eval_dir(run_dir, name)
    folder.mkdir(parents=True)
    metrics = {"n": n, **{accuracy_key(s): acc for s in DISTANCE_SCALES_KM}, "median_km": 800.0, "mean_km": 900.0,
               "geoscore": 2000.0, "split": "test", "predict": "argmax", "test_set": name,
               "cache_path": cache_path or f"/data/{name}.h5", "cache_n_skipped": skipped}
    metrics["ci"] = {accuracy_key(s): [acc - half_width, acc + half_width] for s in DISTANCE_SCALES_KM}
    run_files.write_json(folder / run_files.METRICS_FILE, metrics)


def make_runs(root):
    """mvmf and softmax at c = 16 and 64; evaluated on im2gps3k (mvmf better) and osv5m (softmax better)."""
    for c in (16, 64):
        for head, own, im2gps, osv in (("mvmf", 0.30, 0.20, 0.10), ("softmax", 0.25, 0.12, 0.18)):
            run = write_run(root / f"{head}-c{c}", head=head, n_cells=c, kappa0=16.0 if head == "mvmf" else None,
                            acc=[own + (0.01 if c == 64 else 0)] * 5)
            write_eval(run, "im2gps3k", im2gps + (0.01 if c == 64 else 0))
            write_eval(run, "osv5m", osv, n=250, skipped=3)
            write_eval(run, "cache", 0.99, cache_path="/data/cache.h5")  # the run's own test split again
    return root


def test_collect_test_sets(tmp_path):
    runs, _ = find_runs([make_runs(tmp_path / "runs")])
    sets = collect_test_sets(runs)
    assert [t.name for t in sets] == ["cache", "im2gps3k", "osv5m"]
    assert [len(t.runs) for t in sets] == [4, 4, 4]
    own, im2gps, osv = sets
    assert own.runs[0].metric("acc@1km") != 0.99  # the repeated own evaluation is not read as another set
    assert im2gps.n_images == {300} and im2gps.n_skipped == {7} and osv.n_images == {250}
    mvmf16 = next(r for r in osv.runs if r.name == "mvmf-c16")
    assert mvmf16.metric("acc@25km") == 0.10 and mvmf16.predictions_path.parent.name == "osv5m"


def test_report_shows_every_test_set_side_by_side_with_claims_per_set(tmp_path):
    result = build_report([make_runs(tmp_path / "runs")], tmp_path / "out", n_maps=0)
    md = (tmp_path / "out" / "report.md").read_text()
    for title in ("## Test sets", "## Accuracy per test set, side by side", "## Test set cache",
                  "## Test set im2gps3k", "## Test set osv5m", "## Claims across test sets (direction only)"):
        assert title in md, title
    assert "| im2gps3k | /data/im2gps3k.h5 | 300 | 7 | 4 |" in md
    assert "| osv5m | /data/osv5m.h5 | 250 | 3 | 4 |" in md
    # Side by side: mvmf-c64's row holds its own, im2gps3k and osv5m accuracies (%).
    row = next(line for line in md.splitlines() if line.startswith("| mvmf-c64 |"))
    cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
    assert cells[4:9] == ["31.0"] * 5 and cells[9:14] == ["21.0"] * 5 and cells[14:19] == ["10.0"] * 5
    # Claim 3 (MvMF beats softmax) holds on the own split and im2gps3k, fails on osv5m.
    assert ("Claim 3: holds on 2 of 3 test sets (cache, im2gps3k); fails on 1 of 3 test sets (osv5m)" in md)
    assert (tmp_path / "out" / "figures" / "accuracy_vs_c_osv5m.png").is_file()
    html = (tmp_path / "out" / "index.html").read_text()
    assert '<th colspan="5">im2gps3k</th>' in html
    with open(tmp_path / "out" / "table.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({r["test_set"] for r in rows}) == ["cache", "im2gps3k", "osv5m"] and len(rows) == 12
    assert len(result.runs) == 4
