"""`geo extract TEST --like TRAIN_CACHE` (or a run directory): a second set of images through the same backbone.

The field's protocol trains once and evaluates the same backbone and heads on
several test sets. A test set's cache must therefore hold features made exactly
as the training cache's were: the same fine-tuned checkpoint (verified by its
sha256, never re-saved, so its hash stays the one the training cache records),
transform, image size, precision and JPEG decoding, and no fine-tuning. ``like_settings`` reads
those from the training cache's provenance and checks the checkpoint;
``like_provenance`` gives the new cache's provenance: the training cache's,
with only the manifest keys changed (``geo.training.runs.MANIFEST_PROVENANCE_KEYS``,
which evaluation ignores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from geo.errors import ConfigError
from geo.files import check_file_sha256

# Provenance keys every cache made by `geo extract` records and `--like` needs.
REQUIRED_KEYS = ("backbone", "weights", "checkpoint_path", "image_size", "transform", "precision")


@dataclass(frozen=True)
class LikeSettings:
    """What a ``--like`` extraction copies from the training cache."""

    cache_path: Path
    provenance: dict  # the training cache's provenance, as recorded
    checkpoint_path: Path  # the fine-tuned backbone checkpoint (sha256 verified)
    backbone: str
    image_size: int
    precision: str
    decode: str  # "draft" or "full" (a cache that records none was decoded in full)


def like_settings(cache_path: str | Path) -> LikeSettings:
    """Read TRAIN_CACHE's provenance and verify its backbone checkpoint.

    Raises:
        ConfigError: the cache records no checkpoint (not made by `geo extract`), the
            checkpoint is missing, its sha256 differs from the recorded one (both paths
            and hashes named). The transform is checked once the backbone is built
            (``check_like_transform``).
    """
    from geo.cache.store import FeatureCache  # lazy: h5py only when extracting

    cache_path = Path(cache_path).expanduser().resolve()
    if cache_path.is_dir():  # a run directory (e.g. `geo finetune`'s): the cache its config.json names
        cache_path = run_cache(cache_path)
    if not cache_path.is_file():
        raise ConfigError(f"--like {cache_path}: no such cache")
    with FeatureCache(cache_path, validate=False) as cache:
        provenance = dict(cache.provenance)
    missing = [key for key in REQUIRED_KEYS if key not in provenance]
    if missing:
        raise ConfigError(f"--like {cache_path}: its provenance lacks {', '.join(missing)} (found "
                          f"{', '.join(sorted(provenance)) or 'none'}); only a cache made by `geo extract` "
                          "names the backbone checkpoint its features came from")
    checkpoint = Path(str(provenance["checkpoint_path"]))
    recorded = str(provenance["weights"])
    check_file_sha256(
        checkpoint, recorded,
        missing=f"--like {cache_path}: its backbone checkpoint {checkpoint} (sha256 {recorded}) is missing; "
                "restore it there to extract more images with the same backbone",
        changed=lambda actual: f"--like {cache_path}: records backbone checkpoint {checkpoint} with sha256 "
                               f"{recorded}, but {checkpoint} now has sha256 {actual}; it was replaced after the "
                               "cache was made, so its features would not match the training cache's")
    image_size = int(provenance["image_size"])
    return LikeSettings(cache_path, provenance, checkpoint, str(provenance["backbone"]), image_size,
                        str(provenance["precision"]), str(provenance.get("decode", "full")))


def run_cache(run_dir: Path) -> Path:
    """The cache a run directory was trained on (its config.json's ``cache_path``; read as plain JSON,
    stage one knows no run format). A `geo finetune` run's is its own, made by the fine-tuned backbone."""
    import json

    config_path = run_dir / "config.json"
    try:
        cache = json.loads(config_path.read_text()).get("cache_path")
    except (OSError, ValueError) as err:
        raise ConfigError(f"--like {run_dir}: a folder, but not a run directory ({config_path}: {err})") from None
    if not cache:
        raise ConfigError(f"--like {run_dir}: its {config_path.name} names no cache (an unfinished `geo finetune`?)")
    return Path(cache).expanduser().resolve()


def like_provenance(settings: LikeSettings, manifest_sha256: str) -> dict:
    """The new cache's provenance: the training cache's, with the manifest keys replaced."""
    return {**settings.provenance, "manifest_sha256": manifest_sha256, "like_cache": str(settings.cache_path),
            "like_manifest_sha256": str(settings.provenance.get("manifest_sha256", ""))}


def check_like_transform(settings: LikeSettings, ours: str) -> None:
    """Refuse when the backbone's evaluation transform (described as ``ours``) is not the recorded one."""
    if str(settings.provenance["transform"]) != ours:
        raise ConfigError(f"--like {settings.cache_path}: its transform {settings.provenance['transform']!r} is not "
                          f"the one its backbone applies in this geo at {settings.image_size} px ({ours!r})")
