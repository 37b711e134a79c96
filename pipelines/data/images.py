"""Check and normalise one image file for the shards: every input ends up RGB JPEG or rejected.

Checking needs a full decode (a truncated JPEG opens fine and fails only when its pixels are
read), so the same decode also yields the perceptual hash used for de-duplication.

Most inputs are plain RGB JPEGs whose bytes are kept. Those are checked by libjpeg-turbo directly
(``simplejpeg``), decoding to luma only: every entropy-coded block of every component is still read,
so truncation and corruption fail exactly as in a full decode, while the chroma transforms and
Pillow's Python header parser (as costly as the decode itself for a small image) are skipped.
Anything else, and any JPEG libjpeg-turbo complains about, takes Pillow's path, whose verdict and
reason codes are the reference.

Rejections carry a short, stable reason code (the ``reason`` column of ``rejects.parquet``):

=====================  ======================================================================
``empty``              zero bytes
``file-too-large``     more bytes than ``ImagePolicy.max_bytes``
``not-an-image``       no image format recognised (text, random bytes, an archive)
``decompression-bomb`` the header declares more pixels than ``ImagePolicy.max_pixels``
``truncated``          the file ends before the pixel data does
``corrupt``            the decoder failed on the pixel data
``too-small``          a side shorter than ``ImagePolicy.min_side``
=====================  ======================================================================
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must fail, never be padded with grey: keep Pillow's strict default.
ImageFile.LOAD_TRUNCATED_IMAGES = False

REJECT_REASONS = ("empty", "file-too-large", "not-an-image", "decompression-bomb", "truncated", "corrupt", "too-small")
_EXIF_ORIENTATION = 0x0112
_SOI, _SOS = b"\xff\xd8", 0xDA
_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])  # markers without a length field


class RejectedImage(ValueError):
    """An input that cannot become a training image; ``reason`` is one of ``REJECT_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REJECT_REASONS, reason
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True, kw_only=True)
class ImagePolicy:
    max_bytes: int = 64 * 2**20  # larger files are rejected before decoding
    # Decompression-bomb guard, checked on the header before decoding. Pillow refuses on its own above
    # 2 x Image.MAX_IMAGE_PIXELS (179M by default); raise that too to allow larger images.
    max_pixels: int = 89_478_485
    max_side: int | None = None  # longer sides are resized down on ingest (aspect ratio kept)
    min_side: int = 4
    jpeg_quality: int = 95  # for re-encoded images
    background: tuple[int, int, int] = (255, 255, 255)  # transparent pixels are composited onto this


@dataclass(frozen=True)
class NormalizedImage:
    data: bytes  # RGB JPEG
    width: int
    height: int
    source_format: str  # what the file was: JPEG, PNG, ...
    source_mode: str  # its pixel mode: RGB, CMYK, P, I;16, ...
    reencoded: bool  # False when the original bytes were kept
    phash: int | None = None  # 64-bit perceptual hash, when asked for


def normalize_image(data: bytes, policy: ImagePolicy = ImagePolicy(), *, with_phash: bool = False) -> NormalizedImage:
    """Decode ``data`` fully, apply EXIF orientation, convert to 8-bit RGB, resize to ``max_side``.

    A file that is already a baseline RGB JPEG needing none of that keeps its exact bytes.
    Raises :class:`RejectedImage` for anything that cannot be used.
    """
    if not data:
        raise RejectedImage("empty")
    if len(data) > policy.max_bytes:
        raise RejectedImage("file-too-large", f"{len(data)} bytes > {policy.max_bytes}")
    kept = _plain_jpeg(data, policy, with_phash)
    return kept if kept is not None else _normalize_with_pillow(data, policy, with_phash)


def _normalize_with_pillow(data: bytes, policy: ImagePolicy, with_phash: bool) -> NormalizedImage:
    image = _open(data, policy)
    source_format, source_mode = image.format or "unknown", image.mode
    width, height = image.size
    if min(width, height) < policy.min_side:
        raise RejectedImage("too-small", f"{width}x{height} px")
    _decode(image)  # before getexif(), which decodes PNGs itself
    # Parsing EXIF costs as much as decoding a small JPEG: only when the file carries it.
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1) if "exif" in image.info else 1

    too_big = policy.max_side is not None and max(width, height) > policy.max_side
    keep = source_format == "JPEG" and source_mode == "RGB" and orientation in (0, 1) and not too_big
    if keep:
        rgb = image
    else:
        rgb = _to_rgb(ImageOps.exif_transpose(image), policy.background)
        if too_big:
            scale = policy.max_side / max(rgb.size)
            size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
            rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    phash = _phash(rgb) if with_phash else None
    if keep:
        return NormalizedImage(data, width, height, source_format, source_mode, False, phash)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=policy.jpeg_quality)
    return NormalizedImage(out.getvalue(), rgb.width, rgb.height, source_format, source_mode, True, phash)


def _plain_jpeg(data: bytes, policy: ImagePolicy, with_phash: bool) -> NormalizedImage | None:
    """The kept-bytes verdict for a baseline or progressive RGB JPEG that needs no change, or None for
    anything else (Pillow's path then converts, resizes or rejects it)."""
    if not data.startswith(_SOI) or not _plain_jpeg_segments(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    limit = policy.max_pixels if not Image.MAX_IMAGE_PIXELS else min(policy.max_pixels, 2 * Image.MAX_IMAGE_PIXELS)
    if (
        colorspace not in ("YCbCr", "RGB")  # what Pillow opens as mode RGB; grey, CMYK, YCCK are converted
        or width * height > limit
        or min(width, height) < policy.min_side
        or (policy.max_side is not None and max(width, height) > policy.max_side)
    ):
        return None
    try:
        # strict: libjpeg's warnings (premature end, corrupt data) are errors, as they are to Pillow
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB" if with_phash else "GRAY", strict=True)
    except ValueError:
        return None
    phash = _phash(Image.fromarray(pixels, "RGB")) if with_phash else None
    return NormalizedImage(data, width, height, "JPEG", "RGB", False, phash)


def _plain_jpeg_segments(data: bytes) -> bool:
    """Walks the JPEG's header segments up to the scan: False when one carries EXIF (which may rotate
    the image) or a multi-picture index (Pillow opens such a file as MPO, and it is re-encoded)."""
    position, end = 2, len(data)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return False  # not a marker where one must be: let Pillow name the problem
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == _SOS:
            return True
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xE1 and data[position + 4 : position + 10] == b"Exif\0\0":
            return False
        if marker == 0xE2 and data[position + 4 : position + 8] == b"MPF\0":
            return False
        position += 2 + length
    return False


def _open(data: bytes, policy: ImagePolicy) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # Pillow's own hard limit (2x MAX_IMAGE_PIXELS)
        raise RejectedImage("decompression-bomb", str(err)) from err
    except UnidentifiedImageError as err:
        raise RejectedImage("not-an-image", str(err)) from err
    except (OSError, SyntaxError, ValueError, struct.error) as err:  # broken headers
        raise RejectedImage(_reason(err), str(err)) from err
    width, height = image.size
    if width * height > policy.max_pixels:
        raise RejectedImage("decompression-bomb", f"{width}x{height} px > {policy.max_pixels} pixels")
    return image


def _decode(image: Image.Image) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        raise RejectedImage(_reason(err), str(err)) from err


def _reason(err: Exception) -> str:
    return "truncated" if "truncated" in str(err).lower() else "corrupt"


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit and float scaled, alpha composited, CMYK converted."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _phash(image: Image.Image) -> int:
    import imagehash

    bits = imagehash.phash(image).hash.flatten()  # 64 booleans
    return int(np.packbits(bits).view(">u8")[0].astype(np.int64))
