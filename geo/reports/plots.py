"""Figures of a report (matplotlib, Agg): accuracy vs c, accuracy vs κ0, learning curves, training curves,
reliability diagrams (calibration).

Each function returns a ``matplotlib.figure.Figure``, or a string saying why the
runs cannot make that figure. Accuracies are drawn in percent with their bootstrap
95 % intervals as shaded bands.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)

import numpy as np  # noqa: E402

from geo.reports.paired import hpd_levels  # noqa: E402
from geo.reports.runs import ACC_KEYS, SCALES_KM, Run, group_series, pick_one, series_label  # noqa: E402

MAX_LEGEND_ENTRIES = 12
LEARNING_CURVE_SCALES_KM = (25, 200, 750, 2500)


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes (Figure objects need no pyplot state, so nothing leaks)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _accuracy_panels(runs: list[Run], vary: str, xlabel: str, log2_x: bool) -> Figure | str:
    series = {k: s for k, s in group_series(runs, vary).items() if len(s) >= 2}
    if not series:
        return f"needs runs at ≥ 2 values of {xlabel} with the other settings equal"
    fig = Figure(figsize=(3.2 * len(SCALES_KM), 3.2))
    axes = fig.subplots(1, len(SCALES_KM), sharex=True)
    for ax, acc_key, scale in zip(axes, ACC_KEYS, SCALES_KM):
        for key, points in series.items():
            _line_with_band(ax, points, acc_key, 100, series_label(key, vary))
        if log2_x:
            ax.set_xscale("log", base=2)
        ax.set_title(f"accuracy @ {scale} km")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    if len(series) <= MAX_LEGEND_ENTRIES:
        axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _line_with_band(ax, points: list[tuple[float, Run]], key: str, factor: float, label: str, color=None):
    """``key`` (times ``factor``) against x, with the bootstrap interval band when every point has one."""
    points = [(x, run) for x, run in points if run.metric(key) is not None]
    if not points:
        return
    xs = [x for x, _ in points]
    line, = ax.plot(xs, [factor * run.metric(key) for _, run in points], marker="o", label=label, color=color)
    cis = [run.ci(key) for _, run in points]
    if all(ci is not None for ci in cis):
        ax.fill_between(xs, [factor * lo for lo, _ in cis], [factor * hi for _, hi in cis],
                        color=line.get_color(), alpha=0.15, linewidth=0)


def accuracy_vs_cells(runs: list[Run]) -> Figure | str:
    """Test accuracy against the number of cells c (log2 axis), one panel per scale (paper fig. 7)."""
    return _accuracy_panels(runs, "n_cells", "c (cells / components)", log2_x=True)


def accuracy_vs_kappa0(runs: list[Run]) -> Figure | str:
    """Test accuracy against κ0 (initial log κ), one panel per scale, MvMF runs only (paper fig. 6)."""
    return _accuracy_panels([r for r in runs if r.kappa0 is not None], "kappa0", "κ0 (log κ at init)", log2_x=False)


def learning_curves(runs: list[Run]) -> Figure | str:
    """Test accuracy @ 25/200/750/2500 km and NLL against the number of training rows (log axis), per head.

    One line per head configuration (head, c, κ0, prediction mode) trained on ≥ 2 training-set
    sizes (``geo sweep --train-fraction``), with bootstrap 95 % interval bands; the NLL panel
    shows the heads that have a density.
    """
    series = {k: s for k, s in group_series(runs, "n_train").items() if len(s) >= 2}
    if not series:
        return "needs runs of one head on ≥ 2 training-set sizes (geo sweep --train-fraction 0.1,0.3,1)"
    keys = [ACC_KEYS[SCALES_KM.index(s)] for s in LEARNING_CURVE_SCALES_KM] + ["nll_nats"]
    fig = Figure(figsize=(3.2 * len(keys), 3.2))
    axes = fig.subplots(1, len(keys), sharex=True)
    colors = {key: f"C{i % 10}" for i, key in enumerate(series)}  # a line keeps its colour in every panel
    for ax, key in zip(axes, keys):
        for series_key, points in series.items():
            factor = 1 if key == "nll_nats" else 100
            _line_with_band(ax, points, key, factor, series_label(series_key, "n_train"), colors[series_key])
        ax.set_xscale("log")
        ax.set_xlabel("training rows")
        ax.grid(alpha=0.3)
        if key == "nll_nats":
            ax.set(title="NLL (nats/sr, lower is better)", ylabel="NLL (nats/sr)")
        else:
            ax.set_title(f"accuracy @ {LEARNING_CURVE_SCALES_KM[keys.index(key)]} km")
    axes[0].set_ylabel("accuracy (%)")
    if len(series) <= MAX_LEGEND_ENTRIES:
        axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def training_curves(runs: list[Run]) -> Figure | str:
    """Train loss and val acc@750 km against step for each run, and final val NLL vs accuracy (fig. 3).

    The third panel asks the paper's question "does a lower loss mean better geolocation?"
    with the validation NLL per steradian, which (unlike the training losses) is comparable
    between heads.
    """
    with_history = [r for r in runs if r.history]
    if not with_history:
        return "needs metrics.jsonl with at least one evaluation"
    fig = Figure(figsize=(15, 3.6))
    ax_loss, ax_acc, ax_nll = fig.subplots(1, 3)
    for run in with_history:
        label = f"{run.head} c={run.n_cells}" + (f" κ0={run.kappa0:g}" if run.kappa0 is not None else "")
        steps = [h["step"] for h in run.history if h["step"] is not None and h["train_loss"] is not None]
        losses = [h["train_loss"] for h in run.history if h["step"] is not None and h["train_loss"] is not None]
        line, = ax_loss.plot(steps, losses, label=label)
        acc = [(h["step"], 100 * h["val"]["acc@750km"]) for h in run.history
               if h["step"] is not None and "acc@750km" in h["val"]]
        if acc:
            ax_acc.plot(*zip(*acc), color=line.get_color(), label=label)
        final = [h["val"] for h in run.history if "nll_nats" in h["val"] and "acc@750km" in h["val"]]
        if final:
            ax_nll.scatter(final[-1]["nll_nats"], 100 * final[-1]["acc@750km"], color=line.get_color(), label=label)
    ax_loss.set(xlabel="step", ylabel="train loss (nats)", title="training loss")
    ax_acc.set(xlabel="step", ylabel="val accuracy @ 750 km (%)", title="validation accuracy @ 750 km")
    ax_nll.set(xlabel="val NLL (nats/sr, last evaluation)", ylabel="val accuracy @ 750 km (%)",
               title="lower loss, better geolocation?")
    for ax in (ax_loss, ax_acc, ax_nll):
        ax.grid(alpha=0.3)
    if len(with_history) <= MAX_LEGEND_ENTRIES:
        ax_loss.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _run_label(run: Run) -> str:
    return f"{run.head}" + (f" c={run.n_cells}" if run.n_cells is not None else "") + \
        (f" κ0={run.kappa0:g}" if run.kappa0 is not None else "")


def reliability_diagram(runs: list[Run]) -> Figure | str:
    """Coverage of the a-credible (highest-density) regions against a, one line per head, and the diagonal.

    Coverage(a) is the fraction of test images whose ``hpd_level`` (predictions.parquet) is <= a; a
    calibrated head lies on the diagonal, an overconfident one below it, an underconfident one above.
    Per head, its best run on validation (``pick_one``) among those with HPD levels; the right panel shows
    each line's gap coverage − a (the calibration error is its mean absolute value over a = 0.05…0.95).
    """
    by_head: dict[str, list[tuple[Run, np.ndarray]]] = {}
    for run in runs:
        levels = hpd_levels(run.predictions_path)
        if levels is not None and len(levels):
            by_head.setdefault(run.head, []).append((run, levels))
    if not by_head:
        return "needs runs with hpd_level in predictions.parquet (heads with a density, scored by this geo)"
    grid = np.linspace(0.0, 1.0, 101)
    fig = Figure(figsize=(9.6, 4.0))
    ax, ax_gap = fig.subplots(1, 2)
    ax.plot([0, 100], [0, 100], color="black", linewidth=1, linestyle="--", label="calibrated")
    ax_gap.axhline(0.0, color="black", linewidth=1, linestyle="--")
    for head, members in sorted(by_head.items()):
        chosen = pick_one([run for run, _ in members])
        levels = np.sort(next(lv for run, lv in members if run is chosen))
        covered = np.searchsorted(levels, grid, side="right") / len(levels)
        error = chosen.metric("calibration_error")
        label = _run_label(chosen) + (f" (calib. err {100 * error:.1f} %)" if error is not None else "")
        line, = ax.plot(100 * grid, 100 * covered, label=label)
        ax_gap.plot(100 * grid, 100 * (covered - grid), color=line.get_color())
    ax.set(xlabel="credible level a (%)", ylabel="images whose truth lies in the a region (%)",
           title="reliability diagram", xlim=(0, 100), ylim=(0, 100))
    ax_gap.set(xlabel="credible level a (%)", ylabel="coverage − a (points)", title="gap (0 = calibrated)",
               xlim=(0, 100))
    for a in (ax, ax_gap):
        a.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig
