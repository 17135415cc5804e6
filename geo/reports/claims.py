"""Computed verdicts on the paper's claims, from the runs at hand (rules in ``METHOD``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from geo.reports.paired import (PairedDifference, matched_errors, matched_hpd_levels, paired_accuracy_difference,
                                paired_calibration_difference)
from geo.reports.runs import ACC_KEYS, END_TO_END, FROZEN, SCALES_KM, Run, group_series, pick_one, series_label
from geo.reports.scope import NOT_MEANINGFUL, NOT_TESTABLE, testable
from geo.reports.tables import format_cells

HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"
NOT_TESTED = "not tested"  # a claim the runs cannot test ("not tested: needs ..."), in summaries
FINE_SCALES_KM, COARSE_SCALES_KM = (1, 25), (2500,)
MVMF, SOFTMAX = "mvmf", "softmax"
# Retrieval (nearest neighbours in feature space, Im2GPS-style): claim 5 compares it when runs of it exist.
KNN = "knn"
DATA_SCALES_KM = (25, 200, 750, 2500)  # the scales of claim 5 (1 km is near 0 on small training sets)
METHOD = (
    "How verdicts are computed: two runs evaluated on the same test images are compared by a **paired "
    "bootstrap** over those images (the same resamples for both runs, matched by image id): their accuracies "
    "are called different when the 95 % interval of the difference excludes 0, and the comparison is "
    "inconclusive otherwise. Only where a run's predictions are missing does the comparison fall back to "
    "the overlap of the two runs' own intervals, which is far too conservative (different only when the "
    "intervals do not overlap). "
    "Each claim is checked on sub-cases (a series of runs and a distance scale). Sub-verdicts combine as: "
    "fails if any sub-case fails, holds if all hold, otherwise inconclusive; claim 2, which says a drop "
    "exists, holds if any sub-case shows one. Among several runs of one setting (seeds, learning rates), "
    "the one with the best validation GeoScore is used. A claim the runs cannot test is "
    "\"not tested: needs ...\". Claim 5 (data efficiency) compares heads at each training-set size both "
    "were trained on (`geo sweep --train-fraction`), each head's best run on validation at that size: as "
    "accuracy rises with data, \"reaches every accuracy with less data\" is the same as \"its learning curve "
    "lies above\", so a sub-case (competitor, size, scale) holds when the MvMF's interval lies above the "
    "other's and fails when it lies below. "
    "A sub-case at a scale below the test set's smallest train–test distance is \"not testable here\" and "
    "left out of the verdict (a claim with only such sub-cases is not testable here); on a test set where no "
    "head beats uniform guessing at 2500 km every claim is \"not meaningful here\"."
)


@dataclass
class SubCase:
    """One comparison a claim is checked on: what (series, scale), the numbers, and its verdict."""

    case: str
    evidence: str
    verdict: str

    @property
    def line(self) -> str:
        return f"{self.case}: {self.evidence}: {self.verdict}"


@dataclass
class Claim:
    """A claim of the paper, its verdict on these runs, and the numbers behind it: ``subcases``, and
    ``notes`` about what was left out."""

    number: int
    statement: str
    verdict: str
    subcases: list[SubCase] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def details(self) -> list[str]:
        """The notes, then one line per sub-case ("c=2^6 @2500 km: mvmf (r0) ... : fails")."""
        return self.notes + [s.line for s in self.subcases]

    def counts(self) -> dict[str, int]:
        """Sub-cases per verdict, in the order holds, fails, inconclusive, not testable here (zeros left out)."""
        order = (HOLDS, FAILS, INCONCLUSIVE, NOT_TESTABLE)
        return {v: n for v in order if (n := sum(s.verdict == v for s in self.subcases))}

    def counts_text(self) -> str:
        """E.g. "12 sub-cases: 3 hold, 1 fails, 4 inconclusive, 4 not testable here" ("" without sub-cases)."""
        if not self.subcases:
            return ""
        words = {HOLDS: "hold", FAILS: "fail", INCONCLUSIVE: "inconclusive", NOT_TESTABLE: NOT_TESTABLE}
        parts = [f"{n} {words[v] if n != 1 else v}" for v, n in self.counts().items()]
        return f"{len(self.subcases)} sub-case{'s' if len(self.subcases) != 1 else ''}: " + ", ".join(parts)


def not_meaningful(claims: list[Claim]) -> list[Claim]:
    """``claims`` on a flagged test set (no head beats uniform guessing): verdicts "not meaningful here",
    the sub-cases kept for reference."""
    return [Claim(c.number, c.statement, NOT_MEANINGFUL, c.subcases, c.notes) for c in claims]


def _untestable_evidence(*runs: Run) -> str:
    nearest = min(r.train_min_km for r in runs if r.train_min_km is not None)
    return f"below the smallest train–test distance ({nearest:,.0f} km)"


def paired(a: Run, b: Run, key: str) -> PairedDifference | None:
    """The paired bootstrap of accuracy ``key`` of a minus b on their shared test images (None without
    both predictions files or for a metric that is not an accuracy)."""
    if key not in ACC_KEYS:
        return None
    matched = matched_errors(a.predictions_path, b.predictions_path)
    if matched is None:
        return None
    return paired_accuracy_difference(*matched, SCALES_KM[ACC_KEYS.index(key)])


def compare(a: Run, b: Run, key: str) -> str:
    """"higher" / "lower" if a's accuracy is significantly above / below b's, else "overlap".

    By the paired bootstrap where both runs' predictions are at hand; otherwise when a's interval
    lies wholly above / below b's.
    """
    difference = paired(a, b, key)
    if difference is not None:
        return difference.outcome
    ci_a, ci_b = a.ci(key), b.ci(key)
    if ci_a is None or ci_b is None:
        return "overlap"  # without intervals nothing can be told apart
    if ci_a[0] > ci_b[1]:
        return "higher"
    if ci_a[1] < ci_b[0]:
        return "lower"
    return "overlap"


def _acc(run: Run, key: str) -> str:
    ci = run.ci(key)
    text = f"{100 * run.metric(key):.1f}%"
    return text + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else " [no interval]")


def _combine_all(verdicts: list[str]) -> str:
    tested = [v for v in verdicts if v != NOT_TESTABLE]
    if verdicts and not tested:
        return NOT_TESTABLE
    verdicts = tested
    if FAILS in verdicts:
        return FAILS
    return HOLDS if verdicts and all(v == HOLDS for v in verdicts) else INCONCLUSIVE


def _trend(series: list[tuple[float, Run]], key: str) -> tuple[list[str], str]:
    """Significance of each step along a series, and the run-of-numbers text."""
    steps = [compare(b, a, key) for (_, a), (_, b) in zip(series, series[1:])]
    text = " → ".join(f"c={format_cells(int(x))}: {_acc(run, key)}" for x, run in series)
    return steps, text


def _rise_with_c(runs: list[Run], head: str, rising_claim: bool) -> tuple[str, list[SubCase]]:
    """Sub-verdicts of "accuracy rises monotonically with c" (or, if not rising_claim, of its negation)."""
    series = {k: s for k, s in group_series([r for r in runs if r.head == head], "n_cells").items() if len(s) >= 2}
    if not series:
        return f"not tested: needs {head} runs at ≥ 2 values of c (same κ0 and prediction mode)", []
    subcases = []
    for key, points in series.items():
        for acc_key, scale in zip(ACC_KEYS, SCALES_KM):
            steps, text = _trend(points, acc_key)
            members = [run for _, run in points]
            if not testable(scale, *members):
                finding, verdict = _untestable_evidence(*members), NOT_TESTABLE
            elif all(s == "higher" for s in steps):
                finding = "rises at every step (intervals apart)"
                verdict = HOLDS if rising_claim else FAILS
            elif "lower" in steps:
                at = [format_cells(int(points[i + 1][0])) for i, s in enumerate(steps) if s == "lower"]
                finding = f"falls significantly at c={', '.join(at)}"
                verdict = FAILS if rising_claim else HOLDS
            else:
                values = [run.metric(acc_key) for _, run in points]
                monotone = all(b >= a for a, b in zip(values, values[1:]))
                finding = ("point estimates rise" if monotone else "point estimates do not rise monotonically") \
                    + " but some intervals overlap"
                verdict = INCONCLUSIVE
            subcases.append(SubCase(f"{series_label(key, 'n_cells')} @{scale} km", f"{text} — {finding}", verdict))
    verdicts = [c.verdict for c in subcases]
    if rising_claim:
        return _combine_all(verdicts), subcases
    tested = [v for v in verdicts if v != NOT_TESTABLE]
    if not tested:
        return NOT_TESTABLE, subcases
    overall = HOLDS if HOLDS in tested else (FAILS if all(v == FAILS for v in tested) else INCONCLUSIVE)
    return overall, subcases


def claim_mvmf_rises(runs: list[Run]) -> Claim:
    verdict, subcases = _rise_with_c(runs, MVMF, rising_claim=True)
    return Claim(1, "MvMF accuracy rises monotonically with c, at every distance scale.", verdict, subcases)


def claim_softmax_not_monotone(runs: list[Run]) -> Claim:
    verdict, subcases = _rise_with_c(runs, SOFTMAX, rising_claim=False)
    return Claim(2, "Softmax (PlaNet) accuracy does not rise monotonically with c "
                    "(a significant drop at some scale).", verdict, subcases)


def _paired_subcase(case: str, first: tuple[str, Run], second: tuple[str, Run], acc_key: str) -> SubCase:
    """A sub-case "does ``first`` beat ``second`` at ``acc_key``": the verdict of ``compare`` and the numbers
    behind it (each run's accuracy, the paired difference with its interval where predictions allow)."""
    (label_a, a), (label_b, b) = first, second
    verdict = {"higher": HOLDS, "lower": FAILS, "overlap": INCONCLUSIVE}[compare(a, b, acc_key)]
    difference = paired(a, b, acc_key)
    paired_text = (f"; paired difference {100 * difference.difference:+.1f} points "
                   f"[{100 * difference.low:+.1f}, {100 * difference.high:+.1f}] over {difference.n} images"
                   if difference is not None else "")
    return SubCase(case, f"{label_a} ({a.name}) {_acc(a, acc_key)} vs {label_b} ({b.name}) "
                         f"{_acc(b, acc_key)}{paired_text}", verdict)


def claim_mvmf_beats_softmax(runs: list[Run]) -> Claim:
    statement = "MvMF beats softmax at every distance scale at equal c."
    # Equal c and equal training data (runs on a --train-fraction subset are compared among themselves).
    by_c: dict[tuple[int, float], dict[str, list[Run]]] = {}
    for run in runs:
        if run.head in (MVMF, SOFTMAX) and run.n_cells is not None:
            by_c.setdefault((run.n_cells, run.train_fraction), {}).setdefault(run.head, []).append(run)
    common = sorted(key for key, heads in by_c.items() if len(heads) == 2)
    if not common:
        return Claim(3, statement, "not tested: needs mvmf and softmax runs with a common c")
    subcases = []
    for c, fraction in common:
        # Among several runs per head (κ0, prediction modes, seeds), the best on validation.
        mvmf, softmax = pick_one(by_c[c, fraction][MVMF]), pick_one(by_c[c, fraction][SOFTMAX])
        on = f" f={fraction:g}" if fraction != 1.0 else ""
        for acc_key, scale in zip(ACC_KEYS, SCALES_KM):
            case = f"c={format_cells(c)}{on} @{scale} km"
            if not testable(scale, mvmf, softmax):
                subcases.append(SubCase(case, _untestable_evidence(mvmf, softmax), NOT_TESTABLE))
                continue
            subcases.append(_paired_subcase(case, ("mvmf", mvmf), ("softmax", softmax), acc_key))
    return Claim(3, statement, _combine_all([c.verdict for c in subcases]), subcases)


def claim_kappa0_scales(runs: list[Run]) -> Claim:
    statement = ("Large κ0 favours fine scales (@1, @25 km), small κ0 coarse ones (@2500 km): comparing the "
                 "largest and smallest κ0 at equal c.")
    series = {k: s for k, s in group_series([r for r in runs if r.head == MVMF], "kappa0").items() if len(s) >= 2}
    if not series:
        return Claim(4, statement, "not tested: needs mvmf runs at ≥ 2 values of κ0 (same c and prediction mode)")
    subcases = []
    for key, points in series.items():
        (k_small, small), (k_large, large) = points[0], points[-1]
        for scale in FINE_SCALES_KM + COARSE_SCALES_KM:
            acc_key = ACC_KEYS[SCALES_KM.index(scale)]
            case = f"{series_label(key, 'kappa0')} @{scale} km"
            if not testable(scale, large, small):
                subcases.append(SubCase(case, _untestable_evidence(large, small), NOT_TESTABLE))
                continue
            favoured, other = (large, small) if scale in FINE_SCALES_KM else (small, large)
            verdict = {"higher": HOLDS, "lower": FAILS, "overlap": INCONCLUSIVE}[compare(favoured, other, acc_key)]
            subcases.append(SubCase(case, f"κ0={k_large:g}: {_acc(large, acc_key)} vs κ0={k_small:g}: "
                                          f"{_acc(small, acc_key)}", verdict))
    return Claim(4, statement, _combine_all([c.verdict for c in subcases]), subcases)


def _by_size(runs: list[Run], head: str) -> dict[int, Run]:
    """{train rows: the best-on-validation run of ``head`` trained on that many rows}."""
    sizes: dict[int, list[Run]] = {}
    for run in runs:
        if run.head == head and run.n_train is not None:
            sizes.setdefault(run.n_train, []).append(run)
    return {n: pick_one(members) for n, members in sorted(sizes.items())}


def _size_text(n_train: int, run: Run) -> str:
    return f"n={n_train:,}" + (f" (f={run.train_fraction:g})" if run.train_fraction != 1.0 else "")


def claim_mvmf_data_efficient(runs: list[Run]) -> Claim:
    statement = ("The MvMF reaches a given accuracy with less training data than classification (softmax) and "
                 "retrieval (knn): at every training-set size both were trained on, its accuracy is higher at "
                 f"{', '.join(map(str, DATA_SCALES_KM[:-1]))} and {DATA_SCALES_KM[-1]} km.")
    mvmf = _by_size(runs, MVMF)
    common = {head: [n for n in _by_size(runs, head) if n in mvmf] for head in (SOFTMAX, KNN)}
    if len(common[SOFTMAX]) < 2:
        return Claim(5, statement, "not tested: needs mvmf and softmax runs on ≥ 2 common training-set sizes "
                                   "(geo sweep --train-fraction)")
    subcases, notes = [], []
    if len(common[KNN]) < 2:
        notes.append(f"retrieval ({KNN}): not tested, no {KNN} runs on ≥ 2 of the MvMF's training-set sizes; "
                       "the verdict compares with softmax only")
    for head in (SOFTMAX, KNN):
        if len(common[head]) < 2:
            continue
        other = _by_size(runs, head)
        for n in common[head]:
            for scale in DATA_SCALES_KM:
                acc_key = ACC_KEYS[SCALES_KM.index(scale)]
                case = f"{_size_text(n, mvmf[n])} @{scale} km"
                if not testable(scale, mvmf[n], other[n]):
                    subcases.append(SubCase(case, _untestable_evidence(mvmf[n], other[n]), NOT_TESTABLE))
                    continue
                verdict = {"higher": HOLDS, "lower": FAILS, "overlap": INCONCLUSIVE}[
                    compare(mvmf[n], other[n], acc_key)]
                subcases.append(SubCase(case, f"mvmf ({mvmf[n].name}) {_acc(mvmf[n], acc_key)} vs {head} "
                                              f"({other[n].name}) {_acc(other[n], acc_key)}", verdict))
    return Claim(5, statement, _combine_all([c.verdict for c in subcases]), subcases, notes)


def claim_end_to_end_improves(runs: list[Run]) -> Claim:
    """Claim 6 (paper table 2, section 4.2): each end-to-end run against its frozen parent, per scale."""
    statement = ("End-to-end fine-tuning improves the head: the end-to-end run (backbone and head trained together, "
                 "`geo finetune`) is more accurate than its frozen parent at every distance scale.")
    by_path = {str(Path(r.path).resolve()): r for r in runs if r.features == FROZEN}
    pairs = [(child, by_path[str(Path(child.parent).resolve())]) for child in runs
             if child.features == END_TO_END and child.parent and str(Path(child.parent).resolve()) in by_path]
    if not pairs:
        return Claim(6, statement, "not tested: needs an end-to-end run and its parent run on the same test set")
    subcases = []
    for child, parent in pairs:
        for acc_key, scale in zip(ACC_KEYS, SCALES_KM):
            case = f"{child.head} @{scale} km"
            if not testable(scale, child, parent):
                subcases.append(SubCase(case, _untestable_evidence(child, parent), NOT_TESTABLE))
                continue
            subcases.append(_paired_subcase(case, ("end-to-end", child), ("frozen", parent), acc_key))
    return Claim(6, statement, _combine_all([c.verdict for c in subcases]), subcases)


def _calibration_text(run: Run) -> str:
    value, ci = run.metric("calibration_error"), run.ci("calibration_error")
    if value is None:
        return "calibration error ?"
    return f"calibration error {100 * value:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "") + \
        (f", cov@95 {100 * run.metric('coverage@95'):.0f}%" if run.metric("coverage@95") is not None else "")


def claim_mvmf_calibrated(runs: list[Run]) -> Claim:
    """Claim 7 (paper section 1, fig. 1): the MvMF's credible regions are better calibrated than softmax's at
    equal c and than retrieval's (knn, which has no c: its best run on validation)."""
    statement = ("The MvMF represents the ambiguity of weakly localizable images properly, unlike classification "
                 "and retrieval (paper section 1, fig. 1): its calibration error (mean |coverage − level| of its "
                 "credible regions, levels 5 %…95 %) is lower than softmax's at equal c and than knn's, by a paired "
                 "bootstrap over test images.")
    groups: dict[tuple[int, float], dict[str, list[Run]]] = {}
    knn_by_fraction: dict[float, list[Run]] = {}
    for run in runs:
        if run.head in (MVMF, SOFTMAX) and run.n_cells is not None:
            groups.setdefault((run.n_cells, run.train_fraction), {}).setdefault(run.head, []).append(run)
        elif run.head == KNN:
            knn_by_fraction.setdefault(run.train_fraction, []).append(run)
    pairs = []
    for (c, fraction), heads in sorted(groups.items()):
        if MVMF not in heads:
            continue
        mvmf = pick_one(heads[MVMF])
        if SOFTMAX in heads:
            pairs.append((c, fraction, mvmf, SOFTMAX, pick_one(heads[SOFTMAX])))
        if knn_by_fraction.get(fraction):
            pairs.append((c, fraction, mvmf, KNN, pick_one(knn_by_fraction[fraction])))
    if not pairs:
        return Claim(7, statement, "not tested: needs mvmf runs and softmax runs with a common c, or knn runs")
    subcases, notes, untested = [], [], []
    for c, fraction, mvmf, head, other in pairs:
        on = f" f={fraction:g}" if fraction != 1.0 else ""
        matched = matched_hpd_levels(mvmf.predictions_path, other.predictions_path)
        if matched is None:
            untested.append(f"c={format_cells(c)}{on} vs {head} ({other.name})")
            continue
        difference = paired_calibration_difference(*matched)
        verdict = HOLDS if difference.high < 0 else FAILS if difference.low > 0 else INCONCLUSIVE
        subcases.append(SubCase(f"c={format_cells(c)}{on} vs {head}",
                                f"mvmf ({mvmf.name}) {_calibration_text(mvmf)} vs {head} ({other.name}) "
                                f"{_calibration_text(other)}; paired difference {100 * difference.difference:+.1f} "
                                f"points [{100 * difference.low:+.1f}, {100 * difference.high:+.1f}] over "
                                f"{difference.n} images", verdict))
    if untested:
        notes.append("not tested (no hpd_level in predictions.parquet: runs scored before calibration existed; "
                     f"re-run geo evaluate): {'; '.join(untested)}")
    if not subcases:
        return Claim(7, statement, "not tested: needs hpd_level in the runs' predictions.parquet (geo evaluate)",
                     notes=notes)
    return Claim(7, statement, _combine_all([s.verdict for s in subcases]), subcases, notes)


def evaluate_claims(runs: list[Run]) -> list[Claim]:
    """The claims of the paper's experiments (table 2, figs. 6 and 7) and its calibration claim (section 1,
    fig. 1) on ``runs`` (one feature cache).

    Claims 1-4 and 7 compare heads on frozen features: end-to-end runs are left out of them and checked
    against their parents by claim 6, present when there is an end-to-end run.
    """
    frozen = [r for r in runs if r.features == FROZEN]
    claims = [claim_mvmf_rises(frozen), claim_softmax_not_monotone(frozen),
              claim_mvmf_beats_softmax(frozen), claim_kappa0_scales(frozen)]
    if any(r.features == END_TO_END for r in runs):
        claims.append(claim_end_to_end_improves(runs))
    claims.append(claim_mvmf_calibrated(frozen))
    return claims


def learning_curve_claims(runs: list[Run]) -> list[Claim]:
    """The claims read from learning curves (runs on several training-set sizes): claim 5, data efficiency."""
    return [claim_mvmf_data_efficient([r for r in runs if r.features == FROZEN])]


def direction_summary(claims_by_test_set: dict[str, list[Claim]]) -> list[str]:
    """Per claim, how many test sets agree: "Claim 3: holds on 2 of 3 test sets (a, b); inconclusive on 1 (c)"."""
    lines = []
    numbers = sorted({c.number for claims in claims_by_test_set.values() for c in claims})
    for number in numbers:
        verdicts: dict[str, list[str]] = {}
        for name, claims in claims_by_test_set.items():
            for claim in claims:
                if claim.number == number:
                    kind = claim.verdict if claim.verdict in (HOLDS, FAILS, INCONCLUSIVE, NOT_TESTABLE,
                                                              NOT_MEANINGFUL) else NOT_TESTED
                    verdicts.setdefault(kind, []).append(name)
        total = sum(len(v) for v in verdicts.values())
        parts = [f"{kind} on {len(names)} of {total} test sets ({', '.join(names)})"
                 for kind in (HOLDS, FAILS, INCONCLUSIVE, NOT_TESTABLE, NOT_MEANINGFUL, NOT_TESTED)
                 if (names := verdicts.get(kind))]
        lines.append(f"Claim {number}: " + "; ".join(parts))
    return lines
