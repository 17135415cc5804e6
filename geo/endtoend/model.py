"""The model ``geo finetune`` trains: a backbone and a head end to end, what of it trains, and its optimiser."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as torch_dist

from geo.devices import autocast
from geo.pipeline.backbone import Backbone, Placement, backbone_eval_transform, backbone_resize_px
from geo.pipeline.distributed import Dist, shard_range
from geo.training.trainer import adamw, optimizer_groups


class EndToEnd(torch.nn.Module):
    """Backbone then head: images ``[B, 3, S, S]`` -> the head's output (e.g. logits ``[B, c]``).

    The backbone runs under the caller's autocast; the head never does (its W x product has
    its own precision, ``matmul_dtype``, and its vMF terms run in float32/float64): features
    enter it as float32, cast to ``x_dtype`` as fit-head feeds cached features.
    """

    def __init__(self, backbone: Backbone, head, x_dtype: torch.dtype):
        super().__init__()
        self.backbone, self.head, self.x_dtype = backbone, head, x_dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(images)
        with torch.autocast(features.device.type, enabled=False):
            return self.head(features.float().to(self.x_dtype))


def freeze(backbone: Backbone, finetune_blocks: int | None) -> None:
    """None: train the whole trunk; 0: none of it (eval mode kept); N: its last N blocks. Never the classifier."""
    backbone.classifier.requires_grad_(False)  # the country classifier takes no part in the head's loss
    if finetune_blocks == 0:
        backbone.trunk.requires_grad_(False)
        backbone._frozen_modules = [""]  # train() keeps the whole trunk in eval mode
    elif finetune_blocks is not None:
        backbone.freeze_all_but_last(finetune_blocks)


def make_optimizer(model: EndToEnd, config: dict) -> torch.optim.Optimizer:
    """fit-head's AdamW groups for the head (decay on W only) plus one for the trainable backbone (no decay)."""
    groups = optimizer_groups(model.head, config)
    trunk = [p for p in model.backbone.trunk.parameters() if p.requires_grad]
    if trunk:
        groups.append({"params": trunk, "weight_decay": 0.0})
    return adamw(groups, config["lr"])


def head_loss_fn(head, weight: float = 1.0):
    """``loss_fn`` for ``geo.pipeline.finetune.train_step``: the head's own mean loss times ``weight``."""
    def loss_fn(output, targets: dict):
        return head.loss(output, **targets) * weight
    return loss_fn


@torch.inference_mode()
def val_features(backbone: Backbone, manifest, rows: np.ndarray, place: Placement, *, batch_size: int, workers: int,
                 dist: Dist, decode: str = "full") -> tuple[np.ndarray, np.ndarray]:
    """float16 features [len(rows), d] of manifest ``rows`` through ``backbone`` (eval transform), and a bool mask
    of the rows that could be read. Under DDP each rank computes its contiguous shard and the shards are summed."""
    from geo.pipeline.finetune import image_loader

    lo, hi = shard_range(len(rows), dist.rank, dist.world_size)
    out = torch.zeros(len(rows), backbone.feature_dim, dtype=torch.float32)
    ok = torch.zeros(len(rows), dtype=torch.float32)
    was_training = backbone.training
    backbone.eval()
    loader = image_loader([manifest.paths[i] for i in rows[lo:hi]], backbone_eval_transform(backbone),
                          batch_size=batch_size, workers=workers,
                          draft_short_side=backbone_resize_px(backbone) if decode == "draft" else None)
    for index, images, _ in loader:
        if len(index):
            with autocast(place.device, place.precision):
                feats = backbone.forward_features(place.inputs(images))
            out[lo + index] = feats.float().cpu()
            ok[lo + index] = 1.0
    backbone.train(was_training)
    if dist.enabled:
        torch_dist.all_reduce(out)
        torch_dist.all_reduce(ok)
    return out.numpy().astype(np.float16), ok.numpy() > 0
