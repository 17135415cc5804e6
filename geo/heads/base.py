"""The Head contract, the shared linear layer of cell heads, and the low-precision product.

Every output head is a ``torch.nn.Module`` subclass of :class:`Head`. The
contract does not assume cells: a head may be built over a partition of the
sphere (MvMF, softmax: ``uses_partition = True``) or not (regression,
retrieval, input-dependent vMF mixtures).

- ``forward(features [B, d]) -> output``: the head's own tensor (for cell heads
  the logits ``[B, c]``, float32);
- ``loss(output, target_xyz [B, 3], **targets) -> []``: mean over the batch, nats;
  ``targets`` are the per-row tensors of ``row_targets`` (e.g. the softmax's cells);
- ``log_density_at(output, target_xyz [B, 3]) -> [B]`` and
  ``log_density(output, xyz [G, 3]) -> [B, G]``: log probability per steradian,
  so every head's NLL at the true location is comparable (heads without a
  density raise ``NotImplementedError``);
- ``predict(output, k, mode) -> (lat_deg [B, k], lon_deg [B, k])`` float64 degrees,
  and ``topk(output, k) -> (score [B, k], index [B, k])``, the probability of each of
  the k best components / cells (what ``predictions.parquet`` stores as ``topk_prob``);
- ``max_k``: the largest k ``predict`` and ``topk`` accept.

Declared facts, read by training, sweeps, reports, credible radii and
``geo predict`` instead of the head's name or attributes:

- ``predict_modes``: the modes ``predict`` accepts; the first is the default;
- ``has_density``: whether ``log_density`` is a normalised density;
- ``sweep_options``: ``{option: run-name tag}``, the options a sweep may vary
  (``{"kappa0": "k"}`` for MvMF: runs ``mvmf-c1024-k16``);
- ``options_from_config(config)``: the keyword options of ``create_head`` from a
  run's resolved configuration (``config.json``), i.e. how it is rebuilt;
- ``needs_calibration`` and ``calibrate(outputs, target_xyz)``: a head that fits
  something on held-out data after (or while) its parameters are trained declares
  ``needs_calibration = True``; the trainer then calls ``calibrate`` with the head's
  outputs on the whole val split and the true points ``[n, 3]`` before every val
  evaluation, so the selected state carries its own calibration (e.g. the
  regression head's one kappa, a buffer). The default does nothing;
- ``trainable``: False for a head with nothing to train (retrieval): the trainer
  makes no optimizer, takes no steps and evaluates it once (one metrics.jsonl line);
- ``needs_gallery`` and ``fit_gallery(gallery)``: a head that searches the train
  split itself (retrieval) gets it from the training layer (fit, evaluate, predict)
  as an object serving its features in blocks (``geo.heads.knn.Gallery``, read from
  the run's cache); it keeps a reference, never a copy in its state;
- ``vmf_mixture(output)`` / ``cell_density(output)``: the density in a form the
  credible radii and maps integrate exactly (a vMF mixture, or a piecewise-constant
  density over a partition's cells); None when the head's density is not of that form.

``geo.heads`` holds models only: no training loop, no file I/O, and it never
imports ``geo.pipeline`` or ``geo.training``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

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


@dataclass
class VmfMixture:
    """A density that is a mixture of vMF components, one row's worth (numpy, float64).

    ``log_weights [K]`` (normalised: logsumexp = 0), ``mu_xyz [K, 3]`` unit means,
    ``log_kappa [K]`` log concentrations.
    """

    log_weights: Any
    mu_xyz: Any
    log_kappa: Any


@dataclass
class CellDensity:
    """A density constant on each cell of ``partition``: ``probs [c]`` the cells' probabilities."""

    probs: Any
    partition: Any


class Head(nn.Module):
    """Base of every output head: the declared facts and their defaults (see the module docstring)."""

    name: ClassVar[str] = ""  # set by register_head
    uses_partition: ClassVar[bool] = False
    has_density: ClassVar[bool] = False
    predict_modes: ClassVar[tuple[str, ...]] = ("argmax",)
    sweep_options: ClassVar[dict[str, str]] = {}
    trainable: ClassVar[bool] = True  # False: nothing to optimise (the trainer takes no steps)
    needs_gallery: ClassVar[bool] = False  # the training layer calls fit_gallery() with the train split
    needs_calibration: ClassVar[bool] = False  # the trainer calls calibrate() on val outputs before evaluating
    shared_components: ClassVar[bool] = False  # a mixture whose components do not depend on the input (MvMF)

    def __init__(self, feature_dim: int):
        super().__init__()
        if feature_dim < 1:
            raise ConfigError(f"feature_dim must be >= 1 (got {feature_dim})")
        self.feature_dim = int(feature_dim)
        self.options: dict = {}  # JSON-able keyword options that re-create the head with create_head

    @classmethod
    def default_predict(cls) -> str:
        return cls.predict_modes[0]

    @classmethod
    def check_predict(cls, predict: str | None) -> str:
        """``predict`` (None = the default mode), refused with the modes this head offers."""
        predict = predict or cls.default_predict()
        if predict not in cls.predict_modes:
            why = " (it has no density to maximise)" if predict == "mode" and not cls.has_density else ""
            raise ConfigError(f"--predict {predict} is not available for head {cls.name!r}{why}; "
                              f"choose one of: {', '.join(cls.predict_modes)}")
        return predict

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        """Keyword options of ``create_head`` from a run's resolved configuration (config.json)."""
        return {}

    @classmethod
    def parameter_count(cls, feature_dim: int, n_cells: int) -> int:
        """Trainable parameters of such a head (for the sweep's memory estimate)."""
        return 0

    @property
    def max_k(self) -> int:
        """The largest k that ``predict`` and ``topk`` accept."""
        return 1

    def row_targets(self, lat_deg, lon_deg) -> dict[str, torch.Tensor]:
        """Per-row training targets beyond ``target_xyz``, computed once for a whole dataset.

        ``lat_deg, lon_deg [n]`` (numpy degrees) -> ``{loss keyword: tensor [n]}``;
        the trainer slices them per batch and passes them to ``loss``.
        """
        return {}

    def weight_decay_parameters(self) -> list[nn.Parameter]:
        """The parameters decoupled weight decay applies to (matrices acting on features)."""
        return [p for p in self.parameters() if p.requires_grad and p.ndim >= 2 and p.shape[-1] == self.feature_dim]

    def fit_gallery(self, gallery, *args, **kwargs) -> None:
        """Attach the train split as a gallery (``geo.heads.knn.Gallery``; heads with ``needs_gallery``)."""

    def calibrate(self, outputs: torch.Tensor, target_xyz: torch.Tensor) -> None:
        """Fit what the head fits on held-out data: its ``outputs`` on the val split and the true points ``[n, 3]``.

        Called by the trainer only for heads declaring ``needs_calibration``; the default does nothing.
        """

    def vmf_mixture(self, output_row: torch.Tensor) -> VmfMixture | None:
        """One row's density as a vMF mixture, or None when it is not one."""
        return None

    def cell_density(self, output_row: torch.Tensor) -> CellDensity | None:
        """One row's density as cell probabilities over a partition, or None when it is not one."""
        return None

    # ---- the product W x + b of heads with a ``linear`` layer and a ``matmul_dtype`` ----------

    def linear_product(self, features: torch.Tensor) -> torch.Tensor:
        """``self.linear(features)`` ``[B, out]`` in float32 (float64 for a float64 head), features of any float dtype.

        With ``self.matmul_dtype = bfloat16`` only the products run in bf16 (inputs cast
        explicitly, no autocast): W x in forward and the weight gradient in backward
        (``LowPrecisionLinear``); the result, the bias and all gradients are float32.
        """
        weight, bias = self.linear.weight, self.linear.bias
        if getattr(self, "matmul_dtype", None) is None:
            return F.linear(features.to(weight.dtype), weight, bias)
        return LowPrecisionLinear.apply(features, weight, bias, self._low_precision_weight(weight))

    def _low_precision_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W cast to ``matmul_dtype``, written into a buffer kept between calls.

        Recast on every call (the fused AdamW updates W without bumping its version
        counter, so a cached copy could not tell it is stale), but into the same
        memory: a fresh [c, d] tensor costs more in page faults than the cast itself.
        A plain attribute, not a registered buffer: it is not part of the state.
        """
        cached = getattr(self, "_weight_cast", None)
        if cached is None or cached.shape != weight.shape or cached.device != weight.device \
                or cached.dtype != self.matmul_dtype:
            cached = torch.empty(weight.shape, dtype=self.matmul_dtype, device=weight.device)
            self._weight_cast = cached
        with torch.no_grad():
            return cached.copy_(weight)

    def _check_mode(self, mode: str) -> str:
        """``mode`` if it is one of ``predict_modes``; ConfigError listing them otherwise."""
        if mode not in self.predict_modes:
            raise ConfigError(f"predict mode for the {self.name} head must be one of {', '.join(self.predict_modes)}, "
                              f"not {mode!r}")
        return mode

    def _check_k(self, k: int) -> int:
        if not 1 <= int(k) <= self.max_k:
            raise ConfigError(f"k must be between 1 and {self.max_k} (this head's max_k), not {k}")
        return int(k)


class CellHead(Head):
    """A head over the c cells of a partition with logits ``W x + b`` (MvMF, softmax).

    ``forward(features [B, d]) -> logits [B, c]``; ``topk`` gives the k largest
    softmax probabilities and their cell / component indices.
    """

    uses_partition = True

    def __init__(self, feature_dim: int, n_cells: int, matmul_dtype: Any = None):
        super().__init__(feature_dim)
        if n_cells < 1:
            raise ConfigError(f"feature_dim and the number of cells must be >= 1 (got {feature_dim}, {n_cells})")
        self.n_cells = int(n_cells)
        self.matmul_dtype = resolve_matmul_dtype(matmul_dtype)
        self.linear = nn.Linear(self.feature_dim, self.n_cells)
        # Glorot for W as in the paper (eq. 5 training starts there); zero bias = uniform mixing weights.
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @classmethod
    def parameter_count(cls, feature_dim: int, n_cells: int) -> int:
        return n_cells * (feature_dim + 1)

    @property
    def max_k(self) -> int:
        return self.n_cells

    @property
    def matmul_dtype_name(self) -> str | None:
        return matmul_dtype_option(self.matmul_dtype)

    def weight_decay_parameters(self) -> list[nn.Parameter]:
        return [self.linear.weight] if self.linear.weight.requires_grad else []

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, c]`` (float32, or float64 for a float64 head) from features ``[B, d]`` of any float dtype."""
        return self.linear_product(features)

    def topk(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest softmax probabilities ``[B, k]`` and their cell/component indices ``[B, k]`` int64.

        The softmax runs in float64 (float32 on MPS, which has none): in float32 the
        probabilities of a confident row can sum to 1 + 4e-8.
        """
        k = self._check_k(k)
        dtype = torch.float32 if logits.device.type == "mps" else torch.float64
        probs = torch.softmax(logits.to(dtype), dim=-1)
        return torch.topk(probs, k, dim=-1)


def low_precision_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [m, k] @ b [k, n]`` of two low-precision (bf16) operands, accumulated and returned in float32.

    Only the *operands* are rounded: the result is never rounded to bf16's 8-bit
    mantissa (which costs 0.2 nats of log Gamma at |logit| ~ 38). On CUDA one
    kernel with ``out_dtype=float32`` (bf16 tensor cores, fp32 accumulator and
    output); elsewhere (CPU, MPS: no such kernel) the bf16 operands are widened to
    float32 and multiplied there, which is the same arithmetic: a product of two
    bf16 numbers (8-bit mantissas) is exact in float32, so only the summation order differs.
    """
    if a.device.type == "cuda":
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without the out_dtype overload
            pass
    return a.to(torch.float32) @ b.to(torch.float32)


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
