"""The image backbone: a torchvision, timm, OpenCLIP or Hugging Face image model, its weights,
its preprocessing, device and precision.

``create_backbone`` builds the model by name and puts a fresh country classifier on top
of its pooled feature:

- a torchvision classification model (``wide_resnet50_2``): its final ``nn.Linear`` is
  stripped, so the trunk returns the pooled feature (2048-d for ``wide_resnet50_2``);
- ``timm/<model>``, ``open_clip/<arch>[:<tag>]``, ``hf/<model id or folder>``: the
  model's pooled image embedding, projected by default for CLIP towers
  (``clip_features``); see ``geo/pipeline/backbones/``.

Weights come from ``"none"`` (random init from a seed), ``"imagenet"`` / ``"pretrained"``
(the library's own weights and cache: torchvision's ``$TORCH_HOME/hub/checkpoints``, the
Hugging Face hub cache for the others; offline and not cached, a ``WeightsError`` names
the file and the folder to put it in), or a file path (the library's state_dict, or a
geo backbone checkpoint written by ``save_backbone``). Every backbone records where its
weights came from and their sha256, which the feature cache keeps as provenance, and
its own preprocessing (``Backbone.preprocess``), which extraction, fine-tuning and
``geo predict`` use.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from geo.devices import resolve_device, resolve_precision
from geo.errors import ConfigError, WeightsError
from geo.files import atomic_torch_save, sha256_file
from geo.pipeline.images import TORCHVISION_PREPROCESS, Preprocess

CHECKPOINT_FORMAT = "geo-backbone/1"




class Backbone(nn.Module):
    """An image trunk returning its pooled feature, plus a country classifier.

    ``forward_features(x [B,3,H,W]) -> [B, feature_dim]`` is the pooled feature (for
    torchvision models the input of the original classifier; for CLIP towers the image
    embedding, projected unless ``clip_features == "pre-projection"``);
    ``forward(x) -> logits [B, num_classes]``.
    Attributes: ``name``, ``feature_dim``, ``num_classes``, ``weights_source``
    ("none" | "imagenet" | "pretrained" | a path), ``weights_sha256`` (of the weights file
    used, or ``random-init-seed-S``), ``classes`` (country codes of the classifier outputs,
    if known), ``preprocess`` (the model's own preprocessing at the image size used),
    ``clip_features`` (None for non-CLIP models), ``block_groups`` (trunk parameter names:
    stem, block 1 .. block K; see ``freeze_all_but_last``), ``build_meta`` (what rebuilding
    the trunk from a checkpoint needs).
    """

    def __init__(self, name: str, trunk: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.name = name
        self.trunk = trunk
        self.feature_dim = int(feature_dim)
        self.classifier = nn.Linear(self.feature_dim, max(int(num_classes), 1))
        self.weights_source = "none"
        self.weights_sha256 = ""
        self.classes: list[str] = []
        self.preprocess: Preprocess = TORCHVISION_PREPROCESS
        self.clip_features: str | None = None
        self.block_groups: list[list[str]] = []
        self.build_meta: dict = {}
        self._frozen_modules: list[str] = []

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    @property
    def n_blocks(self) -> int:
        """Blocks ``freeze_all_but_last`` counts (0: the model has no known block structure)."""
        return max(len(self.block_groups) - 1, 0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.trunk(x)
        # Inception-style models return a namedtuple in train mode; the first entry is the output.
        if not torch.is_tensor(feats):
            feats = feats[0]
        return feats.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))

    def freeze_all_but_last(self, n_blocks: int) -> None:
        """Train only the last ``n_blocks`` blocks, what follows them (final norm, pooling,
        projection) and the classifier: the stem and earlier blocks get ``requires_grad=False``
        and stay in eval mode in ``train()`` (their BatchNorm statistics and dropout do not change)."""
        if self.n_blocks == 0:
            raise ConfigError(f"--finetune-blocks: backbone {self.name} has no block structure geo knows; "
                              "leave --finetune-blocks out to fine-tune all of it")
        if not 1 <= n_blocks <= self.n_blocks:
            raise ConfigError(f"--finetune-blocks {n_blocks}: backbone {self.name} has {self.n_blocks} blocks; "
                              f"choose 1 to {self.n_blocks}")
        frozen = {name for group in self.block_groups[: len(self.block_groups) - n_blocks] for name in group}
        for name, param in self.trunk.named_parameters():
            param.requires_grad_(name not in frozen)
        # The outermost modules whose parameters are all frozen.
        self._frozen_modules = []
        for name, module in self.trunk.named_modules():
            params = [n for n, _ in module.named_parameters(prefix=name)]
            if params and all(n in frozen for n in params) and \
                    not any(name.startswith(f + ".") for f in self._frozen_modules):
                self._frozen_modules.append(name)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for name in self._frozen_modules:
            self.trunk.get_submodule(name).eval()
        return self


def _strip_classifier(model: nn.Module, name: str) -> int:
    """Replace the last ``nn.Linear`` of ``model`` by Identity; return its in_features."""
    last = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = module_name
    if last is None:
        raise ConfigError(f"backbone {name!r} has no final nn.Linear classifier to replace; "
                          "choose a torchvision classification model such as wide_resnet50_2")
    parent_name, _, attr = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    if attr.isdigit():
        parent[int(attr)] = nn.Identity()
    else:
        setattr(parent, attr, nn.Identity())
    return int(linear.in_features)


def _imagenet_state_dict(name: str) -> tuple[dict, str]:
    """torchvision's default ImageNet weights for ``name`` and the sha256 of the file."""
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError) as err:
        raise WeightsError(f"torchvision has no pretrained weights for backbone {name!r}: {err}")
    filename = os.path.basename(weights.url)
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        state = weights.get_state_dict(progress=False, check_hash=False)
    except Exception as err:  # offline: URLError, socket errors, partial downloads ...
        raise WeightsError(
            f"--weights imagenet: cannot load {filename} for {name} ({type(err).__name__}: {err}). "
            f"Download {weights.url} on a machine with internet and put it at {target} "
            f"(the cache under $TORCH_HOME/hub/checkpoints/), or pass --weights PATH to a "
            f"state_dict file, or --weights none to train from random initialisation."
        ) from None
    return state, sha256_file(target)


def _load_file(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"--weights {path}: no such file (expected 'none', 'imagenet' or a "
                           "torchvision state_dict / geo backbone checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"--weights {path}: cannot read it as a torch state_dict: {err}") from None


def create_backbone(name: str = "wide_resnet50_2", weights: str = "none", num_classes: int = 1,
                    *, seed: int = 0, image_size: int | None = None, clip_features: str | None = None) -> Backbone:
    """Build backbone ``name`` with ``weights`` and a ``num_classes``-way country classifier.

    name: a torchvision classification model, ``timm/<model>``, ``open_clip/<arch>[:<tag>]``
    or ``hf/<model id or folder>``. weights: "none" (random init from ``seed``), "imagenet"
    (torchvision) / "pretrained" (any family), or a path to the library's state_dict or a geo
    backbone checkpoint (``CHECKPOINT_FORMAT``); from a geo checkpoint the classifier is
    restored too when its size equals ``num_classes``, and the image size, CLIP feature choice
    and preprocessing are the checkpoint's. image_size: crop side in pixels (None: the model's
    own; another size than its own is warned about for timm/OpenCLIP/hf models).
    clip_features: "projected" (the default for CLIP towers) or "pre-projection".
    Raises ConfigError for an unknown model name or option, WeightsError for weights problems.
    """
    from geo.pipeline.backbones import Built, family_module, split_name

    family, model_name = split_name(name)
    geo_ckpt = None
    if weights not in ("none", "imagenet", "pretrained"):
        path = Path(weights).expanduser().resolve()
        state = _load_file(path) if family == "torchvision" or path.suffix in (".pt", ".pth") else None
        if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
            geo_ckpt = state
            if geo_ckpt["backbone"] != name:
                raise WeightsError(f"--weights {path} is a {geo_ckpt['backbone']} checkpoint, "
                                   f"not {name}; pass --backbone {geo_ckpt['backbone']}")
            build = dict(geo_ckpt.get("build") or {})
            for option, value, saved in (("--image-size", image_size, build.get("image_size")),
                                         ("--clip-features", clip_features, geo_ckpt.get("clip_features"))):
                if value is not None and saved is not None and value != saved:
                    raise WeightsError(f"{option} {value}: the checkpoint {path} was made with {saved}")
            image_size = build.get("image_size", image_size)
            clip_features = geo_ckpt.get("clip_features", clip_features)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # "none" must be reproducible from the seed alone
        if family == "torchvision":
            built = _torchvision(name, "none" if geo_ckpt else weights, image_size, clip_features)
        else:
            built: Built = family_module(family).build(
                model_name, "none" if geo_ckpt else weights, image_size=image_size, clip_features=clip_features,
                meta=dict(geo_ckpt.get("build") or {}) if geo_ckpt else {})
        backbone = Backbone(name, built.trunk, built.feature_dim, num_classes)
    backbone.preprocess, backbone.clip_features = built.preprocess, built.clip_features
    backbone.block_groups, backbone.build_meta = built.block_groups, dict(built.meta)
    backbone.weights_source, backbone.weights_sha256 = built.weights_source, built.weights_sha256 or f"random-init-seed-{seed}"
    if geo_ckpt is not None:
        state = geo_ckpt["model"]
        trunk = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
        backbone.trunk.load_state_dict(trunk)
        if state["classifier.weight"].shape[0] == backbone.num_classes:
            backbone.classifier.load_state_dict({"weight": state["classifier.weight"],
                                                 "bias": state["classifier.bias"]})
            backbone.classes = list(geo_ckpt.get("classes", []))
        if geo_ckpt.get("preprocess"):
            backbone.preprocess = Preprocess.from_dict(geo_ckpt["preprocess"])
        backbone.weights_source, backbone.weights_sha256 = str(Path(weights).expanduser().resolve()), \
            sha256_file(Path(weights).expanduser().resolve())
    elif family != "torchvision" and image_size is not None and built.native_image_size not in (None, image_size):
        warnings.warn(f"--image-size {image_size} overrides the {built.native_image_size} px preprocessing of "
                      f"{name}: {describe_preprocess(backbone.preprocess)}", UserWarning, stacklevel=2)
    return backbone


def describe_preprocess(pre: Preprocess) -> str:
    return (f"resize {pre.resize_size} ({pre.crop}, {pre.interpolation}) -> crop {pre.image_size}, "
            f"mean {pre.mean}, std {pre.std}")


def backbone_preprocess(backbone: Backbone, image_size: int | None = None) -> Preprocess:
    """``backbone``'s own preprocessing at crop side ``image_size`` (None: its own)."""
    return backbone.preprocess if image_size is None else backbone.preprocess.at_size(int(image_size))


def backbone_eval_transform(backbone: Backbone, image_size: int | None = None):
    """The evaluation transform of ``backbone`` (PIL RGB -> float32 [3, S, S]): its own preprocessing,
    at crop side ``image_size`` (None: its own). ``geo predict`` applies what extraction applied."""
    return backbone_preprocess(backbone, image_size).eval_transform()


def backbone_resize_px(backbone: Backbone, image_size: int | None = None) -> int:
    """The side the evaluation transform resizes to before its crop (what reduced-scale JPEG
    decoding must keep: ``geo.pipeline.images.draft_request``)."""
    return backbone_preprocess(backbone, image_size).resize_size


def _torchvision(name: str, weights: str, image_size: int | None, clip_features: str | None):
    """A torchvision classification model with its last nn.Linear stripped, as a ``Built``."""
    from geo.pipeline.backbones import Built, check_clip_features, group_by_regex

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"unknown --backbone {name!r}; torchvision classification models "
                          f"include: {', '.join(sorted(torchvision.models.list_models(module=torchvision.models))[:12])} "
                          "...; or timm/<model>, open_clip/<arch>:<tag>, hf/<model id>")
    check_clip_features(name, False, clip_features)
    extra = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    model = torchvision.models.get_model(name, weights=None, **extra)
    source, sha = weights, ""
    if weights in ("imagenet", "pretrained"):
        source = "imagenet"  # torchvision's pretrained weights are its ImageNet ones
        state, sha = _imagenet_state_dict(name)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("AuxLogits")}, strict=False)
    elif weights != "none":
        path = Path(weights).expanduser().resolve()
        state = _load_file(path)
        source, sha = str(path), sha256_file(path)
        try:
            model.load_state_dict(state)
        except (RuntimeError, AttributeError) as err:
            raise WeightsError(f"--weights {path} does not fit {name}: {err}") from None
    feature_dim = _strip_classifier(model, name)
    names = [n for n, _ in model.named_parameters()]
    # ResNets: conv1/bn1, then layer1..layer4; MobileNet/EfficientNet/VGG ...: features.N.
    groups = group_by_regex(names, r"^(conv1|bn1)\.", [r"^layer(\d+)\."]) or \
        group_by_regex(names, None, [r"^features\.(\d+)\."])
    preprocess = TORCHVISION_PREPROCESS.at_size(image_size or TORCHVISION_PREPROCESS.image_size)
    return Built(model, feature_dim, preprocess, source, sha, groups, False, None,
                 {"image_size": preprocess.image_size})


def save_backbone(model: Backbone, path: str | os.PathLike, **meta) -> str:
    """Write a geo backbone checkpoint atomically; return its sha256.

    Loadable with ``torch.load(weights_only=True)`` and by ``create_backbone(weights=path)``.
    ``meta`` (JSON-like: str, int, float, lists) is stored alongside.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "backbone": model.name, "feature_dim": model.feature_dim,
               "classes": list(model.classes), "init_weights": model.weights_source,
               "init_weights_sha256": model.weights_sha256, "model": state,
               "preprocess": model.preprocess.to_dict(), "clip_features": model.clip_features,
               "build": model.build_meta, **meta}
    atomic_torch_save(path, payload)
    return sha256_file(path)


# ---- device and precision ------------------------------------------------------------


@dataclass
class Placement:
    """Where and how the backbone runs: device, precision ("bf16"/"fp32"), memory format."""

    device: torch.device
    precision: str
    channels_last: bool

    def to(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def placement(device: str = "auto", precision: str = "auto") -> Placement:
    dev = resolve_device(device)
    # channels_last helps oneDNN and cuDNN convolutions; mps gains nothing from it.
    return Placement(dev, resolve_precision(precision, dev), dev.type in ("cpu", "cuda"))
