"""The ``regression`` head: a unit vector predicted directly, trained on great-circle distance.

    y_hat(x) = normalize(A x + a),   loss = mean great-circle angle between y_hat and y (radians)

The angle is 2 asin(|y_hat - y| / 2) (accurate at every distance, and with a
zero gradient, not a NaN, when the prediction is exact). No cells.

As a density (so its NLL is comparable with every other head's): a vMF at the
prediction, vMF(y; y_hat(x), kappa), with one kappa for all inputs fitted on the
val split after training (``calibrate``, the hook the trainer calls on heads that
declare ``needs_calibration``). The fit is the maximum-likelihood kappa: with
S = mean(1 - y_hat . y) = mean |y_hat - y|^2 / 2 over the val rows, it solves

    1 / kappa - 2 / (e^(2 kappa) - 1) = S

(the derivative of the mean log-likelihood), whose left side falls from 1 to 0:
a 1-D bisection on log kappa in float64 (kappa = 1 / S is its large-kappa limit).
kappa is a buffer, saved with the head's state: the selected weights carry their
own kappa. Before any calibration kappa = 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from geo.geometry import normalize, vmf_log_normalizer, xyz_to_latlon
from geo.heads.base import Head, VmfMixture
from geo.heads.low_precision import matmul_dtype_of, matmul_dtype_option, resolve_matmul_dtype
from geo.heads.registry import register_head
from geo.heads.trunk import trunk_options_of

LOG_KAPPA_RANGE = (-14.0, 21.0)  # kappa from ~1e-6 to ~1.3e9, the range the vMF terms are exact over


def fit_log_kappa(mean_sq_chord_half: float) -> float:
    """log kappa maximising the mean vMF log-likelihood of points with mean (1 - mu . y) = ``S``.

    Solves 1/kappa - 2/(e^(2 kappa) - 1) = S by bisection on log kappa in float64,
    clamped to ``LOG_KAPPA_RANGE`` (S >= 1: as uniform as allowed; S -> 0: as sharp as allowed).
    """
    s = float(mean_sq_chord_half)
    if not math.isfinite(s):
        raise ValueError(f"the mean of 1 - mu.y must be finite, not {s}")
    lo, hi = LOG_KAPPA_RANGE

    def slope(log_kappa: float) -> float:  # d/dkappa of the mean log-likelihood; decreasing in kappa
        kappa = math.exp(log_kappa)
        return 1.0 / kappa - 2.0 / math.expm1(2.0 * kappa) - s if kappa < 300 else 1.0 / kappa - s

    if slope(lo) <= 0:
        return lo
    if slope(hi) >= 0:
        return hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


@register_head("regression")
class RegressionHead(Head):
    """A unit vector from a linear layer, trained on great-circle distance; a vMF with kappa fitted on val.

    Args:
        feature_dim: d, the width of the features.
        matmul_dtype: None or bfloat16, for the W x product only.
    """

    has_density = True
    predict_modes = ("argmax", "mode")  # the prediction is the density's mean and its mode
    needs_calibration = True

    def __init__(self, feature_dim: int, *, matmul_dtype: Any = None, trunk_width: int = 512, trunk_depth: int = 0):
        super().__init__(feature_dim)
        self.matmul_dtype = resolve_matmul_dtype(matmul_dtype)
        self.linear = nn.Linear(self._attach_trunk(trunk_width, trunk_depth), 3)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("log_kappa", torch.zeros(()))
        self.options = {"matmul_dtype": matmul_dtype_option(self.matmul_dtype), **self.trunk_options()}

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        return dict(matmul_dtype=matmul_dtype_of(config), **trunk_options_of(config))

    @classmethod
    def parameter_count(cls, feature_dim: int, n_cells: int) -> int:
        return 3 * (feature_dim + 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The predicted unit vector ``[B, 3]`` from features ``[B, d]``."""
        return normalize(self.linear_product(features))

    def loss(self, output: torch.Tensor, target_xyz: torch.Tensor) -> torch.Tensor:
        """Mean great-circle angle (radians) between predictions ``[B, 3]`` and targets ``[B, 3]``."""
        chord = (output - torch.as_tensor(target_xyz).to(output)).norm(dim=-1)
        # asin's slope is infinite at 1 (antipodes): clamp just below it
        return (2.0 * torch.asin((0.5 * chord).clamp(max=1.0 - 1e-7))).mean()

    def calibrate(self, outputs: torch.Tensor, target_xyz: torch.Tensor) -> None:
        """Fit kappa on the val split: predictions ``[n, 3]`` and true points ``[n, 3]`` (module docstring)."""
        y_hat = normalize(torch.as_tensor(outputs).detach().to("cpu", torch.float64))
        y = normalize(torch.as_tensor(target_xyz).detach().to(y_hat))
        s = float(0.5 * (y_hat - y).pow(2).sum(-1).mean()) if len(y) else 1.0
        self.log_kappa.fill_(fit_log_kappa(s))

    def log_density_at(self, output: torch.Tensor, target_xyz: torch.Tensor) -> torch.Tensor:
        """log vMF(y_b; y_hat_b, kappa) per steradian: ``[B, 3], [B, 3] -> [B]``."""
        y = torch.as_tensor(target_xyz).to(output)
        log_kappa = self.log_kappa.to(output)
        return vmf_log_normalizer(log_kappa) - 0.5 * torch.exp(log_kappa) * (y - output).pow(2).sum(-1)

    def log_density(self, output: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """log vMF(g; y_hat_b, kappa) per steradian on a grid: ``[B, 3], [G, 3] -> [B, G]``."""
        grid = torch.as_tensor(xyz).to(output)
        log_kappa = self.log_kappa.to(output)
        sq_chord = (grid[None, :, :] - output[:, None, :]).pow(2).sum(-1)
        return vmf_log_normalizer(log_kappa) - 0.5 * torch.exp(log_kappa) * sq_chord

    def vmf_mixture(self, output_row: torch.Tensor) -> VmfMixture:
        with torch.no_grad():
            return VmfMixture(torch.zeros(1, dtype=torch.float64), normalize(output_row.detach().double().cpu())[None],
                              self.log_kappa.detach().double().cpu()[None])

    def mixture_parts(self, output: torch.Tensor):
        """One vMF per row: ``(0 [B, 1], prediction [B, 1, 3], log kappa [B, 1])`` float64 on the CPU."""
        with torch.no_grad():
            y_hat = normalize(torch.as_tensor(output).detach().to("cpu", torch.float64))
            n = y_hat.shape[0]
            return torch.zeros((n, 1), dtype=torch.float64), y_hat[:, None, :], \
                self.log_kappa.detach().to("cpu", torch.float64).expand(n, 1).clone()

    def topk(self, output: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One prediction of probability 1 per row (``[B, 1]``, ``[B, 1]``)."""
        self._check_k(k)
        n = output.shape[0]
        return output.new_ones((n, 1), dtype=torch.float32), torch.zeros((n, 1), dtype=torch.int64,
                                                                           device=output.device)

    def predict(self, output: torch.Tensor, k: int = 1, mode: str = "argmax") -> tuple[torch.Tensor, torch.Tensor]:
        """The predicted point ``(lat_deg [B, 1], lon_deg [B, 1])``, float64 degrees, in either mode."""
        self._check_k(k)
        self._check_mode(mode)
        return xyz_to_latlon(normalize(output.detach().to("cpu", torch.float64))[:, None, :])
