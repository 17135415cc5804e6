"""Output heads trained on cached features, and their registry.

A head maps features ``[B, d]`` to its output (for cell heads the logits
``[B, c]``) and turns that into a loss, predictions and a density on the sphere;
the contract is ``geo.heads.base.Head``. Heads are registered by name, so a new
head is one new file, imported below so that it registers::

    @register_head("myhead")
    class MyHead(Head):
        ...

    head = create_head("mvmf", feature_dim=2048, partition=partition, kappa0=16.0)

``create_head(name, feature_dim=..., partition=..., **head.options)`` re-creates
a head; the partition is passed only to heads that declare ``uses_partition``.
Cell heads read only the partition's ``centres_xyz [c, 3]``, ``means_xyz [c, 3]``,
``areas_sr [c]``, ``n_cells`` and (the softmax head) ``assign(lat_deg, lon_deg) -> int64 [n]``.
``geo.heads`` never imports ``geo.pipeline`` or ``geo.training``.
"""

from geo.heads import flow as _flow  # noqa: F401  (registers "flow")
from geo.heads import knn as _knn  # noqa: F401  (registers "knn")
from geo.heads import mvmf as _mvmf  # noqa: F401  (registers "mvmf")
from geo.heads import regression as _regression  # noqa: F401  (registers "regression")
from geo.heads import softmax as _softmax  # noqa: F401  (registers "softmax")
from geo.heads import softmax_hier as _softmax_hier  # noqa: F401  (registers "softmax-hier")
from geo.heads import vmf as _vmf  # noqa: F401  (registers "vmf")
from geo.heads import vmf_mixture as _vmf_mixture  # noqa: F401  (registers "vmf-mixture")
from geo.heads.base import CellHead, Head
from geo.heads.low_precision import LowPrecisionLinear, TrainingBf16Linear, resolve_matmul_dtype
from geo.heads.registry import create_head, head_class, list_heads, register_head

__all__ = ["CellHead", "Head", "LowPrecisionLinear", "TrainingBf16Linear", "create_head", "head_class", "list_heads",
           "register_head", "resolve_matmul_dtype"]
