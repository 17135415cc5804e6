"""The PlaNet softmax head: cross-entropy over the cells of the partition.

p(cell | x) = softmax(W x + b) with the same linear layer as the MvMF head
(Glorot W, zero b). The density it implies is piecewise constant,
p(cell) / area(cell) per steradian, so its NLL is comparable with MvMF's.

Cell indices of points come from ``partition.assign(lat_deg, lon_deg)``
(numpy, on the CPU). ``loss``, ``log_density_at`` and ``log_density`` compute
them from the xyz points unless given: a trainer should compute
``target_cell = partition.assign(lat_deg, lon_deg)`` once per dataset and
pass it, which makes the loss exactly ``F.cross_entropy(logits, target_cell)``
with no host round trip per batch.

Haversine label smoothing (PIGEON, ``label_smoothing_km`` = tau > 0): the
training target over cells is

    q_j(y) = exp(-(d(y, centre_j) - d(y, centre_true)) / tau) / Z

(d the great-circle distance in km; the d(y, centre_true) shift cancels in Z, so
q = softmax(-d(y, centres) / tau)) and the loss is the cross-entropy
-sum_j q_j log p_j. tau = 0 is exactly plain cross-entropy on the true cell. As
tau -> 0, q tends to the cell whose centre is nearest y, which is the true cell
except for points near a cell's edge that are nearer a neighbour's centre. The
distances come from one float64 product of unit vectors, d = 2 R asin(|y - c| / 2),
exact to centimetres. Only the training loss changes: the density, the NLL and
the predictions are the plain softmax's.

Predictions, float64 degrees ``(lat_deg [B, k], lon_deg [B, k])`` as CPU
tensors:

- "argmax": the k most probable cells (PlaNet), placed at ``predict_at``;
- "centre" / "mean": the same cells at their centres / training-point means;
- "mode": the k cells of highest *density* p(cell) / area(cell), placed at
  ``predict_at``. Every point of the top cell is a maximiser of the
  piecewise-constant density, so this is its exact mode (eq. 6's analogue);
  it differs from "argmax" only when cell areas differ.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from geo.errors import ConfigError
from geo.geometry import EARTH_RADIUS_KM, normalize, wrap_lon_deg, xyz_to_latlon
from geo.heads.base import CellDensity, CellHead
from geo.heads.low_precision import matmul_dtype_of
from geo.heads.registry import register_head
from geo.heads.trunk import trunk_options_of

PREDICT_AT = ("centre", "mean")


@register_head("softmax")
class SoftmaxHead(CellHead):
    """Cross-entropy over the cells of ``partition`` (PlaNet).

    Args:
        feature_dim: d, the width of the features.
        partition: object with ``centres_xyz [c, 3]``, ``means_xyz [c, 3]``, ``areas_sr [c]``
            and ``assign(lat_deg, lon_deg) -> int64 [n]``; kept as ``self.partition``.
        predict_at: where a predicted cell is placed: "centre" (PlaNet) or "mean".
        label_smoothing_km: tau of the haversine label smoothing (PIGEON), km; 0 = plain cross-entropy.
        matmul_dtype: None or bfloat16, for the W x product only.
    """

    has_density = True
    # "centre" (PlaNet's) first: the default of a run; "argmax" places the top cell at predict_at.
    predict_modes = ("centre", "mean", "argmax", "mode")

    def __init__(self, feature_dim: int, partition: Any, *, predict_at: str = "centre",
                 label_smoothing_km: float = 0.0, matmul_dtype: Any = None, trunk_width: int = 512,
                 trunk_depth: int = 0):
        centres = torch.as_tensor(np.asarray(partition.centres_xyz), dtype=torch.float64)
        super().__init__(feature_dim, centres.shape[0], matmul_dtype, trunk_width, trunk_depth)
        if predict_at not in PREDICT_AT:
            raise ConfigError(f"predict_at must be one of {', '.join(PREDICT_AT)}, not {predict_at!r}")
        areas = torch.as_tensor(np.asarray(partition.areas_sr), dtype=torch.float64)
        if areas.shape != (self.n_cells,) or not bool((areas > 0).all()):
            raise ConfigError(f"partition areas_sr must be {self.n_cells} positive areas in steradians")
        if not (0.0 <= float(label_smoothing_km) < float("inf")):
            raise ConfigError(f"label_smoothing_km must be a finite number >= 0, not {label_smoothing_km!r}")
        self.partition = partition
        self.predict_at = predict_at
        self.label_smoothing_km = float(label_smoothing_km)
        # Buffers so that they follow .to(device) and are saved with the head state; float32
        # (~0.4 m) because MPS has no float64.
        means = torch.as_tensor(np.asarray(partition.means_xyz), dtype=torch.float64)
        self.register_buffer("centres_xyz", normalize(centres).to(torch.float32))
        self.register_buffer("means_xyz", normalize(means).to(torch.float32))
        self.register_buffer("log_areas_sr", torch.log(areas).to(torch.float32))
        self.options = {"predict_at": predict_at, "label_smoothing_km": self.label_smoothing_km,
                        "matmul_dtype": self.matmul_dtype_name, **self.trunk_options()}

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        predict = config.get("predict")
        return dict(predict_at=predict if predict in PREDICT_AT else PREDICT_AT[0],
                    label_smoothing_km=float(config.get("label_smoothing_km") or 0.0),
                    matmul_dtype=matmul_dtype_of(config), **trunk_options_of(config))

    def row_targets(self, lat_deg, lon_deg) -> dict[str, torch.Tensor]:
        """Each row's cell, assigned once for the whole dataset: the loss is then a plain cross-entropy."""
        return {"target_cell": torch.from_numpy(np.asarray(self.partition.assign(lat_deg, lon_deg), np.int64))}

    def cell_density(self, output_row: torch.Tensor) -> CellDensity:
        """The row's cell probabilities ``[c]`` (float64 numpy) over the partition."""
        with torch.no_grad():
            log_p = torch.log_softmax(torch.as_tensor(output_row).detach().double().cpu(), dim=-1)
        return CellDensity(np.exp(log_p.numpy()), self.partition)

    def cell_probs(self, logits: torch.Tensor):
        """``(log p(cell) [B, c], partition, log area [c])`` float64 on the CPU."""
        with torch.no_grad():
            log_p = torch.log_softmax(torch.as_tensor(logits).detach().to("cpu", torch.float64), dim=-1)
        areas = torch.as_tensor(np.asarray(self.partition.areas_sr), dtype=torch.float64)
        return log_p, self.partition, torch.log(areas)

    def cells_of(self, xyz: torch.Tensor) -> torch.Tensor:
        """Cell index ``int64 [n]`` of points ``xyz [n, 3]`` via ``partition.assign`` (on the CPU)."""
        xyz_np = torch.as_tensor(xyz).detach().to("cpu", torch.float64).numpy().reshape(-1, 3)
        if len(xyz_np) == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.log_areas_sr.device)
        lat_deg, lon_deg = xyz_to_latlon(xyz_np)
        cells = np.asarray(self.partition.assign(lat_deg, wrap_lon_deg(lon_deg)), dtype=np.int64)
        return torch.from_numpy(cells).to(self.log_areas_sr.device)

    def _cells(self, xyz: torch.Tensor, cells: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if xyz is None and cells is None:
            raise ValueError("give the target points (target_xyz [B, 3]) or their cells (target_cell [B])")
        cells = self.cells_of(xyz) if cells is None else torch.as_tensor(cells)
        return cells.to(device=device, dtype=torch.int64)

    def loss(self, logits: torch.Tensor, target_xyz: torch.Tensor | None = None, *,
             target_cell: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy in nats: ``logits [B, c]``, ``target_xyz [B, 3]`` or ``target_cell [B]`` -> ``[]``.

        This is the training loss (the log-area term of the density NLL is a
        constant that does not depend on the parameters). With label smoothing
        (``label_smoothing_km > 0``, which needs ``target_xyz``) the target is
        ``smoothed_target(target_xyz)`` instead of the true cell.
        """
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.label_smoothing_km > 0:
            if target_xyz is None:
                raise ValueError("label smoothing needs the target points (target_xyz [B, 3])")
            return F.cross_entropy(logits, self.smoothed_target(target_xyz).to(logits.dtype))
        return F.cross_entropy(logits, self._cells(target_xyz, target_cell, logits.device))

    @torch.no_grad()
    def smoothed_target(self, target_xyz: torch.Tensor) -> torch.Tensor:
        """PIGEON's haversine-smoothed target ``[B, c]`` (rows sum to 1, float64) for points ``[B, 3]``.

        softmax over cells of -d(y, centre_j) / tau, d in km (the true cell's
        distance, a per-row constant, cancels); see the module docstring.
        """
        y = normalize(torch.as_tensor(target_xyz).to(self.centres_xyz.device, torch.float64))
        centres = normalize(self.centres_xyz.to(torch.float64))
        # |y - c|^2 = 2 - 2 y.c in float64: ~1e-16 absolute, i.e. centimetres after the sqrt
        chord = (2.0 - 2.0 * (y @ centres.T)).clamp(0.0, 4.0).sqrt()
        dist_km = 2.0 * EARTH_RADIUS_KM * torch.asin((0.5 * chord).clamp(max=1.0))
        return torch.softmax(-dist_km / self.label_smoothing_km, dim=-1)

    def log_density_at(self, logits: torch.Tensor, target_xyz: torch.Tensor | None = None, *,
                       target_cell: torch.Tensor | None = None) -> torch.Tensor:
        """log p(cell_b | x_b) - log area(cell_b), per steradian: ``[B, c], [B, 3] -> [B]``."""
        cells = self._cells(target_xyz, target_cell, logits.device)
        log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        log_area = self.log_areas_sr.to(logits.device)[cells].to(log_p.dtype)
        return log_p.gather(1, cells[:, None])[:, 0] - log_area

    def log_density(self, logits: torch.Tensor, xyz: torch.Tensor, *, cells: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Log density per steradian on a grid: ``logits [B, c], xyz [G, 3] -> [B, G]``."""
        cells = self._cells(xyz, cells, logits.device)
        log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        return log_p[:, cells] - self.log_areas_sr.to(logits.device)[cells].to(log_p.dtype)[None, :]

    def predict(self, logits: torch.Tensor, k: int = 1, mode: str = "argmax") -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k predicted locations ``(lat_deg [B, k], lon_deg [B, k])`` in degrees (see the module docstring)."""
        k = self._check_k(k)
        if mode not in self.predict_modes:
            raise ConfigError(f"predict mode for the softmax head must be one of {', '.join(self.predict_modes)}, "
                              f"not {mode!r}")
        score = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if mode == "mode":
            score = torch.log_softmax(score, dim=-1) - self.log_areas_sr.to(score.device, score.dtype)[None, :]
        index = torch.topk(score.detach(), k, dim=-1).indices.cpu()
        at = mode if mode in PREDICT_AT else self.predict_at
        points = (self.centres_xyz if at == "centre" else self.means_xyz).detach().cpu().to(torch.float64)
        return xyz_to_latlon(points[index])
