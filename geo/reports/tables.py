"""The results table in the paper's table-2 layout, as Markdown, HTML, CSV and Parquet.

One row per run: head, c, κ0, prediction mode (the training rows when runs differ in
them: learning curves), accuracy at 1/25/200/750/2500 km
(percent, with the bootstrap 95 % interval), median km, GeoScore, country accuracy,
NLL (nats per steradian, heads with a density only). The best value of each column
is marked (bold); ties are all marked.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from geo.files import atomic_write
from geo.geometry import vmf_radius_km
from geo.reports.runs import ACC_KEYS, FROZEN, HIGHER_IS_BETTER, METRIC_KEYS, SCALES_KM, SELECT_KEY, Run
from geo.reports.scope import NT, testable

CONVENTIONS = (
    "Metric conventions: accuracy@X km is the percentage of test images whose great-circle error "
    "(sphere of radius 6371.0088 km) is **≤ X km** — an accuracy, not an error rate; brackets give "
    "the bootstrap 95 % interval over test images, as recorded in each run's metrics.json. "
    "Median km is the median error "
    "(not the mean; the mean is in table.csv). GeoScore is the mean of 5000·exp(−d/1492.7 km). "
    "Country accuracy is the percentage of predictions in the true country. NLL is the mean negative "
    "log-density at the true location in nats per steradian (lower is better; only heads with a "
    "density). Bold marks the best value of each column. c is the number of cells/components, "
    "κ0 the initial log κ of the MvMF components. "
    "Calibration (heads with a density): cov@95 is the percentage of test images whose true location lies in "
    "the head's 95 % credible (highest-density) region — 95 for a calibrated head, less for an overconfident "
    "one; calib. err is the mean |coverage − level| over levels 5 %, 10 %, …, 95 % (0 = calibrated; "
    "lower is better). Sharpness: the median area (km²) of the 50 % and 95 % credible regions "
    "(smaller is sharper, which is only worth having with a small calibration error; not marked)."
)


def kappa0_note(runs: list[Run]) -> str:
    """What the κ0 values of ``runs`` mean as distances: the radius holding half of an initial component's mass."""
    kappa0s = sorted({run.kappa0 for run in runs if run.kappa0 is not None})
    if not kappa0s:
        return ""
    radii = ", ".join(f"κ0 = {k:g}: {vmf_radius_km(k):,.3g} km" for k in kappa0s)
    return f"Half of an initial MvMF component's mass lies within ({radii})."


def knn_index_note(runs: list[Run]) -> str:
    """How the knn runs searched their gallery: the FAISS index, its build time and its recall@k against exact."""
    notes = []
    for run in runs:
        facts = run.knn_index
        if not facts.get("knn_index"):
            continue
        recall = next(((k.split("@")[1], v) for k, v in facts.items() if k.startswith("knn_recall@")), None)
        text = f"{run.name}: {facts['knn_index']} index ({facts.get('knn_index_factory', '?')}"
        if facts.get("knn_nprobe") is not None:
            text += f", nprobe {facts['knn_nprobe']}"
        if (facts.get("knn_rerank") or 1) > 1:
            text += f", {facts['knn_rerank']}k candidates re-scored exactly"
        if facts.get("knn_index_build_s") is not None:
            text += f", built in {facts['knn_index_build_s']:.1f} s"
        text += ")"
        if recall is not None and recall[1] is not None:
            text += f", recall@{recall[0]} against exact search on val {recall[1]:.3f}"
        notes.append(text)
    return ("Approximate retrieval: " + "; ".join(notes) + ".") if notes else ""


@dataclass(frozen=True)
class Column:
    """A metric column: key in Run.test, title, value -> text, shown with interval?"""

    key: str
    title: str
    fmt: Callable[[float], str]
    with_ci: bool = True


def _area(x: float) -> str:
    return f"{x:,.3g}" if x < 1e4 else f"{x:,.0f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


COLUMNS = (
    *(Column(key, f"@{s} km (%)", _pct) for key, s in zip(ACC_KEYS, SCALES_KM)),
    Column("median_km", "median km", lambda x: f"{x:,.0f}" if x >= 10 else f"{x:.2f}"),
    Column("geoscore", "GeoScore", lambda x: f"{x:,.0f}"),
    Column("country_acc", "country (%)", _pct),
    Column("nll_nats", "NLL (nats)", lambda x: f"{x:.2f}"),
    Column("coverage@95", "cov@95 (%)", _pct),
    Column("calibration_error", "calib. err (%)", _pct),
    Column("area50_km2", "50 % region (km²)", _area, with_ci=False),
    Column("area95_km2", "95 % region (km²)", _area, with_ci=False),
)


def format_cells(n_cells: int | None) -> str:
    """c as the paper writes it: 2^k for powers of two."""
    if n_cells is None:
        return "?"
    if n_cells > 0 and n_cells & (n_cells - 1) == 0:
        return f"2^{n_cells.bit_length() - 1}"
    return str(n_cells)


def best_values(runs: list[Run]) -> dict[str, float]:
    """Best point estimate per metric column over runs (max, or min for km and NLL)."""
    best = {}
    for column in COLUMNS:
        values = [r.metric(column.key) for r in runs if r.metric(column.key) is not None
                  and not untestable(r, column.key)]
        if values and HIGHER_IS_BETTER[column.key] is not None:
            best[column.key] = max(values) if HIGHER_IS_BETTER[column.key] else min(values)
    return best


def untestable(run: Run, key: str) -> bool:
    """Whether metric ``key`` of ``run`` is an accuracy at a scale below its test set's minimum train-test
    distance (shown "n/t": not testable here, ``geo.reports.scope``)."""
    return key in ACC_KEYS and not testable(SCALES_KM[ACC_KEYS.index(key)], run)


NT_NOTE = ("n/t: not testable here: the scale is below the smallest distance from a test image to the nearest "
           "training image, so no head could have learned to place a test image that close (the values are in "
           "table.csv).")


def has_untestable(runs: list[Run]) -> bool:
    return any(untestable(run, key) for run in runs for key in ACC_KEYS)


def _cell_text(run: Run, column: Column) -> str:
    if untestable(run, column.key):
        return NT
    value = run.metric(column.key)
    if value is None:
        return "–"
    text = column.fmt(value)
    ci = run.ci(column.key)
    if column.with_ci and ci is not None:
        text += f" [{column.fmt(ci[0])}, {column.fmt(ci[1])}]"
    return text


def _rows(runs: list[Run]) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and rows of (text, is_best) cells, shared by the Markdown and HTML renderers."""
    mixed = any(r.cache_label for r in runs)
    sized = len({r.n_train for r in runs}) > 1  # learning curves: runs on several training-set sizes
    end_to_end = any(r.features != FROZEN for r in runs)  # paper table 2: frozen and end-to-end rows
    header = (["head", "c", "κ0", "prediction"] + (["features"] if end_to_end else [])
              + (["train rows"] if sized else []) + (["cache"] if mixed else []) + [c.title for c in COLUMNS])
    best = best_values(runs)
    rows = []
    for run in runs:
        cells = [(run.head, False), (format_cells(run.n_cells), False),
                 ("–" if run.kappa0 is None else f"{run.kappa0:g}", False), (run.predict or "?", False)]
        if end_to_end:
            cells.append((run.features, False))
        if sized:
            cells.append(("?" if run.n_train is None else f"{run.n_train:,}", False))
        if mixed:
            cells.append((run.cache_label or "?", False))
        for column in COLUMNS:
            value = run.metric(column.key)
            is_best = (value is not None and column.key in best and not untestable(run, column.key)
                       and math.isclose(value, best[column.key], rel_tol=1e-12, abs_tol=1e-12))
            cells.append((_cell_text(run, column), is_best))
        rows.append(cells)
    return header, rows


def to_markdown(runs: list[Run]) -> str:
    """A GitHub-flavoured Markdown table (best values in bold)."""
    header, rows = _rows(runs)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells in rows:
        lines.append("| " + " | ".join(f"**{t}**" if b else t for t, b in cells) + " |")
    return "\n".join(lines)


def to_html(runs: list[Run]) -> str:
    """An HTML <table> (best values in <strong>), titled with the run name on hover."""
    header, rows = _rows(runs)
    out = ['<table class="results">', "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
           + "</tr></thead>", "<tbody>"]
    for run, cells in zip(runs, rows):
        tds = "".join(f"<td><strong>{html.escape(t)}</strong></td>" if b else f"<td>{html.escape(t)}</td>"
                      for t, b in cells)
        out.append(f'<tr title="{html.escape(str(run.path))}">{tds}</tr>')
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def records(runs: list[Run]) -> list[dict]:
    """One flat dict per run for CSV/Parquet: metrics as stored (accuracies are fractions 0..1)."""
    out = []
    for run in runs:
        record = {"run": run.name, "path": str(run.path), "head": run.head, "n_cells": run.n_cells,
                  "kappa0": run.kappa0, "predict": run.predict, "seed": run.seed, "lr": run.lr,
                  "train_fraction": run.train_fraction, "n_train": run.n_train,
                  "cache": run.cache_path, "cache_id": run.cache_id, "cache_label": run.cache_label,
                  "features": run.features, "parent": run.parent}
        for key in METRIC_KEYS:
            ci = run.ci(key)
            record[key] = run.metric(key)
            record[f"{key}_lo"], record[f"{key}_hi"] = ci if ci else (None, None)
        record["split"] = run.split
        record["test_set"] = run.test_set
        record[f"best_val_{SELECT_KEY}"] = run.best_val()
        out.append(record)
    return out


_STRING_COLUMNS = {"run", "path", "head", "predict", "cache", "cache_id", "cache_label", "split", "test_set",
                   "features", "parent"}
_INT_COLUMNS = {"n_cells", "seed", "n_train"}


def write_exports(runs: list[Run], out_dir: Path) -> tuple[Path, Path]:
    """Write table.csv and table.parquet into ``out_dir``; returns their paths."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = records(runs)
    # An explicit schema keeps all-None columns typed (e.g. kappa0 when there are only softmax runs).
    def column_type(name: str) -> pa.DataType:
        return pa.int64() if name in _INT_COLUMNS else pa.string() if name in _STRING_COLUMNS else pa.float64()

    schema = pa.schema([(name, column_type(name)) for name in (rows[0] if rows else ["run"])])
    table = pa.Table.from_pylist(rows, schema=schema)
    csv_path, parquet_path = Path(out_dir) / "table.csv", Path(out_dir) / "table.parquet"
    with atomic_write(csv_path) as handle:
        pacsv.write_csv(table, handle)
    with atomic_write(parquet_path) as handle:
        pq.write_table(table, handle)
    return csv_path, parquet_path
