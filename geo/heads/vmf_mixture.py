"""Input-dependent von Mises-Fisher mixtures (PLONK's baselines): ``vmf-mixture`` (K components) and ``vmf`` (K = 1).

    p(y | x) = sum_k pi_k(x) vMF(y; mu_k(x), kappa_k(x)),   k = 1..K

Every parameter of the density is a function of the features: one linear layer
``[d] -> [K * 5]`` gives, per component, a mixing logit, an unnormalised mean
(3 numbers, normalised) and a log concentration offset from ``log_kappa0``. No
cells: ``uses_partition = False``. Loss: the NLL in nats per steradian, the
same quantity every head's NLL reports.

The output of ``forward`` is the mixture itself, ``[B, K, 5]`` float32:
``[..., 0]`` log pi (normalised), ``[..., 1:4]`` unit mean, ``[..., 4]`` log kappa.
Initialisation: the means' rows Glorot and their biases at K points of a Fibonacci
lattice (spread over the sphere); the mixing and concentration rows and biases zero
(uniform pi, log kappa = log_kappa0 for every input,
default 2: kappa ~ 7, ~3500 km half-mass radius, so early gradients are not
dominated by a few far points).

Numerics: log vMF = log C(kappa) - kappa |y - mu|^2 / 2 with ``geometry.vmf_log_normalizer``
(no sinh; finite for kappa from 1e-6 to 1e9), mixtures combined with logsumexp.
Predictions: "argmax" the means of the k heaviest components (eq. 7's analogue),
"mode" the density's maxima (``geo.heads.mixture_modes``); for K = 1 both are mu(x).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from geo.errors import ConfigError
from geo.geometry import logsumexp, normalize, vmf_log_normalizer, xyz_to_latlon
from geo.heads.base import Head, VmfMixture
from geo.heads.low_precision import matmul_dtype_of, matmul_dtype_option, resolve_matmul_dtype
from geo.heads.mixture_modes import mixture_modes
from geo.heads.registry import register_head
from geo.heads.trunk import trunk_options_of

MAX_COMPONENTS = 16
_GRID_CHUNK_ELEMENTS = 2**24  # bound on the [B, g, K] temporaries of log_density


def _fibonacci_xyz(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    r = torch.sqrt(1.0 - z * z)
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=-1)


@register_head("vmf-mixture")
class VmfMixtureHead(Head):
    """K input-dependent vMF components (mu_k(x), kappa_k(x), pi_k(x)); see the module docstring.

    Args:
        feature_dim: d, the width of the features.
        n_components: K, 1 to 16 (K = 1 is the ``vmf`` head).
        log_kappa0: initial log kappa of every component.
        matmul_dtype: None or bfloat16, for the W x product only.
    """

    has_density = True
    predict_modes = ("argmax", "mode")

    def __init__(self, feature_dim: int, *, n_components: int = 4, log_kappa0: float = 2.0,
                 matmul_dtype: Any = None, trunk_width: int = 512, trunk_depth: int = 0):
        super().__init__(feature_dim)
        if not 1 <= int(n_components) <= MAX_COMPONENTS:
            raise ConfigError(f"n_components (K) must be between 1 and {MAX_COMPONENTS}, not {n_components}")
        if not math.isfinite(float(log_kappa0)):
            raise ConfigError(f"log_kappa0 must be finite, not {log_kappa0!r}")
        self.n_components = int(n_components)
        self.log_kappa0 = float(log_kappa0)
        self.matmul_dtype = resolve_matmul_dtype(matmul_dtype)
        self.linear = nn.Linear(self._attach_trunk(trunk_width, trunk_depth), 5 * self.n_components)
        nn.init.xavier_uniform_(self.linear.weight)
        with torch.no_grad():
            # Mixing and concentration rows start at zero: uniform pi and kappa = e^log_kappa0 for
            # every input (random rows would start some inputs at kappa ~ e^10 and huge gradients).
            self.linear.weight.view(self.n_components, 5, self.linear.in_features)[:, [0, 4]] = 0.0
            bias = torch.zeros(self.n_components, 5)
            bias[:, 1:4] = _fibonacci_xyz(self.n_components).float() if self.n_components > 1 else \
                torch.tensor([1.0, 0.0, 0.0])
            self.linear.bias.copy_(bias.reshape(-1))
        self.options = {"n_components": self.n_components, "log_kappa0": self.log_kappa0,
                        "matmul_dtype": matmul_dtype_option(self.matmul_dtype), **self.trunk_options()}

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        return dict(n_components=int(config.get("mixture_components") or 4), matmul_dtype=matmul_dtype_of(config),
                    **trunk_options_of(config))

    @classmethod
    def parameter_count(cls, feature_dim: int, n_cells: int) -> int:
        return 5 * MAX_COMPONENTS * (feature_dim + 1)  # an upper bound: K is an option

    @property
    def max_k(self) -> int:
        return self.n_components

    # ---- the mixture ------------------------------------------------------------------

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The mixture ``[B, K, 5]``: log pi, unit mean (3), log kappa; from features ``[B, d]``."""
        raw = self.linear_product(features).view(features.shape[0], self.n_components, 5)
        log_pi = torch.log_softmax(raw[..., :1], dim=1)
        mu = normalize(raw[..., 1:4])
        log_kappa = raw[..., 4:] + self.log_kappa0
        return torch.cat([log_pi, mu, log_kappa], dim=-1)

    @staticmethod
    def _parts(output: torch.Tensor):
        return output[..., 0], output[..., 1:4], output[..., 4]

    def log_density_at(self, output: torch.Tensor, target_xyz: torch.Tensor) -> torch.Tensor:
        """log p(y_b | x_b) per steradian: ``output [B, K, 5], target_xyz [B, 3] -> [B]``."""
        log_pi, mu, log_kappa = self._parts(output)
        y = torch.as_tensor(target_xyz).to(output)
        sq_chord = (y[:, None, :] - mu).pow(2).sum(-1)                                     # [B, K]
        return logsumexp(log_pi + vmf_log_normalizer(log_kappa) - 0.5 * torch.exp(log_kappa) * sq_chord, dim=1)

    def loss(self, output: torch.Tensor, target_xyz: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood, nats per steradian: ``[B, K, 5], [B, 3] -> []``."""
        return -self.log_density_at(output, target_xyz).mean()

    def log_density(self, output: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """log p(g | x_b) per steradian on a grid: ``output [B, K, 5], xyz [G, 3] -> [B, G]``."""
        log_pi, mu, log_kappa = self._parts(output)
        grid = torch.as_tensor(xyz).to(output)
        log_peak = (log_pi + vmf_log_normalizer(log_kappa))[:, None, :]                   # [B, 1, K]
        kappa = torch.exp(log_kappa)[:, None, :]
        rows = max(1, _GRID_CHUNK_ELEMENTS // max(1, output.shape[0] * self.n_components * 3))
        out = []
        for g0 in range(0, grid.shape[0], rows):
            sq_chord = (grid[None, g0:g0 + rows, None, :] - mu[:, None, :, :]).pow(2).sum(-1)  # [B, g, K]
            out.append(logsumexp(log_peak - 0.5 * kappa * sq_chord, dim=-1))
        return torch.cat(out, dim=1) if out else output.new_zeros((output.shape[0], 0))

    def vmf_mixture(self, output_row: torch.Tensor) -> VmfMixture:
        """The row's mixture (float64, CPU): log pi [K], means [K, 3], log kappa [K]."""
        with torch.no_grad():
            row = torch.as_tensor(output_row).detach().double().cpu()
            return VmfMixture(torch.log_softmax(row[:, 0], dim=0), normalize(row[:, 1:4]), row[:, 4])

    def mixture_parts(self, output: torch.Tensor):
        """``(log pi [B, K], mu [B, K, 3], log kappa [B, K])`` float64 on the CPU."""
        with torch.no_grad():
            out = torch.as_tensor(output).detach().to("cpu", torch.float64)
            return torch.log_softmax(out[..., 0], dim=-1), normalize(out[..., 1:4]), out[..., 4]

    def topk(self, output: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest mixing weights ``[B, k]`` and their component indices ``[B, k]`` int64."""
        k = self._check_k(k)
        return torch.topk(torch.exp(output[..., 0].to(torch.promote_types(output.dtype, torch.float32))), k, dim=-1)

    def predict(self, output: torch.Tensor, k: int = 1, mode: str = "argmax", *, n_starts: int = 8,
                max_iter: int = 10_000) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted locations ``(lat_deg [B, k], lon_deg [B, k])``, float64 degrees (module docstring)."""
        k = self._check_k(k)
        self._check_mode(mode)
        with torch.no_grad():
            out = output.detach().to("cpu", torch.float64)
            log_pi, mu, log_kappa = self._parts(out)
            mu = normalize(mu)
            if mode == "argmax" or self.n_components == 1:
                index = torch.topk(log_pi, k, dim=-1).indices
                points = torch.gather(mu, 1, index[..., None].expand(-1, -1, 3))
            else:
                points = mixture_modes(log_pi, mu, log_kappa, k, n_starts, max_iter) if out.shape[0] else \
                    torch.zeros((0, k, 3), dtype=torch.float64)
        return xyz_to_latlon(points)
