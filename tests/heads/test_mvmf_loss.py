"""The fused MvMF log-likelihood Function against plain float64 autograd, and the bf16 linear of Head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geo.heads import LowPrecisionLinear, create_head
from geo.heads.mvmf_loss import mvmf_log_density_at


def reference(logits, y, mu_raw, log_kappa):
    """The same quantity by float64 autograd on the difference form (geometry's exact chord)."""
    mu = mu_raw / mu_raw.norm(dim=-1, keepdim=True)
    kappa = torch.exp(log_kappa)
    log_c = log_kappa - math.log(2 * math.pi) - torch.log(-torch.expm1(-2 * kappa))
    chord2 = (y[:, None, :] - mu[None, :, :]).pow(2).sum(-1)
    log_vmf = log_c[None, :] - 0.5 * kappa[None, :] * chord2
    return torch.logsumexp(logits + log_vmf, dim=1) - torch.logsumexp(logits, dim=1)


def problem(seed, batch=12, c=6, log_kappa_max=16.0, log_kappa_min=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mu_raw = torch.randn(c, 3, generator=g, dtype=torch.float64) * (0.5 + torch.rand(c, 1, generator=g, dtype=torch.float64))
    mu = mu_raw / mu_raw.norm(dim=-1, keepdim=True)
    log_kappa = log_kappa_min + torch.rand(c, generator=g, dtype=torch.float64) * (log_kappa_max - log_kappa_min)
    log_kappa[0] = log_kappa_max
    comp = torch.randint(0, c, (batch,), generator=g)
    # points one standard deviation or so from a component, some anywhere, one antipodal
    y = mu[comp] + torch.randn(batch, 3, generator=g, dtype=torch.float64) * torch.exp(-0.5 * log_kappa[comp])[:, None]
    y[batch // 2:] = torch.randn(batch - batch // 2, 3, generator=g, dtype=torch.float64)
    y[-1] = -mu[0]
    y = y / y.norm(dim=-1, keepdim=True)
    logits = torch.randn(batch, c, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (logits, y, mu_raw, log_kappa)]


@pytest.mark.parametrize("chunk_rows", [1, 5, 100])
def test_gradcheck_float64(chunk_rows):
    logits, y, mu_raw, log_kappa = problem(0, batch=7, c=4, log_kappa_max=3.0)
    inputs = (logits.requires_grad_(), mu_raw.requires_grad_(), log_kappa.requires_grad_())
    g = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # mixed-sign row weights

    def fn(lg, m, lk):
        return (mvmf_log_density_at(lg, y, m, lk, chunk_rows) * g).sum()

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_float64_values_and_gradients_match_autograd_at_large_kappa():
    logits, y, mu_raw, log_kappa = (t.requires_grad_() if i != 1 else t for i, t in enumerate(problem(2)))
    got = mvmf_log_density_at(logits, y, mu_raw, log_kappa, 5)
    ref = reference(logits, y, mu_raw, log_kappa)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-8)
    w = torch.linspace(-1, 1, len(got), dtype=torch.float64)
    grads = torch.autograd.grad((got * w).sum(), (logits, mu_raw, log_kappa))
    refs = torch.autograd.grad((ref * w).sum(), (logits, mu_raw, log_kappa))
    for a, b in zip(grads, refs):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9 * b.abs().max().item())


def test_float32_within_float_rounding_of_float64_reference():
    # float32 inputs, kappa up to e^16: the log vMF matrix is exact (float64 product), so
    # the density is within ~1e-3 nats near the means and float32 relative rounding far out
    logits, y, mu_raw, log_kappa = problem(3, batch=40, c=9, log_kappa_min=10.0, dtype=torch.float32)
    for t in (logits, mu_raw, log_kappa):
        t.requires_grad_()
    got = mvmf_log_density_at(logits, y, mu_raw, log_kappa, 16)
    ref = reference(*(t.detach().double() for t in (logits, y, mu_raw, log_kappa)))
    assert ref.min() < -1e4 and ref.max() > 10  # far-out and peaked (kappa ~ e^16) points
    np.testing.assert_allclose(got.detach().double().numpy(), ref.numpy(), rtol=1e-6, atol=1e-3)
    got.sum().backward()
    ref64 = [t.detach().double().requires_grad_() for t in (logits, mu_raw, log_kappa)]
    reference(ref64[0], y.double(), ref64[1], ref64[2]).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref64[0].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(log_kappa.grad.double(), ref64[2].grad, rtol=1e-4, atol=1e-4)
    # mu: float32 accumulation of sum_b G_bi y_b, relative to the gradient's scale
    scale = ref64[1].grad.abs().max().item()
    torch.testing.assert_close(mu_raw.grad.double(), ref64[1].grad, rtol=1e-3, atol=1e-3 * scale)


def test_float32_gradients_of_mu_and_kappa_are_accumulated_in_float64():
    # 2000 rows into 300 components up to kappa = e^20: the column sums behind d mu and
    # d log kappa come from one float64 product of the float32 responsibilities, so both
    # gradients are within float32 rounding of r (~1e-7 of their scale), where a float32
    # accumulation of sum_b G_bi y_b was ~1e-4 off for mu (measured).
    logits, y, mu_raw, log_kappa = problem(3, batch=2000, c=300, log_kappa_min=8.0, log_kappa_max=20.0,
                                           dtype=torch.float32)
    for t in (logits, mu_raw, log_kappa):
        t.requires_grad_()
    mvmf_log_density_at(logits, y, mu_raw, log_kappa, 64).sum().backward()
    ref64 = [t.detach().double().requires_grad_() for t in (logits, mu_raw, log_kappa)]
    reference(ref64[0], y.double(), ref64[1], ref64[2]).sum().backward()
    for got, ref in ((mu_raw.grad, ref64[1].grad), (log_kappa.grad, ref64[2].grad)):
        assert (got.double() - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_repeated_backward_through_the_saved_softmaxes_is_identical():
    logits, y, mu_raw, log_kappa = problem(5, dtype=torch.float32)
    for t in (logits, mu_raw, log_kappa):
        t.requires_grad_()
    out = mvmf_log_density_at(logits, y, mu_raw, log_kappa, 4).sum()
    first = torch.autograd.grad(out, (logits, mu_raw, log_kappa), retain_graph=True)
    second = torch.autograd.grad(out, (logits, mu_raw, log_kappa))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_frozen_inputs_get_no_gradient_and_no_grad_mode_works():
    logits, y, mu_raw, log_kappa = problem(4, dtype=torch.float32)
    logits.requires_grad_()
    out = mvmf_log_density_at(logits, y, mu_raw, log_kappa, 3)
    out.sum().backward()
    assert logits.grad is not None and mu_raw.grad is None and log_kappa.grad is None
    with torch.no_grad():
        torch.testing.assert_close(mvmf_log_density_at(logits, y, mu_raw, log_kappa, 3), out.detach())


# ---- the bf16 linear of Head ----------------------------------------------------


def test_low_precision_linear_gradients_match_float64_within_bf16_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=g).to(torch.bfloat16).float().requires_grad_()
    w = torch.randn(10, 32, generator=g).requires_grad_()
    b = torch.randn(10, generator=g).requires_grad_()
    out = LowPrecisionLinear.apply(x, w, b, w.detach().to(torch.bfloat16))
    assert out.dtype == torch.float32
    upstream = torch.randn(16, 10, generator=g)
    out.backward(upstream)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    (torch.nn.functional.linear(x64, w64, b64) * upstream.double()).sum().backward()
    bound = 2.0**-7 * (x64.abs() @ w64.abs().T) + 1e-6               # bf16 operands, then one rounding
    assert torch.all((out.double() - torch.nn.functional.linear(x64, w64, b64)).abs() <= bound)
    gw_bound = 2.0**-7 * (upstream.double().abs().T @ x64.abs()) + 1e-6
    assert w.grad.dtype == torch.float32 and torch.all((w.grad.double() - w64.grad).abs() <= gw_bound)
    torch.testing.assert_close(b.grad.double(), b64.grad)             # bias: float32 throughout
    gx_bound = 2.0**-7 * (upstream.double().abs() @ w64.abs()) + 1e-6
    assert torch.all((x.grad.double() - x64.grad).abs() <= gx_bound)


def test_bf16_logits_are_accumulated_and_returned_in_float32():
    # The audit's case: logits |z| ~ 38. Rounding the *output* to bf16 (8-bit mantissa) costs
    # ~0.1-0.2 nats of log Gamma; with float32 accumulation and output only the operands are
    # rounded, so the logits equal the float64 product of the rounded operands to float32 accuracy.
    g = torch.Generator().manual_seed(1)
    d, c = 256, 64
    x = torch.randn(256, d, generator=g)
    w = torch.randn(c, d, generator=g) * (38.0 / (d ** 0.5 * 1.0))  # |z| up to ~38 * a few
    b = torch.zeros(c)
    x_low, w_low = x.to(torch.bfloat16), w.to(torch.bfloat16)
    out = LowPrecisionLinear.apply(x, w, b, w_low)
    assert out.dtype == torch.float32
    exact = x_low.double() @ w_low.double().T                        # float64 product of the rounded operands
    scale = x_low.double().abs() @ w_low.double().abs().T
    assert torch.all((out.double() - exact).abs() <= d * 2.0**-24 * scale + 1e-6)
    log_gamma, log_gamma_ref = torch.log_softmax(out.double(), -1), torch.log_softmax(exact, -1)
    assert (log_gamma - log_gamma_ref).abs().max() < 1e-3             # was 0.2 nats with a bf16 output
    assert (out.abs().max() > 30) and torch.equal(out.argmax(-1), exact.argmax(-1))
    # and the weight gradient is accumulated in float32 too
    upstream = torch.randn(256, c, generator=g)
    w_req = w.clone().requires_grad_()
    LowPrecisionLinear.apply(x, w_req, b, w_low).backward(upstream)
    gw_exact = upstream.to(torch.bfloat16).double().T @ x_low.double()
    gw_scale = upstream.to(torch.bfloat16).double().abs().T @ x_low.double().abs()
    assert torch.all((w_req.grad.double() - gw_exact).abs() <= 256 * 2.0**-24 * gw_scale + 1e-6)


def test_bf16_head_sees_weight_updates_by_fused_adamw():
    # the cast W lives in a reused buffer: it must be recast after every optimizer step
    from types import SimpleNamespace

    part = SimpleNamespace(centres_xyz=np.eye(3), means_xyz=np.eye(3), areas_sr=np.full(3, 4 * np.pi / 3), n_cells=3)
    head = create_head("mvmf", feature_dim=4, partition=part, matmul_dtype="bfloat16", kappa0=2.0)
    opt = torch.optim.AdamW(head.parameters(), lr=0.5, fused=True)
    x = torch.randn(5, 4).to(torch.bfloat16)
    y = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    before = head(x).detach()
    head.loss(head(x), y).backward()
    opt.step()
    after = head(x).detach()
    expected = torch.nn.functional.linear(x.float(), head.linear.weight.detach().bfloat16().float(),
                                          head.linear.bias.detach())
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-2, atol=1e-2)
