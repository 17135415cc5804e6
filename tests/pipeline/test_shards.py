"""`geo extract` reads shard members in place: the same features as from plain files, any worker count."""

from __future__ import annotations

import numpy as np
import pytest

from support.datasets import write_mp16, write_osv5m
from geo.cache.store import FeatureCache
from geo.pipeline import shards
from geo.pipeline.datasets.common import split_codes, write_dataset_manifest
from geo.pipeline.datasets.osv5m import read_osv5m
from geo.pipeline.datasets.places365 import read_places365
from geo.pipeline.extract import ExtractConfig, run_extract
from geo.pipeline.manifest import read_manifest, write_manifest

TINY = dict(backbone="resnet18", image_size=32, batch_size=4, finetune_epochs=0, precision="fp32")


def _cache(path):
    with FeatureCache(path) as cache:
        return cache.ids.tolist(), cache.load_features(np.arange(cache.n_rows)), list(cache.skipped)


def test_features_from_shards_equal_features_from_plain_files(tmp_path):
    write_mp16(tmp_path / "mp16")
    rows = read_places365(tmp_path / "mp16" / "mp16_places365.csv", tmp_path / "mp16" / "shards", progress=False)
    sharded, _ = write_dataset_manifest(tmp_path / "sharded.parquet", rows, split=split_codes(rows.ids, "test",
                                        default=None), source="mp16")
    # The same images unpacked as files, listed in the same order.
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    names = []
    for k, path in enumerate(sharded.paths.tolist()):
        (plain_dir / f"{k}.jpg").write_bytes(shards.read_member(path))
        names.append(f"plain/{k}.jpg")
    write_manifest(tmp_path / "plain.parquet", ids=sharded.ids, paths=names, lat_deg=sharded.lat_deg,
                   lon_deg=sharded.lon_deg, split=sharded.split)
    seed = run_extract(tmp_path / "plain.parquet", tmp_path / "plain.h5", ExtractConfig(**TINY, workers=0))
    like = dict(TINY, weights=str(seed.checkpoint_path))
    for workers in (0, 2):  # each worker opens its own shard handles
        run_extract(tmp_path / "sharded.parquet", tmp_path / f"s{workers}.h5",
                    ExtractConfig(**like, workers=workers, checkpoint_dir=str(tmp_path / f"c{workers}")))
    ids, feats, _ = _cache(tmp_path / "plain.h5")
    for workers in (0, 2):
        ids_s, feats_s, skipped = _cache(tmp_path / f"s{workers}.h5")
        assert ids_s == ids and skipped == []
        np.testing.assert_array_equal(feats_s, feats)


def test_a_corrupt_member_is_skipped_at_extraction_with_its_reason(tmp_path):
    write_osv5m(tmp_path / "osv", corrupt_member=6)
    rows = read_osv5m(tmp_path / "osv", "test")
    write_dataset_manifest(tmp_path / "m.parquet", rows, split=split_codes(rows.ids, "test", default=None),
                           source="osv")
    assert read_manifest(tmp_path / "m.parquet").country is not None
    run_extract(tmp_path / "m.parquet", tmp_path / "m.h5", ExtractConfig(**TINY, workers=0))
    ids, _, skipped = _cache(tmp_path / "m.h5")
    assert len(ids) == 22 and [i for i, _ in skipped] == ["9000006"] and "corrupt" in skipped[0][1]
    with FeatureCache(tmp_path / "m.h5") as cache:  # OSV-5M's own label (one set to BR) is the cache's
        codes = dict(zip(cache.ids.tolist(), np.asarray(cache.countries)[cache.country].tolist()))
    assert codes["9000004"] == "BR" and codes["9000000"] == "FR"


def test_member_paths():
    assert shards.split_member("a/shard_0.msg#123") == ("a/shard_0.msg", "123")
    assert shards.split_member("a/00.zip#00/1.jpg") == ("a/00.zip", "00/1.jpg")
    assert shards.split_member("a/photo#1.jpg") is None  # not a shard container
    with pytest.raises(shards.MemberError, match="shard not found"):
        shards.read_member("/nonexistent/shard_0.msg#0")
