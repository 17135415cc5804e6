"""Country fine-tuning: resume equals a straight run, val accuracy, bad-image handling."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from support.images import write_dataset  # noqa: E402

from geo.errors import ConfigError, GeoError  # noqa: E402
from geo.pipeline.backbone import create_backbone, placement  # noqa: E402
from geo.pipeline.finetune import FinetuneConfig, finetune  # noqa: E402
from geo.pipeline.images import eval_transform, load_rgb  # noqa: E402
from geo.pipeline.manifest import read_manifest  # noqa: E402

CLASSES = ["DE", "ES", "FR", "IT"]
LABEL_OF_PLACE = [2, 0, 1, 3]  # PLACES order FR, DE, ES, IT -> index into CLASSES


def _setup(tmp_path, n=12, corrupt=()):
    manifest = read_manifest(write_dataset(tmp_path / "data", n, corrupt=corrupt))
    labels = np.array([LABEL_OF_PLACE[i % 4] for i in range(n)], dtype=np.int64)
    return manifest, labels


def _model():
    # mobilenet_v3_small: a real torchvision model whose training step takes milliseconds here.
    model = create_backbone("mobilenet_v3_small", "none", num_classes=4, seed=0)
    model.classes = CLASSES
    return model


CONFIG = dict(batch_size=4, image_size=32, lr=1e-3)


def test_resumed_fine_tune_equals_a_straight_run(tmp_path):
    manifest, labels = _setup(tmp_path)
    place = placement("cpu", "fp32")
    config = FinetuneConfig(epochs=2, **CONFIG)
    straight = _model()
    finetune(straight, manifest.paths, labels, manifest.split, config, place, tmp_path / "a.pt")

    killed = _model()
    with pytest.raises(RuntimeError, match="simulated kill"):
        finetune(killed, manifest.paths, labels, manifest.split, config, place, tmp_path / "b.pt",
                 stop_after_epochs=1)
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state["epoch"] == 1
    resumed = _model()  # a fresh process: weights and optimizer come from the checkpoint
    result = finetune(resumed, manifest.paths, labels, manifest.split, config, place, tmp_path / "b.pt")
    assert [h["epoch"] for h in result.history] == [1, 2]
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict(), rtol=1e-5, atol=1e-6)
    # And training changed the weights at all.
    assert not torch.equal(resumed.trunk.features[0][0].weight, _model().trunk.features[0][0].weight)


def test_val_accuracy_and_majority_rate_match_a_manual_count(tmp_path):
    manifest, labels = _setup(tmp_path)
    place = placement("cpu", "fp32")
    model = _model()
    result = finetune(model, manifest.paths, labels, manifest.split, FinetuneConfig(epochs=1, **CONFIG),
                      place, tmp_path / "s.pt")
    val = np.flatnonzero(manifest.split == 1)
    images = torch.stack([eval_transform(32)(load_rgb(manifest.paths[i])) for i in val])
    with torch.no_grad():
        pred = model.eval()(images).argmax(1).numpy()
    record = result.history[0]
    assert record["val_acc"] == pytest.approx(np.mean(pred == labels[val]))
    majority = np.bincount(labels[manifest.split == 0]).argmax()
    assert record["val_majority_acc"] == pytest.approx(np.mean(labels[val] == majority))
    assert not model.training  # evaluation never leaves the model in train mode


def test_state_from_other_options_is_refused(tmp_path):
    manifest, labels = _setup(tmp_path, n=8)
    place = placement("cpu", "fp32")
    finetune(_model(), manifest.paths, labels, manifest.split, FinetuneConfig(epochs=1, **CONFIG), place,
             tmp_path / "s.pt")
    with pytest.raises(ConfigError, match="other options"):
        finetune(_model(), manifest.paths, labels, manifest.split,
                 FinetuneConfig(epochs=1, batch_size=2, image_size=32, lr=1e-3), place, tmp_path / "s.pt")


def test_unreadable_images_are_skipped_and_recorded(tmp_path):
    manifest, labels = _setup(tmp_path, corrupt=(0, 1))
    result = finetune(_model(), manifest.paths, labels, manifest.split, FinetuneConfig(epochs=1, **CONFIG),
                      placement("cpu", "fp32"), tmp_path / "s.pt")
    assert sorted(result.failed) == [0, 1] and all(result.failed.values())
    assert result.history[0]["n_train"] == int((manifest.split == 0).sum()) - 2


def test_most_images_failing_stops_the_run(tmp_path):
    manifest, labels = _setup(tmp_path, corrupt=tuple(range(10)))
    with pytest.raises(GeoError, match="could not be read"):
        finetune(_model(), manifest.paths, labels, manifest.split, FinetuneConfig(epochs=1, **CONFIG),
                 placement("cpu", "fp32"), tmp_path / "s.pt")
