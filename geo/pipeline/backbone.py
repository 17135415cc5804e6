"""The image backbone: any torchvision classifier, its weights, device and precision.

``create_backbone`` builds a torchvision classification model by name, strips its
final ``nn.Linear`` (so the trunk returns the pooled feature, 2048-d for
``wide_resnet50_2``) and puts a fresh country classifier on top. Weights come from
``"none"`` (random init from a seed), ``"imagenet"`` (torchvision's weights API:
download where there is internet, else read ``$TORCH_HOME/hub/checkpoints``), or a
file path (a torchvision state_dict, or a geo backbone checkpoint written by
``save_backbone``). Every backbone records where its weights came from and their
sha256, which the feature cache keeps as provenance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from geo.devices import resolve_device, resolve_precision
from geo.errors import ConfigError, GeoError
from geo.files import atomic_torch_save, sha256_file

CHECKPOINT_FORMAT = "geo-backbone/1"


class WeightsError(GeoError):
    """Backbone weights that cannot be found, downloaded or loaded."""




class Backbone(nn.Module):
    """A torchvision trunk with its classifier removed, plus a country classifier.

    ``forward_features(x [B,3,H,W]) -> [B, feature_dim]`` is the pooled feature (the
    input of the original classifier); ``forward(x) -> logits [B, num_classes]``.
    Attributes: ``name``, ``feature_dim``, ``num_classes``, ``weights_source``
    ("none" | "imagenet" | a path), ``weights_sha256`` (of the weights file used, or
    ``random-init-seed-S``), ``classes`` (country codes of the classifier outputs, if known).
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

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.trunk(x)
        # Inception-style models return a namedtuple in train mode; the first entry is the output.
        if not torch.is_tensor(feats):
            feats = feats[0]
        return feats.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


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
                    *, seed: int = 0) -> Backbone:
    """Build backbone ``name`` with ``weights`` and a ``num_classes``-way country classifier.

    weights: "none" (random init from ``seed``), "imagenet", or a path to a torchvision
    state_dict or a geo backbone checkpoint (``CHECKPOINT_FORMAT``); from a geo
    checkpoint the classifier is restored too when its size equals ``num_classes``.
    Raises ConfigError for an unknown model name, WeightsError for weights problems.
    """
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"unknown --backbone {name!r}; torchvision classification models "
                          f"include: {', '.join(sorted(torchvision.models.list_models(module=torchvision.models))[:12])} ...")
    extra = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # "none" must be reproducible from the seed alone
        model = torchvision.models.get_model(name, weights=None, **extra)
        source, sha, geo_ckpt = weights, f"random-init-seed-{seed}", None
        if weights == "imagenet":
            state, sha = _imagenet_state_dict(name)
            model.load_state_dict({k: v for k, v in state.items() if not k.startswith("AuxLogits")},
                                  strict=False)
        elif weights != "none":
            path = Path(weights).expanduser().resolve()
            state = _load_file(path)
            source, sha = str(path), sha256_file(path)
            if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
                geo_ckpt = state
                if geo_ckpt["backbone"] != name:
                    raise WeightsError(f"--weights {path} is a {geo_ckpt['backbone']} checkpoint, "
                                       f"not {name}; pass --backbone {geo_ckpt['backbone']}")
            else:
                try:
                    model.load_state_dict(state)
                except (RuntimeError, AttributeError) as err:
                    raise WeightsError(f"--weights {path} does not fit {name}: {err}") from None
        feature_dim = _strip_classifier(model, name)
        backbone = Backbone(name, model, feature_dim, num_classes)
    if geo_ckpt is not None:
        state = geo_ckpt["model"]
        trunk = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
        backbone.trunk.load_state_dict(trunk)
        if state["classifier.weight"].shape[0] == backbone.num_classes:
            backbone.classifier.load_state_dict({"weight": state["classifier.weight"],
                                                 "bias": state["classifier.bias"]})
            backbone.classes = list(geo_ckpt.get("classes", []))
    backbone.weights_source, backbone.weights_sha256 = source, sha
    return backbone


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
               "init_weights_sha256": model.weights_sha256, "model": state, **meta}
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
