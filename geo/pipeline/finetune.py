"""Country fine-tuning of the backbone: cross-entropy over the countries of the train split.

One plain loop (``finetune``) for a single process and for torchrun/DDP: Adam, bf16
autocast and channels_last where the device supports them, top-1 country accuracy on
val after every epoch (with the majority-class rate beside it for reference), an atomic
checkpoint after every epoch that a re-run resumes from, and a tqdm bar. Unreadable
images are skipped and recorded; when more than ``max_failed_fraction`` of the rows
seen fail, the run stops and says so.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from geo.errors import ConfigError, GeoError
from geo.devices import autocast
from geo.files import atomic_torch_save
from geo.pipeline.backbone import Backbone, Placement, backbone_eval_transform
from geo.pipeline.distributed import Dist, shard_range
from geo.pipeline.images import ImageRows, collate_rows

STATE_FORMAT = "geo-finetune-state/1"


@dataclass
class FinetuneConfig:
    """Options of the fine-tuning loop. ``lr=None`` -> 1e-5 from pretrained weights (torchvision's
    ImageNet ones, the paper's rate; and timm / OpenCLIP / hf "pretrained": pretrained ViTs and
    CLIP towers are fine-tuned at 1e-5 with Adam(W), higher rates wreck their features), 1e-3
    otherwise (from scratch a 1e-5 step barely moves the weights)."""

    epochs: int = 1
    lr: float | None = None
    batch_size: int = 32
    workers: int = 0
    image_size: int = 224
    seed: int = 0
    max_failed_fraction: float = 0.5

    def resolved_lr(self, weights_source: str) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 1e-5 if weights_source in ("imagenet", "pretrained") else 1e-3


@dataclass
class FinetuneResult:
    """``history``: one dict per epoch; ``failed``: manifest row -> reason for unreadable images."""

    history: list[dict] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


def image_loader(paths, transform, *, batch_size, workers, sampler=None, generator=None,
                 pin_memory=False, draft_short_side: int | None = None,
                 batch_transform: Callable | None = None) -> DataLoader:
    """A DataLoader over ``ImageRows(paths, transform)``; yields ``collate_rows`` batches.
    ``draft_short_side``: decode JPEGs at reduced scale (``geo.pipeline.images.load_rgb``);
    ``batch_transform``: applied to each collated batch, in the worker (training colour jitter)."""
    collate = collate_rows if batch_transform is None else functools.partial(collate_rows, batch_transform=batch_transform)
    return DataLoader(ImageRows(list(paths), transform, draft_short_side=draft_short_side), batch_size=batch_size,
                      sampler=sampler, shuffle=False, num_workers=workers, collate_fn=collate, generator=generator,
                      pin_memory=pin_memory, persistent_workers=False)


@torch.inference_mode()
def evaluate_countries(model: Backbone, paths, labels: np.ndarray, place: Placement, *,
                       image_size: int, batch_size: int, workers: int) -> tuple[int, int, int]:
    """Top-1 country hits over ``paths`` (labels int64, -1 = class unknown to the classifier,
    counted as a miss). Returns (correct, n_read, n_failed)."""
    was_training = model.training
    model.eval()
    correct = n_read = n_failed = 0
    for index, images, failures in image_loader(paths, backbone_eval_transform(model, image_size),
                                                batch_size=batch_size, workers=workers):
        n_failed += len(failures)
        if len(index) == 0:
            continue
        with autocast(place.device, place.precision):
            pred = model(place.inputs(images)).argmax(1).cpu().numpy()
        correct += int((pred == labels[index.numpy()]).sum())
        n_read += len(index)
    model.train(was_training)
    return correct, n_read, n_failed


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               target, place: Placement, loss_fn: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch (images [b, 3, S, S] on the CPU): ``net`` runs under the
    placement's autocast, the loss outside it. Default: country cross-entropy (target int64 [b]
    on ``place.device``); ``loss_fn(output, target) -> 0-d loss`` replaces it (the end-to-end
    fine-tuning of ``geo.endtoend`` passes a head's own loss). Returns (output, the loss)."""
    with autocast(place.device, place.precision):
        logits = net(place.inputs(images))
    loss = F.cross_entropy(logits.float(), target) if loss_fn is None else loss_fn(logits, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, loss


def _save_state(path: Path, payload: dict) -> None:
    atomic_torch_save(path, payload)  # a kill leaves the previous epoch's state intact


def finetune(model: Backbone, paths, labels: np.ndarray, split: np.ndarray, config: FinetuneConfig,
             place: Placement, state_path: str | os.PathLike, *, dist: Dist = Dist(),
             identity: dict | None = None, stop_after_epochs: int | None = None) -> FinetuneResult:
    """Fine-tune ``model`` (already on ``place``) in place on country ``labels``.

    paths: image path per manifest row; labels: int64 class index per row (-1 = a country the
    classifier does not have; only possible outside train); split: uint8 codes (0 train, 1 val).
    state_path: the per-epoch checkpoint; an existing one whose ``identity`` (the options that
    define the run) matches is resumed, another is refused. ``stop_after_epochs`` is a test hook
    that raises after that many epochs in this call (a simulated kill).
    """
    state_path = Path(state_path)
    train_rows = np.flatnonzero(split == 0)
    val_rows = np.flatnonzero(split == 1)
    if len(train_rows) == 0:
        raise ConfigError("fine-tuning needs rows in the train split; the manifest has none "
                          "(or pass --finetune-epochs 0)")
    identity = dict(identity or {}, classes=list(model.classes), epochs=config.epochs,
                    lr=config.resolved_lr(model.weights_source), batch_size=config.batch_size,
                    image_size=config.image_size, seed=config.seed, world_size=dist.world_size,
                    lr_schedule="cosine-per-step")
    # Frozen blocks (--finetune-blocks) have requires_grad=False and no optimizer state.
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=identity["lr"])
    result, start_epoch = FinetuneResult(), 0
    if state_path.exists():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as err:  # torn or foreign: the user decides to drop the progress in it
            raise ConfigError(f"{state_path}: cannot be read ({type(err).__name__}); delete it to start the "
                              "fine-tuning again (the epochs it held are lost)") from None
        if state.get("identity") != identity:
            raise ConfigError(f"{state_path} holds a fine-tuning run with other options "
                              f"({state.get('identity')}); pass --overwrite to start again")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, result.history = int(state["epoch"]), list(state["history"])
        result.failed = {int(k): v for k, v in state["failed"].items()}
    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[place.device.index] if place.device.type == "cuda" else None)
    train_paths = [paths[i] for i in train_rows]
    train_labels = torch.as_tensor(labels[train_rows], dtype=torch.int64)
    epochs_run = 0
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(config.seed * 100_003 + epoch)  # augmentation/dropout: resume == straight run
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        if dist.enabled:
            sampler = DistributedSampler(range(len(train_rows)), num_replicas=dist.world_size,
                                         rank=dist.rank, shuffle=True, seed=config.seed)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(range(len(train_rows)), generator=generator)
        preprocess = model.preprocess.at_size(config.image_size)
        loader = image_loader(train_paths, preprocess.train_transform(),
                              batch_transform=preprocess.train_batch_transform(), sampler=sampler,
                              batch_size=config.batch_size, workers=config.workers,
                              generator=generator, pin_memory=place.device.type == "cuda")
        model.train()
        loss_sum = hits = seen = failed = 0.0
        bar = tqdm(loader, desc=f"fine-tune {epoch + 1}/{config.epochs}", disable=not dist.is_main,
                   leave=False, unit="batch")
        steps_per_epoch = max(1, len(loader))
        for step_in_epoch, (index, images, failures) in enumerate(bar):
            # Cosine decay to 0 over all epochs, a function of the step alone (resume-safe):
            # from random initialisation a constant lr leaves the last epoch noisy.
            progress = (epoch * steps_per_epoch + step_in_epoch) / (config.epochs * steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = identity["lr"] * 0.5 * (1.0 + math.cos(math.pi * progress))
            for i, reason in failures:
                result.failed[int(train_rows[i])] = reason
            failed += len(failures)
            if len(index) < 2:
                # BatchNorm cannot train on one row; under DDP every rank must still join the
                # gradient all-reduce, so run a zero-loss step in eval mode (no BN statistics).
                if dist.enabled:
                    model.eval()
                    with autocast(place.device, place.precision):
                        dummy = net(place.inputs(torch.zeros(1, 3, config.image_size, config.image_size)))
                    optimizer.zero_grad(set_to_none=True)
                    (dummy.float().sum() * 0.0).backward()
                    model.train()
                continue
            target = train_labels[index].to(place.device)
            logits, loss = train_step(net, optimizer, images, target, place)
            loss_sum += float(loss.detach()) * len(index)
            hits += float((logits.argmax(1) == target).sum())
            seen += len(index)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        seen, hits, loss_sum, failed = dist.sum([seen, hits, loss_sum, failed])
        if failed > config.max_failed_fraction * max(seen + failed, 1):
            raise GeoError(f"fine-tuning stopped: {int(failed)} of {int(seen + failed)} training "
                           f"images could not be read (e.g. {next(iter(result.failed.values()), '')}); "
                           "check the manifest's paths and image files")
        # Validation: contiguous shards per rank, counts summed over ranks.
        lo, hi = shard_range(len(val_rows), dist.rank, dist.world_size)
        correct, n_val, n_val_failed = evaluate_countries(
            model, [paths[i] for i in val_rows[lo:hi]], labels[val_rows[lo:hi]], place,
            image_size=config.image_size, batch_size=config.batch_size, workers=config.workers)
        correct, n_val, n_val_failed = dist.sum([correct, n_val, n_val_failed])
        majority = np.bincount(labels[train_rows], minlength=1).argmax()
        record = {
            "epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": hits / max(seen, 1),
            "val_acc": correct / n_val if n_val else None,
            "val_majority_acc": float(np.mean(labels[val_rows] == majority)) if len(val_rows) else None,
            "n_train": int(seen), "n_failed": int(failed + n_val_failed),
            "lr_peak": identity["lr"], "lr_last": optimizer.param_groups[0]["lr"], "elapsed_s": time.perf_counter() - t0,
        }
        result.history.append(record)
        if dist.is_main:
            tqdm.write("fine-tune " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                  for k, v in record.items()}))
            _save_state(state_path, {
                "format": STATE_FORMAT, "identity": identity, "epoch": epoch + 1,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "history": result.history,
                "failed": {str(k): v for k, v in result.failed.items()},
            })
            with open(state_path.with_suffix(".jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        dist.barrier()
        epochs_run += 1
        if stop_after_epochs is not None and epochs_run >= stop_after_epochs and epoch + 1 < config.epochs:
            raise RuntimeError(f"simulated kill after {epochs_run} fine-tuning epoch(s) (test hook)")
    model.eval()
    return result
