"""The head registry, and the contract every registered head must keep (parametrised over list_heads())."""

from __future__ import annotations

import json
import math

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
    grid = torch.from_numpy(fibonacci_sphere(100_000))
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
    torch.testing.assert_close(again.loss(again(x), y), head.loss(head(x), y))


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
    loss16 = head16.loss(logits16, y)
    loss16.backward()
    assert head16.linear.weight.grad.dtype == torch.float32
    assert loss16.item() == pytest.approx(head32.loss(logits32, y).item(), rel=2e-2)
