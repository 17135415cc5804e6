"""geo.reports.plots: the learning curves figure draws what the runs hold (values, bands, axes)."""

from __future__ import annotations

import numpy as np
import pytest

from geo.reports.plots import learning_curves
from geo.reports.runs import find_runs, group_series, series_label
from support.runs import write_run

SIZES = (100, 300, 1000)


def curve(tmp_path, head, accs, nll, n_cells=64, kappa0=None, half_width=0.01):
    for n, acc, loss in zip(SIZES, accs, nll):
        write_run(tmp_path / f"{head}-c{n_cells}-n{n}", head=head, n_cells=n_cells, kappa0=kappa0, acc=[acc] * 5,
                  nll=loss, half_width=half_width, n_train=n, train_fraction=n / 1000)


def test_learning_curves_plot_accuracy_and_nll_against_training_rows_with_bands(tmp_path):
    curve(tmp_path, "mvmf", (0.2, 0.3, 0.5), (6.0, 5.0, 4.0), kappa0=16.0)
    curve(tmp_path, "softmax", (0.1, 0.2, 0.3), (7.0, 6.5, 6.0))
    write_run(tmp_path / "mvmf-c256-full", n_cells=256, acc=[0.6] * 5, n_train=1000)  # one size: no line
    runs, _ = find_runs([tmp_path])
    fig = learning_curves(runs)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["accuracy @ 25 km", "accuracy @ 200 km", "accuracy @ 750 km",
                                               "accuracy @ 2500 km", "NLL (nats/sr, lower is better)"]
    for ax in axes:
        assert ax.get_xscale() == "log" and ax.get_xlabel() == "training rows"
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"mvmf c=64 κ0=16 argmax", "softmax c=64 centre"}
        assert list(lines["mvmf c=64 κ0=16 argmax"].get_xdata()) == list(SIZES)
        assert len(ax.collections) == 2  # one interval band per line
    mvmf_750 = {line.get_label(): line for line in axes[2].get_lines()}["mvmf c=64 κ0=16 argmax"]
    assert np.allclose(mvmf_750.get_ydata(), [20, 30, 50])  # percent
    band = axes[2].collections[0].get_paths()[0].vertices  # the band spans acc ± 1 point
    assert np.isclose(band[:, 1].min(), 19) and np.isclose(band[:, 1].max(), 51)
    nll = {line.get_label(): line for line in axes[4].get_lines()}
    assert np.allclose(nll["softmax c=64 centre"].get_ydata(), [7.0, 6.5, 6.0])  # nats, not percent


def test_learning_curves_say_why_they_are_not_drawn(tmp_path):
    write_run(tmp_path / "a", n_cells=64, n_train=1000)
    write_run(tmp_path / "b", n_cells=256, n_train=1000)
    runs, _ = find_runs([tmp_path])
    assert learning_curves(runs) == ("needs runs of one head on ≥ 2 training-set sizes "
                                     "(geo sweep --train-fraction 0.1,0.3,1)")


@pytest.mark.parametrize("vary", ["n_cells", "kappa0"])
def test_series_along_c_and_kappa0_keep_training_fractions_apart(tmp_path, vary):
    for fraction in (0.1, 1.0):
        for x in (16, 64):
            c, kappa0 = (x, 16.0) if vary == "n_cells" else (64, float(x))
            write_run(tmp_path / f"r{fraction}-{x}", n_cells=c, kappa0=kappa0, n_train=int(1000 * fraction),
                      train_fraction=fraction)
    runs, _ = find_runs([tmp_path])
    series = group_series(runs, vary)
    assert len(series) == 2 and all(len(points) == 2 for points in series.values())
    labels = sorted(series_label(key, vary) for key in series)
    assert labels[1] == labels[0] + " f=0.1"  # only a subset is labelled (full-data labels are unchanged)
    assert {run.train_fraction for points in series.values() for _, run in points} == {0.1, 1.0}
