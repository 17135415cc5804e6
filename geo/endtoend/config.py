"""The options of ``geo finetune`` and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from geo.errors import ConfigError


@dataclass
class EndToEndConfig:
    """Options of ``geo finetune`` (defaults: the paper's second round, section 4.2)."""

    epochs: int = 5
    lr: float = 1e-5
    batch_size: int = 32
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.01
    weight_decay: float | None = None  # on the head's W only; None: the parent run's
    finetune_blocks: int | None = None  # None: the whole backbone; 0: frozen (the head alone); N: the last N blocks
    augment: bool = True  # the backbone's training augmentation (as `geo extract` fine-tunes); False: eval transform
    workers: int | None = None  # None: as geo extract
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    checkpoint_every: int = 0  # steps between resumable states; 0 = once per epoch (at the val evaluation)
    backbone_checkpoint: str | None = None  # where the parent cache's backbone checkpoint is now
    allow_other_manifest: bool = False
    overwrite: bool = False


def check_options(config: EndToEndConfig) -> None:
    """Refuse values out of range, naming the option as typed."""
    def refuse(flag: str, value, why: str):
        raise ConfigError(f"{flag} {value!r}: {why}")

    for name in ("lr", "warmup_fraction", "min_lr_fraction"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            refuse("--" + name.replace("_", "-"), value, "must be a finite number")
    if config.lr <= 0:
        refuse("--lr", config.lr, "must be > 0")
    if config.epochs < 1:
        refuse("--epochs", config.epochs, "must be >= 1")
    if config.batch_size < 1:
        refuse("--batch-size", config.batch_size, "must be >= 1")
    if not 0 <= config.warmup_fraction < 1:
        refuse("--warmup-fraction", config.warmup_fraction, "must be in [0, 1)")
    if not 0 <= config.min_lr_fraction <= 1:
        refuse("--min-lr-fraction", config.min_lr_fraction, "must be in [0, 1]")
    if config.weight_decay is not None and not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        refuse("--weight-decay", config.weight_decay, "must be >= 0")
    if config.finetune_blocks is not None and config.finetune_blocks < 0:
        refuse("--finetune-blocks", config.finetune_blocks, "must be >= 0 (0 = backbone frozen, the head alone)")
    if config.workers is not None and config.workers < 0:
        refuse("--workers", config.workers, "must be >= 0")
    if config.checkpoint_every < 0:
        refuse("--checkpoint-every", config.checkpoint_every, "must be >= 0 (0 = once per epoch)")
