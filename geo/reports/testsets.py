"""Test sets: every evaluation of every run, grouped so that a report shows one table per test set.

A run's own ``metrics.json`` is its test split (the test set named after its
cache's stem, e.g. ``mp16``); each ``RUN/eval/NAME/`` written by ``geo evaluate``
is test set NAME. An evaluation of the run's own cache and test split repeats
the run's own results and is left out. Each test set lists the runs evaluated on
it as ``Run`` copies whose ``test`` metrics (and predictions) are that test
set's, with the number of images evaluated and skipped at extraction.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from geo.reports.runs import Run, _read_json, final_metrics, reference_of
from geo.training.runs import METRICS_FILE, list_evaluations


@dataclass
class TestSet:
    """One test set: its name, the runs evaluated on it, and how many images it had."""

    name: str
    runs: list[Run] = field(default_factory=list)
    n_images: set[int] = field(default_factory=set)  # images evaluated, per run (normally one value)
    n_skipped: set[int] = field(default_factory=set)  # images the cache's extraction skipped
    caches: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)

    def count_text(self, counts: set[int]) -> str:
        return "?" if not counts else ", ".join(str(n) for n in sorted(counts))


def _same_file(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def own_name(run: Run) -> str:
    """The test set of a run's own metrics.json: its cache's stem."""
    return Path(run.cache_path).stem if run.cache_path else "own test split"


def collect_test_sets(runs: list[Run]) -> list[TestSet]:
    """Test sets in report order: the runs' own test splits first, then evaluations by name."""
    sets: dict[str, TestSet] = {}

    def add(name: str, run: Run, final: dict) -> None:
        test_set = sets.setdefault(name, TestSet(name))
        test_set.runs.append(run)
        if isinstance(final.get("n"), int):
            test_set.n_images.add(final["n"])
        if isinstance(final.get("cache_n_skipped"), int):
            test_set.n_skipped.add(final["cache_n_skipped"])
        if final.get("cache_path") or run.cache_path:
            test_set.caches.add(str(final.get("cache_path") or run.cache_path))

    evaluations = []
    for run in runs:
        own = dataclasses.replace(run, test_set=own_name(run))
        try:
            add(own.test_set, own, _read_json(run.path / METRICS_FILE))
        except ValueError:
            add(own.test_set, own, {})
        for folder in list_evaluations(run.path):
            try:
                final = _read_json(folder / METRICS_FILE)
                test, test_ci = final_metrics(final)
            except (ValueError, OSError) as err:
                sets.setdefault(folder.name, TestSet(folder.name)).warnings.append(f"`{folder}`: {err}")
                continue
            if final.get("split", "test") == "test" and _same_file(final.get("cache_path"), run.cache_path):
                continue  # the run's own test split again
            variant = dataclasses.replace(run, test=test, test_ci=test_ci, eval_dir=folder, test_set=folder.name,
                                          split=final.get("split"), predict=final.get("predict") or run.predict,
                                          reference=reference_of(final))
            evaluations.append((folder.name, variant, final))
    for name, variant, final in sorted(evaluations, key=lambda item: item[0]):
        add(name, variant, final)
    return list(sets.values())


def side_by_side(test_sets: list[TestSet]) -> tuple[str, str]:
    """(Markdown, HTML) of one table: a row per run, the five accuracies (%) of each test set side by side.

    The best value of each test set's column is bold; "–" where a run was not evaluated on that set.
    """
    import html as html_mod

    from geo.reports.tables import format_cells, untestable
    from geo.reports.runs import ACC_KEYS, SCALES_KM

    order: dict[Path, Run] = {}
    for test_set in test_sets:
        for run in test_set.runs:
            order.setdefault(run.path, run)
    values = {(t.name, r.path): r for t in test_sets for r in t.runs}
    best = {(t.name, k): max((r.metric(k) for r in t.runs if r.metric(k) is not None and not untestable(r, k)),
                             default=None)
            for t in test_sets for k in ACC_KEYS}
    header = ["run", "head", "c", "κ0"] + [f"{t.name} @{s} km" for t in test_sets for s in SCALES_KM]
    rows = []
    for path, run in order.items():
        cells = [(run.name, False), (run.head, False), (format_cells(run.n_cells), False),
                 ("–" if run.kappa0 is None else f"{run.kappa0:g}", False)]
        for t in test_sets:
            seen = values.get((t.name, path))
            for key in ACC_KEYS:
                value = seen.metric(key) if seen is not None else None
                if value is not None and untestable(seen, key):
                    cells.append(("n/t", False))
                    continue
                cells.append(("–" if value is None else f"{100 * value:.1f}",
                              value is not None and value == best[(t.name, key)]))
        rows.append(cells)
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(f"**{t}**" if b else t for t, b in cells) + " |" for cells in rows]
    top = "".join(f'<th colspan="{len(SCALES_KM)}">{html_mod.escape(t.name)}</th>' for t in test_sets)
    sub = "".join(f"<th>@{s} km</th>" for _ in test_sets for s in SCALES_KM)
    body = "".join("<tr>" + "".join(f"<td><strong>{html_mod.escape(t)}</strong></td>" if b
                                    else f"<td>{html_mod.escape(t)}</td>" for t, b in cells) + "</tr>"
                   for cells in rows)
    html = (f'<table class="results"><thead><tr><th rowspan="2">run</th><th rowspan="2">head</th>'
            f'<th rowspan="2">c</th><th rowspan="2">κ0</th>{top}</tr><tr>{sub}</tr></thead>'
            f"<tbody>{body}</tbody></table>")
    return "\n".join(markdown), html
