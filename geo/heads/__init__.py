"""Output heads trained on cached features, and their registry.

A head maps features ``[B, d]`` to logits ``[B, c]`` over the c cells of a
partition and turns logits into a loss, predictions and a density on the
sphere. Heads are registered by name, so a new head is one new file::

    @register_head("myhead")
    class MyHead(Head):
        ...

    head = create_head("mvmf", feature_dim=2048, partition=partition, kappa0=16.0)

``create_head(name, feature_dim=..., partition=..., **head.options)``
re-creates a head (the partition is saved with the run). Heads read only the
partition's ``centres_xyz [c, 3]``, ``means_xyz [c, 3]``, ``areas_sr [c]``,
``n_cells`` and (the softmax head) ``assign(lat_deg, lon_deg) -> int64 [n]``.
``geo.heads`` never imports ``geo.pipeline``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn
import torch.nn.functional as F

from geo.errors import ConfigError

_REGISTRY: dict[str, type["Head"]] = {}

MATMUL_DTYPES = {None: None, "float32": None, "bfloat16": torch.bfloat16}


def register_head(name: str) -> Callable[[type["Head"]], type["Head"]]:
    """Class decorator registering a head under ``name``; a duplicate name raises ValueError."""

    def decorator(cls: type[Head]) -> type[Head]:
        if name in _REGISTRY:
            raise ValueError(f"head name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_heads() -> list[str]:
    """Names of the registered heads, sorted."""
    return sorted(_REGISTRY)


def create_head(name: str, *, feature_dim: int, partition: Any, **options: Any) -> "Head":
    """A new head ``name`` for features of width ``feature_dim`` over ``partition``'s cells.

    Raises ConfigError for an unknown head name (listing the known ones) or an
    option the head does not take (listing the ones it does).
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown head {name!r}; known heads: {', '.join(list_heads())}")
    cls = _REGISTRY[name]
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "feature_dim", "partition")]
    unknown = sorted(set(options) - set(accepted))
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise ConfigError(
            f"head {name!r} has no option(s) {', '.join(unknown)}; its options are: {', '.join(accepted)}"
        )
    return cls(feature_dim=feature_dim, partition=partition, **options)


def resolve_matmul_dtype(matmul_dtype: Any) -> torch.dtype | None:
    """``None``/"float32" -> None (plain float32 matmul); torch.bfloat16/"bfloat16" -> torch.bfloat16."""
    if isinstance(matmul_dtype, torch.dtype):
        matmul_dtype = {torch.bfloat16: "bfloat16", torch.float32: "float32"}.get(matmul_dtype, str(matmul_dtype))
    if matmul_dtype not in MATMUL_DTYPES:
        raise ConfigError(f"matmul_dtype must be None, 'float32' or 'bfloat16', not {matmul_dtype!r}")
    return MATMUL_DTYPES[matmul_dtype]


class Head(nn.Module):
    """Shared part of every head: the linear logits W x + b and the top-k of their softmax.

    Subclasses set ``has_density`` and implement ``loss``, ``log_density_at``,
    ``log_density`` and ``predict`` (see ``geo.heads.mvmf`` for the contract's
    shapes and units). ``options`` is the JSON-able dict of keyword options
    that re-creates the head with ``create_head``.
    """

    name: str = ""
    has_density: bool = False

    def __init__(self, feature_dim: int, n_cells: int, matmul_dtype: Any = None):
        super().__init__()
        if feature_dim < 1 or n_cells < 1:
            raise ConfigError(f"feature_dim and the number of cells must be >= 1 (got {feature_dim}, {n_cells})")
        self.feature_dim, self.n_cells = int(feature_dim), int(n_cells)
        self.matmul_dtype = resolve_matmul_dtype(matmul_dtype)
        self.linear = nn.Linear(self.feature_dim, self.n_cells)
        # Glorot for W as in the paper (eq. 5 training starts there); zero bias = uniform mixing weights.
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @property
    def matmul_dtype_name(self) -> str | None:
        return None if self.matmul_dtype is None else "bfloat16"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, c]`` (float32, or float64 for a float64 head) from features ``[B, d]`` of any float dtype.

        With ``matmul_dtype=bfloat16`` only the products run in bf16 (inputs cast
        explicitly, no autocast): W x in forward and the weight gradient in backward
        (``LowPrecisionLinear``); the logits, the bias and all gradients are float32.
        """
        weight, bias = self.linear.weight, self.linear.bias
        if self.matmul_dtype is None:
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

    def topk(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest softmax probabilities ``[B, k]`` and their cell/component indices ``[B, k]`` int64."""
        k = self._check_k(k)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        return torch.topk(probs, k, dim=-1)

    def _check_k(self, k: int) -> int:
        if not 1 <= int(k) <= self.n_cells:
            raise ConfigError(f"k must be between 1 and the number of cells {self.n_cells}, not {k}")
        return int(k)


class LowPrecisionLinear(torch.autograd.Function):
    """``x [B, d] @ W.T + b`` with both products in a low precision (bf16) and float32 results.

    Forward: ``x`` and ``weight_cast`` (W already in the low dtype) multiply in bf16
    (fp32 accumulation inside oneDNN); the product is rounded once into a float32
    tensor that the bias is added to. Backward: the weight gradient is one bf16
    product ``grad.T @ x`` cast once to W's dtype; the input gradient is computed
    only when ``x`` requires it (never in training: features are fixed), from a
    private copy of the cast weight (the shared one is overwritten by the next call).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_cast):
        x_low = x.to(weight_cast.dtype)
        product = F.linear(x_low, weight_cast)
        out_dtype = torch.promote_types(weight.dtype, torch.float32)
        out = torch.empty(product.shape, dtype=out_dtype, device=product.device).copy_(product)
        out.add_(bias.to(out_dtype))
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
            grad_x = (grad_low @ weight_cast).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_low.T @ x_low).to(w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None


# Imported last: the head modules use register_head and Head defined above.
from geo.heads import mvmf as _mvmf  # noqa: E402,F401
from geo.heads import softmax as _softmax  # noqa: E402,F401
