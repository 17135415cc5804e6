"""Image decoding (modes, orientation, bad files), transforms, the Dataset and its collate."""

import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from geo.pipeline.images import (IMAGENET_MEAN, IMAGENET_STD, BatchColorJitter, ImageError, ImageRows, collate_rows,
                                 describe_transform, eval_transform, load_rgb, train_transform)


def rgb_array(path, **kw):
    image = load_rgb(path, **kw)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_rgb_and_grey(tmp_path):
    Image.new("RGB", (3, 2), (10, 20, 30)).save(tmp_path / "rgb.png")
    assert (rgb_array(tmp_path / "rgb.png") == [10, 20, 30]).all()
    Image.new("L", (3, 2), 77).save(tmp_path / "l.png")
    assert (rgb_array(tmp_path / "l.png") == 77).all()
    Image.new("1", (3, 2), 1).save(tmp_path / "bw.png")
    assert (rgb_array(tmp_path / "bw.png") == 255).all()


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert rgb_array(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 1, 128, 255]  # value / 257


def test_cmyk(tmp_path):
    image = Image.new("CMYK", (2, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))      # no ink: white
    image.putpixel((1, 0), (255, 0, 0, 0))    # full cyan
    image.save(tmp_path / "c.jpg", quality=100)
    pixels = rgb_array(tmp_path / "c.jpg")
    assert np.abs(pixels[0, 0] - [255, 255, 255]).max() <= 3
    assert np.abs(pixels[0, 1] - [0, 255, 255]).max() <= 3


def test_alpha_composited_on_white(tmp_path):
    Image.new("RGBA", (2, 2), (200, 0, 100, 64)).save(tmp_path / "a.png")
    alpha = 64 / 255
    expected = [round(c * alpha + 255 * (1 - alpha)) for c in (200, 0, 100)]  # closed form "over"
    assert np.abs(rgb_array(tmp_path / "a.png") - expected).max() <= 1
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert (rgb_array(tmp_path / "la.png") == 255).all()  # fully transparent black: background
    assert (rgb_array(tmp_path / "la.png", background=(0, 0, 0)) == 0).all()


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png")
    assert rgb_array(tmp_path / "p.png")[0].tolist() == [[255, 0, 0], [0, 0, 255]]
    palette.save(tmp_path / "pt.png", transparency=0)
    assert rgb_array(tmp_path / "pt.png")[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_exif_orientation_applied(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, size=(2, 4, 3), dtype=np.uint8)  # H=2, W=4
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: the viewer rotates 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif)
    upright = rgb_array(tmp_path / "o.png")
    assert upright.shape == (4, 2, 3)
    assert (upright == np.rot90(stored, k=-1)).all()  # numpy reference: clockwise rotation


def test_bad_files_give_reasons(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_rgb(tmp_path / "zero.jpg")
    (tmp_path / "text.jpg").write_text("not an image at all")
    with pytest.raises(ImageError, match="not an image"):
        load_rgb(tmp_path / "text.jpg")
    with pytest.raises(ImageError, match="cannot open"):
        load_rgb(tmp_path / "missing.jpg")
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_rgb(tmp_path / "cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the global was not touched


def test_decompression_bomb_limit(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    Image.new("RGB", (100, 60)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="too large: 100x60 = 6000 pixels > limit 5999"):
        load_rgb(tmp_path / "big.png", max_pixels=5999)
    assert load_rgb(tmp_path / "big.png", max_pixels=6000).size == (100, 60)
    assert load_rgb(tmp_path / "big.png", max_pixels=None).size == (100, 60)
    assert Image.MAX_IMAGE_PIXELS == before


def test_eval_transform_resizes_crops_and_normalises():
    image = Image.new("RGB", (300, 200), (128, 64, 255))
    x = eval_transform(32)(image)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((128, 64, 255), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    # Short side 200 -> round(32 * 256 / 224) = 37, long side int(37 * 300 / 200) = 55, then a
    # centre crop at top round(2.5) = 2, left round(11.5) = 12 (torchvision's rounding).
    gradient = Image.fromarray(np.tile(np.arange(300, dtype=np.uint8)[None, :, None], (200, 1, 3)))
    y = eval_transform(32)(gradient)
    reference = torch.nn.functional.interpolate(  # independent: torch's antialiased resize of the same array
        torch.from_numpy(np.array(gradient)).permute(2, 0, 1)[None].float(), size=(37, 55),
        mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = 2, 12
    reference = reference[:, top:top + 32, left:left + 32] / 255
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(y * std + mean, reference, atol=2 / 255)


def test_train_transform_shape_and_randomness():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    transform = train_transform(48)
    torch.manual_seed(0)
    a, b = transform(image), transform(image)
    assert a.shape == b.shape == (3, 48, 48) and a.dtype == torch.uint8 and not torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(transform(image), a)  # reproducible under a seed


def _torchvision_jitter(image: torch.Tensor, factors, order) -> torch.Tensor:
    """The reference: torchvision's own functional ops on one image, in ``order``."""
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for op in order:
        image = ops[op](image, float(factors[op]))
    return image


def test_batch_colour_jitter_equals_torchvision_ops_in_any_order():
    gen = torch.Generator().manual_seed(0)
    # values in [0.3, 0.55]: no step leaves [0, 1] for factors in [0.8, 1.2] (0.55 * 1.2^3 < 1), so
    # torchvision's clamp after each step and geo's single clamp at the end give the same pixels.
    images = 0.3 + 0.25 * torch.rand(12, 3, 9, 7, generator=gen)
    jitter = BatchColorJitter(0.2, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    factors = 0.8 + 0.4 * torch.rand(12, 3, generator=gen)
    out = jitter.apply(images, factors)
    mean, std = torch.tensor([0.4, 0.5, 0.6])[:, None, None], torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    for i in range(12):
        for order in itertools.permutations(range(3)):  # torchvision draws one; unclamped, they commute
            reference = (_torchvision_jitter(images[i], factors[i], order) - mean) / std
            assert torch.allclose(out[i], reference, atol=1e-4), (i, order)
        reference = (_torchvision_jitter(images[i], factors[i], (0, 1, 2)) - mean) / std
        assert torch.allclose(out[i], reference, atol=2e-6), i
    # each factor does something: jittering with other factors changes the pixels
    assert not torch.allclose(out[:1], jitter.apply(images[:1], factors[:1].flip(1)), atol=1e-3)


def test_batch_colour_jitter_clamps_and_reads_uint8():
    jitter = BatchColorJitter(0.2)
    u8 = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    factors = torch.full((4, 3), 1.2)
    out = jitter.apply(u8, factors)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    pixels = out * std + mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6 and torch.isclose(pixels.max(), torch.tensor(1.0))
    assert torch.allclose(out, jitter.apply(u8.float() / 255, factors), atol=1e-6)
    identity = jitter.apply(u8, torch.ones(4, 3))  # factors 1: normalisation only
    assert torch.allclose(identity * std + mean, u8.float() / 255, atol=1e-6)


def test_batch_colour_jitter_draws():
    torch.manual_seed(0)
    factors = BatchColorJitter(0.2).sample(3000)
    assert factors.shape == (3000, 3) and factors.min() >= 0.8 and factors.max() <= 1.2
    assert torch.allclose(factors.mean(0), torch.ones(3), atol=0.01) and factors.std(0).min() > 0.1
    torch.manual_seed(0)
    out = BatchColorJitter(0.2)(torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)


def test_collate_applies_the_batch_transform():
    items = [(0, torch.zeros(3, 2, 2, dtype=torch.uint8), ""), (1, None, "bad"),
             (2, torch.full((3, 2, 2), 255, dtype=torch.uint8), "")]
    indices, images, failures = collate_rows(items, batch_transform=lambda x: x.float() / 255)
    assert indices.tolist() == [0, 2] and failures == [(1, "bad")]
    assert images.dtype == torch.float32 and images[0].max() == 0 and images[1].min() == 1


def test_describe_transform():
    text = describe_transform(eval_transform(224))
    assert "\n" not in text and text == describe_transform(eval_transform(224))
    assert "Resize(size=256" in text and "CenterCrop(size=(224, 224))" in text and "Normalize(" in text
    assert describe_transform(eval_transform(224)) != describe_transform(train_transform(224))


def _rows(tmp_path):
    paths = []
    for i, color in enumerate([(255, 0, 0), None, (0, 255, 0), None]):
        path = tmp_path / f"{i}.png"
        if color is None:
            path.write_bytes(b"" if i == 1 else b"garbage")
        else:
            Image.new("RGB", (40, 30), color).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("workers", [0, 1])
def test_rows_and_collate_drop_failures(tmp_path, workers):
    dataset = ImageRows(_rows(tmp_path), eval_transform(16))
    assert dataset[1][0] == 1 and dataset[1][1] is None and "empty file" in dataset[1][2]
    assert dataset[0][2] == "" and dataset[0][1].shape == (3, 16, 16)
    batches = list(DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=collate_rows))
    assert len(batches) == 1
    indices, images, failures = batches[0]
    assert indices.dtype == torch.int64 and indices.tolist() == [0, 2]
    assert images.shape == (2, 3, 16, 16)
    assert [i for i, _ in failures] == [1, 3]
    assert "empty file" in failures[0][1] and "not an image" in failures[1][1]


def test_collate_all_failed():
    indices, images, failures = collate_rows([(5, None, "empty file (0 bytes)")])
    assert indices.shape == (0,) and images.shape == (0, 3, 0, 0)
    assert failures == [(5, "empty file (0 bytes)")]
