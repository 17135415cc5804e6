"""Backbone families beyond torchvision: ``timm/<model>``, ``open_clip/<arch>[:<tag>]``, ``hf/<model id>``.

Each family module has one ``build(model, weights, *, image_size, clip_features, meta)``
returning a ``Built``: a trunk mapping images [B, 3, H, W] to the pooled image
embedding [B, d], the family's own preprocessing, where the weights came from, and
the parameter groups "stem, block 1 .. block K" that ``--finetune-blocks`` counts.
The libraries (timm, open_clip_torch, transformers: the ``backbones`` extra) are
imported only here, when such a backbone is named.

Pretrained weights come through each library's own cache (the Hugging Face hub
cache for timm, OpenCLIP and transformers); offline and not cached, the error names
the model id, the file expected and the folder to put it in.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from geo.errors import ConfigError, WeightsError
from geo.pipeline.images import Preprocess

FAMILIES = {"timm": "timm", "open_clip": "open_clip", "hf": "transformers"}
CLIP_FEATURES = ("projected", "pre-projection")
PACKAGE_OF = {"timm": "timm", "open_clip": "open_clip_torch", "transformers": "transformers",
              "huggingface_hub": "huggingface_hub"}


@dataclass
class Built:
    """What a family gives ``create_backbone``.

    trunk: images [B, 3, H, W] -> pooled embedding [B, feature_dim].
    preprocess: the model's own preprocessing at the image size used.
    block_groups: trunk parameter names, [stem, block 1, ..., block K] (input to output);
        parameters in no group (final norm, pooling, projection) always train.
    is_clip: the embedding has a projected / pre-projection choice.
    meta: what rebuilding the trunk from a geo checkpoint needs besides the name (JSON-able).
    native_image_size: the model's own input size (an ``--image-size`` other than it is warned about).
    """

    trunk: nn.Module
    feature_dim: int
    preprocess: Preprocess
    weights_source: str
    weights_sha256: str
    block_groups: list[list[str]] = field(default_factory=list)
    is_clip: bool = False
    clip_features: str | None = None
    meta: dict = field(default_factory=dict)
    native_image_size: int | None = None


def split_name(name: str) -> tuple[str, str]:
    """``"timm/vit_base_patch16_224"`` -> ("timm", "vit_base_patch16_224"); torchvision names -> ("torchvision", name)."""
    family, sep, model = name.partition("/")
    if sep and family in FAMILIES:
        if not model:
            raise ConfigError(f"--backbone {name!r}: name a model after '{family}/'")
        return family, model
    return "torchvision", name


def require(library: str):
    """Import ``library`` of the ``backbones`` extra, or say how to install it."""
    try:
        return importlib.import_module(library)
    except ImportError as err:
        raise ConfigError(f"this --backbone needs the Python package {PACKAGE_OF[library]} ({err}); "
                          f"install it with: pip install 'geo-mvmf[backbones]'") from None


def family_module(family: str):
    return importlib.import_module(f"geo.pipeline.backbones.{family}_models")


def check_clip_features(name: str, is_clip: bool, clip_features: str | None) -> str | None:
    """The CLIP feature choice for model ``name``: "projected" by default for CLIP models, None for others."""
    if clip_features is not None and clip_features not in CLIP_FEATURES:
        raise ConfigError(f"--clip-features {clip_features!r}: choose one of {', '.join(CLIP_FEATURES)}")
    if not is_clip:
        if clip_features is not None:
            raise ConfigError(f"--clip-features {clip_features}: --backbone {name} is not a CLIP image tower "
                              "(its feature is its pooled embedding); leave --clip-features out")
        return None
    return clip_features or "projected"


# ---- the Hugging Face hub cache (timm, OpenCLIP and transformers download through it) ----------


def hub_cache_dir() -> Path:
    """The hub cache folder as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_file(repo_id: str, filenames: list[str], *, what: str) -> Path:
    """The first of ``filenames`` in hub repo ``repo_id``, from the hub cache (downloaded there if online).

    Raises WeightsError naming the repo, the files and the cache folder when none can be had.
    """

    require_hub = require("huggingface_hub")
    cache = hub_cache_dir()
    errors = []
    for filename in filenames:
        try:
            return Path(require_hub.hf_hub_download(repo_id, filename, cache_dir=str(cache),
                                                    local_files_only=hub_offline()))
        except Exception as err:  # offline, not cached, no such file in the repo ...
            errors.append(f"{filename}: {type(err).__name__}")
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    raise WeightsError(
        f"--weights pretrained: cannot load the weights of {what} (hub repo {repo_id}, file "
        f"{' or '.join(filenames)}; {'; '.join(errors)}). On a machine with internet run "
        f"`huggingface-cli download {repo_id} {filenames[0]}` and copy its cache folder to {folder} "
        f"(the hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, now {cache}), or pass --weights PATH to the "
        f"file, or --weights none to start from random initialisation.")


def group_by_regex(names: list[str], stem: str | None, blocks: list[str]) -> list[list[str]]:
    """[stem names, block 1 names, ..., block K names] of parameter ``names``.

    stem: regex of the parameters before the first block; blocks: regexes whose groups
    (numbers) order the blocks. Names matching neither are left out (they always train).
    """
    stem_re = re.compile(stem) if stem else None
    block_res = [re.compile(b) for b in blocks]
    stem_names, by_block = [], {}
    for name in names:
        if stem_re is not None and stem_re.match(name):
            stem_names.append(name)
            continue
        for r in block_res:
            m = r.match(name)
            if m:
                by_block.setdefault(tuple(int(g) for g in m.groups() if g is not None), []).append(name)
                break
    if not by_block:
        return []
    return [stem_names] + [by_block[k] for k in sorted(by_block)]
