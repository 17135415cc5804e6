"""``timm/<model>``: any timm model (``arch`` or ``arch.tag``), its pooled pre-logits embedding.

The feature is ``model.forward_head(model.forward_features(x), pre_logits=True)`` as
timm builds it with ``num_classes=0``; for CLIP image towers (a ``*clip*`` model whose
pretrained head is the image projection, e.g. ``vit_large_patch14_clip_224.openai``)
the projected embedding by default (the head kept), or the pre-projection one.
Preprocessing is timm's own ``resolve_data_config`` (resolution, crop_pct, crop mode,
interpolation, mean/std). Blocks for ``--finetune-blocks`` are timm's coarse groups
(``group_matcher(coarse=True)``): transformer blocks for ViTs, stages for CNNs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from geo.errors import ConfigError, WeightsError
from geo.files import sha256_file
from geo.pipeline.backbones import Built, check_clip_features, group_by_regex, hub_file, require
from geo.pipeline.images import Preprocess


def _pretrained_cfg(timm, model: str):
    try:
        cfg = timm.models.get_pretrained_cfg(model)
    except RuntimeError:
        cfg = None
    if cfg is None:
        arch = model.split(".")[0]
        tags = timm.list_pretrained(f"{arch}.*")[:8]
        raise ConfigError(f"--backbone timm/{model}: timm knows no pretrained tag {model!r}; "
                          f"tags of {arch}: {', '.join(tags) or '(none)'}")
    return cfg


def _native_preprocess(timm, model_obj, name: str) -> Preprocess:
    cfg = timm.data.resolve_data_config({}, model=model_obj)
    _, height, width = cfg["input_size"]
    mode = cfg.get("crop_mode") or "center"
    if height != width or mode not in ("center", "squash"):
        raise ConfigError(f"--backbone timm/{name}: its preprocessing (input {height}x{width}, crop_mode {mode!r}) "
                          "is not a square centre/squash crop; pass --image-size N to use a square centre crop")
    return Preprocess(int(height), int(math.floor(height / cfg["crop_pct"])), cfg["interpolation"],
                      tuple(cfg["mean"]), tuple(cfg["std"]), mode)


def _weights_file(cfg, name: str) -> Path:
    """The pretrained weights file of ``cfg`` from the hub cache (or torch.hub's, for URL-only weights)."""

    if cfg.hf_hub_id:
        return hub_file(cfg.hf_hub_id, ["model.safetensors", "pytorch_model.bin"], what=f"timm/{name}")
    if cfg.url:
        target = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if not target.exists():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(cfg.url, str(target), progress=False)
            except Exception as err:
                raise WeightsError(f"--weights pretrained: cannot load {target.name} for timm/{name} "
                                   f"({type(err).__name__}: {err}); download {cfg.url} on a machine with internet "
                                   f"and put it at {target} (torch.hub's cache, $TORCH_HOME/hub/checkpoints)") from None
        return target
    raise WeightsError(f"--weights pretrained: timm has no pretrained weights for {name}; pass --weights none or PATH")


def build(model: str, weights: str, *, image_size: int | None, clip_features: str | None, meta: dict) -> Built:

    timm = require("timm")
    if not timm.is_model(model):
        raise ConfigError(f"--backbone timm/{model}: timm has no model {model.split('.')[0]!r} "
                          f"(list them with python -c \"import timm; print(timm.list_models('*vit*'))\")")
    cfg = _pretrained_cfg(timm, model)
    tag = model.partition(".")[2] or (cfg.tag or "")
    is_clip = "clip" in model.split(".")[0] and "_ft_" not in tag and (cfg.num_classes or 0) > 0
    clip_features = check_clip_features(f"timm/{model}", is_clip, clip_features)
    kwargs = {} if clip_features == "projected" else {"num_classes": 0}
    native_size = int(cfg.input_size[-1])
    if image_size is not None and image_size != native_size and cfg.fixed_input_size:
        kwargs["img_size"] = int(image_size)  # position embeddings are resampled to the new grid
    source, sha = weights, ""
    if weights == "imagenet":
        raise ConfigError("--weights imagenet is for torchvision backbones; timm models take --weights pretrained")
    try:
        if weights == "none":
            net = timm.create_model(model, pretrained=False, **kwargs)
        else:
            path = _weights_file(cfg, model) if weights == "pretrained" else Path(weights).expanduser().resolve()
            if not path.is_file():
                raise WeightsError(f"--weights {weights}: no such file")
            source, sha = (weights if weights == "pretrained" else str(path)), sha256_file(path)
            net = timm.create_model(model, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    except (RuntimeError, KeyError, ValueError) as err:
        raise WeightsError(f"--weights {weights} does not fit timm/{model}: {err}") from None
    native = _native_preprocess(timm, net, model)  # at img_size already where the model was built at it
    preprocess = native if image_size is None else native.at_size(image_size)
    head = net.get_classifier()
    head_params = {id(p) for p in head.parameters()} if isinstance(head, torch.nn.Module) else set()
    names = [n for n, p in net.named_parameters() if id(p) not in head_params]
    groups = []
    matcher = net.group_matcher(coarse=True) if hasattr(net, "group_matcher") else None
    if isinstance(matcher, dict):
        specs = matcher.get("blocks") or []
        specs = [specs] if isinstance(specs, str) else [s[0] for s in specs if s[1] is None or s[1][0] != 99999]
        groups = group_by_regex(names, matcher.get("stem"), specs)
    # Pre-logits width, or the CLIP projection's output width.
    dim = int(net.num_classes if clip_features == "projected" else net.num_features)
    return Built(net, dim, preprocess, source, sha, groups, is_clip, clip_features,
                 {"image_size": preprocess.image_size}, native_size)
