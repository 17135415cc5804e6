"""The bf16 training product (TrainingBf16Linear) against float64, and the exact path everything reported takes.

Bounds used below, for bf16 operands (x, W already rounded: their products are exact):
- float32 accumulation of k exact products: |s32 - s| <= k 2^-24 S, S = sum |x_i w_i| (we allow 2x);
- one round-to-nearest to bf16 (8 significant bits): |bf16(t) - t| <= 2^-8 |t|;
- a float32 add or cast: 2^-24 of the result.
So a training-path logit z' = float32(bf16(s32) + b) obeys
    |z' - (s + b)| <= 2^-8 (|s| + acc) + acc + 2^-23 (|s| + |b|),  acc = 2 k 2^-24 S,
and the reported path (no bf16 rounding of the result) obeys acc + 2^-23 (|s| + |b|).
A row's loss, log-sum-exp(z) minus a convex combination of z (cross-entropy) or
log-sum-exp(z) - log-sum-exp(z + v) (MvMF), moves by at most 2 max_j |dz_j|; its
gradient in z, (p - q) / B with q fixed or q the posterior, moves by at most
(p + q)(e^(2 max_j |dz_j|) - 1) / B, since every probability moves by a factor within e^(+-2 max|dz|).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geo.devices import cpu_supports_bf16, onednn_fp32_matmuls
from geo.heads import LowPrecisionLinear, TrainingBf16Linear, create_head
from geo.heads import base as heads_base
from geo.heads.low_precision import Scratch, bf16_outputs_are_faster
from geo.sphere.partition import Partition

U32 = 2.0**-24
U16 = 2.0**-8


def bf16_valued(*shape, generator, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16)


def training_bound(exact: torch.Tensor, abs_sum: torch.Tensor, k: int, offset: torch.Tensor | float = 0.0):
    """The bound above for bf16(float32 sum of k exact products) (+ a float32 ``offset``), float64."""
    acc = 2 * k * U32 * abs_sum
    return U16 * (exact.abs() + acc) + acc + 2 * U32 * (exact.abs() + torch.as_tensor(offset).abs())


def test_training_product_logits_and_gradients_within_the_derived_bounds():
    g = torch.Generator().manual_seed(0)
    n, d, c = 96, 512, 300
    x = bf16_valued(n, d, generator=g).float().requires_grad_()
    w = bf16_valued(c, d, generator=g, scale=d**-0.5 * 6).float().requires_grad_()  # |z| up to ~20
    b = torch.randn(c, generator=g).requires_grad_()
    out = TrainingBf16Linear.apply(x, w, b, w.detach().to(torch.bfloat16), Scratch())
    assert out.dtype == torch.float32
    upstream = torch.randn(n, c, generator=g)
    out.backward(upstream)

    x64, w64, b64, up64 = (t.detach().double() for t in (x, w, b, upstream))
    s = x64 @ w64.T
    err = (out.detach().double() - (s + b64)).abs()
    bound = training_bound(s, x64.abs() @ w64.abs().T, d, b64)
    assert torch.all(err <= bound)
    # The bound is the rounding itself, not a loose one: some logits come close to it,
    # and the float32-output bound (no bf16 rounding of the result) is broken.
    assert (err / bound).max() > 0.5
    assert torch.any(err > 2 * d * U32 * (x64.abs() @ w64.abs().T) + 2 * U32 * (s.abs() + b64.abs()))

    up_low = upstream.to(torch.bfloat16).double()                      # the upstream gradient is a bf16 operand
    gw = up_low.T @ x64
    gw_err = (w.grad.double() - gw).abs()
    gw_bound = training_bound(gw, up_low.abs().T @ x64.abs(), n)
    assert w.grad.dtype == torch.float32 and torch.all(gw_err <= gw_bound) and (gw_err / gw_bound).max() > 0.5
    gx = up_low @ w64
    assert torch.all((x.grad.double() - gx).abs() <= training_bound(gx, up_low.abs() @ w64.abs(), c))
    assert torch.all((b.grad.double() - up64.sum(0)).abs() <= 2 * n * U32 * up64.abs().sum(0))  # float32 sum


def test_reported_product_stays_float32_exact_in_onednn():
    # LowPrecisionLinear (every evaluation) on a native-bf16 CPU runs in oneDNN's bf16 math mode:
    # still the float64 product of the bf16 operands to float32 accumulation, never a bf16 result.
    g = torch.Generator().manual_seed(1)
    n, d, c = 128, 1024, 512                                            # big enough for oneDNN to take it
    x, w_low = bf16_valued(n, d, generator=g), bf16_valued(c, d, generator=g, scale=d**-0.5 * 20)
    b = torch.randn(c, generator=g)
    out = LowPrecisionLinear.apply(x, w_low.float(), b, w_low)
    s = x.double() @ w_low.double().T
    scale = x.double().abs() @ w_low.double().abs().T
    assert torch.all((out.double() - (s + b.double())).abs() <= 2 * d * U32 * scale + 2 * U32 * (s.abs() + b.abs()))
    assert out.abs().max() > 30
    before = torch.backends.mkldnn.matmul.fp32_precision
    with pytest.raises(ZeroDivisionError):
        with onednn_fp32_matmuls():
            assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
            1 / 0
    assert torch.backends.mkldnn.matmul.fp32_precision == before         # restored, even after an error
    with onednn_fp32_matmuls():
        inside = x.float() @ w_low.float().T
    assert torch.all((inside.double() - s).abs() <= 2 * d * U32 * scale)


@pytest.fixture(scope="module")
def partition():
    rng = np.random.default_rng(0)
    return Partition.build(np.degrees(np.arcsin(rng.uniform(-1, 1, 20000))), rng.uniform(-180, 180, 20000), 256)


def head_and_batch(name, partition, seed=0):
    torch.manual_seed(seed)
    kw = {"kappa0": 4.0} if name == "mvmf" else {}   # moderate kappa: the float32 loss itself is exact to ~1e-6
    head = create_head(name, feature_dim=256, partition=partition, matmul_dtype="bfloat16", **kw)
    with torch.no_grad():
        head.linear.weight.mul_(8.0)                                     # logits of a few units to ~20
        head.linear.bias.normal_()
    rng = np.random.default_rng(seed)
    lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1, 64))), rng.uniform(-180, 180, 64)
    targets = {"target_xyz": torch.from_numpy(
        np.stack([np.cos(np.radians(lat)) * np.cos(np.radians(lon)), np.cos(np.radians(lat)) * np.sin(np.radians(lon)),
                  np.sin(np.radians(lat))], 1).astype(np.float32)),
        **{k: torch.as_tensor(v) for k, v in head.row_targets(lat, lon).items()}}
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return head, x, targets


@pytest.mark.parametrize("name", ["mvmf", "softmax"])
def test_training_step_loss_and_weight_gradient_within_bounds_of_float64(name, partition, monkeypatch):
    # Force the training path on any CPU (bf16 emulated where not native: same rounding, only slower).
    monkeypatch.setattr(heads_base, "bf16_outputs_are_faster", lambda device: True)
    head, x, targets = head_and_batch(name, partition)
    head.train()
    logits = head(x)
    loss = head.loss(logits, **targets)
    loss.backward()

    # float64 recomputation from the same bf16 operands
    x64, w_low64 = x.double(), head.linear.weight.detach().to(torch.bfloat16).double()
    b64 = head.linear.bias.detach().double()
    s = x64 @ w_low64.T
    z64 = (s + b64).requires_grad_()
    loss64 = head.loss(z64, **targets)
    (g64,) = torch.autograd.grad(loss64, z64)
    dz = training_bound(s, x64.abs() @ w_low64.abs().T, x.shape[1], b64)
    assert torch.all((logits.detach().double() - z64.detach()).abs() <= dz)
    delta = dz.max(dim=1).values                                         # per row: max_j |dz_j|
    loss_slack = 1e-5 * (1 + loss64.abs())                               # the float32 loss code itself
    assert abs(loss.item() - loss64.item()) <= 2 * delta.mean().item() + loss_slack.item()

    batch = x.shape[0]
    p = torch.softmax(z64.detach(), -1)
    q = p - batch * g64                                                  # the one-hot / posterior term, >= 0
    dg = (p + q.abs()) * (torch.exp(2 * delta)[:, None] - 1) / batch + 1e-5 * (p + q.abs()) / batch
    gw64 = g64.T @ x64
    reach = (g64.abs() + dg).T @ x64.abs()                               # bounds sum_i |g'_ij x_ik|
    gw_bound = dg.T @ x64.abs() + U16 * reach + training_bound(gw64, reach, batch) - 2 * U32 * gw64.abs()
    err = (head.linear.weight.grad.double() - gw64).abs()
    assert torch.all(err <= gw_bound)
    assert err.max() > 1e-3 * gw64.abs().max()                           # the rounded path did run


@pytest.mark.parametrize("name", ["mvmf", "softmax"])
def test_evaluations_take_the_exact_path(name, partition):
    head, x, _ = head_and_batch(name, partition)
    s = x.double() @ head.linear.weight.detach().to(torch.bfloat16).double().T
    b64 = head.linear.bias.detach().double()
    scale = x.double().abs() @ head.linear.weight.detach().to(torch.bfloat16).double().abs().T
    exact_bound = 2 * x.shape[1] * U32 * scale + 2 * U32 * (s.abs() + b64.abs())
    head.train()
    with torch.no_grad():                                                # evaluate_split / calibrate_on_split
        no_grad = head(x)
    head.eval()
    eval_mode = head(x)                                                  # eval mode, even with autograd on
    head.train()
    head.linear.weight.requires_grad_(False)
    frozen = head(x)                                                     # a frozen head is not being trained
    head.linear.weight.requires_grad_(True)
    for out in (no_grad, eval_mode, frozen):
        assert torch.all((out.detach().double() - (s + b64)).abs() <= exact_bound)
    trained = head(x).detach().double() - b64
    if bf16_outputs_are_faster(x.device):                                # native bf16: the step's logits round
        assert torch.any((trained - s).abs() > exact_bound + 2 * U32 * b64.abs())
    else:                                                                # elsewhere the step is exact too
        assert torch.all((trained - s).abs() <= exact_bound + 2 * U32 * b64.abs())


def test_bf16_outputs_only_where_bf16_is_native():
    assert bf16_outputs_are_faster(torch.device("cpu")) == cpu_supports_bf16()
    assert not bf16_outputs_are_faster(torch.device("meta"))


def test_training_path_bias_free_logits_are_bf16_values(partition, monkeypatch):
    # With a zero bias the training path's logits are exactly the bf16-rounded products.
    monkeypatch.setattr(heads_base, "bf16_outputs_are_faster", lambda device: True)
    head, x, targets = head_and_batch("softmax", partition)
    with torch.no_grad():
        head.linear.bias.zero_()
    head.train()
    out = head(x)
    assert torch.equal(out, out.to(torch.bfloat16).float())
    ref = F.linear(x.double(), head.linear.weight.detach().to(torch.bfloat16).double())
    torch.testing.assert_close(out.detach().double(), ref, rtol=U16, atol=1e-6)
    # the scratch buffers are reused between steps, and a smaller chunk fits in them
    head.loss(out, **targets).backward()
    head.loss(head(x[:10]), **{k: v[:10] for k, v in targets.items()}).backward()
    assert head._bf16_scratch.buffers["z"].numel() == 64 * head.n_cells
