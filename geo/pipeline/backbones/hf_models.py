"""``hf/<model id or folder>``: an image tower in Hugging Face transformers format.

CLIP checkpoints (``CLIPModel``, e.g. ``hf/geolocal/StreetCLIP``, or
``CLIPVisionModelWithProjection``): the projected image embedding
(``get_image_features``) by default, the pooled output (post-layernorm CLS) with
``--clip-features pre-projection``. SigLIP: the vision tower's pooled output. Any other
model: its ``pooler_output``. Preprocessing is the model's image processor
configuration (``preprocessor_config.json``: resize, crop, resample, mean/std).
Blocks for ``--finetune-blocks``: the encoder layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from geo.errors import ConfigError, WeightsError
from geo.files import sha256_file
from geo.pipeline.backbones import Built, check_clip_features, group_by_regex, hub_cache_dir, hub_file, \
    hub_offline, require
from geo.pipeline.images import Preprocess

WEIGHT_FILES = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as image processors store them


class PooledTower(nn.Module):
    """images [B, 3, H, W] -> pooled image embedding [B, d] of a transformers vision model.

    ``projection``: CLIP's ``visual_projection`` (None: the pooled output itself);
    ``interpolate``: resample position embeddings to an image size other than the config's.
    """

    def __init__(self, vision_model: nn.Module, projection: nn.Module | None, interpolate: bool):
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = projection
        self.interpolate = interpolate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        pooled = self.vision_model(pixel_values=x, **kwargs).pooler_output
        return pooled if self.visual_projection is None else self.visual_projection(pooled)


def _hub_error(repo: str, what: str, err: Exception):

    cache = hub_cache_dir()
    return WeightsError(
        f"--backbone hf/{repo}: cannot load its {what} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        f"On a machine with internet run `huggingface-cli download {repo}` and copy its cache folder to "
        f"{cache / ('models--' + repo.replace('/', '--'))} (the hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, "
        f"now {cache}), or pass hf/PATH to a folder holding config.json, preprocessor_config.json and "
        f"model.safetensors.")


def _preprocess(transformers, repo: str) -> Preprocess:
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(repo, cache_dir=str(hub_cache_dir()),
                                                               local_files_only=hub_offline())
    except Exception as err:  # offline, not cached, or no preprocessor_config.json
        raise _hub_error(repo, "image processor configuration preprocessor_config.json", err) from None
    size = proc.size
    size = size if isinstance(size, dict) else {k: getattr(size, k, None) for k in ("shortest_edge", "height", "width")}
    crop = getattr(proc, "crop_size", None)
    crop = crop if isinstance(crop, dict) or crop is None else {"height": crop.height, "width": crop.width}
    resample = RESAMPLE.get(int(getattr(proc, "resample", 3)), "bicubic")
    mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    if size.get("shortest_edge") and getattr(proc, "do_center_crop", False) and crop and crop["height"] == crop["width"]:
        return Preprocess(int(crop["height"]), int(size["shortest_edge"]), resample, mean, std, "center")
    if size.get("height") and size.get("height") == size.get("width") and not getattr(proc, "do_center_crop", False):
        return Preprocess(int(size["height"]), int(size["height"]), resample, mean, std, "squash")
    raise ConfigError(f"--backbone hf/{repo}: its image processor ({type(proc).__name__}, size {size}, crop {crop}) "
                      "is not a square resize/centre-crop that geo reproduces; pass --image-size N")


def build(model: str, weights: str, *, image_size: int | None, clip_features: str | None, meta: dict) -> Built:

    transformers = require("transformers")
    local = Path(model).expanduser()
    repo = str(local.resolve()) if local.is_dir() else model
    if weights == "imagenet":
        raise ConfigError("--weights imagenet is for torchvision backbones; hf models take --weights pretrained")
    if meta.get("hf_config"):  # rebuilt from a geo checkpoint: no hub needed
        config = transformers.CONFIG_MAPPING[meta["hf_config"]["model_type"]].from_dict(meta["hf_config"])
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(repo, cache_dir=str(hub_cache_dir()),
                                                             local_files_only=hub_offline())
        except Exception as err:
            raise _hub_error(repo, "configuration config.json", err) from None
    kind = config.model_type
    is_clip = kind == "clip" or (kind == "clip_vision_model" and "CLIPVisionModel" not in (config.architectures or []))
    clip_features = check_clip_features(f"hf/{model}", is_clip, clip_features)
    if kind == "clip":
        cls = transformers.CLIPModel
    elif kind == "clip_vision_model":
        cls = transformers.CLIPVisionModelWithProjection if is_clip else transformers.CLIPVisionModel
    else:
        cls = transformers.AutoModel
    source, sha = weights, ""
    try:
        if weights == "pretrained":
            weights_file = next((local / f for f in WEIGHT_FILES if (local / f).is_file()), None) if local.is_dir() \
                else hub_file(repo, WEIGHT_FILES[:1] + WEIGHT_FILES[2:], what=f"hf/{model}")
            if weights_file is None:
                raise WeightsError(f"--weights pretrained: folder {repo} holds none of {', '.join(WEIGHT_FILES)}")
            sha = sha256_file(weights_file)
            net = cls.from_pretrained(repo, config=config, cache_dir=str(hub_cache_dir()), local_files_only=hub_offline())
        else:
            net = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
            if weights != "none":
                path = Path(weights).expanduser().resolve()
                if not path.is_file():
                    raise WeightsError(f"--weights {weights}: no such file")
                if path.suffix == ".safetensors":
                    from safetensors.torch import load_file
                    state = load_file(str(path))
                else:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                net.load_state_dict(state)
                source, sha = str(path), sha256_file(path)
    except (RuntimeError, KeyError, ValueError) as err:
        raise WeightsError(f"--weights {weights} does not fit hf/{model}: {err}") from None
    vision = getattr(net, "vision_model", net)
    projection = getattr(net, "visual_projection", None) if clip_features == "projected" else None
    native_size = int(getattr(getattr(config, "vision_config", config), "image_size", 0) or 0)
    preprocess = Preprocess.from_dict(meta["preprocess"]) if meta.get("preprocess") else _preprocess(transformers, repo)
    own_size = preprocess.image_size
    if image_size is not None:
        preprocess = preprocess.at_size(image_size)
    trunk = PooledTower(vision, projection, interpolate=bool(native_size) and preprocess.image_size != native_size)
    vcfg = getattr(config, "vision_config", config)
    dim = int(projection.out_features) if projection is not None else int(vcfg.hidden_size)
    names = [n for n, _ in trunk.named_parameters()]
    groups = group_by_regex(names, r"^vision_model\.(embeddings|pre_layrnorm)",
                            [r"^vision_model\.encoder\.layers?\.(\d+)\."])
    return Built(trunk, dim, preprocess, source, sha, groups, is_clip, clip_features,
                 {"image_size": preprocess.image_size, "hf_config": config.to_dict(),
                  "preprocess": preprocess.to_dict()}, own_size)
