"""``open_clip/<arch>[:<pretrained tag>]``: an OpenCLIP image tower (``model.visual``), text tower dropped.

The feature is ``model.encode_image(x)`` unnormalised: the projected image embedding
by default, or (``--clip-features pre-projection``, ViT towers) the pooled output
before ``visual.proj``. Preprocessing is OpenCLIP's own (``visual.preprocess_cfg``,
merged with the tag's pretrained config: resolution, interpolation, mean/std).
Blocks for ``--finetune-blocks``: ``visual.transformer.resblocks``.
"""

from __future__ import annotations

import os
from pathlib import Path

from geo.errors import ConfigError, WeightsError
from geo.files import sha256_file
from geo.pipeline.backbones import Built, check_clip_features, group_by_regex, hub_file, require
from geo.pipeline.images import Preprocess

HF_FILES = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


def _weights_file(cfg: dict, name: str) -> Path:
    """The file of pretrained config ``cfg``: the hub cache for ``hf_hub`` entries, OpenCLIP's for URLs."""

    if cfg.get("hf_hub"):
        # "org/repo/filename", or "org/repo/" for OpenCLIP's default file names
        repo, filename = os.path.dirname(cfg["hf_hub"]), os.path.basename(cfg["hf_hub"])
        return hub_file(repo, [filename] if filename else HF_FILES, what=f"open_clip/{name}")
    target = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
    if not target.exists():
        open_clip = require("open_clip")
        try:
            return Path(open_clip.pretrained.download_pretrained_from_url(cfg["url"]))
        except Exception as err:
            raise WeightsError(f"--weights pretrained: cannot load {target.name} for open_clip/{name} "
                               f"({type(err).__name__}: {err}); download {cfg['url']} on a machine with "
                               f"internet and put it at {target} (OpenCLIP's cache)") from None
    return target


def build(model: str, weights: str, *, image_size: int | None, clip_features: str | None, meta: dict) -> Built:

    open_clip = require("open_clip")
    arch, _, tag = model.partition(":")
    if arch not in open_clip.list_models():
        raise ConfigError(f"--backbone open_clip/{model}: OpenCLIP has no architecture {arch!r} "
                          f"(python -c \"import open_clip; print(open_clip.list_models())\")")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag and tag not in tags:
        raise ConfigError(f"--backbone open_clip/{model}: no pretrained tag {tag!r} for {arch}; "
                          f"tags: {', '.join(tags) or '(none)'}")
    if weights == "imagenet":
        raise ConfigError("--weights imagenet is for torchvision backbones; OpenCLIP models take --weights pretrained")
    if weights == "pretrained" and not tag:
        raise ConfigError(f"--weights pretrained: name the pretrained tag, --backbone open_clip/{arch}:TAG "
                          f"(tags: {', '.join(tags[:8])})")
    pcfg = open_clip.pretrained.get_pretrained_cfg(arch, tag) if tag else {}
    kwargs = {"force_quick_gelu": bool(pcfg.get("quick_gelu", False))}  # the tag's activation, whatever the weights
    if image_size is not None:
        kwargs["force_image_size"] = int(image_size)
    source, sha, pretrained = weights, "", None
    if weights == "pretrained":
        path = _weights_file(pcfg, model)
        sha, pretrained = sha256_file(path), str(path)
    elif weights != "none":
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            raise WeightsError(f"--weights {weights}: no such file")
        source, sha, pretrained = str(path), sha256_file(path), str(path)
    try:
        net = open_clip.create_model(arch, pretrained=pretrained, **kwargs)
    except (RuntimeError, KeyError, ValueError) as err:
        raise WeightsError(f"--weights {weights} does not fit open_clip/{model}: {err}") from None
    visual = net.visual
    del net  # the text tower is not needed
    pp = open_clip.transform.merge_preprocess_dict(visual.preprocess_cfg, {k: v for k, v in pcfg.items()
                                                                          if k != "size"})
    size = pp["size"][0] if isinstance(pp["size"], (tuple, list)) else pp["size"]
    crop = {"shortest": "center", "squash": "squash"}.get(pp["resize_mode"])
    if crop is None:
        raise ConfigError(f"--backbone open_clip/{model}: resize mode {pp['resize_mode']!r} is not reproduced by geo")
    preprocess = Preprocess(int(size), int(size), pp["interpolation"], tuple(pp["mean"]), tuple(pp["std"]), crop)
    is_vit = hasattr(visual, "transformer") and getattr(visual, "proj", None) is not None
    clip_features = check_clip_features(f"open_clip/{model}", True, clip_features)
    if clip_features == "pre-projection":
        if not is_vit:
            raise ConfigError(f"--clip-features pre-projection: the {type(visual).__name__} tower of "
                              f"open_clip/{model} has no separate projection; use projected")
        dim = int(visual.proj.shape[0])
        visual.proj = None  # forward returns the pooled embedding before the projection
    else:
        dim = int(visual.output_dim)
    names = [n for n, _ in visual.named_parameters()]
    groups = group_by_regex(names, r"^(class_embedding|positional_embedding|conv1|ln_pre)",
                            [r"^transformer\.resblocks\.(\d+)\."]) if is_vit else []
    native = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    native = native[0] if isinstance(native, (tuple, list)) else native
    return Built(visual, dim, preprocess, source, sha, groups, True, clip_features,
                 {"image_size": preprocess.image_size}, int(native))
