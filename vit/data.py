"""Decoding, augmentation and label encoding for the training and evaluation streams (PIL, numpy, torch).

A transform turns the raw bytes of one sample's image into a uint8 (3, size, size) tensor; the batch
is normalised to floats later, on the device (``normalize``), so workers ship 4x fewer bytes.

    transform = build_transform("pretrain", 224)
    image = transform(sample["jpg"], sample_rng(seed, epoch, sample["__key__"]))  # uint8 (3, 224, 224)
    target = encode_labels(meta["label_ids"], num_classes=1000, multi_label=False)

Each recipe decodes, crops and resizes with a single ``Image.resize(..., box=crop)`` call, and asks
the JPEG decoder for a power-of-two downscaled image (``Image.draft``) whenever the crop still spans
at least ``size`` pixels afterwards: decoding a 4000x3000 photo at 1/8 scale is several times faster
and the output is the same up to resampling noise.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image

Recipe = Literal["pretrain", "finetune", "eval"]
Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels, PIL's convention

MAX_PIXELS = 89_478_485  # Pillow's default decompression-bomb threshold (about 0.25 GiB of RGB)

# Errors Pillow raises on bytes that are not an image, are cut short or are corrupt.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


# --- decoding ---------------------------------------------------------------------------------------


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Read the header only (lazy), refusing empty input and images above ``max_pixels``."""
    if not data:
        raise ValueError("cannot decode image: no bytes")
    try:
        with warnings.catch_warnings():
            # ``max_pixels`` is enforced just below, as an error; Pillow's own warning would be a duplicate,
            # or a false alarm when the caller raised the limit on purpose. Pillow still refuses images
            # above twice its global ``Image.MAX_IMAGE_PIXELS``; that refusal becomes a ValueError here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except _DECODE_ERRORS as err:
        raise ValueError(f"cannot decode image ({len(data)} bytes): {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(
            f"image is {width}x{height} = {width * height} pixels, above max_pixels={max_pixels} "
            "(a decompression bomb, or pass a larger max_pixels)"
        )
    return image


def _load_rgb(image: Image.Image, num_bytes: int, draft: tuple[int, int] | None) -> tuple[Image.Image, float]:
    """Decode a lazily opened image to RGB; returns it and the JPEG downscale factor (1, 2, 4 or 8).

    ``draft`` asks libjpeg to decode at 1/2, 1/4 or 1/8 scale, the smallest that keeps both sides at
    least ``draft``: the decoder then skips most of the inverse DCT work instead of producing full-size
    pixels only for us to throw them away in the resize. Other formats ignore it.
    """
    scale = 1.0
    try:
        if draft is not None and image.format == "JPEG":
            original_width = image.size[0]
            drafted = image.draft("RGB", (max(1, draft[0]), max(1, draft[1])))
            if drafted is not None:
                scale = original_width / drafted[1][2]  # Pillow returns the box (0, 0, W / scale, H / scale)
        image.load()
        if image.mode != "RGB":
            image = image.convert("RGB")
    except _DECODE_ERRORS as err:
        raise ValueError(f"cannot decode image ({num_bytes} bytes, truncated or corrupt?): {err}") from err
    return image, scale


def decode_image(data: bytes, *, draft: tuple[int, int] | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes to an RGB PIL image; raises ValueError for empty, undecodable, truncated or oversized input.

    ``draft=(w, h)`` lets a JPEG decode at a power-of-two fraction of its size that is still at least
    ``w`` x ``h`` (when the image is that large); see ``_load_rgb``.
    """
    image = _open(data, max_pixels)
    return _load_rgb(image, len(data), draft)[0]


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a uint8 (3, H, W) tensor."""
    # np.array copies: np.asarray would give a read-only view that torch.from_numpy warns about.
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def normalize(batch: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels (B, 3, H, W) to ``dtype`` in [-1, 1] (x / 127.5 - 1, the paper's value range), on the same device.

    Float input is refused: it has almost certainly been normalised already.
    """
    if batch.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {batch.dtype} (already normalised?)")
    # Computed in float32 and cast once, so bfloat16 output is rounded once rather than twice.
    return (batch.float() / 127.5 - 1.0).to(dtype)


# --- crops ------------------------------------------------------------------------------------------


def inception_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    *,
    area_range: tuple[float, float] = (0.05, 1.0),
    ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """A random (left, top, right, bottom) box for an Inception-style crop of a ``width`` x ``height`` image.

    Draws an area fraction uniformly from ``area_range`` and an aspect ratio (w / h) log-uniformly from
    ``ratio_range``, places the box uniformly where it fits, and retries ``attempts`` times. When no
    draw fits (very elongated or tiny images) it falls back, like torchvision, to the largest central
    box whose aspect ratio is clamped into ``ratio_range``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
    for _ in range(attempts):
        target_area = area * rng.uniform(*area_range)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * ratio))
        h = round(math.sqrt(target_area / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < ratio_range[0]:  # too tall: full width, cut the height
        w, h = width, min(height, max(1, round(width / ratio_range[0])))
    elif ratio > ratio_range[1]:  # too wide: full height, cut the width
        w, h = min(width, max(1, round(height * ratio_range[1]))), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _square_resize_crop_box(width: int, height: int, resize_size: int, size: int, left: int, top: int) -> Box:
    """The box of the original image that becomes the ``size`` crop at (left, top) of the image resized
    (ignoring aspect) to ``resize_size`` squared. Pillow's ``resize(box=...)`` samples outside the box for
    the filter's support, so one call equals resize-then-crop."""
    sx, sy = width / resize_size, height / resize_size
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def _draft_for(width: int, height: int, box: Box, size: int) -> tuple[int, int]:
    """The draft request that keeps ``box`` at least ``size`` pixels on each side after JPEG downscaling.

    Pillow picks the largest scale s in {1, 2, 4, 8} with s <= min(W // w_req, H // h_req); requesting
    w_req = ceil(W * size / box_w) gives s <= box_w / size, so the crop is never upsampled from fewer
    pixels than a full decode would offer: a 5%-area crop of a big photo drafts little, a full-image
    crop drafts up to 1/8.
    """
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    eps = 1e-6  # float noise in the box must not push the request up by a whole pixel
    return math.ceil(width * size / box_w - eps), math.ceil(height * size / box_h - eps)


# --- transforms -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTransform:
    """Image bytes and a per-sample generator to a uint8 (3, size, size) tensor; picklable for workers.

    Recipes (those of the paper, after big_vision's preprocessing ops):

    - ``pretrain``: Inception crop (area ``crop_area_min``-100%, 5% by default, aspect 3/4-4/3, see
      ``inception_crop_box``) resized to ``size`` squared (bilinear), then a horizontal flip with probability 1/2.
    - ``finetune``: resize to ``resize_size`` squared, ignoring the aspect ratio (big_vision's ``resize``),
      a random ``size`` squared crop, then a horizontal flip with probability 1/2.
    - ``eval``: resize to ``resize_size`` squared and take the central ``size`` squared crop;
      deterministic (``rng`` may be None). ``resize_size=size`` makes it a plain resize.

    ``resize_size`` defaults to ``round(size * 8 / 7)`` (224 -> 256, 384 -> 439) for finetune/eval; the
    pretrain recipe does not use it. ``draft=False`` always decodes at full resolution (slower, exact).
    ``flip=False`` keeps the orientation, for data where a mirror image means something else (digits, text).
    ``crop_area_min`` is big_vision's ``inception_crop(area_min)``: a small image whose object fills it (a glyph,
    a digit) loses what makes it itself in a 5% crop.
    """

    recipe: Recipe
    size: int
    resize_size: int | None = None
    draft: bool = True
    flip: bool = True
    crop_area_min: float = 0.05

    def __post_init__(self) -> None:
        if self.recipe not in get_args(Recipe):
            raise ValueError(f"unknown recipe {self.recipe!r}; expected one of {get_args(Recipe)}")
        if not 0.0 < self.crop_area_min <= 1.0:
            raise ValueError(f"crop_area_min must be in (0, 1], got {self.crop_area_min}")
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.recipe != "pretrain":
            if self.resize_size is None:
                object.__setattr__(self, "resize_size", round(self.size * 8 / 7))
            elif self.resize_size < self.size:
                raise ValueError(f"resize_size={self.resize_size} is smaller than the crop size={self.size}")

    def __call__(self, data: bytes, rng: np.random.Generator | None = None) -> torch.Tensor:
        return _to_tensor(self.to_image(data, rng))

    def to_image(self, data: bytes, rng: np.random.Generator | None = None) -> Image.Image:
        """The transformed RGB image, for callers that copy its pixels straight into a batch."""
        if rng is None and self.recipe != "eval":
            raise ValueError(f"the {self.recipe} recipe is random: pass a generator (see sample_rng)")
        image = _open(data, MAX_PIXELS)
        width, height = image.size
        box, flip = self._plan(width, height, rng)
        draft = _draft_for(width, height, box, self.size) if self.draft else None
        image, scale = _load_rgb(image, len(data), draft)
        box = (box[0] / scale, box[1] / scale, box[2] / scale, box[3] / scale)
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def _plan(self, width: int, height: int, rng: np.random.Generator | None) -> tuple[Box, bool]:
        """The crop box in original pixels and whether to flip; all random draws happen here, in a fixed order."""
        if self.recipe == "pretrain":
            box = inception_crop_box(width, height, rng, area_range=(self.crop_area_min, 1.0))
            return box, bool(rng.random() < 0.5) and self.flip
        margin = self.resize_size - self.size
        if self.recipe == "finetune":
            left, top = int(rng.integers(0, margin + 1)), int(rng.integers(0, margin + 1))
            box = _square_resize_crop_box(width, height, self.resize_size, self.size, left, top)
            return box, bool(rng.random() < 0.5) and self.flip
        box = _square_resize_crop_box(width, height, self.resize_size, self.size, margin // 2, margin // 2)
        return box, False


def build_transform(
    recipe: Recipe, size: int, resize_size: int | None = None, *, flip: bool = True, crop_area_min: float = 0.05
) -> ImageTransform:
    """The transform for one recipe; see ``ImageTransform``."""
    return ImageTransform(recipe, size, resize_size, flip=flip, crop_area_min=crop_area_min)


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """A generator for one sample's augmentation, a pure function of (seed, epoch, sample key).

    Augmentation therefore does not depend on which worker or rank reads the sample, or on how many
    samples came before it, so a resumed run draws exactly what an uninterrupted one would have.
    """
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    words = np.frombuffer(digest, dtype="<u4").tolist()  # 4 x 32-bit words of the key's hash
    return np.random.default_rng([seed, epoch, *words])


# --- labels ----------------------------------------------------------------------------------------------


def encode_labels(
    label_ids: Sequence[int], num_classes: int, *, multi_label: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Class ids to a target: a float32 multi-hot (num_classes,) or, single-label, an int64 scalar (first id).

    ``out`` (such a tensor, e.g. a row of a batch) is filled instead of allocating a new one."""
    if len(label_ids) == 0:
        raise ValueError("sample has no labels")
    bad = [i for i in label_ids if not 0 <= i < num_classes]
    if bad:
        raise ValueError(f"label ids {bad} outside [0, {num_classes})")
    if not multi_label:
        if out is None:
            return torch.tensor(label_ids[0], dtype=torch.int64)
        return out.fill_(label_ids[0])
    target = torch.zeros(num_classes, dtype=torch.float32) if out is None else out.zero_()
    target[list(label_ids)] = 1.0
    return target
