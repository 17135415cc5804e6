"""What a test set can show: the block each test set gets in the report, and the rules the claims follow.

From what the runs recorded with their metrics (``geo.training.reference``):

- the images, and the minimum and median distance from a test image to the nearest
  training image. A scale below the minimum is **not testable here**: no test image has
  a training image that close, so accuracy there says nothing about what a head learned
  (the demo holds every test image >= 100 km from train: @1 and @25 km are 0 for every
  head). Tables show "n/t" there and claims count such sub-cases apart.
- uniform guessing (closed form, ``geo.metrics.uniform_accuracy``) and the trivial
  baseline (the densest training cell, per c) at each scale, beside the best head.
- a test set on which no head beats uniform guessing at 2500 km (the lower end of its
  bootstrap 95 % interval above the uniform rate; the point estimate without an interval)
  is **flagged**: its claims are "not meaningful here".
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from geo.metrics import uniform_accuracy
from geo.reports.runs import ACC_KEYS, SCALES_KM, Run
from geo.training.reference import DENSEST_CELL_KEY, TRAIN_DISTANCE_KEY

NOT_TESTABLE = "not testable here"
NOT_MEANINGFUL = "not meaningful here"
FLAG_SCALE_KM = 2500
NT = "n/t"  # a table cell at a scale below the minimum train-test distance


def testable(scale_km: float, *runs: Run) -> bool:
    """Whether accuracy at ``scale_km`` can be tested on the test set of ``runs``: the scale is at least
    the smallest train-test distance each run recorded (runs that recorded none: testable)."""
    return all(run.train_min_km is None or scale_km >= run.train_min_km for run in runs)


def beats_uniform(run: Run, scale_km: float = FLAG_SCALE_KM) -> bool:
    """Whether ``run``'s accuracy at ``scale_km`` lies above uniform guessing (interval wholly above)."""
    key = ACC_KEYS[SCALES_KM.index(scale_km)]
    value, ci = run.metric(key), run.ci(key)
    if value is None:
        return False
    return (ci[0] if ci is not None else value) > uniform_accuracy(scale_km)


@dataclass
class Scope:
    """What one test set can show (see the module docstring)."""

    name: str
    runs: list[Run]
    n_images: set[int] = field(default_factory=set)
    min_km: float | None = None  # over the runs' records (they agree when made on one training cache)
    median_km: float | None = None
    n_train: int | None = None
    baselines: dict[int, dict] = field(default_factory=dict)  # c -> densest-cell metrics

    @property
    def untestable_scales(self) -> list[int]:
        return [s for s in SCALES_KM if self.min_km is not None and s < self.min_km]

    @property
    def flagged(self) -> bool:
        """No head beats uniform guessing at 2500 km (and there are runs to tell)."""
        return bool(self.runs) and not any(beats_uniform(run) for run in self.runs)


def scope_of(name: str, runs: list[Run]) -> Scope:
    """The Scope of test set ``name`` from the ``runs`` evaluated on it."""
    scope = Scope(name, runs, n_images={int(r.reference["n"]) for r in runs if "n" in r.reference})
    distances = [r.reference[TRAIN_DISTANCE_KEY] for r in runs if TRAIN_DISTANCE_KEY in r.reference]
    if distances:
        scope.min_km = min(float(d["min"]) for d in distances)
        scope.median_km = min(float(d["median"]) for d in distances)
        scope.n_train = max(int(d.get("n_train") or 0) for d in distances) or None
    for run in runs:
        baseline = run.reference.get(DENSEST_CELL_KEY)
        if baseline and isinstance(baseline.get("n_cells"), int):
            scope.baselines.setdefault(baseline["n_cells"], baseline)
    return scope


def _pct(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if value >= 0.0005 or value == 0 else f"{100 * value:.1g}"


def scope_table(scope: Scope) -> tuple[str, str]:
    """(Markdown, HTML): per scale, whether it is testable, uniform guessing, the densest-cell baselines and
    the best head (accuracy %, ≤ X km)."""
    header = ["", *[f"@{s} km" for s in SCALES_KM]]
    rows = [["testable here", *("no" if s in scope.untestable_scales else "yes" if scope.min_km is not None
                                 else "?" for s in SCALES_KM)],
            ["uniform guessing (%)", *(_pct(uniform_accuracy(s)) for s in SCALES_KM)]]
    for c, baseline in sorted(scope.baselines.items()):
        rows.append([f"densest cell, c={c} (%)", *(_pct(baseline.get(k)) for k in ACC_KEYS)])
    best = []
    for key in ACC_KEYS:
        values = [(r.metric(key), r.name) for r in scope.runs if r.metric(key) is not None]
        best.append(f"{_pct(max(values)[0])} ({max(values)[1]})" if values else "–")
    rows.append(["best head (%)", *best])
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(row) + " |" for row in rows]
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    html_table = ('<table class="results"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                  + f"</tr></thead><tbody>{body}</tbody></table>")
    return "\n".join(markdown), html_table


def scope_text(scope: Scope) -> str:
    """The sentences above the table: images, train-test distances, what is not testable, the flag."""
    images = ", ".join(str(n) for n in sorted(scope.n_images)) or "?"
    if scope.min_km is None:
        distance = ("the distance from test to training images was not recorded (runs scored before geo "
                    "recorded it: re-run `geo evaluate` to add it)")
    else:
        n_train = f"{scope.n_train:,}" if scope.n_train else "?"
        distance = (f"from each test image to the nearest of the {n_train} training images: "
                    f"minimum {scope.min_km:,.0f} km, median {scope.median_km:,.0f} km")
    lines = [f"**What this test set can show.** {images} images; {distance}."]
    if scope.untestable_scales:
        scales = ", ".join(f"{s}" for s in scope.untestable_scales)
        lines.append(f"Accuracy at {scales} km is **{NOT_TESTABLE}**: no test image has a training image that "
                     f"close (\"{NT}\" in the tables; such claim sub-cases are counted apart, not as inconclusive).")
    if scope.flagged:
        lines.append(f"**Flagged:** no head beats uniform guessing at {FLAG_SCALE_KM} km on this test set "
                     f"(uniform guesses land within it {_pct(uniform_accuracy(FLAG_SCALE_KM))} % of the time; no "
                     f"head's 95 % interval lies above that), so its claims are **{NOT_MEANINGFUL}**.")
    return " ".join(lines)
