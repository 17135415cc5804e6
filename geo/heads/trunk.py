"""The optional deep trunk that any head can put in front of its linear layer (``--trunk-depth``)."""

from __future__ import annotations

import torch
from torch import nn

from geo.errors import ConfigError


class ResidualTrunk(nn.Module):
    """The optional deep trunk in front of a head's linear layer (``--trunk-depth``; off by default).

    ``features [B, d] -> [B, width]``: a linear lift to ``width``, then ``depth`` residual
    blocks ``h + W2 SiLU(W1 LN(h))``, then a layer norm. The paper's heads are linear in the
    features; with a trunk, a linear MvMF, a deep MvMF and a flow head compare at equal capacity.
    """

    def __init__(self, feature_dim: int, width: int, depth: int):
        super().__init__()
        if width < 1 or depth < 1:
            raise ConfigError(f"trunk_width and trunk_depth must be >= 1 (got {width}, {depth})")
        self.lift = nn.Linear(feature_dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(),
                                                  nn.Linear(width, width)) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.lift(features.to(self.lift.weight.dtype))
        for block in self.blocks:
            h = h + block(h)
        return self.norm(h)


def trunk_options_of(config: dict) -> dict:
    """The ``trunk_width``/``trunk_depth`` head options of a run's config; {} when it has no trunk."""
    depth = int(config.get("trunk_depth") or 0)
    return {"trunk_width": int(config.get("trunk_width") or 512), "trunk_depth": depth} if depth > 0 else {}
