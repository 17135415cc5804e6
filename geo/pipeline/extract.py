"""Stage one end to end: manifest -> country fine-tuning -> feature cache.

``run_extract`` checks the whole manifest first, labels every row with its country,
fine-tunes the backbone (resuming an interrupted fine-tune), saves the backbone
checkpoint, and writes every row's pooled feature (evaluation transform, manifest
order) into the HDF5 cache in row blocks, with full provenance. A killed run resumes
where the cache stopped (``CacheWriter.rows_done``). Under ``torchrun --nproc_per_node N``
every rank fine-tunes in DDP, extracts a contiguous shard into ``<out>.rank{r}`` and
rank 0 joins the shards, in manifest order, into ``<out>``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from geo.cache.store import CacheWriter, FeatureCache
from geo.errors import CacheError, ConfigError, GeoError, ManifestError
from geo.pipeline import distributed
from geo.devices import autocast
from geo.files import atomic_write_text, sha256_file
from geo.pipeline.backbone import (Backbone, Placement, backbone_eval_transform, backbone_resize_px,
                                   create_backbone, placement, save_backbone)
from geo.pipeline.countries import country_codes
from geo.pipeline.backbones import split_name
from geo.pipeline.distributed import Dist, shard_range
from geo.pipeline.finetune import FinetuneConfig, finetune, image_loader
from geo.pipeline.images import describe_transform
from geo.pipeline.like import check_like_transform, like_provenance, like_settings
from geo.pipeline.manifest import Manifest, read_manifest

JOIN_BLOCK_ROWS = 4096


@dataclass
class ExtractConfig:
    """Every option of ``geo extract`` (saved, resolved, as ``<out>.config.json``)."""

    backbone: str = "wide_resnet50_2"
    weights: str = "none"
    image_size: int | None = None  # None: the backbone's own (224 for torchvision models)
    clip_features: str | None = None  # CLIP towers: "projected" (None = this) or "pre-projection"
    finetune_epochs: int = 1
    finetune_blocks: int | None = None  # fine-tune only the last N blocks (None: all)
    lr: float | None = None
    batch_size: int = 32
    workers: int | None = None  # None: min(8, half the CPUs), at least 1 (decoding overlaps the forward)
    device: str = "auto"
    precision: str = "auto"
    checkpoint_dir: str | None = None
    seed: int = 0
    overwrite: bool = False
    feature_dtype: str = "float16"
    max_failed_fraction: float = 0.5
    decode: str = "draft"  # "draft": JPEGs decoded at reduced scale when >= 2x the resize; "full"
    like: str | None = None  # a training cache: reuse its checkpoint, transform, size, precision (geo.pipeline.like)


@dataclass
class ExtractResult:
    cache_path: Path
    checkpoint_path: Path
    config_path: Path
    n_rows: int
    n_skipped: int
    history: list
    is_main: bool = True  # False on torchrun ranks other than 0 (they print nothing)
    already_complete: bool = False  # a rerun that found this job's cache finished: nothing was redone


def default_workers() -> int:
    """DataLoader workers when not given: half the CPUs (the backbone's threads need the rest),
    at least 1, at most 8. On 2 cores, 1 worker lifts end-to-end/bare from ~0.6 to ~0.9 in fp32."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def default_checkpoint_dir(out: Path) -> Path:
    """``cache.h5`` -> ``cache.checkpoints/`` beside it."""
    return out.with_name(out.stem + ".checkpoints")


def shard_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.rank{rank}")


def _labels(manifest: Manifest) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """Cache countries + int16 index per row; classifier classes (train countries) + int64 label
    per row (-1 where a row's country never occurs in train)."""
    codes = np.asarray(country_codes(manifest.lat_deg, manifest.lon_deg)).astype("<U8")
    if manifest.country is not None:  # the dataset's own labels (OSV-5M) win where given
        codes = np.where(manifest.country != "", manifest.country, codes)
    countries = sorted(set(codes.tolist()))
    country_index = np.searchsorted(countries, codes).astype(np.int16)
    classes = sorted(set(codes[manifest.split == 0].tolist()))
    lookup = {c: i for i, c in enumerate(classes)}
    labels = np.array([lookup.get(c, -1) for c in codes], dtype=np.int64)
    return countries, country_index, classes, labels


def _prepare_backbone(manifest: Manifest, classes: list[str], labels: np.ndarray, config: ExtractConfig,
                      place: Placement, ckpt_dir: Path, dist: Dist, stop_after_epochs) -> tuple[Backbone, Path, list, dict]:
    """Fine-tune (or reuse a finished fine-tune); return (model, checkpoint path, history,
    {"init_weights", "init_weights_sha256"})."""
    ckpt_path = ckpt_dir / "backbone.pt"
    state_path = ckpt_dir / "finetune_state.pt"
    model = create_backbone(config.backbone, config.weights, num_classes=len(classes), seed=config.seed,
                            image_size=config.image_size, clip_features=config.clip_features)
    model.classes = list(classes)
    if config.finetune_blocks is not None:
        model.freeze_all_but_last(config.finetune_blocks)
    image_size = model.preprocess.image_size
    ft = FinetuneConfig(epochs=config.finetune_epochs, lr=config.lr, batch_size=config.batch_size,
                        workers=config.workers, image_size=image_size, seed=config.seed,
                        max_failed_fraction=config.max_failed_fraction)
    init = {"init_weights": model.weights_source, "init_weights_sha256": model.weights_sha256}
    identity = {"backbone": config.backbone, "init_weights_sha256": model.weights_sha256,
                "manifest_sha256": manifest.sha256, "epochs": config.finetune_epochs,
                "lr": ft.resolved_lr(model.weights_source), "batch_size": config.batch_size,
                "image_size": image_size, "seed": config.seed, "precision": place.precision,
                "classes": list(classes), "world_size": dist.world_size}
    # Keys only the newer backbones have: identities of torchvision fine-tunes stay as they were.
    identity.update({k: v for k, v in (("clip_features", model.clip_features),
                                       ("finetune_blocks", config.finetune_blocks)) if v is not None})
    if dist.is_main and config.overwrite:
        for stale in (ckpt_path, state_path, state_path.with_suffix(".jsonl")):
            stale.unlink(missing_ok=True)
    dist.barrier()
    if ckpt_path.exists():
        try:
            done = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as err:  # torn (a disk that filled before atomic writes) or foreign
            raise ConfigError(f"{ckpt_path}: cannot be read ({type(err).__name__}); delete it to fine-tune "
                              "again, or give another --checkpoint-dir") from None
        # A finished fine-tune may be reused by any number of processes: world_size aside.
        same = {k: v for k, v in done.get("identity", {}).items() if k != "world_size"}
        if same != {k: v for k, v in identity.items() if k != "world_size"}:
            raise ConfigError(f"{ckpt_path} was fine-tuned with other options or data; pass "
                              "--overwrite, or another --checkpoint-dir")
        model = create_backbone(config.backbone, str(ckpt_path), num_classes=len(classes), seed=config.seed)
        return place.to(model).eval(), ckpt_path, list(done.get("history", [])), init
    model = place.to(model)
    history = []
    if config.finetune_epochs > 0:
        history = finetune(model, manifest.paths, labels, manifest.split, ft, place, state_path,
                           dist=dist, identity=identity, stop_after_epochs=stop_after_epochs).history
    if dist.is_main:
        # No wall-clock values inside the hashed checkpoint (its sha256 is the cache's `weights`):
        # identical runs give identical files. The timings go beside it.
        save_backbone(model, ckpt_path, identity=identity,
                      history=[{k: v for k, v in record.items() if k != "elapsed_s"} for record in history])
        atomic_write_text(ckpt_path.with_name("backbone.timings.json"), json.dumps(
            [{"epoch": r.get("epoch"), "elapsed_s": r.get("elapsed_s")} for r in history], indent=2) + "\n")
        # backbone.pt now carries the run; the per-epoch state (weights + Adam moments, 3x the
        # model) is only needed to resume an unfinished fine-tune.
        state_path.unlink(missing_ok=True)
    dist.barrier()
    return model.eval(), ckpt_path, history, init


def extract_rows(model: Backbone, manifest: Manifest, rows: range, country_index: np.ndarray,
                 writer: CacheWriter, place: Placement, *, image_size: int | None = None, batch_size: int,
                 workers: int, max_failed_fraction: float = 1.0, show_progress: bool = True,
                 fail_after_blocks: int | None = None, decode: str = "full") -> None:
    """Append features of manifest ``rows`` (contiguous, in order) to ``writer``, one block per
    batch, resuming at ``writer.rows_done``. Images: the backbone's own evaluation transform (at
    crop side ``image_size``, None: its own). Features: float32 forward_features -> cache dtype.
    Stops with GeoError once more than ``max_failed_fraction`` of >= 64 rows failed to read.
    ``decode="draft"`` decodes JPEGs at the smallest DCT scale whose short side still covers the
    transform's resize (``geo.pipeline.images.draft_request``)."""
    start = rows.start + writer.rows_done
    todo = range(start, rows.stop)
    loader = image_loader([manifest.paths[i] for i in todo], backbone_eval_transform(model, image_size),
                          batch_size=batch_size, workers=workers, pin_memory=place.device.type == "cuda",
                          draft_short_side=backbone_resize_px(model, image_size) if decode == "draft" else None)
    model.eval()
    n_seen = n_failed = blocks = 0
    bar = tqdm(total=len(rows), initial=start - rows.start, desc="extract", unit="img",
               disable=not show_progress, leave=False)
    for index, images, failures in loader:
        if len(index):
            with torch.inference_mode(), autocast(place.device, place.precision):
                feats = model.forward_features(place.inputs(images))
            feats = feats.float().cpu().numpy()
        else:
            feats = np.zeros((0, model.feature_dim), np.float32)
        r = start + index.numpy()
        writer.write_block(features=feats, ids=manifest.ids[r], lat_deg=manifest.lat_deg[r],
                           lon_deg=manifest.lon_deg[r], split=manifest.split[r], country=country_index[r],
                           skipped=[(str(manifest.ids[start + i]), reason) for i, reason in failures],
                           rows_consumed=len(index) + len(failures))
        n_seen += len(index) + len(failures)
        n_failed += len(failures)
        bar.update(len(index) + len(failures))
        blocks += 1
        if n_seen >= 64 and n_failed > max_failed_fraction * n_seen:
            raise GeoError(f"extraction stopped: {n_failed} of the {n_seen} images read so far failed "
                           f"(e.g. {failures[0][1] if failures else ''}); check the manifest's images")
        if fail_after_blocks is not None and blocks >= fail_after_blocks:
            raise RuntimeError(f"simulated kill after {blocks} blocks (test hook)")
    bar.close()


def join_shards(out: Path, shards: list[Path], *, feature_dim: int, countries: list[str],
                provenance: dict, feature_dtype: str) -> Path:
    """Copy shard caches, in order, into one cache at ``out`` (rebuilt from scratch: joining is a
    plain sequential copy, cheap next to extraction). Shard files are removed afterwards."""
    with CacheWriter(out, feature_dim=feature_dim, countries=countries, provenance=provenance,
                     feature_dtype=feature_dtype, overwrite=True) as writer:
        for shard in shards:
            with FeatureCache(shard, validate=False) as src:
                n = src.n_rows
                if n == 0 and not src.skipped:
                    continue
                for lo in range(0, max(n, 1), JOIN_BLOCK_ROWS):
                    rows = np.arange(lo, min(lo + JOIN_BLOCK_ROWS, n), dtype=np.int64)
                    last = lo + JOIN_BLOCK_ROWS >= n
                    skipped = list(src.skipped) if last else []
                    writer.write_block(features=src.load_features(rows), ids=src.ids[rows],
                                       lat_deg=src.lat_deg[rows], lon_deg=src.lon_deg[rows],
                                       split=src.split[rows], country=src.country[rows],
                                       skipped=skipped, rows_consumed=len(rows) + len(skipped))
        path = writer.finalize()
    for shard in shards:
        shard.unlink(missing_ok=True)
    return path


# What the fine-tuning reached, recorded in the provenance so that runs (config.json's cache_provenance) and
# reports can say how much the features know about place: the last epoch's val country accuracy and the rate
# of always answering the train split's most frequent country on val.
FINETUNE_SUMMARY_KEYS = ("finetune_val_country_acc", "finetune_val_majority_acc")


def finetune_summary(history: list[dict]) -> dict:
    """``{"finetune_val_country_acc", "finetune_val_majority_acc"}`` of the last epoch ({} without val)."""
    last = history[-1] if history else {}
    acc, majority = last.get("val_acc"), last.get("val_majority_acc")
    if acc is None or majority is None:
        return {}
    return dict(zip(FINETUNE_SUMMARY_KEYS, (float(acc), float(majority))))


def _same_provenance(path: Path, provenance: dict) -> bool:
    """Whether the complete cache at ``path`` was made from exactly ``provenance`` (backbone sha256, manifest ...).
    The fine-tuning summary follows from the checkpoint; caches made before it was recorded lack it."""
    with FeatureCache(path, validate=False) as cache:
        return all(str(cache.provenance.get(k)) == str(v) for k, v in provenance.items()
                   if k not in FINETUNE_SUMMARY_KEYS)


def _finished_shard(path: Path, provenance: dict, overwrite: bool) -> bool:
    """True for a complete DDP shard of this same job (a run killed while joining resumes at the
    join); only shard names ``<out>.rank{r}`` ever reach here complete."""
    if overwrite or not path.name.split(".")[-1].startswith("rank") or not path.exists():
        return False
    same = _same_provenance(path, provenance)
    if not same:
        path.unlink()  # a stale shard of another job: redo it
    return same


# Options that change nothing in the cache or the checkpoint: a rerun may differ in them and still be the same job.
_NOT_IDENTITY = ("overwrite", "workers")


def _requested(config: ExtractConfig) -> dict:
    """The options as the user gave them (paths resolved): with the manifest's bytes, what makes a job the same job."""
    requested = {k: v for k, v in asdict(config).items() if k not in _NOT_IDENTITY}
    for key in ("checkpoint_dir", "like"):
        if requested[key]:
            requested[key] = str(Path(requested[key]).expanduser().resolve())
    if Path(str(requested["weights"])).expanduser().is_file():
        requested["weights"] = str(Path(requested["weights"]).expanduser().resolve())
    return requested


def _option_differences(stored: dict, requested: dict, out: Path) -> list[str]:
    """``--option A there, B now`` for each option in which ``requested`` differs from the finished job ``stored``.

    A config.json written before the options as given were recorded (``requested``) holds
    resolved options only; they are compared with those as they are, so an option left to a
    default that resolves later (``--image-size``, ``--lr``, ``--precision auto``) does not
    match and the rerun is refused as before: never taken for a job it may not be.
    """
    given = stored.get("requested")
    legacy = given is None
    if legacy:
        given = stored
    diffs = []
    for key, now in requested.items():
        if legacy and key == "checkpoint_dir" and now is None:
            now = str(default_checkpoint_dir(out))  # the default folder, resolved as run_extract does
        there = given.get(key)
        if str(there) != str(now):
            diffs.append(f"--{key.replace('_', '-')} {there!r} there, {now!r} now")
    return diffs


def _finished_job(out: Path, config_path: Path, manifest_path, config: ExtractConfig) -> ExtractResult:
    """The result of the finished job at ``out`` when this call asks for the same job; else a CacheError.

    Same job: the same options (``_requested``; workers and --overwrite aside) and a manifest
    with the same bytes (its sha256 is the cache's ``manifest_sha256``), wherever it now lies. A rerun of a
    finished extract then reports the cache and exits 0, as a rerun of fit-head does; only
    another configuration needs --overwrite.
    """
    try:
        stored = json.loads(config_path.read_text())
        provenance = stored["provenance"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CacheError(f"{out} already exists and its {config_path.name} cannot be read; pass --overwrite to "
                         "replace it, or another --out") from None
    diffs = _option_differences(stored, _requested(config), out)
    manifest = Path(manifest_path)
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: no such file")
    if not diffs and sha256_file(manifest) != provenance.get("manifest_sha256"):
        diffs.append(f"manifest {manifest} is not the one the cache was made from (sha256 differs)")
    if diffs:
        raise CacheError(f"{out} already exists and was made by another job ({'; '.join(diffs)}); pass --overwrite "
                         "to replace it, or another --out")
    if not _same_provenance(out, provenance):
        raise CacheError(f"{out} already exists but does not match its {config_path.name} (provenance differs); "
                         "pass --overwrite to replace it")
    with FeatureCache(out, validate=False) as cache:
        n_rows, n_skipped = cache.n_rows, len(cache.skipped)
    return ExtractResult(out, Path(stored.get("checkpoint", "")), config_path, n_rows, n_skipped,
                         list(stored.get("finetune_history", [])), already_complete=True)


def run_extract(manifest_path: str | os.PathLike, out: str | os.PathLike, config: ExtractConfig, *,
                _fail_after_blocks: int | None = None, _stop_after_epochs: int | None = None) -> ExtractResult:
    """Manifest -> fine-tuned backbone checkpoint -> feature cache at ``out``; see the module doc.

    Writes ``<out>``, ``<out>.config.json`` and ``<checkpoint_dir>/backbone.pt`` (plus the
    per-epoch ``finetune_state.pt``). The ``_`` hooks simulate a kill (tests only).
    """
    out = Path(out).expanduser().resolve()
    requested = _requested(config)
    # A finished job (cache and config.json) rerun with the same options is reported, not redone.
    # A cache without its config.json was killed right after its final rename: checked below
    # against this job's provenance, recognised as finished and its config.json written again.
    if out.exists() and not config.overwrite and out.with_name(out.name + ".config.json").exists():
        return _finished_job(out, out.with_name(out.name + ".config.json"), manifest_path, config)
    if config.decode not in ("draft", "full"):
        raise ConfigError(f"--decode {config.decode!r}: choose draft or full")
    if config.image_size is not None and config.image_size < 16:
        raise ConfigError(f"--image-size {config.image_size}: use at least 16 pixels")
    config = replace(config, workers=default_workers() if config.workers is None else config.workers)
    if config.batch_size < 1 or config.finetune_epochs < 0 or config.workers < 0:
        raise ConfigError("--batch-size must be >= 1, --finetune-epochs and --workers >= 0")
    if config.finetune_blocks is not None and config.finetune_blocks < 1:
        raise ConfigError(f"--finetune-blocks {config.finetune_blocks}: fine-tune at least 1 block (or leave it out)")
    like = None
    if config.like:
        like = like_settings(config.like)  # checkpoint verified before the manifest is read
        config = replace(config, backbone=like.backbone, weights=str(like.checkpoint_path), image_size=like.image_size,
                         finetune_epochs=0, precision=like.precision, decode=like.decode)
    split_name(config.backbone)  # a malformed --backbone fails before the manifest is read
    manifest = read_manifest(manifest_path)  # every problem row is reported before any training
    place = placement(config.device, config.precision)
    dist, device = distributed.init(place.device)
    place = Placement(device, place.precision, place.channels_last)
    try:
        torch.manual_seed(config.seed)
        ckpt_dir = Path(config.checkpoint_dir).expanduser().resolve() if config.checkpoint_dir \
            else default_checkpoint_dir(out)
        countries, country_index, classes, labels = _labels(manifest)
        if like is not None:  # the training cache's backbone as is: no fine-tuning, nothing saved
            ckpt_dir, ckpt_path, history = like.checkpoint_path.parent, like.checkpoint_path, []
            model = place.to(create_backbone(config.backbone, str(ckpt_path), num_classes=max(len(classes), 1),
                                             seed=config.seed)).eval()
            check_like_transform(like, describe_transform(backbone_eval_transform(model, config.image_size)))
            init = {k: like.provenance.get(k, "") for k in ("init_weights", "init_weights_sha256")}
            provenance = like_provenance(like, manifest.sha256)
        else:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            model, ckpt_path, history, init = _prepare_backbone(manifest, classes, labels, config, place,
                                                                ckpt_dir, dist, _stop_after_epochs)
            provenance = {
                "backbone": config.backbone, "weights": sha256_file(ckpt_path),
                "checkpoint_path": str(ckpt_path), **init,
                "finetune_epochs": int(config.finetune_epochs), "image_size": int(model.preprocess.image_size),
                "transform": describe_transform(backbone_eval_transform(model)),
                "manifest_sha256": manifest.sha256, "precision": place.precision, "decode": config.decode,
            }
            if model.clip_features is not None:  # projected and pre-projection features are not comparable
                provenance["clip_features"] = model.clip_features
            if config.finetune_blocks is not None:
                provenance["finetune_blocks"] = int(config.finetune_blocks)
            provenance.update(finetune_summary(history))
        n = len(manifest.ids)
        target = shard_path(out, dist.rank) if dist.enabled else out
        lo, hi = shard_range(n, dist.rank, dist.world_size)
        if out.exists() and not config.overwrite and not dist.enabled:
            if not _same_provenance(out, provenance):
                raise CacheError(f"{out} already exists and was made by another job (backbone, weights or "
                                 "manifest differ); pass --overwrite to replace it")
        elif not _finished_shard(target, provenance, config.overwrite):
            with CacheWriter(target, feature_dim=model.feature_dim, countries=countries,
                             provenance=provenance, feature_dtype=config.feature_dtype,
                             overwrite=config.overwrite) as writer:
                extract_rows(model, manifest, range(lo, hi), country_index, writer, place,
                             batch_size=config.batch_size,
                             workers=config.workers, show_progress=dist.is_main,
                             max_failed_fraction=config.max_failed_fraction if not dist.enabled else 1.0,
                             fail_after_blocks=_fail_after_blocks, decode=config.decode)
                writer.finalize()
        dist.barrier()
        if dist.enabled and dist.is_main:
            join_shards(out, [shard_path(out, r) for r in range(dist.world_size)],
                        feature_dim=model.feature_dim, countries=countries, provenance=provenance,
                        feature_dtype=config.feature_dtype)
        dist.barrier()
        with FeatureCache(out, validate=False) as cache:
            n_rows, n_skipped = cache.n_rows, len(cache.skipped)
        if n_skipped > config.max_failed_fraction * max(n_rows + n_skipped, 1):
            raise GeoError(f"{out}: {n_skipped} of {n_rows + n_skipped} images could not be read "
                           "(listed in /skipped); the cache is not usable for training")
        config_path = out.with_name(out.name + ".config.json")
        if dist.is_main:
            resolved = dict(asdict(config), image_size=int(model.preprocess.image_size),
                            clip_features=model.clip_features, manifest=str(Path(manifest_path).resolve()), out=str(out),
                            checkpoint_dir=str(ckpt_dir), checkpoint=str(ckpt_path), device=str(place.device),
                            precision=place.precision, world_size=dist.world_size, classes=classes,
                            lr=FinetuneConfig(lr=config.lr).resolved_lr(init["init_weights"]),
                            provenance=provenance, n_rows=n_rows, n_skipped=n_skipped, finetune_history=history,
                            requested=requested)
            atomic_write_text(config_path, json.dumps(resolved, indent=2, default=str) + "\n")
        return ExtractResult(out, ckpt_path, config_path, n_rows, n_skipped, history, dist.is_main)
    finally:
        distributed.shutdown()
