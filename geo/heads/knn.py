"""The ``knn`` head: image retrieval (Im2GPS-deep, Vo et al.) over the train split's features.

Nothing is trained. The gallery is the train split: its features, normalised,
and its locations as unit vectors, given once by the trainer through the head's
``fit_gallery`` hook (``needs_gallery = True``) and kept as buffers, i.e. saved with
the head's state in the run's checkpoint (so a run predicts without its cache;
the cost is n x d float32 in the checkpoint). For a query x, the k gallery rows
of highest cosine similarity s_i, found exactly by blocked matrix products
(``block_rows`` gallery rows at a time, a running top-k merged per block: memory
O(B x block_rows), whatever the gallery size).

Output of ``forward``: ``[B, k, 4]`` float32, per neighbour (most similar first)
its similarity and its location's unit vector. The density is a vMF kernel
density over the neighbours,

    p(y | x) = sum_i w_i vMF(y; y_i, kappa),   w_i proportional to max(s_i, 0) + 1e-6,

with one kappa chosen on val (``calibrate``: the kappa of highest mean val
log-likelihood, a grid over log kappa then a golden-section refinement), so its
NLL is comparable with every head's. Predictions: "mode" the densest point of
that density (the similarity-weighted mean shift on the sphere, from the
neighbours: ``geo.heads.mixture_modes``), "nn" the nearest neighbour's location
(k = 1 retrieval); "argmax" is "nn" (the neighbours by weight, best first).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from geo.errors import ConfigError
from geo.geometry import latlon_to_xyz, normalize, vmf_log_normalizer, xyz_to_latlon
from geo.heads.base import Head, VmfMixture
from geo.heads.mixture_modes import mixture_modes
from geo.heads.registry import register_head

LOG_KAPPA_GRID = np.arange(-2.0, 22.01, 0.5)  # the calibration's coarse grid of log kappa


def topk_cosine(queries: torch.Tensor, gallery: torch.Tensor, k: int, block_rows: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``queries [B, d] @ gallery [n, d].T`` (both normalised): ``(sims [B, k], index [B, k])``.

    The gallery is read ``block_rows`` rows at a time; each block's top-k is merged
    with the running one, so memory is O(B x (block_rows + k)).
    """
    best_s = queries.new_full((queries.shape[0], 0), -math.inf)
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.int64, device=queries.device)
    for start in range(0, gallery.shape[0], block_rows):
        sims = queries @ gallery[start:start + block_rows].T                       # [B, g]
        s, i = torch.topk(sims, min(k, sims.shape[1]), dim=1)
        best_s, order = torch.topk(torch.cat([best_s, s], 1), min(k, best_s.shape[1] + s.shape[1]), dim=1)
        best_i = torch.gather(torch.cat([best_i, i + start], 1), 1, order)
    return best_s, best_i


@register_head("knn")
class KnnHead(Head):
    """k-nearest-neighbour retrieval by cosine similarity over the train split (see the module docstring).

    Args:
        feature_dim: d, the width of the features.
        k: neighbours per query.
        block_rows: gallery rows per block of the exact top-k search (memory, not results).
    """

    has_density = True
    predict_modes = ("mode", "nn", "argmax")
    trainable = False
    needs_gallery = True
    needs_calibration = True

    def __init__(self, feature_dim: int, *, k: int = 16, block_rows: int = 65536):
        super().__init__(feature_dim)
        if int(k) < 1 or int(block_rows) < 1:
            raise ConfigError(f"knn: k and block_rows must be >= 1, not {k}, {block_rows}")
        self.k, self.block_rows = int(k), int(block_rows)
        self.register_buffer("gallery_features", torch.zeros(0, self.feature_dim))
        self.register_buffer("gallery_xyz", torch.zeros(0, 3))
        self.register_buffer("log_kappa", torch.tensor(3.0))
        self.options = {"k": self.k}

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        return dict(k=int(config.get("knn_k") or 16))

    @property
    def max_k(self) -> int:
        return self.k

    def fit_gallery(self, features, lat_deg, lon_deg) -> None:
        """The gallery: features ``[n, d]`` (any float dtype; normalised here) and their locations (degrees)."""
        features = torch.as_tensor(np.asarray(features))
        if features.ndim != 2 or features.shape[1] != self.feature_dim or features.shape[0] < self.k:
            raise ConfigError(f"knn: the gallery must be [n >= k = {self.k}, {self.feature_dim}] features, "
                              f"not {tuple(features.shape)}")
        device, dtype = self.log_kappa.device, self.log_kappa.dtype  # float32 (float64 for a float64 head)
        self.gallery_features = normalize(features.to(torch.float64)).to(device, dtype)
        self.gallery_xyz = torch.from_numpy(latlon_to_xyz(np.asarray(lat_deg, np.float64),
                                                          np.asarray(lon_deg, np.float64))).to(device, dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The gallery's size is known only from the state being loaded: take its shape first.
        for name in ("gallery_features", "gallery_xyz"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.log_kappa.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The k neighbours ``[B, k, 4]``: cosine similarity, then the unit vector of the neighbour's location."""
        if self.gallery_features.shape[0] < self.k:
            raise ConfigError("knn: no gallery; fit_gallery(train features, lat, lon) first")
        queries = normalize(features.to(self.gallery_features.device, self.gallery_features.dtype))
        sims, index = topk_cosine(queries, self.gallery_features, self.k, self.block_rows)
        return torch.cat([sims[..., None], self.gallery_xyz[index]], dim=-1)

    def _mixture(self, output: torch.Tensor):
        """(log weights [B, k], unit means [B, k, 3], log kappa []) of the kernel density."""
        log_w = torch.log(output[..., 0].clamp_min(0.0) + 1e-6)
        return log_w - torch.logsumexp(log_w, dim=-1, keepdim=True), normalize(output[..., 1:4]), \
            self.log_kappa.to(output)

    def _log_density_rows(self, output, points, log_kappa=None):  # points [B, G, 3] -> [B, G]
        log_w, mu, lk = self._mixture(output)
        lk = lk if log_kappa is None else log_kappa
        sq_chord = (points[:, :, None, :] - mu[:, None, :, :]).pow(2).sum(-1)              # [B, G, k]
        return torch.logsumexp(log_w[:, None, :] + vmf_log_normalizer(lk) - 0.5 * torch.exp(lk) * sq_chord, dim=-1)

    def log_density_at(self, output: torch.Tensor, target_xyz: torch.Tensor) -> torch.Tensor:
        """log p(y_b | x_b) per steradian: ``[B, k, 4], [B, 3] -> [B]``."""
        return self._log_density_rows(output, torch.as_tensor(target_xyz).to(output)[:, None, :])[:, 0]

    def log_density(self, output: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """log p(g | x_b) per steradian on a grid: ``[B, k, 4], [G, 3] -> [B, G]``."""
        grid = torch.as_tensor(xyz).to(output)
        rows = max(1, 2**24 // max(1, output.shape[0] * self.k))
        parts = [self._log_density_rows(output, grid[None, g:g + rows].expand(output.shape[0], -1, -1))
                 for g in range(0, grid.shape[0], rows)]
        return torch.cat(parts, dim=1) if parts else output.new_zeros((output.shape[0], 0))

    def loss(self, output: torch.Tensor, target_xyz: torch.Tensor) -> torch.Tensor:
        """Mean NLL (nats per steradian); nothing is trained with it (``trainable = False``)."""
        return -self.log_density_at(output, target_xyz).mean()

    @torch.no_grad()
    def calibrate(self, outputs: torch.Tensor, target_xyz: torch.Tensor) -> None:
        """kappa of highest mean log-likelihood of the val points ``[n, 3]`` under their densities (float64)."""
        out = outputs.detach().to("cpu", torch.float64)
        y = torch.as_tensor(target_xyz).detach().to("cpu", torch.float64)
        log_w, mu, _ = self._mixture(out)
        sq_chord = (y[:, None, :] - mu).pow(2).sum(-1)                  # [n, k], once for every kappa tried

        def mean_ll(log_kappa: float) -> float:
            lk = torch.tensor(log_kappa, dtype=torch.float64)
            return float(torch.logsumexp(log_w + vmf_log_normalizer(lk) - 0.5 * torch.exp(lk) * sq_chord, -1).mean())

        scores = [mean_ll(v) for v in LOG_KAPPA_GRID]
        best = int(np.argmax(scores))
        lo, hi = LOG_KAPPA_GRID[max(best - 1, 0)], LOG_KAPPA_GRID[min(best + 1, len(LOG_KAPPA_GRID) - 1)]
        ratio = (math.sqrt(5) - 1) / 2
        for _ in range(40):  # golden section on the bracket around the grid's best
            a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
            lo, hi = (lo, b) if mean_ll(a) >= mean_ll(b) else (a, hi)
        self.log_kappa.fill_(0.5 * (lo + hi))

    def vmf_mixture(self, output_row: torch.Tensor) -> VmfMixture:
        with torch.no_grad():
            log_w, mu, lk = self._mixture(torch.as_tensor(output_row).detach().double().cpu()[None])
            return VmfMixture(log_w[0], mu[0], lk.expand(self.k).clone())

    def mixture_parts(self, output: torch.Tensor):
        """``(log w [B, k], neighbours [B, k, 3], log kappa [B, k])`` float64 on the CPU (the kernel density)."""
        with torch.no_grad():
            log_w, mu, lk = self._mixture(torch.as_tensor(output).detach().to("cpu", torch.float64))
            return log_w, mu, lk.expand(log_w.shape).clone()

    def topk(self, output: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k largest kernel weights ``[B, k]`` and their neighbour ranks ``[B, k]`` int64."""
        k = self._check_k(k)
        return torch.topk(torch.exp(self._mixture(output.float())[0]), k, dim=-1)

    def predict(self, output: torch.Tensor, k: int = 1, mode: str = "mode") -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted locations ``(lat_deg [B, k], lon_deg [B, k])``, float64 degrees (module docstring)."""
        k = self._check_k(k)
        self._check_mode(mode)
        with torch.no_grad():
            out = output.detach().to("cpu", torch.float64)
            log_w, mu, log_kappa = self._mixture(out)
            if mode == "mode" and out.shape[0]:
                points = mixture_modes(log_w, mu, log_kappa.expand(log_w.shape), k, 8, 10_000)
            else:  # neighbours by similarity, most similar first (the order of forward's output)
                points = mu[:, :k]
        return xyz_to_latlon(points)
