"""``softmax-hier``: PlaNet softmaxes over several nested partitions trained jointly (GeoEstimation).

The partitions, coarse to fine, have about c/4^(L-1), ..., c/4, c cells (``levels`` = L,
each coarse count rounded down to 6 + 3k): the finest is the run's partition and
the coarser ones are derived from it (``geo.sphere.hierarchy.coarser_cells``, the
greedy construction replayed on the fine cells' counts: nested, and exactly
``Partition.build`` of the train points with that many cells). So the head is
rebuilt from the run's saved partition alone.

One linear layer gives the logits of every level, ``[B, c + c_1 + ...]`` (finest
first). Loss: the sum over levels of the cross-entropy of each level's true cell.
Each fine cell j is scored by the product of its own probability and its
ancestors' at every coarser level, normalised over the fine cells:

    q_j  is proportional to  p_fine(j) * prod_l p_l(ancestor_l(j))

and q is the head's distribution over the fine cells: its predictions, top-k
and density (q_j / area_j per steradian) are the softmax head's with q in place
of the softmax. With one level q = softmax(logits): it is the softmax head.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geo.errors import ConfigError
from geo.heads.low_precision import matmul_dtype_of
from geo.heads.registry import register_head
from geo.heads.softmax import PREDICT_AT, SoftmaxHead
from geo.sphere.hierarchy import coarser_cells

MAX_LEVELS = 4


@register_head("softmax-hier")
class SoftmaxHierHead(SoftmaxHead):
    """Jointly trained softmaxes over ``levels`` nested partitions; predictions in the finest.

    Args:
        feature_dim: d, the width of the features.
        partition: the finest partition (a ``Partition``: ``cell_ids`` and ``counts`` are read
            to derive the coarser ones, plus what the softmax head reads).
        levels: L, the number of partitions (1 to 4; 1 = the softmax head).
        predict_at: where a predicted cell is placed: "centre" (PlaNet) or "mean".
        matmul_dtype: None or bfloat16, for the W x product only.
    """

    def __init__(self, feature_dim: int, partition: Any, *, levels: int = 3, predict_at: str = "centre",
                 matmul_dtype: Any = None):
        super().__init__(feature_dim, partition, predict_at=predict_at, matmul_dtype=matmul_dtype)
        if not 1 <= int(levels) <= MAX_LEVELS:
            raise ConfigError(f"levels must be between 1 and {MAX_LEVELS}, not {levels}")
        self.levels = int(levels)
        ancestors, sizes = [], []
        for level in range(1, self.levels):
            index, n = coarser_cells(partition, self.n_cells // 4 ** level)
            if sizes and n >= sizes[-1]:
                break  # too few cells for a coarser level (6 faces at the bottom)
            ancestors.append(index)
            sizes.append(n)
        self.level_sizes = [self.n_cells, *sizes]
        # ancestors[l][j]: the level-(l+1) cell holding fine cell j, offset into the joint logits
        offsets = np.cumsum(self.level_sizes)[:-1]
        self.register_buffer("ancestor_columns", torch.from_numpy(
            np.stack([a + o for a, o in zip(ancestors, offsets)]) if ancestors else np.zeros((0, self.n_cells),
                                                                                               np.int64)),
            persistent=False)
        self.linear = nn.Linear(self.feature_dim, sum(self.level_sizes))
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        del self.options["label_smoothing_km"]
        self.options = {"levels": self.levels, **self.options}

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        predict = config.get("predict")
        return dict(levels=int(config.get("hier_levels") or 3),
                    predict_at=predict if predict in PREDICT_AT else PREDICT_AT[0], matmul_dtype=matmul_dtype_of(config))

    @classmethod
    def parameter_count(cls, feature_dim: int, n_cells: int) -> int:
        return int(n_cells * 4 / 3) * (feature_dim + 1)  # c (1 + 1/4 + 1/16 + ...) rows at most

    def _level_log_probs(self, joint: torch.Tensor) -> list[torch.Tensor]:
        joint = joint.to(torch.promote_types(joint.dtype, torch.float32))
        return [torch.log_softmax(part, dim=-1) for part in torch.split(joint, self.level_sizes, dim=-1)]

    def fine_log_probs(self, joint: torch.Tensor) -> torch.Tensor:
        """log q ``[B, c]`` over the fine cells (normalised) from the joint logits ``[B, c + c_1 + ...]``."""
        levels = self._level_log_probs(joint)
        score = levels[0]
        if len(levels) > 1:
            coarse = torch.cat(levels[1:], dim=-1)                      # [B, c_1 + ...]
            offset = self.level_sizes[0]
            score = score + coarse[:, self.ancestor_columns - offset].sum(dim=1)
        return torch.log_softmax(score, dim=-1)

    def loss(self, joint: torch.Tensor, target_xyz: torch.Tensor | None = None, *,
             target_cell: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over levels of the mean cross-entropy of each level's true cell (nats)."""
        fine = self._cells(target_xyz, target_cell, joint.device)
        levels = self._level_log_probs(joint)
        total = F.nll_loss(levels[0], fine)
        offsets = np.cumsum(self.level_sizes)[:-1]  # where each coarser level starts in the joint logits
        for log_p, columns, offset in zip(levels[1:], self.ancestor_columns, offsets):
            total = total + F.nll_loss(log_p, columns[fine] - int(offset))
        return total

    # The softmax head's density, predictions and top-k, with q in place of softmax(logits)
    # (its log_softmax of log q is log q itself).

    def log_density_at(self, joint, target_xyz=None, *, target_cell=None):
        return super().log_density_at(self.fine_log_probs(joint), target_xyz, target_cell=target_cell)

    def log_density(self, joint, xyz, *, cells=None):
        return super().log_density(self.fine_log_probs(joint), xyz, cells=cells)

    def predict(self, joint, k=1, mode="argmax"):
        return super().predict(self.fine_log_probs(joint), k, mode)

    def topk(self, joint, k):
        return super().topk(self.fine_log_probs(joint), k)

    def cell_probs(self, joint):
        return super().cell_probs(self.fine_log_probs(torch.as_tensor(joint).detach()))

    def cell_density(self, output_row):
        return super().cell_density(self.fine_log_probs(torch.as_tensor(output_row)[None])[0])
