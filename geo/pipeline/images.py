"""Image decoding, the backbone's transforms, and a Dataset that survives bad images.

``load_rgb`` decodes one file fully (``Image.load()``, so a truncated JPEG is
caught here, not half-way through a batch), applies the EXIF orientation and
converts every mode to 8-bit RGB:

- grey ("L", "1"), CMYK, YCbCr, LAB, HSV: Pillow's conversion (CMYK without ICC);
- 16/32-bit grey ("I;16*", "I", "F"): scaled 65535 -> 255 (Pillow's own
  conversion clips at 255, turning most 16-bit photos white);
- alpha ("RGBA", "LA", "PA", "P" with transparency): composited on a white
  background (``background=``), as a browser shows a transparent photo on a page.

It never changes a Pillow global: ``LOAD_TRUNCATED_IMAGES`` stays False, and the
decompression-bomb limit is a check of its own (``max_pixels``, default
Pillow's 89,478,485) that raises ``ImageError``. Pillow's own hard stop at
2 x ``PIL.Image.MAX_IMAGE_PIXELS`` still applies, so a ``max_pixels`` above
that also needs ``PIL.Image.MAX_IMAGE_PIXELS`` raised.

Transforms: a ``Preprocess`` holds a backbone's own preprocessing (crop side,
resize side, interpolation, mean/std, crop mode), as torchvision, timm, OpenCLIP
or a Hugging Face image processor define it; torchvision models use ImageNet's
(Resize 256 -> CenterCrop 224, bilinear, ImageNet mean/std).
- train: RandomResizedCrop(size, scale=(0.25, 1)), horizontal flip, ColorJitter(0.2, 0.2, 0.2),
  with the backbone's interpolation and mean/std. The crop scale is milder than
  ImageNet's 0.08 and hue is left alone: the place is in the context and the
  colours (sky, soil, vegetation).
- eval: Resize of the short side (crop "center") or of both sides (crop "squash"),
  CenterCrop(size), the backbone's mean/std. At another size than the backbone's
  own (``Preprocess.at_size``) the resize/crop ratio is kept:
  Resize(round(size * 256 / 224)) for torchvision models.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

from geo.errors import GeoError
from geo.pipeline import shards

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS (about 9459 x 9459)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(GeoError):
    """An image that cannot be used; ``str(err)`` is the reason (recorded in /skipped)."""


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """8-bit RGB from any Pillow mode (rules: module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if mode != "F" or values.max(initial=0.0) > 1.0 else 255.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P":
        mode = "RGBA" if "transparency" in image.info else "RGB"
        image = image.convert(mode)
    if mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        canvas = Image.new("RGB", image.size, background)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")


def draft_request(width: int, height: int, short_side_px: int) -> tuple[int, int] | None:
    """The size to ask Pillow's ``draft`` for so that the short side stays >= ``short_side_px``.

    JPEG decoding can scale by 1/2, 1/4 or 1/8 in the DCT domain, far faster than a full
    decode and resize. ``draft`` picks the largest such reduction that keeps both sides
    at or above the request, so the transform's resize still only shrinks. None when the
    source is less than twice the target (no reduction is possible).
    """
    short = min(width, height)
    if short < 2 * short_side_px:
        return None
    scale = short_side_px / short
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def load_rgb(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
             background: tuple[int, int, int] = (255, 255, 255), draft_short_side: int | None = None) -> Image.Image:
    """Decode an image file to an upright 8-bit RGB ``PIL.Image``.

    Args:
        path: the image file, or a member of a shard (``CONTAINER#MEMBER``, ``geo.pipeline.shards``).
        max_pixels: refuse images with more pixels than this (decompression bombs);
            None = no limit of ours.
        background: RGB colour that transparent pixels are composited on.
        draft_short_side: decode JPEGs at a reduced scale (DCT scaling, ``draft_request``)
            whose short side is still >= this many pixels; None = full resolution.
    Raises:
        ImageError: missing, empty, not an image, truncated/corrupt, or too large;
            the message is the reason.
    """
    source = path
    if shards.split_member(str(path)) is not None:
        try:
            source = io.BytesIO(shards.read_member(str(path)))
        except shards.MemberError as err:
            raise ImageError(str(err)) from None
        if not source.getbuffer().nbytes:
            raise ImageError("empty member (0 bytes)")
    else:
        try:
            if os.path.getsize(path) == 0:
                raise ImageError("empty file (0 bytes)")
        except OSError as err:
            raise ImageError(f"cannot open: {err.strerror or err}") from None
    try:
        with warnings.catch_warnings():
            # Our own limit decides; Pillow's warning between 1x and 2x its limit is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageError(f"too large: {width}x{height} = {width * height} pixels "
                                     f"> limit {max_pixels} (possible decompression bomb)")
                if draft_short_side is not None:
                    request = draft_request(width, height, draft_short_side)
                    if request is not None:
                        image.draft(None, request)  # a no-op for formats other than JPEG
                image.load()  # decode now: a truncated file raises here
                try:
                    upright = ImageOps.exif_transpose(image)
                except Exception:  # a broken EXIF block must not cost the photo
                    upright = image.copy()
                rgb = _to_rgb(upright if upright is not None else image, background)
                return rgb.copy() if rgb is image else rgb
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (format not recognised)") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"too large: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, MemoryError) as err:
        # Pillow reports truncation and corrupt data as OSError / SyntaxError / ValueError.
        raise ImageError(f"corrupt or truncated image: {err}") from None


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
CROP_MODES = ("center", "squash")


@dataclass(frozen=True)
class Preprocess:
    """A backbone's preprocessing: PIL RGB -> float32 [3, image_size, image_size], normalised.

    image_size: side of the square crop fed to the model, pixels.
    resize_size: side the image is resized to first: the short side (crop "center", aspect
        kept) or both sides (crop "squash", aspect not kept); then CenterCrop(image_size).
    interpolation: one of ``INTERPOLATIONS``; mean, std: per RGB channel, of [0, 1] pixels.
    """

    image_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop: str = "center"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS or self.crop not in CROP_MODES:
            raise GeoError(f"preprocessing {self}: interpolation must be one of {INTERPOLATIONS}, "
                           f"crop one of {CROP_MODES}")
        # Tuples of plain floats: reprs and JSON round trips stay identical.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def at_size(self, image_size: int) -> "Preprocess":
        """The same preprocessing at crop side ``image_size``, keeping the resize/crop ratio."""
        if int(image_size) == self.image_size:
            return self
        return replace(self, image_size=int(image_size),
                       resize_size=round(int(image_size) * self.resize_size / self.image_size))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["image_size"]), int(d["resize_size"]), str(d["interpolation"]),
                   tuple(d["mean"]), tuple(d["std"]), str(d["crop"]))

    def _mode(self) -> T.InterpolationMode:
        return T.InterpolationMode(self.interpolation)

    def _normalize(self) -> list:
        return [T.ToTensor(), T.Normalize(self.mean, self.std)]

    def eval_transform(self) -> T.Compose:
        """Deterministic evaluation transform: PIL RGB -> float32 [3, image_size, image_size]."""
        size = self.resize_size if self.crop == "center" else (self.resize_size, self.resize_size)
        return T.Compose([T.Resize(size, interpolation=self._mode(), antialias=True),
                          T.CenterCrop(self.image_size), *self._normalize()])

    def train_transform(self) -> T.Compose:
        """Training augmentation of one image: PIL RGB -> uint8 [3, image_size, image_size].

        Random resized crop and flip; the colour jitter and normalisation run on the whole
        batch afterwards (``train_batch_transform``, applied by ``collate_rows``).
        """
        return T.Compose([
            T.RandomResizedCrop(self.image_size, scale=(0.25, 1.0), interpolation=self._mode(), antialias=True),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
        ])

    def train_batch_transform(self) -> "BatchColorJitter":
        """The batch half of the training augmentation: uint8 [b, 3, S, S] -> float32, normalised."""
        return BatchColorJitter(0.2, self.mean, self.std)


# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class BatchColorJitter:
    """Colour jitter and normalisation of a training batch: uint8 [b, 3, H, W] -> float32 [b, 3, H, W].

    Per image, brightness, contrast and saturation factors are drawn uniformly from
    [1 - jitter, 1 + jitter], as torchvision's ``ColorJitter`` does: brightness ``x * f``,
    contrast ``f x + (1 - f) mean(gray(x))``, saturation ``f x + (1 - f) gray(x)`` on [0, 1]
    pixels. Each step is affine in the pixel's colour (the contrast step's image mean is the
    same map of the input's channel means), so the three compose into one 3x3 matrix and
    offset per image, applied in one batched matmul: torchvision's per-image jitter costs
    ~0.6 ms an image of 64 px, most of the training loader's CPU time on 2 cores
    (``benchmarks/finetune.py``). Pixels are clamped to [0, 1] once at the end, where
    torchvision clamps after each step and applies the steps in a random order; without the
    intermediate clamps the steps commute (the gray weights sum to 1), so the two differ only
    where an intermediate step leaves [0, 1]. Then ``(x - mean) / std`` per channel.
    """

    jitter: float
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def sample(self, batch: int) -> torch.Tensor:
        """factors float32 [b, 3]: brightness, contrast, saturation per image (torch's RNG)."""
        return torch.empty(batch, 3).uniform_(1.0 - self.jitter, 1.0 + self.jitter)

    @staticmethod
    def colour_maps(channel_mean: torch.Tensor, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image affine colour map (matrix float64 [b, 3, 3], offset [b, 3, 1]) of
        brightness, then contrast, then saturation. channel_mean: float [b, 3], each input
        image's mean colour on [0, 1] (the contrast step's reference)."""
        f = factors.to(torch.float64)[:, :, None, None]  # [b, 3, 1, 1]
        brightness, contrast, saturation = f[:, 0], f[:, 1], f[:, 2]
        eye = torch.eye(3, dtype=torch.float64)
        to_gray = torch.ones(3, 1, dtype=torch.float64) @ torch.tensor([GRAY_WEIGHTS], dtype=torch.float64)  # 1 w^T
        mean_gray = to_gray @ (brightness * channel_mean.to(torch.float64)[:, :, None])  # of the brightened image
        saturate = saturation * eye + (1 - saturation) * to_gray                           # [b, 3, 3]
        return saturate * (contrast * brightness), saturate @ ((1 - contrast) * mean_gray)

    def apply(self, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """``images`` uint8 (0..255) or float ([0, 1]) [b, 3, H, W] jittered by ``factors`` [b, 3], normalised."""
        b, c, h, w = images.shape
        x = images.reshape(b, c, h * w).to(torch.float32)
        if images.dtype == torch.uint8:
            x = x.div_(255.0)
        matrix, offset = self.colour_maps(x.mean(dim=2, dtype=torch.float64), factors)
        out = torch.baddbmm(offset.to(torch.float32), matrix.to(torch.float32), x).clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean, dtype=torch.float32)[None, :, None]
        std = torch.tensor(self.std, dtype=torch.float32)[None, :, None]
        return out.sub_(mean).div_(std).reshape(b, c, h, w)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.sample(images.shape[0]))


# torchvision's ImageNet classifiers: Resize(256) -> CenterCrop(224), bilinear.
TORCHVISION_PREPROCESS = Preprocess(224, 256)


def train_transform(image_size: int) -> T.Compose:
    """Per-image training augmentation of torchvision models: PIL RGB -> uint8 [3, image_size, image_size]."""
    return TORCHVISION_PREPROCESS.at_size(image_size).train_transform()


def eval_transform(image_size: int) -> T.Compose:
    """Evaluation transform of torchvision models: PIL RGB -> float32 [3, image_size, image_size]."""
    return TORCHVISION_PREPROCESS.at_size(image_size).eval_transform()


def describe_transform(transform: Callable) -> str:
    """A one-line, deterministic description of a transform (for cache provenance)."""
    steps = getattr(transform, "transforms", [transform])
    return " -> ".join(" ".join(repr(step).split()) for step in steps)


class ImageRows(Dataset):
    """Rows of image files; item i -> (i, tensor [3,H,W], "") or (i, None, reason).

    Unreadable images do not raise: the reason travels with the row so the
    caller records it and the run goes on. Paths are held in one numpy array,
    not a Python list, so DataLoader workers do not copy them page by page
    (reference counts touch every list element).
    """

    def __init__(self, paths: Sequence[str], transform: Callable, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, draft_short_side: int | None = None):
        self.paths = np.asarray([str(p) for p in paths], dtype=str)
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_short_side = draft_short_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(str(self.paths[i]), max_pixels=self.max_pixels, draft_short_side=self.draft_short_side)
        except ImageError as err:
            return i, None, str(err)
        try:
            return i, self.transform(image), ""
        except Exception as err:  # a transform failing on one odd image must not stop the run
            return i, None, f"transform failed: {type(err).__name__}: {err}"


def collate_rows(items, batch_transform: Callable | None = None):
    """Collate ``ImageRows`` items, dropping the failed ones.

    batch_transform: applied to the stacked images (e.g. ``BatchColorJitter`` in training);
        it runs where the collation runs, in the DataLoader worker.
    Returns:
        (indices int64 [b], images float [b, 3, H, W], failures list[(index, reason)]);
        with no good row, indices is empty and images has shape [0, 3, 0, 0].
    """
    good = [(i, x) for i, x, reason in items if x is not None and not reason]
    failures = [(int(i), str(reason)) for i, x, reason in items if x is None or reason]
    if not good:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3, 0, 0), failures
    indices = torch.tensor([int(i) for i, _ in good], dtype=torch.int64)
    images = torch.stack([x for _, x in good])
    return indices, batch_transform(images) if batch_transform is not None else images, failures
