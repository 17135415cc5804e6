"""What a test set can show: nearest-train distances recorded at scoring, "not testable here" scales,
flagged test sets, and the one-line-per-claim summaries with their sub-case tables."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from geo.metrics import DISTANCE_SCALES_KM, accuracy_key, uniform_accuracy
from geo.reports.baseline import densest_cell_baseline
from geo.reports.build import build_report
from geo.reports.claims import evaluate_claims, learning_curve_claims
from geo.reports.runs import find_runs
from geo.reports.scope import NOT_MEANINGFUL, NOT_TESTABLE, scope_of
from geo.training import runs as run_files
from geo.training.config import FitConfig
from geo.training.sweep import sweep
from support.caches import make_held_out_cache
from support.runs import write_run


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """mvmf and softmax at c = 8 and 16, trained on a cache whose test rows are all >= 500 km from train."""
    root = tmp_path_factory.mktemp("held_out")
    cache, nearest_km = make_held_out_cache(root / "held.h5", exclusion_km=500.0)
    sweep(cache, root / "runs", heads=["mvmf", "softmax"], n_cells=[8, 16], kappa0s=[12.0],
          base_config=FitConfig(batch_size=128, epochs=2, precision="fp32", device="cpu"), progress=False)
    build_report([root / "runs"], root / "report", n_maps=0)
    return root, cache, nearest_km


def test_scoring_records_the_nearest_train_distance_and_the_densest_cell_baseline(held_out):
    root, cache, nearest_km = held_out
    for run_dir in sorted(p for p in (root / "runs").iterdir() if p.is_dir()):
        metrics = json.loads((run_dir / run_files.METRICS_FILE).read_text())
        recorded = metrics["train_distance_km"]
        assert recorded["min"] == pytest.approx(nearest_km, rel=1e-6) and recorded["min"] >= 500.0
        assert recorded["n_train"] == 1500 and recorded["median"] > recorded["min"]
        # the densest-cell baseline of the run's own partition equals `geo baseline` (train split, same c)
        c = metrics["densest_cell"]["n_cells"]
        expected = densest_cell_baseline(cache, [c])[c]
        for s in DISTANCE_SCALES_KM:
            assert metrics["densest_cell"][accuracy_key(s)] == pytest.approx(expected[accuracy_key(s)])


def test_report_marks_scales_below_the_minimum_train_test_distance_as_not_testable(held_out):
    root, _, nearest_km = held_out
    md = (root / "report" / "report.md").read_text()
    html = (root / "report" / "index.html").read_text()
    # the block: images and distances, and which scales cannot be tested (1, 25, 200 km < 500 km <= 750 km)
    n_test = json.loads(next((root / "runs").glob("mvmf*/metrics.json")).read_text())["n"]
    assert f"**What this test set can show.** {n_test} images; from each test image to the nearest of the " \
           f"1,500 training images: minimum {nearest_km:,.0f} km" in md
    assert "Accuracy at 1, 25, 200 km is **not testable here**" in md
    assert "| testable here | no | no | no | yes | yes |" in md
    assert f"| uniform guessing (%) | 6e-07 | 0.0004 | 0.02 | 0.3 | {100 * uniform_accuracy(2500):.1f} |" in md
    # the results table shows n/t at those scales and numbers at 750 and 2500 km
    rows = [line for line in md.splitlines() if line.startswith("| mvmf | 2^")]
    assert rows and all(line.split(" | ").count("n/t") == 3 for line in rows)
    # claims: every sub-case at 1, 25 or 200 km is "not testable here", none of them inconclusive
    runs, _ = find_runs([root / "runs"])
    claims = evaluate_claims(runs)
    for claim in claims:
        for case in claim.subcases:
            at = re.search(r"@(\d+) km", case.case)
            if at is None:  # claim 7 (calibration) is not per distance scale
                continue
            assert (case.verdict == NOT_TESTABLE) == (int(at.group(1)) < nearest_km), (claim.number, case)
    assert sum(c.verdict == NOT_TESTABLE for claim in claims for c in claim.subcases) > 0
    assert "not testable here" in html and "<details><summary>" in html


def _runs_with(tmp_path, acc_mvmf, acc_softmax, rise=0.2):
    for c, bump in ((16, 0.0), (64, rise)):
        write_run(tmp_path / f"mvmf-c{c}", n_cells=c, acc=[a + bump for a in acc_mvmf], half_width=0.005)
        write_run(tmp_path / f"softmax-c{c}", head="softmax", n_cells=c, kappa0=None,
                  acc=[a + bump / 4 for a in acc_softmax], half_width=0.005)
    runs, _ = find_runs([tmp_path])
    return runs


def test_a_test_set_where_no_head_beats_uniform_guessing_at_2500_km_is_flagged(tmp_path):
    # every head at 2500 km below uniform guessing (3.8 %): flagged, every claim "not meaningful here"
    bad = _runs_with(tmp_path / "bad", [0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], rise=0.02)
    assert uniform_accuracy(2500) == pytest.approx(0.038, abs=0.001) and scope_of("x", bad).flagged
    build_report([tmp_path / "bad"], tmp_path / "out", n_maps=0, fmt="md")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**Flagged:** no head beats uniform guessing at 2500 km" in md
    verdicts = re.findall(r"\*\*Claim \d\.\*\* .*? Verdict: \*\*(.+?)\*\*", md)
    assert verdicts[:4] == [NOT_MEANINGFUL] * 4
    # one head whose interval at 2500 km lies above 3.8 % is enough: not flagged, claims computed
    good = _runs_with(tmp_path / "good", [0.0, 0.0, 0.0, 0.0, 0.05], [0.0, 0.0, 0.0, 0.0, 0.0])
    assert not scope_of("x", good).flagged
    build_report([tmp_path / "good"], tmp_path / "out2", n_maps=0, fmt="md")
    md = (tmp_path / "out2" / "report.md").read_text()
    assert "**Flagged:**" not in md and f"Verdict: **{NOT_MEANINGFUL}**" not in md


def test_each_claim_is_one_line_whose_counts_equal_its_sub_cases(tmp_path):
    runs = _runs_with(tmp_path / "runs", [0.1, 0.1, 0.2, 0.3, 0.5], [0.1, 0.1, 0.15, 0.2, 0.4])
    build_report([tmp_path / "runs"], tmp_path / "out", n_maps=0)
    md = (tmp_path / "out" / "report.md").read_text()
    html = (tmp_path / "out" / "index.html").read_text()
    for claim in [c for c in evaluate_claims(runs) if c.subcases]:
        counts = claim.counts()
        assert sum(counts.values()) == len(claim.subcases) > 0
        line = next(x for x in md.splitlines() if x.startswith(f"**Claim {claim.number}.**"))
        numbers = dict((word, int(n)) for n, word in re.findall(
            r"(\d+) (holds?|fails?|inconclusive|not testable here)", line.split("Verdict:")[1]))
        assert sum(numbers.values()) == len(claim.subcases)
        assert f"{len(claim.subcases)} sub-case" in line
        # the sub-cases follow as a table (Markdown) and a folded <details> (HTML), one row each
        table = md.split(line, 1)[1].split("\n\n", 2)[1]
        assert table.count("\n") - 1 == len(claim.subcases)
        assert all(f"| {case.case} |" in table for case in claim.subcases)
    with_cases = [c for c in evaluate_claims(runs) + learning_curve_claims(runs) if c.subcases]
    assert len(with_cases) == 3 and html.count("<details>") == 3  # claims 1-3 (4 and 5: not tested, one line)


def test_the_report_opens_with_the_fine_tunings_val_country_accuracy_against_the_majority_rate(tmp_path):
    from support.runs import PROVENANCE, base_config

    provenance = dict(PROVENANCE, finetune_epochs=4, finetune_val_country_acc=0.34, finetune_val_majority_acc=0.36)
    write_run(tmp_path / "runs" / "a", config=base_config("mvmf", 16, 16.0, provenance=provenance))
    build_report([tmp_path / "runs"], tmp_path / "out", n_maps=0, fmt="md")
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.split("\n\n")[2] == ("**Features** (`cache.h5`): the fine-tuning's val country accuracy is 34.0 % "
                                   "against a majority-country rate of 36.0 % (-2.0 points, after 4 epoch(s)).")
    write_run(tmp_path / "old" / "a")  # a cache made before geo recorded it
    build_report([tmp_path / "old"], tmp_path / "out2", n_maps=0, fmt="md")
    assert "val country accuracy is not recorded" in (tmp_path / "out2" / "report.md").read_text()
