"""The known-density benchmark in a report: each head's NLL minus the oracle's, on a synthetic cache.

A cache written by ``geo.cache.synthetic`` has its rows' true log-densities beside it
(``<stem>.oracle.parquet``). For a run on such a cache, the gap of each test row is

    gap = (-log p_head(y | x)) - (-log p_true(y | x))   nats,

whose mean is the head's excess NLL over the best possible (its expectation is the
KL divergence from the true conditional density: >= 0, up to sampling noise). Rows
are joined by id with the run's ``predictions.parquet``; the interval is a percentile
bootstrap over test rows (1000 replicates, seeded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from geo.cache.synthetic import oracle_path
from geo.reports.document import Section, Table, Text
from geo.reports.runs import Run

N_BOOTSTRAP = 1000


def oracle_gap(run: Run, *, n_bootstrap: int = N_BOOTSTRAP, seed: int = 0) -> dict | None:
    """``{"gap_nats", "ci", "oracle_nll_nats", "n"}`` for a run on a cache with an oracle; None otherwise."""
    if not run.cache_path or not Path(run.predictions_path).is_file():
        return None
    oracle_file = oracle_path(run.cache_path)
    if not oracle_file.is_file():
        return None
    predictions = pq.read_table(run.predictions_path)
    if "log_density" not in predictions.column_names:
        return None
    oracle = pq.read_table(oracle_file, columns=["id", "oracle_log_density"])
    truth = dict(zip(oracle.column("id").to_pylist(), oracle.column("oracle_log_density").to_numpy()))
    ids = predictions.column("id").to_pylist()
    log_p = predictions.column("log_density").to_numpy(zero_copy_only=False).astype(np.float64)
    if any(i not in truth for i in ids) or not np.isfinite(log_p).all():
        return None
    oracle_log_p = np.array([truth[i] for i in ids])
    gap = oracle_log_p - log_p
    rng = np.random.default_rng(seed)
    means = gap[rng.integers(len(gap), size=(n_bootstrap, len(gap)))].mean(1)
    return {"gap_nats": float(gap.mean()), "ci": (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))),
            "oracle_nll_nats": float(-oracle_log_p.mean()), "n": len(gap)}


def oracle_section(runs: list[Run]) -> Section | None:
    """The table of NLL minus the oracle's NLL per run; None when no run is on a cache with an oracle."""
    rows = []
    for run in runs:
        gap = oracle_gap(run)
        if gap is not None:
            rows.append((run, gap))
    if not rows:
        return None
    header = ["run", "head", "NLL (nats)", "oracle NLL (nats)", "NLL − oracle (nats)", "95 % interval", "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    html = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"]
    for run, gap in rows:
        cells = [run.name, run.head, f"{gap['oracle_nll_nats'] + gap['gap_nats']:.3f}", f"{gap['oracle_nll_nats']:.3f}",
                 f"{gap['gap_nats']:.3f}", f"[{gap['ci'][0]:.3f}, {gap['ci'][1]:.3f}]", str(gap["n"])]
        lines.append("| " + " | ".join(cells) + " |")
        html.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    html.append("</table>")
    note = ("Known-density benchmark: the cache's locations were drawn from a known conditional vMF mixture "
            "(`geo.cache.synthetic`), so each test row's true log-density is known. NLL − oracle is the mean excess "
            "negative log-likelihood over the true density (nats per steradian; its expectation is the KL divergence "
            "from the truth, >= 0); the interval is a bootstrap over test rows.")
    return Section("Known-density benchmark: NLL minus the oracle's", [Table("\n".join(lines), "".join(html)),
                                                                       Text(note)])
