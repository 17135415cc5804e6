"""Backbone construction, feature dimensions, weights sources and their errors."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torchvision

from geo.errors import ConfigError
from geo.devices import autocast, resolve_precision
from geo.pipeline.backbone import WeightsError, create_backbone, save_backbone


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("wide_resnet50_2", 2048),
                                       ("mobilenet_v3_small", 1024)])
def test_forward_features_dims_match_the_original_classifier_input(name, dim):
    model = create_backbone(name, "none", num_classes=7).eval()
    # Reference: torchvision's own classifier layer declares its input width.
    ref = torchvision.models.get_model(name)
    last_linear = [m for m in ref.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert model.feature_dim == dim == last_linear.in_features
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert feats.shape == (2, dim) and logits.shape == (2, 7)
    assert torch.isfinite(feats).all()


def test_features_equal_the_torchvision_penultimate_activation():
    # Reference: a torchvision resnet18 with the same weights, fc replaced by Identity by hand.
    model = create_backbone("resnet18", "none", num_classes=3, seed=5).eval()
    ref = torchvision.models.resnet18()
    state = {k[len("trunk."):]: v for k, v in model.state_dict().items() if k.startswith("trunk.")}
    ref.fc = torch.nn.Identity()
    ref.load_state_dict(state)
    x = torch.rand(3, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref.eval()(x))


def test_random_init_is_reproducible_from_the_seed():
    a = create_backbone("resnet18", "none", num_classes=3, seed=1)
    b = create_backbone("resnet18", "none", num_classes=3, seed=1)
    c = create_backbone("resnet18", "none", num_classes=3, seed=2)
    assert a.weights_sha256 == "random-init-seed-1"
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    assert not torch.equal(a.trunk.conv1.weight, c.trunk.conv1.weight)


def test_imagenet_without_network_or_cache_names_the_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    # Guarantee "no network" even on a machine that has it.
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as err:
        create_backbone("wide_resnet50_2", "imagenet", num_classes=2)
    msg = str(err.value)
    assert "wide_resnet50_2-9ba9bcbe.pth" in msg
    assert str(tmp_path / "hub" / "checkpoints" / "wide_resnet50_2-9ba9bcbe.pth") in msg
    assert "--weights" in msg


def test_imagenet_reads_the_torch_home_cache(tmp_path, monkeypatch):
    # A file already in $TORCH_HOME/hub/checkpoints is used without any download.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    target = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    torch.manual_seed(3)
    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), target)
    model = create_backbone("resnet18", "imagenet", num_classes=2)
    assert model.weights_sha256 == hashlib.sha256(target.read_bytes()).hexdigest()
    torch.testing.assert_close(model.trunk.conv1.weight, ref.conv1.weight)


def test_weights_from_a_torchvision_state_dict_and_a_geo_checkpoint(tmp_path):
    torch.manual_seed(4)
    ref = torchvision.models.resnet18()
    path = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), path)
    model = create_backbone("resnet18", str(path), num_classes=4)
    assert model.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    torch.testing.assert_close(model.trunk.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)

    model.classes = ["FR", "IS", "US", "XX"]
    with torch.no_grad():
        model.classifier.weight.fill_(0.25)
    sha = save_backbone(model, tmp_path / "geo.pt")
    again = create_backbone("resnet18", str(tmp_path / "geo.pt"), num_classes=4)
    assert again.weights_sha256 == sha
    assert again.classes == model.classes
    torch.testing.assert_close(again.state_dict(), model.state_dict())
    # A different class count keeps the trunk and re-initialises only the classifier.
    other = create_backbone("resnet18", str(tmp_path / "geo.pt"), num_classes=2)
    torch.testing.assert_close(other.trunk.conv1.weight, model.trunk.conv1.weight)
    assert other.classifier.out_features == 2


def test_bad_names_and_paths_are_user_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown --backbone 'resnet_nope'"):
        create_backbone("resnet_nope")
    with pytest.raises(WeightsError, match="no such file"):
        create_backbone("resnet18", str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt"):
        create_backbone("resnet18", str(tmp_path / "junk.pt"))
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pt")
    with pytest.raises(WeightsError, match="does not fit resnet34"):
        create_backbone("resnet34", str(tmp_path / "r18.pt"))


def test_bf16_autocast_close_to_fp32():
    model = create_backbone("resnet18", "none", num_classes=3).eval()
    x = torch.rand(2, 3, 32, 32)
    device = torch.device("cpu")
    assert resolve_precision("fp32", device) == "fp32"
    with torch.no_grad():
        ref = model.forward_features(x)
        with autocast(device, "bf16"):
            low = model.forward_features(x)
    # bf16 has an 8-bit mantissa: relative error ~1e-2 per op, accumulated over 18 layers.
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.1
