"""The head contract does not assume cells: a head without a partition trains, sweeps, evaluates and reloads.

The head here is a stand-in for the regression / vMF heads to come: the mean
direction is a linear function of the features, normalised, with one learned
concentration; its density is that one vMF. Nothing in geo.training may look
at its name or its attributes: it only declares its facts.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from geo.geometry import normalize, vmf_log_density, xyz_to_latlon
from geo.heads import Head, create_head, list_heads, register_head
from geo.heads.base import VmfMixture
from geo.heads.registry import _REGISTRY
from geo.inference.credible import head_radii_km
from geo.training import runs
from geo.training.config import FitConfig
from geo.training.evaluate import evaluate_run
from geo.training.fit import fit_head
from geo.training.sweep import sweep
from support.caches import make_location_cache

NAME = "test-direction"
FAST = dict(n_cells=16, batch_size=128, epochs=15, lr=5e-2, precision="fp32", device="cpu")


class DirectionHead(Head):
    """vMF(y; normalize(A x + a), exp(log_kappa)): one component whose mean depends on the input."""

    has_density = True
    predict_modes = ("argmax", "mode")  # the mean is both the argmax and the mode

    def __init__(self, feature_dim: int, *, log_kappa0: float = 2.0):
        super().__init__(feature_dim)
        self.direction = torch.nn.Linear(feature_dim, 3)
        self.log_kappa = torch.nn.Parameter(torch.tensor(float(log_kappa0)))
        self.options = {"log_kappa0": float(log_kappa0)}

    @classmethod
    def parameter_count(cls, feature_dim: int, n_cells: int) -> int:
        return 3 * (feature_dim + 1) + 1

    def forward(self, features):
        return normalize(self.direction(features.to(self.direction.weight.dtype)))  # [B, 3]

    def log_density(self, output, xyz):
        y = torch.as_tensor(xyz).to(output)
        return vmf_log_density(y[None, :, :], output[:, None, :], self.log_kappa.to(output.dtype))  # [B, G]

    def log_density_at(self, output, target_xyz):
        return vmf_log_density(torch.as_tensor(target_xyz).to(output), output, self.log_kappa.to(output.dtype))

    def loss(self, output, target_xyz):
        return -self.log_density_at(output, target_xyz).mean()

    def predict(self, output, k=1, mode="argmax"):
        self._check_k(k)
        return xyz_to_latlon(output.detach().double().cpu()[:, None, :])

    def topk(self, output, k):
        self._check_k(k)
        return torch.ones(output.shape[0], 1), torch.zeros(output.shape[0], 1, dtype=torch.int64)

    def vmf_mixture(self, output_row):
        with torch.no_grad():
            return VmfMixture(torch.zeros(1, dtype=torch.float64), output_row.detach().double().cpu()[None],
                              self.log_kappa.detach().double().cpu()[None])


@pytest.fixture(scope="module")
def registered():
    register_head(NAME)(DirectionHead)
    yield NAME
    del _REGISTRY[NAME]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_location_cache(tmp_path_factory.mktemp("cache") / "loc.h5", n=1500)


def test_created_without_a_partition(registered):
    head = create_head(NAME, feature_dim=4, partition=None, log_kappa0=1.0)
    assert isinstance(head, DirectionHead) and head.options == {"log_kappa0": 1.0}
    assert NAME in list_heads()


def test_fit_evaluate_reload_and_radii(registered, cache, tmp_path):
    metrics = fit_head(cache, FitConfig(head=NAME, **FAST), tmp_path / "run", progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["predict"] == "argmax" and config["head_options"] == {}  # options_from_config: the defaults
    # Features carry the city: one input-dependent vMF learns it (cities are ~1000s of km apart;
    # predicting their mean direction gets acc@750km ~0.1).
    assert metrics["acc@750km"] > 0.65 and math.isfinite(metrics["nll_nats"])

    loaded = runs.load_head(tmp_path / "run")
    assert isinstance(loaded.head, DirectionHead) and loaded.partition is None
    again = evaluate_run(tmp_path / "run", n_bootstrap=0)
    assert again["acc@750km"] == pytest.approx(metrics["acc@750km"])

    # Credible radii of a single vMF: the closed form r_q = arccos(1 + log(1 - q (1 - e^-2k)) / k).
    output = loaded.head(torch.zeros(1, config["cache_feature_dim"]))[0]
    kappa = math.exp(float(loaded.head.log_kappa.detach()))
    radii = head_radii_km(loaded.head, output, output.detach().double().numpy(), masses=(0.5, 0.95))
    for q, r_km in zip((0.5, 0.95), radii):
        closed = math.acos(1 + math.log(1 - q * -math.expm1(-2 * kappa)) / kappa) * 6371.0088
        assert r_km == pytest.approx(closed, rel=1e-4)


def test_swept_beside_cell_heads(registered, cache, tmp_path):
    results = sweep(cache, tmp_path, heads=[NAME, "mvmf"], n_cells=[16], kappa0s=[8.0, 12.0],
                    base_config=FitConfig(**FAST), progress=False)
    # The head declares no swept option: one run per c, beside one MvMF run per kappa0.
    assert list(results) == [f"{NAME}-c16", "mvmf-c16-k8", "mvmf-c16-k12"]
    alone = fit_head(cache, FitConfig(head=NAME, **FAST), tmp_path / "alone", progress=False)
    for key in ("acc@750km", "median_km", "nll_nats"):  # the sweep trains it exactly as fit-head does
        assert results[f"{NAME}-c16"][key] == alone[key]
