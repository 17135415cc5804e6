"""`geo extract TEST --like TRAIN_CACHE`: the training cache's backbone on a second set of images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from support.images import write_dataset
from geo.cache.store import FeatureCache
from geo.cli import cli
from geo.errors import ConfigError
from geo.pipeline.extract import ExtractConfig, run_extract
from geo.training import runs

TRAIN = dict(backbone="resnet18", image_size=32, batch_size=4, finetune_epochs=1, precision="fp32", workers=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A training cache whose backbone was fine-tuned (so its checkpoint differs from any fresh init)."""
    root = tmp_path_factory.mktemp("like")
    manifest = write_dataset(root / "train", 12)
    result = run_extract(manifest, root / "train.h5", ExtractConfig(**TRAIN))
    return root, result


def _features(path):
    with FeatureCache(path) as cache:
        return cache.ids.tolist(), cache.load_features(np.arange(cache.n_rows)), dict(cache.provenance)


def test_like_features_equal_a_fresh_extraction_with_the_same_checkpoint(trained, tmp_path):
    root, result = trained
    ckpt = result.checkpoint_path
    ckpt_sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    test_manifest = write_dataset(tmp_path / "test", 8, seed=3, splits=["test"] * 8)
    like = run_extract(test_manifest, tmp_path / "test.h5", ExtractConfig(like=str(result.cache_path), workers=0))
    # The reference: a plain extraction from the same checkpoint file, no fine-tuning.
    fresh = run_extract(test_manifest, tmp_path / "fresh.h5",
                        ExtractConfig(**dict(TRAIN, finetune_epochs=0, weights=str(ckpt)),
                                      checkpoint_dir=str(tmp_path / "fresh.ckpt")))
    ids, feats, prov = _features(like.cache_path)
    ids_ref, feats_ref, _ = _features(fresh.cache_path)
    assert ids == ids_ref == [f"id{i:03d}" for i in range(8)]
    np.testing.assert_array_equal(feats, feats_ref)
    # Nothing re-saved: the checkpoint is the training cache's, byte for byte.
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == ckpt_sha and like.checkpoint_path == ckpt
    assert not (tmp_path / "test.checkpoints").exists()
    _, _, train_prov = _features(result.cache_path)
    assert prov["weights"] == ckpt_sha == train_prov["weights"]
    assert prov["like_cache"] == str(result.cache_path)
    assert prov["manifest_sha256"] == hashlib.sha256(test_manifest.read_bytes()).hexdigest()
    # Evaluation sees the same features: only manifest keys differ.
    assert runs.feature_provenance_differences(runs.json_safe(train_prov), runs.json_safe(prov)) == []
    assert runs.config_differences(runs.json_safe(train_prov), runs.json_safe(prov)) != []


def test_like_refuses_a_missing_or_changed_checkpoint(trained, tmp_path):
    root, result = trained
    test_manifest = write_dataset(tmp_path / "test", 4, seed=4, splits=["test"] * 4)
    ckpt = result.checkpoint_path
    original = ckpt.read_bytes()
    sha = hashlib.sha256(original).hexdigest()
    try:
        ckpt.write_bytes(original + b"x")
        with pytest.raises(ConfigError) as err:
            run_extract(test_manifest, tmp_path / "a.h5", ExtractConfig(like=str(result.cache_path), workers=0))
        message = str(err.value)
        assert str(ckpt) in message and sha in message and hashlib.sha256(original + b"x").hexdigest() in message
        assert str(result.cache_path) in message
        ckpt.unlink()
        with pytest.raises(ConfigError, match=f"checkpoint {ckpt} \\(sha256 {sha}\\) is missing"):
            run_extract(test_manifest, tmp_path / "b.h5", ExtractConfig(like=str(result.cache_path), workers=0))
    finally:
        ckpt.write_bytes(original)
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5").exists()


def test_like_on_the_command_line(trained, tmp_path):
    root, result = trained
    test_manifest = write_dataset(tmp_path / "test", 4, seed=5, splits=["test"] * 4)
    runner = CliRunner()
    out = tmp_path / "t.h5"
    res = runner.invoke(cli, ["extract", str(test_manifest), "--like", str(result.cache_path), "--out", str(out),
                              "--workers", "0"])
    assert res.exit_code == 0, res.output
    config = json.loads(Path(str(out) + ".config.json").read_text())
    assert config["finetune_epochs"] == 0 and config["like"] == str(result.cache_path)
    res = runner.invoke(cli, ["extract", str(test_manifest), "--like", str(result.cache_path), "--out",
                              str(tmp_path / "u.h5"), "--image-size", "64", "--finetune-epochs", "2"])
    assert res.exit_code == 2 and "drop --image-size, --finetune-epochs" in res.output
