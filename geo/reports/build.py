"""``build_report``: run directories in, ``index.html`` + ``report.md`` + tables out.

The report reads only run directories (and, for the density maps, the feature
cache). Sections: the runs read and skipped, the table in the paper's table-2
layout, the claims with computed verdicts, accuracy against c (fig. 7) and κ0
(fig. 6), learning curves (accuracy and NLL against training-set size), training
curves (fig. 3), maps (figs. 1, 2, 5). Runs made on different
caches are refused unless ``allow_mixed_caches``; then the table labels them and
claims and figures are made per cache.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from geo.files import atomic_write_text
from geo.reports import claims as claims_mod
from geo.reports import plots, publish, scope, tables, testsets
from geo.reports.document import (Details, Image, Section, Table, Text, render_html, render_markdown,
                                  write_figures)
from geo.reports.oracle import oracle_section
from geo.reports.runs import ReportError, Run, SkippedRun, check_caches, find_runs

FORMATS = ("html", "md", "both")
TITLE = "geo: output-head comparison"


@dataclass
class ReportResult:
    """What ``build_report`` wrote and read."""

    out_dir: Path
    files: list[Path]
    runs: list[Run]
    skipped: list[SkippedRun]
    notes: list[str] = field(default_factory=list)


def _groups(runs: list[Run], labels: dict[str, str]) -> list[tuple[str, list[Run]]]:
    """("", all runs) for one cache; ("cache A", runs on A) ... for mixed caches."""
    if not labels:
        return [("", runs)]
    return [(f"cache {label}", [r for r in runs if r.cache_label == label]) for label in labels]


def _figure(block_name: str, made, caption: str, group: str) -> list:
    suffix = f" ({group})" if group else ""
    if isinstance(made, str):
        return [Text(f"Not drawn{suffix}: {made}.")]
    name = block_name if not group else block_name.replace(".png", f"_{group.split()[-1]}.png")
    return [Image(name, plots.figure_png(made), caption + suffix)]


# Provenance keys `geo extract` records from the fine-tuning's last epoch (geo.pipeline.extract).
FINETUNE_VAL_KEY, FINETUNE_MAJORITY_KEY = "finetune_val_country_acc", "finetune_val_majority_acc"


def features_text(runs: list[Run]) -> str:
    """One line per feature cache: the fine-tuning's val country accuracy against the majority-country rate
    (what the features learned about place), from the provenance the runs recorded."""
    seen: dict[str, str] = {}
    for run in runs:
        provenance = run.config.get("cache_provenance") or {}
        name = Path(run.cache_path).name if run.cache_path else "(cache not recorded)"
        epochs = provenance.get("finetune_epochs")
        acc, majority = provenance.get(FINETUNE_VAL_KEY), provenance.get(FINETUNE_MAJORITY_KEY)
        if isinstance(acc, (int, float)) and isinstance(majority, (int, float)):
            gap = 100 * (acc - majority)
            text = (f"the fine-tuning's val country accuracy is {100 * acc:.1f} % against a majority-country rate "
                    f"of {100 * majority:.1f} % ({gap:+.1f} points"
                    + (f", after {epochs} epoch(s))" if epochs is not None else ")"))
        elif epochs == 0:
            text = "no country fine-tuning (frozen features): no val country accuracy to report"
        else:
            text = "the fine-tuning's val country accuracy is not recorded (a cache made before geo recorded it)"
        seen.setdefault(name, text)
    return "\n\n".join(f"**Features** (`{name}`): {text}." for name, text in seen.items())


def claim_blocks(claim: claims_mod.Claim, on: str = "") -> list:
    """One line per claim (its verdict and the count of sub-cases per verdict) and the sub-cases in a
    collapsible table (HTML) or a table below the line (Markdown)."""
    head = f"**Claim {claim.number}.**" if not on else f"**Claim {claim.number}** on {on}:"
    line = f"{head} {claim.statement} Verdict: **{claim.verdict}**."
    if claim.counts_text():
        line += f" {claim.counts_text()}."
    if claim.notes:
        line += " " + " ".join(f"({note})" for note in claim.notes)
    if not claim.subcases:
        return [Text(line)]
    header = ["sub-case", "numbers", "verdict"]
    rows = [[c.case, c.evidence, c.verdict] for c in claim.subcases]
    markdown = ["| " + " | ".join(header) + " |", "|---|---|---|"]
    markdown += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    html_rows = "".join("<tr>" + "".join(f'<td style="text-align:left">{html.escape(cell)}</td>' for cell in row)
                        + "</tr>" for row in rows)
    table = Table("\n".join(markdown), '<table class="results"><thead><tr>'
                  + "".join(f"<th>{h}</th>" for h in header) + f"</tr></thead><tbody>{html_rows}</tbody></table>")
    return [Details(line, table)]


def scope_blocks(test_set_scope: scope.Scope) -> list:
    """The "what this test set can show" block: a sentence and the table of scales."""
    markdown, html_table = scope.scope_table(test_set_scope)
    return [Text(scope.scope_text(test_set_scope)), Table(markdown, html_table)]


def checked_claims(runs: list[Run], test_set_scope: scope.Scope, *, learning_curves: bool = False) -> list:
    """The claims on ``runs`` (one test set), "not meaningful here" when that test set is flagged."""
    found = claims_mod.evaluate_claims(runs) + (claims_mod.learning_curve_claims(runs) if learning_curves else [])
    return claims_mod.not_meaningful(found) if test_set_scope.flagged else found


def runs_section(runs: list[Run], skipped: list[SkippedRun], labels: dict[str, str]) -> Section:
    lines = [features_text(runs), f"{len(runs)} run(s) reported; {len(skipped)} skipped."]
    caches = sorted({r.cache_path or "(not recorded)" for r in runs})
    if labels:
        lines.append("Runs were made on **different feature caches** (allowed by --allow-mixed-caches); they are "
                     "labelled, and claims and figures are made per cache:")
        lines.append("\n".join(f"- cache {label}: {text}" for label, text in labels.items()))
    else:
        lines.append(f"Feature cache: `{', '.join(caches)}`.")
    if skipped:
        lines.append("Skipped:")
        lines.append("\n".join(f"- `{s.path}`: {s.reason}" for s in skipped))
    warned = [r for r in runs if r.warnings]
    if warned:
        lines.append("Used with warnings:")
        lines.append("\n".join(f"- `{r.path}`: {'; '.join(r.warnings)}" for r in warned))
    return Section("Runs", [Text("\n\n".join(lines))])


def table_section(runs: list[Run], labels: dict[str, str]) -> Section:
    blocks = [Table(tables.to_markdown(runs), tables.to_html(runs)),
              Text(" ".join(filter(None, [tables.CONVENTIONS, tables.kappa0_note(runs),
                                          tables.NT_NOTE if tables.has_untestable(runs) else "",
                                          tables.knn_index_note(runs)])))]
    splits = sorted({r.split or "?" for r in runs})
    if splits != ["test"]:
        blocks.append(Text(f"Note: metrics.json of some runs is not on the test split (splits: {', '.join(splits)})."))
    if labels:
        blocks.append(Text("\n".join(f"- cache {label}: {text}" for label, text in labels.items())))
    blocks.append(Text("The same table, with every interval as numbers and accuracies as fractions, is in "
                       "`table.csv` and `table.parquet` beside this report."))
    return Section("Results (paper table 2 layout)", blocks)


def claims_section(runs: list[Run], labels: dict[str, str]) -> Section:
    blocks = [Text(claims_mod.METHOD)]
    for group, members in _groups(runs, labels):
        if group:
            blocks.append(Text(f"**On {group}:**"))
        own = scope.scope_of(group or "own test split", members)
        if own.flagged:
            blocks.append(Text(f"The runs' own test split is flagged (no head beats uniform guessing at "
                               f"{scope.FLAG_SCALE_KM} km): its claims are **{scope.NOT_MEANINGFUL}**."))
        for claim in checked_claims(members, own, learning_curves=True):
            blocks += claim_blocks(claim)
    return Section("Claims of the paper, checked on these runs", blocks)


def figures_sections(runs: list[Run], labels: dict[str, str]) -> list[Section]:
    by_c, by_kappa, by_size, curves = (Section("Accuracy against c (paper fig. 7)"),
                                       Section("Accuracy against κ0 (paper fig. 6)"),
                                       Section("Learning curves: accuracy and NLL against training-set size"),
                                       Section("Training curves (paper fig. 3)"))
    for group, members in _groups(runs, labels):
        by_c.blocks += _figure("accuracy_vs_c.png", plots.accuracy_vs_cells(members),
                               "Test accuracy (%, ≤ X km) against the number of cells c (log2 axis); bands are "
                               "bootstrap 95 % intervals; one line per head, κ0 and prediction mode.", group)
        by_kappa.blocks += _figure("accuracy_vs_kappa0.png", plots.accuracy_vs_kappa0(members),
                                   "MvMF test accuracy (%) against κ0 (initial log κ); one line per c.", group)
        by_size.blocks += _figure("learning_curves.png", plots.learning_curves(members),
                                  "Test accuracy (%, ≤ X km) and NLL against the number of training rows (log "
                                  "axis; nested random subsets of the train split, geo sweep --train-fraction); "
                                  "bands are bootstrap 95 % intervals; one line per head, c, κ0 and prediction "
                                  "mode. Claim 5 reads these curves.", group)
        curves.blocks += _figure("training_curves.png", plots.training_curves(members),
                                 "Training loss and validation accuracy @ 750 km against step for each run, and "
                                 "the last validation NLL against accuracy (does a lower loss mean better "
                                 "geolocation?).", group)
    return [by_c, by_kappa, by_size, curves]


def calibration_section(runs: list[Run]) -> Section:
    """Reliability diagrams, one per test set (every run's own test split and each `geo evaluate`)."""
    section = Section("Calibration and sharpness (reliability diagrams)", [Text(
        "Does the truth fall inside a head's credible regions as often as they claim? Each test image's HPD "
        "level is the probability mass the head puts where its density is higher than at the true location "
        "(uniform on [0, 1] for a calibrated head). The diagram draws, against each level a, the percentage "
        "of images whose truth lies in the head's a highest-density region (one line per head: its best run "
        "on validation); the diagonal is calibration, below it the head is overconfident. The table's cov@95, "
        "calib. err and region areas (sharpness) come from the same levels.")])
    for t in testsets.collect_test_sets(runs):
        section.blocks += _figure("reliability.png", plots.reliability_diagram(t.runs),
                                  f"Reliability diagram on test set {t.name}: coverage of the credible regions "
                                  "against their level (left) and the gap coverage − level (right).",
                                  f"test set {t.name}")
    return section


def maps_section(runs: list[Run], labels: dict[str, str], cache_path, n_maps: int) -> tuple[Section, list[str]]:
    section = Section("Maps (paper figs. 1, 2 and 5)")
    if n_maps <= 0:
        return section, []
    try:
        from geo.reports import maps
    except ImportError as err:
        section.blocks.append(Text(f"Maps skipped: {err}."))
        return section, [str(err)]
    notes: list[str] = []
    for group, members in _groups(runs, labels):
        figures, group_notes = maps.make_maps(members, cache_path=cache_path, n_images=n_maps)
        notes += group_notes
        for name, figure, caption in figures:
            section.blocks += _figure(name, figure, caption, group)
    if not section.blocks:
        section.blocks.append(Text("No maps could be drawn."))
    if notes:
        section.blocks.append(Text("Maps skipped for:\n\n" + "\n".join(f"- {n}" for n in notes)))
    return section, notes


def test_set_sections(runs: list[Run]) -> tuple[list[Section], list[Run]]:
    """Sections for the test sets (every run's own test split and each `geo evaluate` of it), and every
    (run, test set) pair as a Run for the exports. With more than one test set: the images evaluated and
    skipped per set, the accuracies side by side, and per test set the table-2 layout, the claims and
    accuracy against c, then each claim's verdicts counted across test sets."""
    sets = testsets.collect_test_sets(runs)
    titles = ["test set", "cache", "images evaluated", "images skipped (unreadable)", "runs"]
    cells = [[t.name, ", ".join(sorted(t.caches)) or "?", t.count_text(t.n_images), t.count_text(t.n_skipped),
              str(len(t.runs))] for t in sets]
    markdown_rows = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    markdown_rows += ["| " + " | ".join(row) + " |" for row in cells]
    html_rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    summary = [Table("\n".join(markdown_rows), '<table class="results"><thead><tr>'
                     + "".join(f"<th>{html.escape(t)}</th>" for t in titles) + f"</tr></thead><tbody>{html_rows}"
                     "</tbody></table>")]
    summary += [Text(w) for t in sets for w in t.warnings]
    variants = [run for t in sets for run in t.runs]
    if len(sets) == 1:
        only = sets[0]
        return [Section("Test set", [Text(
            f"{only.name} ({', '.join(f'`{c}`' for c in sorted(only.caches)) or 'cache not recorded'}): "
            f"{only.count_text(only.n_images)} images evaluated, {only.count_text(only.n_skipped)} skipped "
            "(unreadable at extraction)."), *summary[1:], *scope_blocks(scope.scope_of(only.name, only.runs))])], \
            variants
    markdown, html_table = testsets.side_by_side(sets)
    sections = [Section("Test sets", summary + [Text(
                    "A run's own test split is named after its cache; each further test set is a `geo evaluate "
                    "RUN --cache TEST.h5` (RUN/eval/NAME/). Images skipped are those the test cache's extraction "
                    "could not read (its /skipped).")]),
                Section("Accuracy per test set, side by side (%)", [Table(markdown, html_table), Text(
                    " ".join(filter(None, [tables.CONVENTIONS, tables.NT_NOTE if tables.has_untestable(variants)
                                           else ""])))])]
    claims_by_set = {}
    for t in sets:
        group = f"test set {t.name}"
        test_set_scope = scope.scope_of(t.name, t.runs)
        blocks = [Text(f"{t.count_text(t.n_images)} images evaluated; {t.count_text(t.n_skipped)} skipped."),
                  *scope_blocks(test_set_scope), Table(tables.to_markdown(t.runs), tables.to_html(t.runs))]
        claims_by_set[t.name] = checked_claims(t.runs, test_set_scope)
        for claim in claims_by_set[t.name]:
            blocks += claim_blocks(claim, on=t.name)
        blocks += _figure("accuracy_vs_c.png", plots.accuracy_vs_cells(t.runs),
                          "Accuracy (%, ≤ X km) against c on this test set; bands are bootstrap 95 % intervals.",
                          group)
        sections.append(Section(f"Test set {t.name} (paper table 2 layout, claims, accuracy against c)", blocks))
    sections.append(Section("Claims across test sets (direction only)", [
        Text("Each claim's verdict counted over the test sets (a claim that holds on one test set and fails on "
             "another is a finding about the test sets, not noise to average away):"),
        Text("\n".join(f"- {line}" for line in claims_mod.direction_summary(claims_by_set)))]))
    return sections, variants


def build_report(paths: Iterable[str | Path], out_dir: str | Path, *, fmt: str = "both",
                 allow_mixed_caches: bool = False, cache_path: str | Path | None = None,
                 n_maps: int = 4) -> ReportResult:
    """Read the runs under ``paths`` and write the report into ``out_dir``.

    Args:
        paths: run directories or sweep directories holding them (searched two levels down).
        out_dir: created if needed; receives index.html and/or report.md, figures/, table.csv,
            table.parquet.
        fmt: "html", "md" or "both".
        allow_mixed_caches: report runs made on different caches (labelled) instead of refusing.
        cache_path: feature cache for the density maps (default: each run's own cache).
        n_maps: test images on the density maps (0: no maps).
    Raises:
        ReportError: no usable run, or mixed caches without ``allow_mixed_caches``.
    """
    if fmt not in FORMATS:
        raise ReportError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    publish.check_out_dir(out_dir)  # before the work, not after it
    paths = list(paths)
    runs, skipped = find_runs(paths)
    if not runs:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped) or "nothing given"
        raise ReportError(f"no usable run directory in {', '.join(map(str, paths))} ({reasons})")
    labels = check_caches(runs, allow_mixed=allow_mixed_caches)
    maps, notes = maps_section(runs, labels, cache_path, n_maps)
    per_test_set, variants = test_set_sections(runs)
    sections = [runs_section(runs, skipped, labels), *per_test_set[:2], table_section(runs, labels),
                claims_section(runs, labels), calibration_section(runs), *figures_sections(runs, labels), maps,
                *per_test_set[2:]]
    known_density = oracle_section(runs)  # runs on a synthetic cache with known densities
    if known_density is not None:
        sections.insert(sections.index(maps), known_density)

    out_dir = Path(out_dir)
    with publish.building(out_dir) as build:  # swapped in whole when every file is written
        files = list(tables.write_exports(variants, build))  # one row per run and test set
        if fmt in ("md", "both"):
            files += write_figures(sections, build)
            atomic_write_text(build / "report.md", render_markdown(TITLE, sections))
            files.append(build / "report.md")
        if fmt in ("html", "both"):
            atomic_write_text(build / "index.html", render_html(TITLE, sections))
            files.append(build / "index.html")
    files = [out_dir / path.relative_to(build) for path in files]
    return ReportResult(out_dir, files, runs, skipped, notes)
