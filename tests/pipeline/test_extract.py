"""End-to-end feature extraction on a dozen real JPEGs with a small backbone."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from support.images import PLACES, write_dataset  # noqa: E402

from geo.cache.store import FeatureCache  # noqa: E402
from geo.cli import cli  # noqa: E402
from geo.errors import CacheError, GeoError  # noqa: E402
from geo.pipeline.backbone import create_backbone  # noqa: E402
from geo.pipeline.extract import ExtractConfig, run_extract  # noqa: E402
from geo.pipeline.images import eval_transform, load_rgb  # noqa: E402

TINY = dict(backbone="resnet18", image_size=32, batch_size=4, finetune_epochs=0, precision="fp32", workers=0)


def _rows(cache: FeatureCache) -> dict:
    return {"ids": cache.ids.tolist(), "lat": cache.lat_deg, "lon": cache.lon_deg, "split": cache.split,
            "country": cache.country, "features": cache.load_features(np.arange(cache.n_rows)),
            "skipped": list(cache.skipped)}


def test_extract_end_to_end(tmp_path):
    manifest = write_dataset(tmp_path / "data", 12, corrupt=(3, 7))
    result = run_extract(manifest, tmp_path / "cache.h5", ExtractConfig(**TINY))
    with FeatureCache(result.cache_path) as cache:
        assert cache.validate() == []
        ids = cache.ids.tolist()
        skipped_ids = [i for i, _ in cache.skipped]
        # Every manifest row exactly once: as a feature row or as a skipped row, in manifest order.
        assert ids == [f"id{i:03d}" for i in range(12) if i not in (3, 7)]
        assert sorted(ids + skipped_ids) == [f"id{i:03d}" for i in range(12)]
        assert skipped_ids == ["id003", "id007"] and all(reason for _, reason in cache.skipped)
        # Countries: the cache's labels are the known countries of the places written.
        codes = [cache.countries[c] for c in cache.country]
        assert codes == [PLACES[i % 4][2] for i in range(12) if i not in (3, 7)]
        assert cache.feature_dim == 512 and cache.load_features([0]).dtype == np.float16
        prov = cache.provenance
        ckpt = Path(prov["checkpoint_path"])
        assert prov["weights"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
        assert prov["backbone"] == "resnet18" and int(prov["image_size"]) == 32
        assert prov["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
        assert "CenterCrop" in prov["transform"]
        # Features equal an independent forward pass of the saved checkpoint on one image.
        model = create_backbone("resnet18", str(ckpt), num_classes=4).eval()
        image = eval_transform(32)(load_rgb(tmp_path / "data" / "img005.jpg"))
        with torch.no_grad():
            ref = model.forward_features(image[None])[0].numpy()
        row = ids.index("id005")
        np.testing.assert_allclose(cache.load_features([row])[0].astype(np.float32), ref,
                                   rtol=2e-3, atol=2e-3)  # float16 storage
    config = json.loads(result.config_path.read_text())
    assert config["backbone"] == "resnet18" and config["n_rows"] == 10 and config["n_skipped"] == 2


def test_killed_and_resumed_extraction_equals_an_uninterrupted_one(tmp_path):
    manifest = write_dataset(tmp_path / "data", 12, corrupt=(6,))
    straight = run_extract(manifest, tmp_path / "a.h5", ExtractConfig(**TINY))
    out = tmp_path / "b.h5"
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_extract(manifest, out, ExtractConfig(**TINY), _fail_after_blocks=2)
    assert not out.exists() and Path(str(out) + ".partial").exists()
    resumed = run_extract(manifest, out, ExtractConfig(**TINY))
    with FeatureCache(straight.cache_path) as a, FeatureCache(resumed.cache_path) as b:
        assert b.validate() == []
        ra, rb = _rows(a), _rows(b)
        for key in ra:
            np.testing.assert_array_equal(np.asarray(ra[key], dtype=object if key in ("ids", "skipped")
                                                     else None), np.asarray(rb[key], dtype=object if key in
                                                                            ("ids", "skipped") else None))


def test_existing_cache_of_another_job_is_refused_and_replaced_with_overwrite(tmp_path):
    manifest = write_dataset(tmp_path / "data", 8)
    run_extract(manifest, tmp_path / "c.h5", ExtractConfig(**TINY))
    with pytest.raises(CacheError, match=r"already exists and was made by another job \(--image-size 32 there, 40 now"):
        run_extract(manifest, tmp_path / "c.h5", ExtractConfig(**{**TINY, "image_size": 40}))
    other = write_dataset(tmp_path / "other", 6, seed=1)
    with pytest.raises(CacheError, match="sha256 differs"):
        run_extract(other, tmp_path / "c.h5", ExtractConfig(**TINY))
    result = run_extract(manifest, tmp_path / "c.h5", ExtractConfig(**{**TINY, "image_size": 40}, overwrite=True))
    assert result.n_rows == 8 and not result.already_complete


def test_a_rerun_of_a_finished_extract_reports_it_and_redoes_nothing(tmp_path):
    manifest = write_dataset(tmp_path / "data", 8)
    out = tmp_path / "c.h5"
    first = run_extract(manifest, out, ExtractConfig(**TINY))
    before = {p: p.read_bytes() for p in (out, first.config_path, first.checkpoint_path)}
    # The same job, with another number of workers (which changes nothing written): finished.
    again = run_extract(manifest, out, ExtractConfig(**{**TINY, "workers": 1}))
    assert again.already_complete and (again.n_rows, again.n_skipped) == (first.n_rows, first.n_skipped)
    assert again.checkpoint_path == first.checkpoint_path
    assert {p: p.read_bytes() for p in before} == before


def test_a_run_where_most_images_fail_stops_and_says_so(tmp_path):
    manifest = write_dataset(tmp_path / "data", 12, corrupt=tuple(range(8)))
    with pytest.raises(GeoError, match="8 of 12 images could not be read"):
        run_extract(manifest, tmp_path / "c.h5", ExtractConfig(**TINY))


def test_cli_extract_prints_outputs_and_writes_config(tmp_path):
    manifest = write_dataset(tmp_path / "data", 8)
    out = tmp_path / "cli.h5"
    runner = CliRunner()
    res = runner.invoke(cli, ["extract", str(manifest), "--out", str(out), "--backbone", "resnet18",
                              "--image-size", "32", "--finetune-epochs", "0", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert str(out) in res.output and "backbone.pt" in res.output
    assert json.loads(Path(str(out) + ".config.json").read_text())["image_size"] == 32
    again = runner.invoke(cli, ["extract", str(manifest), "--out", str(out), "--backbone", "resnet18"])
    assert again.exit_code == 2 and "Error:" in again.output and "already exists" in again.output
    assert "--image-size None there, 32 now" not in again.output and "--image-size 32 there, None now" in again.output
    same = runner.invoke(cli, ["extract", str(manifest), "--out", str(out), "--backbone", "resnet18",
                               "--image-size", "32", "--finetune-epochs", "0", "--batch-size", "4"])
    assert same.exit_code == 0 and "already complete" in same.output and str(out) in same.output
    assert "Example:" in runner.invoke(cli, ["extract", "--help"]).output


def test_cli_weights_imagenet_offline_is_a_clear_error(tmp_path, monkeypatch):
    manifest = write_dataset(tmp_path / "data", 4)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    res = CliRunner().invoke(cli, ["extract", str(manifest), "--out", str(tmp_path / "x.h5"),
                                   "--backbone", "resnet18", "--weights", "imagenet"])
    assert res.exit_code == 2
    assert "resnet18-f37072fd.pth" in res.output and "hub/checkpoints" in res.output


@pytest.mark.slow  # three fine-tunes: seconds alone, more on a loaded machine
def test_a_run_killed_while_fine_tuning_resumes_from_its_last_epoch(tmp_path):
    manifest = write_dataset(tmp_path / "data", 12)
    config = ExtractConfig(**dict(TINY, backbone="mobilenet_v3_small", finetune_epochs=2))
    with pytest.raises(RuntimeError, match="simulated kill after 1 fine-tuning epoch"):
        run_extract(manifest, tmp_path / "k.h5", config, _stop_after_epochs=1)
    state = tmp_path / "k.checkpoints" / "finetune_state.pt"
    assert torch.load(state, weights_only=True)["epoch"] == 1
    result = run_extract(manifest, tmp_path / "k.h5", config)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert not state.exists() and result.checkpoint_path.exists()  # the final checkpoint replaces it
    straight = run_extract(manifest, tmp_path / "s.h5", config)
    with FeatureCache(result.cache_path) as a, FeatureCache(straight.cache_path) as b:
        np.testing.assert_array_equal(a.load_features(np.arange(a.n_rows)), b.load_features(np.arange(b.n_rows)))


def test_a_config_json_from_before_requested_options_were_recorded_recognises_its_job_by_resolved_options(tmp_path):
    manifest = write_dataset(tmp_path / "data", 8)
    out = tmp_path / "c.h5"
    first = run_extract(manifest, out, ExtractConfig(**TINY))
    stored = json.loads(first.config_path.read_text())
    del stored["requested"]  # as geo wrote it before: resolved options only
    first.config_path.write_text(json.dumps(stored))
    resolved = {**TINY, "lr": stored["lr"], "device": stored["device"]}
    assert run_extract(manifest, out, ExtractConfig(**resolved)).already_complete
    # A default resolved only later cannot be compared with what it resolved to there: refused, as before.
    with pytest.raises(CacheError, match="--lr 0.001 there, None now; --device 'cpu' there, 'auto' now"):
        run_extract(manifest, out, ExtractConfig(**TINY))
    with pytest.raises(CacheError, match="--batch-size 4 there, 8 now"):
        run_extract(manifest, out, ExtractConfig(**{**resolved, "batch_size": 8}))


def test_the_fine_tunings_val_country_accuracy_and_majority_rate_are_in_the_provenance(tmp_path):
    # what reports print at the top ("val country accuracy against the majority rate"), read by runs from
    # config.json's cache_provenance; a cache without fine-tuning records neither
    manifest = write_dataset(tmp_path / "data", 12)
    result = run_extract(manifest, tmp_path / "f.h5", ExtractConfig(**dict(TINY, finetune_epochs=1)))
    with FeatureCache(result.cache_path) as cache:
        prov = cache.provenance
        train, val = cache.split == 0, cache.split == 1
        majority = np.bincount(cache.country[train]).argmax()  # recomputed from the cache's own rows
        assert val.any() and prov["finetune_val_majority_acc"] == pytest.approx(np.mean(cache.country[val] == majority))
    assert prov["finetune_val_country_acc"] == pytest.approx(result.history[-1]["val_acc"])
    frozen = run_extract(manifest, tmp_path / "z.h5", ExtractConfig(**TINY))
    with FeatureCache(frozen.cache_path) as cache:
        assert "finetune_val_country_acc" not in cache.provenance
