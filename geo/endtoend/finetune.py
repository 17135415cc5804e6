"""`geo finetune RUN MANIFEST --out NEW_RUN`: the paper's second round of fine-tuning (table 2).

Starts from a finished run (its selected head) and the backbone checkpoint its cache
records (sha256 verified), and trains both together on the manifest's train split with
the head's own loss (the MvMF's exact log-sum-exp vMF likelihood, the softmax's
cross-entropy): AdamW (lr 1e-5, 5 epochs by default, the paper's), linear warm-up then
cosine as fit-head (``geo.training.trainer.lr_at``), the backbone under bf16 autocast
where the device runs it and the head outside autocast (its vMF terms in float32/64).
After every epoch the val split is scored through the current backbone
(``geo.training.evaluate.evaluate_split``) and the best pair by the run's ``select_by``
is kept.

Writes NEW_RUN in the run format (``geo.training.runs``): config.json (every option and
the parent run), metrics.jsonl, metrics.json, predictions.parquet, checkpoint.pt; plus
``backbone.pt`` (the selected fine-tuned backbone, a geo backbone checkpoint) and
``<parent cache stem>.h5``, the val and test rows of the manifest extracted through it,
which is the run's own cache: ``geo evaluate NEW_RUN`` uses it, ``geo extract TEST --like
NEW_RUN`` extracts more test sets through the same backbone, and a cache made with the
old backbone is refused by ``geo evaluate`` (its provenance names another checkpoint).

A kill at any point loses at most the steps since the last state (``e2e_state.pt``, each
epoch or every ``checkpoint_every`` steps); rerunning the same command resumes and ends
with the same files as an uninterrupted run (``geo.endtoend.data.SeededBatches``). Under
``torchrun`` every rank reads its contiguous shard of each global batch and the gradient is
averaged with DDP, weighted so that N processes equal one with the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from geo.cache.store import CacheWriter, FeatureCache
from geo.errors import ConfigError, GeoError
from geo.files import sha256_file
from geo.geometry import latlon_to_xyz
from geo.pipeline import distributed
from geo.pipeline.backbone import (Backbone, Placement, backbone_eval_transform, create_backbone, placement,
                                   save_backbone)
from geo.pipeline.countries import country_codes
from geo.pipeline.distributed import Dist
from geo.pipeline.extract import _labels, default_workers, extract_rows
from geo.pipeline.finetune import train_step
from geo.pipeline.images import describe_transform
from geo.pipeline.manifest import read_manifest
from geo.training import runs
from geo.training.config import TOPK
from geo.training.evaluate import evaluate_split, feature_dtype, score_and_write
from geo.training.trainer import TrainingError, lr_at
from geo.version import __version__
from geo.endtoend.config import EndToEndConfig, check_options
from geo.endtoend.data import (FeatureArrays, SeededBatches, batch_seed, check_manifest_splits, epoch_order,
                               sub_manifest)
from geo.endtoend.model import EndToEnd, freeze, head_loss_fn, make_optimizer, val_features
from geo.endtoend.parent import Parent, check_manifest_against_cache, check_parent

STATE_FILE = "e2e_state.pt"
BACKBONE_FILE = "backbone.pt"
STAGE = "end-to-end"
# config.json keys known only once the run's own cache is written (not compared on resume).
_LATE_KEYS = ("cache_path", "cache_provenance", "cache_feature_dim", "cache_n_rows", "geo_version")


# ---- the run ------------------------------------------------------------------------------------------


def _cpu(module_or_state) -> dict:
    sd = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def run_finetune(parent_run: str | os.PathLike, manifest_path: str | os.PathLike, out: str | os.PathLike,
                 config: EndToEndConfig, *, progress: bool = True,
                 _stop_after_steps: int | None = None) -> dict:
    """Fine-tune backbone + head of ``parent_run`` end to end on ``manifest_path``; write run ``out``.

    Returns the final metrics (``metrics.json``). ``_stop_after_steps`` raises after that many
    steps in this call (tests: a simulated kill).
    """
    check_options(config)
    parent = check_parent(parent_run, config.backbone_checkpoint)
    out = Path(out).expanduser().resolve()
    if out == parent.path:
        raise ConfigError(f"--out {out}: the parent run itself; choose a new directory")
    manifest = read_manifest(manifest_path)
    check_manifest_splits(manifest)
    n_differing = check_manifest_against_cache(manifest, parent, config.allow_other_manifest)
    workers = default_workers() if config.workers is None else config.workers

    place = placement(config.device, config.precision)
    dist, device = distributed.init(place.device)
    place = Placement(device, place.precision, place.channels_last)
    try:
        return _run(parent, manifest, out, config, place, dist, workers, n_differing, progress, _stop_after_steps)
    finally:
        distributed.shutdown()


def _resolved_config(parent: Parent, manifest, config: EndToEndConfig, place: Placement, n_train: int,
                     n_val: int, n_differing: int) -> dict:
    p = parent.config
    steps_per_epoch = -(-n_train // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    keep = {k: v for k, v in p.items() if k not in _LATE_KEYS and not k.startswith("cache_")}
    resolved = dict(
        keep, format=runs.RUN_FORMAT, stage=STAGE, parent_run=str(parent.path), parent_name=parent.path.name,
        parent_cache_path=p.get("cache_path"), parent_cache_provenance=p.get("cache_provenance"),
        manifest=str(Path(manifest.path).resolve()), manifest_sha256=manifest.sha256,
        manifest_rows_differing=n_differing,
        backbone=str(p["cache_provenance"]["backbone"]), backbone_init_checkpoint=str(parent.checkpoint_path),
        backbone_init_sha256=str(p["cache_provenance"]["weights"]),
        finetune_blocks=config.finetune_blocks, augment=bool(config.augment),
        decode=str(p["cache_provenance"].get("decode", "full")),  # of val/test images, as the parent cache's
        epochs=config.epochs, lr=float(config.lr), batch_size=config.batch_size,
        warmup_fraction=float(config.warmup_fraction), min_lr_fraction=float(config.min_lr_fraction),
        weight_decay=float(p.get("weight_decay", 0.0) if config.weight_decay is None else config.weight_decay),
        seed=config.seed, device=str(place.device), precision=place.precision,
        checkpoint_every=config.checkpoint_every, optimizer="adamw", lr_schedule="linear-warmup-cosine",
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        warmup_steps=int(round(config.warmup_fraction * total_steps)), eval_every=steps_per_epoch,
        n_train=n_train, n_train_split=n_train, train_fraction=1.0, n_val=n_val, topk=p.get("topk", TOPK),
    )
    return runs.json_safe(resolved)


def _check_out(out: Path, cfg: dict, overwrite: bool) -> bool:
    """Prepare ``out``; True when it holds this same run to resume (or finish)."""
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / runs.CONFIG_FILE
    if overwrite or not config_path.exists():
        for name in (runs.CONFIG_FILE, runs.METRICS_LOG_FILE, runs.METRICS_FILE, runs.CHECKPOINT_FILE,
                     runs.PREDICTIONS_FILE, STATE_FILE, BACKBONE_FILE):
            (out / name).unlink(missing_ok=True)
        return False
    old = {k: v for k, v in runs.read_json(config_path).items() if k not in _LATE_KEYS}
    diffs = runs.config_differences(old, {k: v for k, v in cfg.items() if k not in _LATE_KEYS})
    if diffs:
        raise ConfigError(f"{out} holds a run with a different configuration ({len(diffs)} keys differ: "
                          + "; ".join(diffs) + "). Use another --out, or --overwrite to replace it.")
    return True


def _run(parent: Parent, manifest, out: Path, config: EndToEndConfig, place: Placement, dist: Dist, workers: int,
         n_differing: int, progress: bool, stop_after_steps: int | None) -> dict:
    p = parent.config
    train_rows = np.flatnonzero(manifest.split == 0)
    val_rows = np.flatnonzero(manifest.split == 1)
    eval_rows = np.flatnonzero(manifest.split >= 1)  # val and test: the run's own cache
    cfg = _resolved_config(parent, manifest, config, place, len(train_rows), len(val_rows), n_differing)

    # Backbone: the parent cache's checkpoint, checked to give the features the parent head was trained on.
    torch.manual_seed(config.seed)
    provenance = p["cache_provenance"]
    backbone = create_backbone(str(provenance["backbone"]), str(parent.checkpoint_path), num_classes=1,
                               seed=config.seed)
    ours = describe_transform(backbone_eval_transform(backbone))
    if ours != str(provenance["transform"]) or int(backbone.preprocess.image_size) != int(provenance["image_size"]):
        raise ConfigError(f"{parent.checkpoint_path}: its transform in this geo ({ours!r}) is not the one the parent "
                          f"cache records ({provenance['transform']!r})")
    freeze(backbone, config.finetune_blocks)
    loaded = runs.load_head(parent.path, place.device)
    head = loaded.head
    partition_state = loaded.partition.state_dict() if loaded.partition is not None and head.uses_partition else None
    x_dtype = feature_dtype(place.precision)
    model = EndToEnd(place.to(backbone), head, x_dtype)

    resume = False
    if dist.is_main:
        resume = _check_out(out, cfg, config.overwrite)
        if not resume:
            runs.write_json(out / runs.CONFIG_FILE, cfg)
    dist.barrier()
    optimizer = make_optimizer(model, cfg)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "elapsed_s": 0.0, "n_failed": 0,
             "loss_sum": 0.0, "loss_count": 0,
             "best": {"step": None, "score": None, "metrics": None, "head_state": None}}
    state_path = out / STATE_FILE
    if state_path.exists():
        saved = runs.load_checkpoint(state_path)
        if saved.get("config_identity") != {k: v for k, v in cfg.items() if k not in _LATE_KEYS}:
            raise ConfigError(f"{state_path}: the state of another configuration; pass --overwrite to start again")
        model.backbone.load_state_dict(saved["backbone"])
        model.head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        state.update({k: saved[k] for k in state})
        del saved
    elif (out / runs.METRICS_FILE).exists() and (out / runs.CHECKPOINT_FILE).exists():
        return runs.read_json(out / runs.METRICS_FILE)  # finished before (same configuration): nothing to do
    if dist.is_main:
        runs.truncate_jsonl(out / runs.METRICS_LOG_FILE, max_step=state["step"])

    # Targets of every manifest row, as fit-head computes them for cache rows.
    target_xyz = torch.from_numpy(latlon_to_xyz(manifest.lat_deg, manifest.lon_deg).astype(np.float32))
    row_targets = head.row_targets(manifest.lat_deg, manifest.lon_deg)
    countries, country_index, _, _ = _labels(manifest)
    preprocess = backbone.preprocess
    transform = preprocess.train_transform() if config.augment else preprocess.eval_transform()
    batch_transform = preprocess.train_batch_transform() if config.augment else None
    train_paths = manifest.paths[train_rows]
    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[place.device.index] if place.device.type == "cuda" else None)
    identity = {k: v for k, v in cfg.items() if k not in _LATE_KEYS}

    def save_state():
        if dist.is_main:
            runs.save_checkpoint(state_path, {
                "format": "geo-e2e-state/1", "config_identity": identity, **state,
                "backbone": _cpu(model.backbone), "head": _cpu(model.head), "optimizer": optimizer.state_dict()})
        dist.barrier()

    bar = tqdm(total=len(train_rows) * cfg["epochs"],
               initial=min(state["step"] * cfg["batch_size"], len(train_rows) * cfg["epochs"]),
               disable=not (progress and dist.is_main), unit="img", unit_scale=True, dynamic_ncols=True,
               desc=f"finetune {p['head']}")
    steps_this_call = 0
    while state["step"] < cfg["total_steps"]:
        epoch, first = state["epoch"], state["batch_in_epoch"]
        t0 = time.perf_counter()
        batches = SeededBatches(train_paths, epoch_order(len(train_rows), config.seed, epoch), cfg["batch_size"],
                                seed=config.seed, epoch=epoch, first_batch=first, transform=transform,
                                batch_transform=batch_transform, rank=dist.rank, world_size=dist.world_size)
        loader = DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers,
                            pin_memory=place.device.type == "cuda")
        model.train()
        for k, (index, images, failures, n_global) in enumerate(loader):
            step = state["step"]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            torch.manual_seed(batch_seed(config.seed, epoch, first + k) + 1)  # dropout: a function of the batch
            rows = train_rows[index.numpy()]
            targets = {"target_xyz": target_xyz[rows].to(place.device),
                       **{name: t[rows].to(place.device) for name, t in row_targets.items()}}
            n_good = dist.sum([float(len(index))])[0]
            if len(index) == 0:  # every image of this shard unreadable: a zero-weight step keeps DDP in step
                images = torch.zeros(1, 3, preprocess.image_size, preprocess.image_size)
                rows = train_rows[:1]
                targets = {"target_xyz": target_xyz[rows].to(place.device),
                           **{name: t[rows].to(place.device) for name, t in row_targets.items()}}
            # Weight so that DDP's mean over ranks is the mean over the global batch.
            weight = (len(index) * dist.world_size / n_good) if n_good else 0.0
            _, loss = train_step(net, optimizer, images, targets, place, loss_fn=head_loss_fn(model.head, weight))
            loss_global = dist.sum([float(loss.detach())])[0] / dist.world_size  # the global batch's mean
            if not math.isfinite(loss_global):
                raise TrainingError(f"loss is {loss_global} at step {step + 1} (epoch {epoch + 1}); the last good "
                                    f"state is {state_path if state_path.exists() else 'none yet'}")
            state["n_failed"] += int(dist.sum([float(len(failures))])[0])
            state["loss_sum"] += loss_global
            state["loss_count"] += 1
            state["step"] += 1
            state["batch_in_epoch"] = first + k + 1
            bar.update(n_global)
            bar.set_postfix(loss=f"{state['loss_sum'] / state['loss_count']:.3f}")
            steps_this_call += 1
            end_of_epoch = state["batch_in_epoch"] == cfg["steps_per_epoch"]
            if end_of_epoch:
                state["epoch"], state["batch_in_epoch"] = epoch + 1, 0
            state["elapsed_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if end_of_epoch:
                _evaluate(model, manifest, val_rows, countries, country_index, cfg, place, dist, workers, state,
                          out)
                save_state()
            elif cfg["checkpoint_every"] and state["step"] % cfg["checkpoint_every"] == 0:
                save_state()
            if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                raise RuntimeError(f"simulated kill after {steps_this_call} steps (test hook)")
    bar.close()
    return _finish(model, manifest, eval_rows, countries, country_index, cfg, place, dist, workers, state, out,
                   partition_state, optimizer)


def _evaluate(model: EndToEnd, manifest, val_rows, countries, country_index, cfg, place, dist, workers, state,
              out: Path) -> None:
    """Score the val split through the current backbone; keep the best pair; log a metrics.jsonl line."""
    t0 = time.perf_counter()
    feats, ok = val_features(model.backbone, manifest, val_rows, place, batch_size=cfg["batch_size"],
                             workers=workers, dist=dist, decode=cfg["decode"])
    rows = val_rows[ok]
    arrays = FeatureArrays(feats[ok], ids=manifest.ids[rows], lat_deg=manifest.lat_deg[rows],
                           lon_deg=manifest.lon_deg[rows], split=np.ones(len(rows), np.uint8),
                           country=country_index[rows], countries=countries)
    metrics, _ = evaluate_split(model.head, arrays, "val", predict=cfg["predict"], device=place.device,
                                feature_dtype=model.x_dtype, batch_size=cfg["eval_batch_size"])
    score = float(metrics[cfg["select_by"]])
    best = state["best"]
    improved = math.isfinite(score) and (best["score"] is None or (
        score > best["score"] if cfg["select_mode"] == "max" else score < best["score"]))
    if improved:
        state["best"] = {"step": state["step"], "score": score, "metrics": metrics, "head_state": _cpu(model.head)}
        if dist.is_main:  # the selected backbone; same bytes when a resumed run redoes this epoch
            save_backbone(model.backbone, out / BACKBONE_FILE, identity={
                "parent_run": cfg["parent_run"], "init_sha256": cfg["backbone_init_sha256"],
                "manifest_sha256": cfg["manifest_sha256"], "step": state["step"], "stage": STAGE})
    state["elapsed_s"] += time.perf_counter() - t0
    if dist.is_main:
        line = {"step": state["step"], "epoch": state["step"] / cfg["steps_per_epoch"],
                "train_loss": state["loss_sum"] / max(1, state["loss_count"]), "lr": lr_at(state["step"] - 1, cfg),
                **{f"val_{k}": v for k, v in metrics.items() if k not in ("split", "predict")},
                "best": improved, "n_failed": state["n_failed"], "elapsed_s": state["elapsed_s"]}
        runs.append_jsonl(out / runs.METRICS_LOG_FILE, line)
        tqdm.write("finetune " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in line.items()
                                             if k in ("step", "epoch", "train_loss", f"val_{cfg['select_by']}", "best")}))
    state["loss_sum"], state["loss_count"] = 0.0, 0


def cache_provenance(cfg: dict, backbone: Backbone, place: Placement, checkpoint: Path) -> dict:
    """The provenance of the run's own cache: the fine-tuned checkpoint (what `--like` and evaluate check)."""
    parent_prov = cfg["parent_cache_provenance"]
    prov = {"backbone": cfg["backbone"], "weights": sha256_file(checkpoint), "checkpoint_path": str(checkpoint),
            "init_weights": cfg["backbone_init_checkpoint"], "init_weights_sha256": cfg["backbone_init_sha256"],
            "finetune_epochs": int(parent_prov.get("finetune_epochs", 0)), "end_to_end_epochs": int(cfg["epochs"]),
            "end_to_end_parent_run": cfg["parent_run"], "image_size": int(backbone.preprocess.image_size),
            "transform": describe_transform(backbone_eval_transform(backbone)),
            "manifest_sha256": cfg["manifest_sha256"], "precision": place.precision, "decode": cfg["decode"]}
    if backbone.clip_features is not None:
        prov["clip_features"] = backbone.clip_features
    if "finetune_blocks" in parent_prov:
        prov["finetune_blocks"] = parent_prov["finetune_blocks"]
    return prov


def _finish(model: EndToEnd, manifest, eval_rows, countries, country_index, cfg, place, dist, workers, state, out,
            partition_state, optimizer) -> dict:
    """The selected pair: its backbone extracts the val and test rows into the run's cache; the head is scored on
    test (val without a test split); config.json gains the cache keys; checkpoint.pt is written."""
    best = state["best"]
    if best["head_state"] is None:  # no finite val score: keep the last weights
        best.update(step=state["step"], head_state=_cpu(model.head))
        if dist.is_main:
            save_backbone(model.backbone, out / BACKBONE_FILE, identity={"stage": STAGE, "step": state["step"]})
    dist.barrier()
    checkpoint = out / BACKBONE_FILE
    # Named like the parent's cache: a report shows parent and child under one test set (its stem).
    cache_path = out / (Path(cfg["parent_cache_path"] or "features.h5").stem + ".h5")
    metrics = None
    if dist.is_main:
        backbone = place.to(create_backbone(cfg["backbone"], str(checkpoint), num_classes=1, seed=cfg["seed"])).eval()
        provenance = cache_provenance(cfg, backbone, place, checkpoint)
        complete = False
        if cache_path.exists():
            with FeatureCache(cache_path, validate=False) as done:
                complete = all(str(done.provenance.get(k)) == str(v) for k, v in provenance.items())
            if not complete:
                cache_path.unlink()
        if not complete:
            sub = sub_manifest(manifest, eval_rows)
            with CacheWriter(cache_path, feature_dim=backbone.feature_dim, countries=countries,
                             provenance=provenance) as writer:
                extract_rows(backbone, sub, range(len(eval_rows)), country_index[eval_rows], writer, place,
                             batch_size=cfg["batch_size"], workers=workers, show_progress=False,
                             decode=cfg["decode"])
                writer.finalize()
        model.head.load_state_dict(best["head_state"])
        with FeatureCache(cache_path) as cache:
            final_cfg = dict(cfg, cache_path=str(cache_path), cache_feature_dim=cache.feature_dim,
                             cache_n_rows=cache.n_rows, cache_provenance=runs.json_safe(cache.provenance),
                             geo_version=__version__)
            try:
                final_split = "test" if len(cache.split_rows("test")) else "val"
            except GeoError:
                final_split = "val"
            runs.save_checkpoint(out / runs.CHECKPOINT_FILE, {
                "format": runs.RUN_FORMAT, "config": final_cfg, "partition": partition_state,
                "head_state": best["head_state"], "step": state["step"], "epoch": state["epoch"],
                "batch_in_epoch": 0, "elapsed_s": state["elapsed_s"], "best": best})
            runs.write_json(out / runs.CONFIG_FILE, final_cfg)
            metrics = score_and_write(model.head, cache, final_split, final_cfg, out, device=place.device,
                                      country_fn=country_codes, selected_step=best["step"],
                                      select_by=cfg["select_by"], train_elapsed_s=state["elapsed_s"],
                                      parent_run=cfg["parent_run"], stage=STAGE)
        (out / STATE_FILE).unlink(missing_ok=True)  # the run is complete; its state (3x the backbone) is not needed
    dist.barrier()
    return metrics if metrics is not None else {}

