"""The products W x + b of heads whose ``matmul_dtype`` is bf16, and the ``matmul_dtype`` option.

Everything evaluated or reported goes through ``LowPrecisionLinear`` (bf16 operands, float32
accumulation and result); a training step on a CPU with native bf16 through
``TrainingBf16Linear`` (bf16 products, one rounding of each logit and weight-gradient entry).
``Head.linear_product`` (geo.heads.base) chooses between them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from geo.devices import cpu_supports_bf16, onednn_fp32_matmuls
from geo.errors import ConfigError

MATMUL_DTYPES = {None: None, "float32": None, "bfloat16": torch.bfloat16}


def resolve_matmul_dtype(matmul_dtype: Any) -> torch.dtype | None:
    """``None``/"float32" -> None (plain float32 matmul); torch.bfloat16/"bfloat16" -> torch.bfloat16."""
    if isinstance(matmul_dtype, torch.dtype):
        matmul_dtype = {torch.bfloat16: "bfloat16", torch.float32: "float32"}.get(matmul_dtype, str(matmul_dtype))
    if matmul_dtype not in MATMUL_DTYPES:
        raise ConfigError(f"matmul_dtype must be None, 'float32' or 'bfloat16', not {matmul_dtype!r}")
    return MATMUL_DTYPES[matmul_dtype]


def matmul_dtype_option(matmul_dtype: torch.dtype | None) -> str | None:
    """The JSON-able ``matmul_dtype`` option of a resolved dtype (what a head's ``options`` record)."""
    return None if matmul_dtype is None else "bfloat16"


def matmul_dtype_of(config: dict) -> str | None:
    """The ``matmul_dtype`` option a run's ``precision`` implies: "bfloat16" under bf16, else None."""
    return "bfloat16" if config.get("precision") == "bf16" else None


def bf16_outputs_are_faster(device: torch.device) -> bool:
    """Whether a bf16-output product is worth its rounding in a training step on ``device``.

    True on a CPU with native bf16 (AVX512-BF16 / AMX), where no kernel multiplies bf16
    operands into a float32 result at bf16 speed; False on CUDA (``torch.mm(...,
    out_dtype=float32)`` is that kernel), MPS, and CPUs that emulate bf16 (slower than float32).
    """
    return device.type == "cpu" and cpu_supports_bf16()


def low_precision_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [m, k] @ b [k, n]`` of two low-precision (bf16) operands, accumulated and returned in float32.

    Only the *operands* are rounded: the result is never rounded to bf16's 8-bit
    mantissa (which costs 0.2 nats of log Gamma at |logit| ~ 38). On CUDA one
    kernel with ``out_dtype=float32`` (bf16 tensor cores, fp32 accumulator and
    output); elsewhere (CPU, MPS: no such kernel) the bf16 operands are widened to
    float32 and multiplied there, which is the same arithmetic: a product of two
    bf16 numbers (8-bit mantissas) is exact in float32, so only the summation order differs.
    On a CPU with native bf16 that float32 product runs in oneDNN with its bf16 math
    mode (``geo.devices.onednn_fp32_matmuls``: exact for bf16-valued operands, and
    faster than MKL's float32 there).
    """
    if a.device.type == "cuda":
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without the out_dtype overload
            pass
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    if a.device.type == "cpu" and a.dtype == b.dtype == torch.bfloat16 and cpu_supports_bf16():
        with onednn_fp32_matmuls():
            return a32 @ b32
    return a32 @ b32


class LowPrecisionLinear(torch.autograd.Function):
    """``x [B, d] @ W.T + b`` with both products on low-precision (bf16) operands and float32 results.

    Forward: ``x`` and ``weight_cast`` (W already in the low dtype) multiply with
    fp32 accumulation and a float32 result (``low_precision_product``) that the
    bias is added to. Backward: the weight gradient is one such product
    ``grad.T @ x`` (float32) cast to W's dtype; the input gradient is computed
    only when ``x`` requires it (never in training: features are fixed), from a
    private copy of the cast weight (the shared one is overwritten by the next call).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_cast):
        x_low = x.to(weight_cast.dtype)
        out = low_precision_product(x_low, weight_cast.T)
        out_dtype = torch.promote_types(weight.dtype, torch.float32)
        out = out.to(out_dtype).add_(bias.to(out_dtype))
        ctx.save_for_backward(x_low, weight_cast.clone() if ctx.needs_input_grad[0] else None)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_low, weight_cast = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_low = grad_out.to(x_low.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = low_precision_product(grad_low, weight_cast).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = low_precision_product(grad_low.T, x_low).to(w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None


class Scratch:
    """Reused temporaries of ``TrainingBf16Linear``: one buffer per name, grown as needed.

    A fresh [B, c] or [c, d] tensor costs more in page faults than the pass that
    fills it (large blocks come straight from mmap), so the bf16 products write into
    these. Each buffer is dead once the forward or backward that filled it returns.
    """

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self.buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)


class TrainingBf16Linear(torch.autograd.Function):
    """``x [B, d] @ W.T + b`` for a training step: bf16 operands *and* bf16 products, float32 result.

    The same operands as ``LowPrecisionLinear`` (x and ``weight_cast``, W in bf16), but
    each product is one plain bf16 matmul (float32 accumulation inside the kernel) whose
    result is rounded once to bf16: the logits W x before the float32 bias is added, the
    weight gradient ``grad.T @ x`` before it is widened to W's dtype, and the input
    gradient when ``x`` needs one. Each such entry is off by at most 2^-8 of itself (plus
    the float32 accumulation error), so the loss of a row moves by at most twice its
    largest logit error (tests/heads/test_low_precision.py derives and checks the bounds).
    Never used for anything reported: see ``Head.linear_product``. ``scratch`` (a
    ``Scratch``) holds the bf16 products between the kernel and their float32 copies.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_cast, scratch):
        x_low = x.to(weight_cast.dtype)
        rows, c = x.shape[0], weight.shape[0]
        z_low = scratch.get("z", (rows, c), weight_cast.dtype, x.device)
        torch.mm(x_low, weight_cast.T, out=z_low)
        out = torch.empty((rows, c), dtype=torch.promote_types(weight.dtype, torch.float32), device=x.device)
        out.copy_(z_low).add_(bias)  # two fast passes; a mixed bf16 + float32 add is several times slower
        ctx.save_for_backward(x_low, weight_cast.clone() if ctx.needs_input_grad[0] else None)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        ctx.scratch = scratch
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_low, weight_cast = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_low = ctx.scratch.get("grad", tuple(grad_out.shape), x_low.dtype, grad_out.device).copy_(grad_out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_low @ weight_cast).to(x_dtype)
        if ctx.needs_input_grad[1]:
            gw_low = ctx.scratch.get("grad_w", (grad_low.shape[1], x_low.shape[1]), x_low.dtype, x_low.device)
            torch.mm(grad_low.T, x_low, out=gw_low)
            grad_w = torch.empty(gw_low.shape, dtype=w_dtype, device=gw_low.device).copy_(gw_low)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None
