"""The run ``geo finetune`` starts from: a finished run with a trainable head, its backbone checkpoint
(sha256 checked against its cache's provenance), and the manifest it will fine-tune on."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from geo.cache.store import FeatureCache
from geo.endtoend.data import count_differing_rows
from geo.errors import ConfigError
from geo.files import check_file_sha256
from geo.heads import head_class
from geo.training import runs


@dataclass
class Parent:
    path: Path
    config: dict
    checkpoint_path: Path  # the backbone checkpoint its cache was extracted with (sha256 verified)


def check_parent(run_dir: str | os.PathLike, backbone_checkpoint: str | None) -> Parent:
    """A finished run with a trainable head whose cache names a backbone checkpoint that is at hand."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / runs.CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {runs.CONFIG_FILE})")
    config = runs.read_config(run_dir)
    for name in (runs.CHECKPOINT_FILE, runs.METRICS_FILE):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir}: no {name}; finish the run first (rerun its fit-head or sweep)")
    cls = head_class(config["head"])
    if not cls.trainable:
        raise ConfigError(f"{run_dir}: head {config['head']!r} has nothing to train (no parameters a loss moves); "
                          "end-to-end fine-tuning needs a trainable head such as mvmf or softmax")
    provenance = config.get("cache_provenance") or {}
    missing = [k for k in ("backbone", "weights", "checkpoint_path", "image_size", "transform") if k not in provenance]
    if missing:
        raise ConfigError(f"{run_dir}: its cache's provenance lacks {', '.join(missing)}; only a run on a cache made "
                          "by `geo extract` names the backbone checkpoint to fine-tune")
    recorded = str(provenance["weights"])
    path = Path(backbone_checkpoint or provenance["checkpoint_path"]).expanduser().resolve()
    where = "--backbone-checkpoint" if backbone_checkpoint else "its cache's provenance"
    check_file_sha256(
        path, recorded,
        missing=f"{run_dir}: backbone checkpoint {path} (from {where}, sha256 {recorded}) is missing; "
                "pass its current location with --backbone-checkpoint PATH",
        changed=lambda actual: f"{run_dir}: its cache was extracted with a backbone checkpoint of sha256 {recorded}, "
                               f"but {path} (from {where}) has sha256 {actual}; pass the right file with "
                               "--backbone-checkpoint PATH")
    return Parent(run_dir, config, path)


def check_manifest_against_cache(manifest, parent: Parent, allow_other: bool) -> int:
    """Number of rows differing from those of the parent's cache; ConfigError unless ``allow_other``."""
    provenance = parent.config["cache_provenance"]
    if manifest.sha256 == provenance.get("manifest_sha256"):
        return 0
    cache_path = Path(parent.config.get("cache_path", ""))
    if not cache_path.is_file():
        if allow_other:
            return -1
        raise ConfigError(f"{manifest.path}: not the manifest run {parent.path}'s cache was built from (sha256 "
                          f"{manifest.sha256}, the cache records {provenance.get('manifest_sha256')}), and that "
                          f"cache ({cache_path}) is not at hand to count the differing rows; pass "
                          "--allow-other-manifest to fine-tune on it anyway")
    with FeatureCache(cache_path, validate=False) as cache:
        differing = count_differing_rows(manifest, cache)
    if differing and not allow_other:
        raise ConfigError(f"{manifest.path}: {differing} rows differ (id, location or split) from the rows of "
                          f"{cache_path} that run {parent.path} was trained on; pass --allow-other-manifest to "
                          "fine-tune on this manifest anyway")
    return differing
