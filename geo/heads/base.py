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
  ``mixture_parts(output)`` / ``cell_probs(output)`` are the same for a whole batch;
- ``sample(output, n, generator=None) -> xyz [B, n, 3]`` float64 (CPU): n draws per row
  from the head's own density (``geo.heads.density``: exact vMF sampling for mixtures,
  uniform within a cell for cell densities). Only heads with ``has_density``; the
  default draws from ``mixture_parts`` or ``cell_probs``, and a head with neither
  raises ``NotImplementedError``;
- ``log_density_rows(output, xyz [B, n, 3]) -> [B, n]``: each row's density at its own points;
- ``calibration(output, target_xyz, levels, n_samples, generator) -> (hpd_level [B], area_sr [B, L])``:
  the HPD level of each true point (the mass where the density is higher than there)
  and the areas of the ``levels``-credible regions; closed form for a single vMF, exact
  for cell densities, Monte Carlo from ``sample`` otherwise (``geo.heads.density``).

``geo.heads`` holds models only: no training loop, no file I/O, and it never
imports ``geo.pipeline`` or ``geo.training``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from geo.errors import ConfigError
from geo.geometry import logsumexp, vmf_log_normalizer
from geo.heads import density
from geo.heads.low_precision import (LowPrecisionLinear, Scratch, TrainingBf16Linear, bf16_outputs_are_faster,
                                     matmul_dtype_option, resolve_matmul_dtype)
from geo.heads.trunk import ResidualTrunk

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
    # At most this many val rows (one seeded subset, the same at every evaluation) score the val
    # evaluations during training; None = the whole split. For heads whose every row costs ODE solves.
    val_rows_cap: ClassVar[int | None] = None

    def __init__(self, feature_dim: int):
        super().__init__()
        if feature_dim < 1:
            raise ConfigError(f"feature_dim must be >= 1 (got {feature_dim})")
        self.feature_dim = int(feature_dim)
        self.options: dict = {}  # JSON-able keyword options that re-create the head with create_head

    def _attach_trunk(self, trunk_width: int, trunk_depth: int) -> int:
        """Put a ``ResidualTrunk`` in front of the head's linear layer when ``trunk_depth > 0``.

        Returns the width the linear layer takes (``trunk_width``, or ``feature_dim`` without a
        trunk); ``trunk_options()`` are the options that re-create it.
        """
        self.trunk = ResidualTrunk(self.feature_dim, int(trunk_width), int(trunk_depth)) if trunk_depth > 0 else None
        return int(trunk_width) if self.trunk is not None else self.feature_dim

    def trunk_options(self) -> dict:
        """``{"trunk_width", "trunk_depth"}`` of a head with a trunk; {} without (old runs' options unchanged)."""
        trunk = getattr(self, "trunk", None)
        return {} if trunk is None else {"trunk_width": trunk.lift.out_features, "trunk_depth": len(trunk.blocks)}

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

    # ---- sampling and calibration (geo.heads.density) --------------------------------------

    def mixture_parts(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The batch's density as vMF mixtures, float64 on the CPU, or None when it is not one.

        ``(log_w [B, K], mu [B, K, 3] or [1, K, 3] (shared), log_kappa [B, K] or [1, K])``, log_w normalised.
        """
        return None

    def cell_probs(self, output: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor] | None:
        """``(log_probs [B, c], partition, log_areas_sr [c])`` float64 CPU of a cell density, or None."""
        return None

    def sample(self, output: torch.Tensor, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws per row from the head's density: ``output`` of B rows -> ``xyz [B, n, 3]`` float64 on the CPU.

        Reproducible with a seeded ``generator``. Raises NotImplementedError for a head without a density.
        """
        with torch.no_grad():
            parts = self.mixture_parts(output) if self.has_density else None
            if parts is not None:
                return density.sample_vmf_mixture(*parts, int(n), generator)
            cells = self.cell_probs(output) if self.has_density else None
            if cells is not None:
                log_probs, partition, _ = cells
                return density.sample_cells(torch.exp(log_probs), partition, int(n), generator)
        raise NotImplementedError(f"head {self.name!r} has no density to sample from")

    def log_density_rows(self, output: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """Each row's log-density (nats/sr) at its own points: ``output`` of B rows, ``xyz [B, n, 3]`` -> ``[B, n]``.

        A vMF mixture of few components (``mixture_parts`` with K <= 64) in one float64 pass over
        row chunks; otherwise one ``log_density`` call per row (its memory bounds are the head's own).
        """
        xyz = torch.as_tensor(xyz)
        parts = self.mixture_parts(output) if self.has_density else None
        if parts is not None and parts[0].shape[1] <= 64:
            log_w, mu, log_kappa = parts
            points = xyz.detach().to("cpu", torch.float64)
            b, n, k = points.shape[0], points.shape[1], log_w.shape[1]
            mu, log_kappa = mu.expand(b, k, 3), log_kappa.expand(b, k)
            log_peak = (log_w + vmf_log_normalizer(log_kappa))[:, None, :]              # [B, 1, K]
            kappa = torch.exp(log_kappa)[:, None, :]
            rows = max(1, 2**22 // max(1, n * k))
            out = [logsumexp(log_peak[r:r + rows] - 0.5 * kappa[r:r + rows] * (
                points[r:r + rows, :, None, :] - mu[r:r + rows, None, :, :]).pow(2).sum(-1), dim=-1)
                for r in range(0, b, rows)]
            return torch.cat(out) if out else torch.zeros((0, n), dtype=torch.float64)
        rows = [self.log_density(output[r:r + 1], xyz[r].to(output.device))[0].double().cpu()
                for r in range(output.shape[0])]
        return torch.stack(rows) if rows else torch.zeros((0, xyz.shape[1]), dtype=torch.float64)

    def calibration(self, output: torch.Tensor, target_xyz: torch.Tensor, *,
                    levels: Sequence[float] = density.CREDIBLE_LEVELS, n_samples: int = density.DEFAULT_SAMPLES,
                    generator: torch.Generator | None = None, method: str = "auto"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HPD levels ``[B]`` of the true points ``target_xyz [B, 3]`` and credible areas ``[B, len(levels)]`` (sr).

        ``method``: "auto" (closed form for a single vMF, exact for a cell density, otherwise
        Monte Carlo from ``n_samples`` of the head's own samples per row) or "monte-carlo"
        (always sampled; what the tests compare the exact forms with). Float64 on the CPU.
        """
        if not self.has_density:
            raise NotImplementedError(f"head {self.name!r} has no density: no HPD levels")
        if method not in ("auto", "monte-carlo"):
            raise ValueError(f"method must be 'auto' or 'monte-carlo', not {method!r}")
        y = torch.as_tensor(target_xyz).detach().to("cpu", torch.float64)
        with torch.no_grad():
            if method == "auto":
                parts = self.mixture_parts(output)
                if parts is not None and parts[0].shape[1] == 1:
                    _, mu, log_kappa = parts
                    mu, log_kappa = mu[:, 0].expand(len(y), 3), log_kappa[:, 0].expand(len(y))
                    return density.vmf_hpd_level(mu, log_kappa, y), density.vmf_credible_area_sr(log_kappa, levels)
                cells = self.cell_probs(output) if parts is None else None
                if cells is not None and hasattr(self, "cells_of"):
                    log_probs, _, log_areas = cells
                    return density.cell_hpd(log_probs, log_areas, self.cells_of(y).cpu(), levels, generator)
            samples = self.sample(output, n_samples, generator=generator)
            # The truth goes through the same code path as the samples: ties (cells) compare exactly.
            log_p = self.log_density_rows(output, torch.cat([y[:, None, :], samples], dim=1))
            return density.monte_carlo_hpd(log_p[:, 0], log_p[:, 1:], levels, generator)

    # ---- the product W x + b of heads with a ``linear`` layer and a ``matmul_dtype`` ----------

    def linear_product(self, features: torch.Tensor) -> torch.Tensor:
        """``self.linear(features)`` ``[B, out]`` in float32 (float64 for a float64 head), features of any float dtype.

        With ``self.matmul_dtype = bfloat16`` only the products run in bf16 (inputs cast
        explicitly, no autocast): W x in forward and the weight gradient in backward.
        Everything evaluated or reported (no autograd, or the head in eval mode) takes
        ``LowPrecisionLinear``: bf16 operands, float32 accumulation and result. A training
        step (train mode, autograd on, W trainable) on a CPU with native bf16 takes
        ``TrainingBf16Linear`` instead, whose products also *return* bf16 (one rounding of
        each logit and each weight-gradient entry, relative 2^-8): there the float32-output
        product runs at float32 speed, and that rounding is noise the optimiser averages.
        """
        weight, bias = self.linear.weight, self.linear.bias
        if getattr(self, "trunk", None) is not None:
            features = self.trunk(features)
        if getattr(self, "matmul_dtype", None) is None:
            return F.linear(features.to(weight.dtype), weight, bias)
        weight_cast = self._low_precision_weight(weight)
        if self.training and torch.is_grad_enabled() and weight.requires_grad \
                and bf16_outputs_are_faster(features.device):
            scratch = self.__dict__.setdefault("_bf16_scratch", Scratch())
            return TrainingBf16Linear.apply(features, weight, bias, weight_cast, scratch)
        return LowPrecisionLinear.apply(features, weight, bias, weight_cast)

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

    def __init__(self, feature_dim: int, n_cells: int, matmul_dtype: Any = None, trunk_width: int = 512,
                 trunk_depth: int = 0):
        super().__init__(feature_dim)
        if n_cells < 1:
            raise ConfigError(f"feature_dim and the number of cells must be >= 1 (got {feature_dim}, {n_cells})")
        self.n_cells = int(n_cells)
        self.matmul_dtype = resolve_matmul_dtype(matmul_dtype)
        self.linear = nn.Linear(self._attach_trunk(trunk_width, trunk_depth), self.n_cells)
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
        trunk = [self.trunk.lift.weight] if getattr(self, "trunk", None) is not None else []
        return [self.linear.weight] + trunk if self.linear.weight.requires_grad else trunk

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
