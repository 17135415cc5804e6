"""The head registry, and the contract every registered head must keep (parametrised over list_heads())."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from geo.errors import ConfigError
from geo.heads import Head, create_head, head_class, list_heads, register_head
from geo.sphere.partition import Partition
from support.sphere import CubePartition, fibonacci_sphere

# Per head: options that make its density resolvable by the quadrature grid (kappa = 50 for MvMF,
# ~e^3 for the input-dependent vMFs), the shape of its output for a batch of B rows, and the k its
# predict / topk are tested with. Every registered head must have an entry (a new head without one fails).
C = CubePartition.n_cells
HEADS = {
    "mvmf": dict(options={"kappa0": math.log(50.0)}, shape=lambda b: (b, C), k=2),
    "softmax": dict(options={}, shape=lambda b: (b, C), k=2),
    "softmax-hier": dict(options={}, shape=lambda b: (b, 48 + 12 + 6), k=2, partition=lambda: _real_partition(48)),
    "regression": dict(options={}, shape=lambda b: (b, 3), k=1),
    "knn": dict(options={"k": 4, "block_rows": 7}, shape=lambda b: (b, 4, 4), k=2, linear=False,
                prepare=lambda head: head.fit_gallery(*_gallery())),
    "vmf": dict(options={"log_kappa0": 3.0}, shape=lambda b: (b, 1, 5), k=1),
    # a tiny field: the quadrature test solves 3 x 100,000 ODEs
    # quadrature: the grid of the sampling and HPD tests. The flow head's density is an ODE solve per point
    # (~0.5 ms each here), so 400,000 points cost minutes; its test density is smooth, and 20,000 points resolve it.
    "flow": dict(options={"width": 16, "depth": 1, "n_samples": 4}, shape=lambda b: (b, 5 * 16), k=2, grid=4000,
                 quadrature=20_000),
    "vmf-mixture": dict(options={"n_components": 3, "log_kappa0": 3.0}, shape=lambda b: (b, 3, 5), k=2),
}
TEST_OPTIONS = {name: case["options"] for name, case in HEADS.items()}
# The heads geo itself registers (tests elsewhere register stand-ins of their own).
BUILT_IN = [name for name in list_heads() if head_class(name).__module__.startswith("geo.heads.")]
FEATURE_DIM = 8


def _real_partition(n_cells: int):
    """A PlaNet partition of scattered points (for heads that read cell ids and counts)."""
    rng = np.random.default_rng(0)
    return Partition.build(np.degrees(np.arcsin(rng.uniform(-1, 1, 4000))), rng.uniform(-180, 180, 4000), n_cells)


def _gallery(n: int = 40):
    """Random train features [n, FEATURE_DIM] and locations (degrees) for retrieval heads."""
    rng = np.random.default_rng(5)
    return rng.normal(size=(n, FEATURE_DIM)), np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


def partition_of(name: str):
    return HEADS.get(name, {}).get("partition", CubePartition)()


def make(name: str, **extra) -> Head:
    torch.manual_seed(0)
    head = create_head(name, feature_dim=FEATURE_DIM, partition=partition_of(name),
                       **{**TEST_OPTIONS.get(name, {}), **extra})
    HEADS.get(name, {}).get("prepare", lambda h: None)(head)
    return head


def quadrature_grid(name: str) -> torch.Tensor:
    """The Fibonacci grid ``[G, 3]`` of the sampling and HPD tests: 400,000 points, or the head's own ``quadrature``."""
    return torch.from_numpy(fibonacci_sphere(HEADS.get(name, {}).get("quadrature", 400_000)))


def batch(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURE_DIM, generator=g)
    y = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    return x, y


def test_registry_names_and_errors():
    assert {"mvmf", "softmax"} <= set(list_heads())
    assert list_heads() == sorted(list_heads())
    with pytest.raises(ConfigError, match="known heads: .*mvmf.*softmax"):
        create_head("planet", feature_dim=4, partition=CubePartition())
    with pytest.raises(ConfigError, match="kappa_0"):
        create_head("mvmf", feature_dim=4, partition=CubePartition(), kappa_0=3.0)
    with pytest.raises(ValueError, match="already registered"):
        register_head("mvmf")(type("Other", (Head,), {}))


def test_every_built_in_head_has_a_test_case():
    assert set(BUILT_IN) <= set(HEADS), sorted(set(BUILT_IN) - set(HEADS))
    assert {"mvmf", "softmax", "vmf", "vmf-mixture"} <= set(BUILT_IN)


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("feature_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shapes_and_finite_values(name, feature_dtype):
    head = make(name)
    x, y = batch()
    kk = HEADS[name]["k"]
    with torch.no_grad():
        logits = head(x.to(feature_dtype))
        assert logits.shape == HEADS[name]["shape"](5) and logits.dtype == torch.float32
        loss = head.loss(logits, y)
        assert loss.shape == () and torch.isfinite(loss)
        assert head.log_density_at(logits, y).shape == (5,)
        dens = head.log_density(logits, y[:3])
        assert dens.shape == (5, 3) and torch.isfinite(dens).all()
        assert head.max_k >= kk
        probs, index = head.topk(logits, kk)
        assert probs.shape == index.shape == (5, kk) and index.dtype == torch.int64
        assert torch.all(probs[:, :1] >= probs[:, -1:]) and torch.all(probs.sum(1) <= 1 + 1e-6)
        for mode in head.predict_modes:
            lat_deg, lon_deg = head.predict(logits, k=kk, mode=mode)
            assert lat_deg.shape == lon_deg.shape == (5, kk)
            assert torch.all(lat_deg.abs() <= 90) and torch.all(lon_deg.abs() <= 180)
            assert torch.isfinite(lat_deg).all() and torch.isfinite(lon_deg).all()


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_trainable_parameter_gets_a_gradient(name):
    head = make(name)
    x, y = batch(16)
    trainable = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    if not head.trainable:  # retrieval: nothing to train, and it says so
        assert not trainable and torch.isfinite(head.loss(head(x), y))
        return
    head.loss(head(x), y).backward()
    assert trainable
    for n, p in trainable:
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", BUILT_IN)
def test_density_integrates_to_one(name):
    head = make(name).double()
    if not head.has_density:
        pytest.skip(f"{name} has no density")
    x, _ = batch(3)
    grid = torch.from_numpy(fibonacci_sphere(HEADS[name].get("grid", 100_000)))  # fewer for ODE densities
    with torch.no_grad():
        integral = torch.exp(head.log_density(head(x.double()), grid)).sum(1) * (4 * math.pi / len(grid))
    np.testing.assert_allclose(integral.numpy(), 1.0, atol=2e-3)


@pytest.mark.parametrize("name", BUILT_IN)
def test_options_recreate_the_head(name):
    head = make(name)
    json.dumps(head.options)  # JSON-able: it goes into config.json
    again = create_head(name, feature_dim=FEATURE_DIM, partition=partition_of(name), **head.options)
    assert again.options == head.options and again.name == head.name == name
    again.load_state_dict(head.state_dict())
    HEADS[name].get("prepare", lambda h: None)(again)  # a gallery is attached, never part of the state
    x, y = batch()
    torch.manual_seed(1)  # the same draws for a stochastic loss (flow matching)
    loss_again = again.loss(again(x), y)
    torch.manual_seed(1)
    torch.testing.assert_close(loss_again, head.loss(head(x), y))


@pytest.mark.parametrize("name", BUILT_IN)
def test_bf16_matmul_agrees_with_float32(name):
    if not HEADS[name].get("linear", True):
        assert "matmul_dtype" not in head_class(name).__init__.__code__.co_varnames  # no product to lower
        return
    head32 = make(name)
    head16 = make(name, matmul_dtype="bfloat16")
    head16.load_state_dict(head32.state_dict())
    assert head16.options["matmul_dtype"] == "bfloat16"
    x, y = batch(32)
    logits32, logits16 = head32(x), head16(x)
    assert logits16.dtype == torch.float32
    # each bf16 operand carries a relative rounding error <= 2^-9, so each product <= ~2^-8
    product32, product16 = head32.linear_product(x), head16.linear_product(x)
    assert product16.dtype == torch.float32
    bound = 2.0**-7 * (x.abs() @ head32.linear.weight.abs().T) + 1e-6
    assert torch.all((product16 - product32).abs() <= bound)
    torch.manual_seed(1)  # the same draws for a stochastic loss (flow matching)
    loss16 = head16.loss(logits16, y)
    loss16.backward()
    assert head16.linear.weight.grad.dtype == torch.float32
    torch.manual_seed(1)
    assert loss16.item() == pytest.approx(head32.loss(logits32, y).item(), rel=2e-2)


# ---- sampling and calibration (every head with a density) --------------------------------------------------


def test_a_head_without_a_density_cannot_sample():
    class NoDensity(Head):  # not registered: a stand-in
        name = "no-density"

    head = NoDensity(feature_dim=FEATURE_DIM)
    with pytest.raises(NotImplementedError, match="no density"):
        head.sample(torch.zeros(2, 3), 10)
    with pytest.raises(NotImplementedError, match="no density"):
        head.calibration(torch.zeros(2, 3), torch.zeros(2, 3))


@pytest.mark.parametrize("name", BUILT_IN)
def test_sample_contract(name):
    head = make(name)
    assert head.has_density  # every built-in head has one; a new head without must test the refusal above
    x, y = batch(4)
    with torch.no_grad():
        out = head(x)
    draw = head.sample(out, 300, generator=torch.Generator().manual_seed(1))
    assert draw.shape == (4, 300, 3) and draw.dtype == torch.float64
    torch.testing.assert_close(draw.norm(dim=-1), torch.ones(4, 300, dtype=torch.float64), rtol=0, atol=1e-12)
    again = head.sample(out, 300, generator=torch.Generator().manual_seed(1))
    assert torch.equal(draw, again)  # reproducible from the seed
    assert head.sample(out[:0], 7).shape == (0, 7, 3)
    hpd, area = head.calibration(out, y, levels=(0.5, 0.95), n_samples=500, generator=torch.Generator().manual_seed(2))
    assert hpd.shape == (4,) and area.shape == (4, 2)
    assert torch.all((hpd >= 0) & (hpd <= 1)) and torch.all(area[:, 0] <= area[:, 1])
    assert torch.all((area > 0) & (area <= 4 * math.pi + 1e-9))


@pytest.mark.parametrize("name", BUILT_IN)
def test_samples_follow_the_density(name):
    """Samples are distributed per the head's density: their mean log-density equals the entropy integral
    -H = sum over a quadrature grid of p log p, and their counts in the cells of a partition match the grid's
    integral of p over each cell (chi-square)."""
    head = make(name).double()
    x, _ = batch(2, seed=3)
    n = 20_000
    grid = quadrature_grid(name)
    weight = 4 * math.pi / len(grid)
    cells = _real_partition(24)
    grid_lat, grid_lon = np.degrees(np.arcsin(np.clip(grid[:, 2].numpy(), -1, 1))), \
        np.degrees(np.arctan2(grid[:, 1].numpy(), grid[:, 0].numpy()))
    grid_cell = cells.assign(grid_lat, grid_lon)
    with torch.no_grad():
        out = head(x.double())
        log_p_grid = head.log_density(out, grid).numpy()                                  # [2, G]
        draw = head.sample(out, n, generator=torch.Generator().manual_seed(4))
        log_p_draw = head.log_density_rows(out, draw).numpy()                             # [2, n]
    for row in range(2):
        p = np.exp(log_p_grid[row])
        neg_entropy = float(np.sum(p * log_p_grid[row]) * weight)
        se = log_p_draw[row].std() / math.sqrt(n)
        assert abs(log_p_draw[row].mean() - neg_entropy) < 5 * se + 0.01, (row, log_p_draw[row].mean(), neg_entropy)
        expected = np.bincount(grid_cell, weights=p * weight, minlength=cells.n_cells) * n
        xyz = draw[row].numpy()
        counts = np.bincount(cells.assign(np.degrees(np.arcsin(np.clip(xyz[:, 2], -1, 1))),
                                          np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0]))), minlength=cells.n_cells)
        keep = expected > 5
        chi2 = float(np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep]))
        from scipy.stats import chi2 as chi2_law
        assert chi2_law.sf(chi2, keep.sum() - 1) > 1e-4, (row, chi2, keep.sum())


@pytest.mark.parametrize("name", BUILT_IN)
def test_hpd_levels_and_areas_match_a_dense_grid_integral(name):
    """HPD levels and credible areas, by the head's own method ("auto": closed form, exact cells or Monte Carlo) and
    by Monte Carlo from its samples, equal the integrals over a quadrature grid that resolves the density:
    level = integral of p over {p > p(y)}, area = the grid area of the densest points holding the mass."""
    head = make(name).double()
    x, y = batch(4, seed=5)
    # The flow head's density is an ODE solve per point: a coarser grid (HEADS' quadrature; its test density is
    # smooth) and its own cap on calibration samples (flow.CALIBRATION_SAMPLES), hence a wider Monte Carlo tolerance.
    grid = quadrature_grid(name)
    n_samples = min(10_000, getattr(sys.modules[type(head).__module__], "CALIBRATION_SAMPLES", 10_000))
    hpd_tol = max(0.02, 4 * 0.5 / math.sqrt(n_samples))  # 4 standard errors of a Monte Carlo level, at least
    weight = 4 * math.pi / len(grid)
    levels = (0.5, 0.95)
    with torch.no_grad():
        out = head(x.double())
        log_p_grid = head.log_density(out, grid).numpy()
        log_p_y = torch.stack([head.log_density(out[r:r + 1], y[r:r + 1])[0, 0] for r in range(4)]).numpy()
        results = {method: head.calibration(out, y, levels=levels, n_samples=n_samples, method=method,
                                            generator=torch.Generator().manual_seed(6))
                   for method in ("auto", "monte-carlo")}
    for row in range(4):
        p = np.exp(log_p_grid[row])
        # ties (a cell density: y's own cell) make the level an interval; the methods draw a point inside it
        low = float(np.sum(p * (log_p_grid[row] > log_p_y[row] + 1e-9)) * weight)
        high = float(np.sum(p * (log_p_grid[row] >= log_p_y[row] - 1e-9)) * weight)
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order]) * weight
        ref_area = [(np.searchsorted(cum, a) + 1) * weight for a in levels]
        for method, (hpd, area) in results.items():
            # Monte Carlo: standard error <= 0.5 / sqrt(10^4) = 0.005; the grid's own error is ~1e-3
            assert low - hpd_tol <= float(hpd[row]) <= high + hpd_tol, (method, row, float(hpd[row]), low, high)
            # areas: the Monte Carlo estimate of the 95 % region weighs its low-density edge by 1 / p
            parts = head.mixture_parts(out)
            exact = method == "auto" and (parts is None or parts[0].shape[1] == 1)
            np.testing.assert_allclose(area[row].numpy(), ref_area, rtol=0.03 if exact else 0.12 if n_samples >= 2500
                                       else 0.3,
                                       err_msg=f"{method} row {row}")
