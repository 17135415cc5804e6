"""Verdicts of the claims on constructed runs where each claim holds, fails, or cannot be told."""

from __future__ import annotations

import numpy as np
import pytest

from geo.reports.claims import (FAILS, HOLDS, INCONCLUSIVE, claim_kappa0_scales, claim_mvmf_beats_softmax,
                                claim_mvmf_calibrated, claim_mvmf_data_efficient, claim_mvmf_rises,
                                claim_softmax_not_monotone, compare,
                                evaluate_claims, learning_curve_claims)
from geo.reports.runs import find_runs
from support.runs import write_run


def runs_of(tmp_path, specs):
    """specs: (head, c, kappa0, acc list over the five scales, half width) -> Runs as read back from disk."""
    for i, (head, c, kappa0, acc, half) in enumerate(specs):
        write_run(tmp_path / f"r{i}", head=head, n_cells=c, kappa0=kappa0, acc=acc, half_width=half)
    runs, skipped = find_runs([tmp_path])
    assert not skipped
    return runs


def rising(base, step, n):
    """n accuracy vectors rising by `step` at every scale."""
    return [[base + step * i] * 5 for i in range(n)]


def test_compare_uses_interval_separation(tmp_path):
    low, high, near = runs_of(tmp_path, [("mvmf", 16, 16, [0.1] * 5, 0.01), ("mvmf", 64, 16, [0.3] * 5, 0.01),
                                         ("mvmf", 256, 16, [0.105] * 5, 0.01)])
    assert compare(high, low, "acc@25km") == "higher"
    assert compare(low, high, "acc@25km") == "lower"
    assert compare(near, low, "acc@25km") == "overlap"  # 0.105 ± 0.01 overlaps 0.1 ± 0.01


def test_mvmf_rise_holds_when_every_step_is_significant(tmp_path):
    specs = [("mvmf", c, 16, acc, 0.01) for c, acc in zip((16, 64, 256), rising(0.1, 0.1, 3))]
    claim = claim_mvmf_rises(runs_of(tmp_path, specs))
    assert claim.verdict == HOLDS
    assert len(claim.details) == 5  # one series x five scales, each with its numbers
    assert "c=2^4: 10.0% [9.0, 11.0]" in claim.details[0]


def test_mvmf_rise_fails_on_a_significant_drop_at_one_scale(tmp_path):
    accs = rising(0.1, 0.1, 3)
    accs[2][3] = 0.05  # @750 km falls far below c=64's 0.2 at c=256
    specs = [("mvmf", c, 16, acc, 0.01) for c, acc in zip((16, 64, 256), accs)]
    claim = claim_mvmf_rises(runs_of(tmp_path, specs))
    assert claim.verdict == FAILS
    assert any("@750 km" in d and "falls significantly at c=2^8" in d for d in claim.details)


def test_mvmf_rise_inconclusive_when_intervals_overlap(tmp_path):
    specs = [("mvmf", c, 16, acc, 0.2) for c, acc in zip((16, 64, 256), rising(0.3, 0.05, 3))]
    assert claim_mvmf_rises(runs_of(tmp_path, specs)).verdict == INCONCLUSIVE


def test_mvmf_rise_not_tested_with_one_value_of_c(tmp_path):
    claim = claim_mvmf_rises(runs_of(tmp_path, [("mvmf", 16, 16, [0.1] * 5, 0.01), ("mvmf", 16, 8, [0.1] * 5, 0.01)]))
    assert claim.verdict.startswith("not tested: needs mvmf runs at ≥ 2 values of c")


def test_softmax_not_monotone_holds_on_a_drop_and_fails_on_a_clean_rise(tmp_path):
    accs = rising(0.1, 0.1, 3)
    accs[1][0] = 0.0  # @1 km drops from 0.1 at c=16 to 0.0 at c=64, intervals apart
    runs = runs_of(tmp_path / "drop", [("softmax", c, None, a, 0.01) for c, a in zip((16, 64, 256), accs)])
    assert claim_softmax_not_monotone(runs).verdict == HOLDS
    runs = runs_of(tmp_path / "rise", [("softmax", c, None, a, 0.01)
                                       for c, a in zip((16, 64, 256), rising(0.1, 0.1, 3))])
    assert claim_softmax_not_monotone(runs).verdict == FAILS


def test_mvmf_beats_softmax(tmp_path):
    better = runs_of(tmp_path / "a", [("mvmf", 64, 16, [0.4] * 5, 0.01), ("softmax", 64, None, [0.2] * 5, 0.01)])
    assert claim_mvmf_beats_softmax(better).verdict == HOLDS
    worse_at_one_scale = runs_of(tmp_path / "b", [("mvmf", 64, 16, [0.4, 0.4, 0.4, 0.4, 0.1], 0.01),
                                                  ("softmax", 64, None, [0.2] * 5, 0.01)])
    claim = claim_mvmf_beats_softmax(worse_at_one_scale)
    assert claim.verdict == FAILS
    assert "c=2^6 @2500 km: mvmf (r0) 10.0% [9.0, 11.0] vs softmax (r1) 20.0% [19.0, 21.0]: fails" in claim.details
    no_common_c = runs_of(tmp_path / "c", [("mvmf", 64, 16, [0.4] * 5, 0.01), ("softmax", 16, None, [0.2] * 5, 0.01)])
    assert claim_mvmf_beats_softmax(no_common_c).verdict.startswith("not tested")


def test_kappa0_claim(tmp_path):
    # Large κ0 better at 1 and 25 km, small κ0 better at 2500 km: as the paper says.
    as_paper = runs_of(tmp_path / "a", [("mvmf", 64, 16, [0.3, 0.3, 0.3, 0.3, 0.5], 0.01),
                                        ("mvmf", 64, 12, [0.2, 0.2, 0.3, 0.3, 0.6], 0.01),
                                        ("mvmf", 64, 8, [0.1, 0.1, 0.3, 0.3, 0.7], 0.01)])
    claim = claim_kappa0_scales(as_paper)
    assert claim.verdict == HOLDS
    assert len(claim.details) == 3  # largest vs smallest κ0 at 1, 25 and 2500 km
    reversed_ = runs_of(tmp_path / "b", [("mvmf", 64, 16, [0.1, 0.1, 0.3, 0.3, 0.7], 0.01),
                                         ("mvmf", 64, 8, [0.3, 0.3, 0.3, 0.3, 0.5], 0.01)])
    assert claim_kappa0_scales(reversed_).verdict == FAILS
    one_kappa = runs_of(tmp_path / "c", [("mvmf", 64, 16, [0.1] * 5, 0.01), ("mvmf", 256, 16, [0.1] * 5, 0.01)])
    assert claim_kappa0_scales(one_kappa).verdict.startswith("not tested: needs mvmf runs at ≥ 2 values of κ0")


def test_duplicates_resolved_by_validation_not_test(tmp_path):
    """Two mvmf runs at one c: the better-on-validation one is compared, even if worse on test."""
    write_run(tmp_path / "good_val", n_cells=64, acc=[0.1] * 5, val_geoscore=4000.0)
    write_run(tmp_path / "bad_val", n_cells=64, acc=[0.9] * 5, val_geoscore=100.0)
    write_run(tmp_path / "soft", head="softmax", n_cells=64, kappa0=None, acc=[0.5] * 5)
    runs, _ = find_runs([tmp_path])
    claim = claim_mvmf_beats_softmax(runs)
    assert claim.verdict == FAILS and all("mvmf (good_val)" in d for d in claim.details)


@pytest.mark.parametrize("n_runs", [1, 4])
def test_every_claim_has_a_verdict(tmp_path, n_runs):
    specs = [("mvmf", 16 * 4 ** i, 16, [0.1 * (i + 1)] * 5, 0.01) for i in range(n_runs)]
    claims = evaluate_claims(runs_of(tmp_path, specs))
    assert [c.number for c in claims] == [1, 2, 3, 4, 7]  # 6 (end to end) only with end-to-end runs
    assert all(c.verdict in (HOLDS, FAILS, INCONCLUSIVE) or c.verdict.startswith("not tested: needs") for c in claims)


# ---- claim 5: data efficiency, from learning curves (runs on several training-set sizes) -------------------

def curve_runs(tmp_path, specs):
    """specs: (head, n_train, acc at the five scales, half width[, val geoscore]) -> Runs read back from disk."""
    for i, (head, n_train, acc, half, *val) in enumerate(specs):
        write_run(tmp_path / f"{head}-n{n_train}-{i}", head=head, n_cells=64, kappa0=16.0 if head == "mvmf" else None,
                  acc=acc, half_width=half, n_train=n_train, train_fraction=n_train / 1000,
                  val_geoscore=val[0] if val else None)
    runs, skipped = find_runs([tmp_path])
    assert not skipped
    return runs


def test_data_efficiency_holds_when_the_mvmf_curve_lies_above_softmax_at_every_size_and_scale(tmp_path):
    runs = curve_runs(tmp_path, [("mvmf", 100, [0.3] * 5, 0.01), ("mvmf", 1000, [0.5] * 5, 0.01),
                                 ("softmax", 100, [0.1] * 5, 0.01), ("softmax", 1000, [0.3] * 5, 0.01)])
    claim = claim_mvmf_data_efficient(runs)
    assert claim.number == 5 and claim.verdict == HOLDS
    assert claim.details[0].startswith("retrieval (knn): not tested")  # no knn runs: softmax only, said so
    assert len(claim.details) == 1 + 2 * 4  # two sizes x @25, @200, @750, @2500 km
    assert ("n=100 (f=0.1) @750 km: mvmf (mvmf-n100-0) 30.0% [29.0, 31.0] vs softmax (softmax-n100-2) "
            "10.0% [9.0, 11.0]: holds") in claim.details
    assert not any("@1 km" in d for d in claim.details)
    # the learning-curve claims are reported after the paper's four
    assert [c.number for c in learning_curve_claims(runs)] == [5]


def test_data_efficiency_fails_where_a_competitor_reaches_an_accuracy_with_less_data(tmp_path):
    # softmax at 100 rows is significantly above the MvMF at 100 rows at 2500 km: it reaches 40 % with less data
    runs = curve_runs(tmp_path, [("mvmf", 100, [0.3, 0.3, 0.3, 0.3, 0.3], 0.01), ("mvmf", 1000, [0.5] * 5, 0.01),
                                 ("softmax", 100, [0.1, 0.1, 0.1, 0.1, 0.4], 0.01),
                                 ("softmax", 1000, [0.3] * 5, 0.01)])
    claim = claim_mvmf_data_efficient(runs)
    assert claim.verdict == FAILS
    assert [d for d in claim.details if d.endswith("fails")] == [
        "n=100 (f=0.1) @2500 km: mvmf (mvmf-n100-0) 30.0% [29.0, 31.0] vs softmax (softmax-n100-2) "
        "40.0% [39.0, 41.0]: fails"]


def test_data_efficiency_compares_with_knn_when_present(tmp_path):
    base = [("mvmf", 100, [0.3] * 5, 0.01), ("mvmf", 1000, [0.5] * 5, 0.01),
            ("softmax", 100, [0.1] * 5, 0.01), ("softmax", 1000, [0.3] * 5, 0.01)]
    worse = curve_runs(tmp_path / "a", base + [("knn", 100, [0.2] * 5, 0.01), ("knn", 1000, [0.25] * 5, 0.01)])
    claim = claim_mvmf_data_efficient(worse)
    assert claim.verdict == HOLDS and len(claim.details) == 2 * 2 * 4  # (softmax, knn) x 2 sizes x 4 scales
    assert sum(" vs knn (knn-n1000-" in d for d in claim.details) == 4
    better_at_large_n = curve_runs(tmp_path / "b", base + [("knn", 100, [0.2] * 5, 0.01),
                                                           ("knn", 1000, [0.7] * 5, 0.01)])
    assert claim_mvmf_data_efficient(better_at_large_n).verdict == FAILS


def test_data_efficiency_inconclusive_when_intervals_overlap(tmp_path):
    runs = curve_runs(tmp_path, [("mvmf", 100, [0.3] * 5, 0.1), ("mvmf", 1000, [0.5] * 5, 0.01),
                                 ("softmax", 100, [0.25] * 5, 0.1), ("softmax", 1000, [0.3] * 5, 0.01)])
    claim = claim_mvmf_data_efficient(runs)
    assert claim.verdict == INCONCLUSIVE
    assert sum(d.endswith("inconclusive") for d in claim.details) == 4 and sum(d.endswith("holds")
                                                                               for d in claim.details) == 4


def test_data_efficiency_not_tested_without_several_sizes_or_the_compared_heads(tmp_path):
    one_size = curve_runs(tmp_path / "a", [("mvmf", 1000, [0.5] * 5, 0.01), ("softmax", 1000, [0.3] * 5, 0.01)])
    no_softmax = curve_runs(tmp_path / "b", [("mvmf", 100, [0.3] * 5, 0.01), ("mvmf", 1000, [0.5] * 5, 0.01),
                                             ("knn", 100, [0.1] * 5, 0.01), ("knn", 1000, [0.3] * 5, 0.01)])
    other_sizes = curve_runs(tmp_path / "c", [("mvmf", 100, [0.3] * 5, 0.01), ("mvmf", 1000, [0.5] * 5, 0.01),
                                              ("softmax", 300, [0.1] * 5, 0.01), ("softmax", 1000, [0.3] * 5, 0.01)])
    plain = runs_of(tmp_path / "d", [("mvmf", 64, 16, [0.4] * 5, 0.01), ("softmax", 64, None, [0.2] * 5, 0.01)])
    for runs in (one_size, no_softmax, other_sizes, plain):
        claim = claim_mvmf_data_efficient(runs)
        assert claim.verdict == ("not tested: needs mvmf and softmax runs on ≥ 2 common training-set sizes "
                                 "(geo sweep --train-fraction)") and not claim.details


def test_data_efficiency_picks_each_heads_best_run_on_validation_at_each_size(tmp_path):
    # two MvMF runs at 100 rows (say two values of c): the worse-on-test one is better on validation
    runs = curve_runs(tmp_path, [("mvmf", 100, [0.05] * 5, 0.01, 4000.0), ("mvmf", 100, [0.9] * 5, 0.01, 100.0),
                                 ("mvmf", 1000, [0.5] * 5, 0.01), ("softmax", 100, [0.1] * 5, 0.01),
                                 ("softmax", 1000, [0.3] * 5, 0.01)])
    claim = claim_mvmf_data_efficient(runs)
    assert claim.verdict == FAILS
    assert all("mvmf (mvmf-n100-0)" in d for d in claim.details if d.startswith("n=100 "))


def test_claims_on_c_compare_runs_on_the_same_training_data(tmp_path):
    # full-data MvMF beats full-data softmax; a 10 % MvMF run at the same c must not stand in for it
    runs = curve_runs(tmp_path, [("mvmf", 1000, [0.5] * 5, 0.01, 100.0), ("mvmf", 100, [0.1] * 5, 0.01, 4000.0),
                                 ("softmax", 1000, [0.3] * 5, 0.01)])
    claim = claim_mvmf_beats_softmax(runs)
    assert claim.verdict == HOLDS and all("mvmf (mvmf-n1000-0)" in d for d in claim.details)


# ---- claim 7: the MvMF's credible regions are better calibrated than softmax's and knn's ----------------------

def _with_hpd(run_dir, hpd: np.ndarray):
    """Give a synthetic run a predictions.parquet whose hpd_level column is ``hpd`` (ids img0, img1, ...)."""
    from geo.training import runs as run_files

    n = len(hpd)
    zeros = np.zeros(n)
    run_files.write_predictions(run_dir / run_files.PREDICTIONS_FILE, ids=np.array([f"img{i}" for i in range(n)]),
                                lat_deg=zeros, lon_deg=zeros, pred_lat_deg=zeros, pred_lon_deg=zeros, dist_km=zeros,
                                topk_lat_deg=zeros[:, None], topk_lon_deg=zeros[:, None],
                                topk_prob=np.ones((n, 1)), log_density=zeros, hpd_level=hpd,
                                area_km2=np.ones((n, 2)))


def calibration_runs(tmp_path, hpd_by_head: dict):
    for head, hpd in hpd_by_head.items():
        run_dir = write_run(tmp_path / head, head=head, n_cells=None if head == "knn" else 64,
                            kappa0=16.0 if head == "mvmf" else None, acc=[0.2] * 5)
        if hpd is not None:
            _with_hpd(run_dir, hpd)
    runs, skipped = find_runs([tmp_path])
    assert not skipped
    return runs


def test_paired_calibration_difference_is_the_difference_of_calibration_errors():
    from geo.metrics import calibration_error
    from geo.reports.paired import paired_calibration_difference

    rng = np.random.default_rng(0)
    a, b = rng.uniform(size=400), rng.uniform(size=400) ** 0.5
    diff = paired_calibration_difference(a, b, n_bootstrap=500)
    assert diff.difference == pytest.approx(calibration_error(a) - calibration_error(b), abs=1e-12)
    assert diff.low < diff.difference < diff.high and diff.n == 400
    assert diff.high < 0  # b (levels pushed towards 1: overconfident) is far worse calibrated


def test_mvmf_calibration_claim(tmp_path):
    rng = np.random.default_rng(1)
    n = 600
    calibrated = rng.uniform(size=n)
    overconfident = rng.uniform(size=n) ** 0.3   # truths mostly outside the regions that claim to hold them
    claim = claim_mvmf_calibrated(calibration_runs(tmp_path / "a", {"mvmf": calibrated, "softmax": overconfident,
                                                                   "knn": overconfident[::-1].copy()}))
    assert claim.number == 7 and claim.verdict == HOLDS, claim.details
    assert len(claim.details) == 2 and "vs softmax (softmax)" in claim.details[0] and "vs knn (knn)" in claim.details[1]
    assert "paired difference" in claim.details[0] and f"over {n} images" in claim.details[0]
    reversed_ = claim_mvmf_calibrated(calibration_runs(tmp_path / "b", {"mvmf": overconfident, "softmax": calibrated}))
    assert reversed_.verdict == FAILS
    alike = claim_mvmf_calibrated(calibration_runs(tmp_path / "c", {"mvmf": calibrated,
                                                                   "softmax": rng.uniform(size=n)}))
    assert alike.verdict == INCONCLUSIVE
    no_levels = claim_mvmf_calibrated(calibration_runs(tmp_path / "d", {"mvmf": None, "softmax": None}))
    assert no_levels.verdict.startswith("not tested: needs hpd_level")
    alone = claim_mvmf_calibrated(calibration_runs(tmp_path / "e", {"mvmf": calibrated}))
    assert alone.verdict.startswith("not tested: needs mvmf runs and softmax runs")


def test_reliability_diagram_draws_a_line_per_head(tmp_path):
    from geo.reports.plots import reliability_diagram

    rng = np.random.default_rng(2)
    runs = calibration_runs(tmp_path / "a", {"mvmf": rng.uniform(size=300), "softmax": rng.uniform(size=300) ** 0.3})
    fig = reliability_diagram(runs)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.lines]
    assert labels[0] == "calibrated" and any(label.startswith("mvmf") for label in labels) and \
        any(label.startswith("softmax") for label in labels)
    softmax_line = next(line for line in ax.lines if line.get_label().startswith("softmax"))
    x, y = softmax_line.get_data()
    assert y[list(x).index(50.0)] < 20  # u^0.3 <= 0.5 for 0.5^(1/0.3) = 10 % of images
    assert isinstance(reliability_diagram(calibration_runs(tmp_path / "b", {"mvmf": None})), str)
