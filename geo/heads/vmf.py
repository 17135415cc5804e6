"""The ``vmf`` head: one von Mises-Fisher with input-dependent mean and concentration, mu(x) and kappa(x).

    p(y | x) = vMF(y; mu(x), kappa(x)),  NLL loss (nats per steradian)

It is ``vmf-mixture`` with K = 1 (geo/heads/vmf_mixture.py): the same linear
layer, output ``[B, 1, 5]`` (log pi = 0, unit mean, log kappa), loss, density,
credible radii (a one-component ``vmf_mixture``) and predictions (the mean is
both the argmax and the mode).
"""

from __future__ import annotations

from typing import Any

from geo.heads.low_precision import matmul_dtype_of
from geo.heads.registry import register_head
from geo.heads.trunk import trunk_options_of
from geo.heads.vmf_mixture import VmfMixtureHead


@register_head("vmf")
class VmfHead(VmfMixtureHead):
    """One input-dependent vMF, mu(x) and kappa(x).

    Args:
        feature_dim: d, the width of the features.
        log_kappa0: initial log kappa.
        matmul_dtype: None or bfloat16, for the W x product only.
    """

    def __init__(self, feature_dim: int, *, log_kappa0: float = 2.0, matmul_dtype: Any = None, trunk_width: int = 512,
                 trunk_depth: int = 0):
        super().__init__(feature_dim, n_components=1, log_kappa0=log_kappa0, matmul_dtype=matmul_dtype,
                         trunk_width=trunk_width, trunk_depth=trunk_depth)
        del self.options["n_components"]

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        return dict(matmul_dtype=matmul_dtype_of(config), **trunk_options_of(config))

    @classmethod
    def parameter_count(cls, feature_dim: int, n_cells: int) -> int:
        return 5 * (feature_dim + 1)
