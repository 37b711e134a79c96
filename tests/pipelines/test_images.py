"""Every kind of awkward input the sharder meets, built as real bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipelines.data.images import ImagePolicy, RejectedImage, normalize_image


def photo(size=(64, 48), mode="RGB", seed=0) -> Image.Image:
    """A smooth, photo-like picture (gradients plus a block), so JPEG and phash behave naturally."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) * 255 // max(1, w + h - 2)], -1)
    rgb[h // 4 : h // 2, w // 4 : w // 2] = (np.random.default_rng(seed).integers(0, 255, 3)).astype(np.uint8)
    return (
        Image.fromarray(rgb.astype(np.uint8), "RGB").convert(mode)
        if mode != "RGB"
        else Image.fromarray(rgb.astype(np.uint8), "RGB")
    )


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_baseline_rgb_jpeg_keeps_its_bytes():
    data = encode(photo(), "JPEG", quality=90)
    out = normalize_image(data)
    assert out.data == data and not out.reencoded
    assert (out.width, out.height, out.source_format) == (64, 48, "JPEG")


@pytest.mark.parametrize(
    "make, source_mode",
    [
        (lambda: encode(photo(mode="CMYK"), "JPEG"), "CMYK"),
        (lambda: encode(photo(mode="L"), "JPEG"), "L"),
        (lambda: encode(photo(), "PNG"), "RGB"),
        (lambda: encode(photo(), "WEBP"), "RGB"),
        (lambda: encode(photo(), "BMP"), "RGB"),
        (lambda: encode(photo(mode="1"), "PNG"), "1"),
    ],
    ids=["cmyk-jpeg", "grayscale-jpeg", "png", "webp", "bmp", "bilevel"],
)
def test_other_modes_and_formats_become_rgb_jpeg(make, source_mode):
    out = normalize_image(make())
    assert out.reencoded and out.source_mode == source_mode
    image = decode(out.data)
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 48)


def test_cmyk_colours_survive_conversion():
    red = Image.new("RGB", (32, 32), (220, 30, 30))
    out = decode(normalize_image(encode(red.convert("CMYK"), "JPEG", quality=95)).data)
    r, g, b = np.asarray(out).reshape(-1, 3).mean(0)
    assert r > 180 and g < 70 and b < 70


def test_sixteen_bit_png_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 64), (32, 1)).astype(np.uint16)  # dark left, bright right
    data = encode(Image.fromarray(ramp), "PNG")  # uint16 -> mode I;16
    out = normalize_image(data)
    assert out.source_mode.startswith("I")
    pixels = np.asarray(decode(out.data).convert("L"), dtype=np.float64)
    assert pixels[:, :4].mean() < 20 and pixels[:, -4:].mean() > 235  # the full range is used


def test_palette_with_alpha_is_composited_on_the_background():
    rgba = Image.new("RGBA", (40, 40), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 20, 40))  # left half fully transparent
    palette = rgba.convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = palette.getpixel((0, 0))
    out = decode(normalize_image(encode(palette, "PNG", transparency=palette.getpixel((0, 0)))).data)
    left, right = np.asarray(out)[:, :16].mean((0, 1)), np.asarray(out)[:, 24:].mean((0, 1))
    assert left.min() > 230  # white background where transparent
    assert right[2] > 200 and right[0] < 60  # blue stays blue


def test_exif_rotation_is_applied():
    wide = photo(size=(80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = normalize_image(encode(wide, "JPEG", exif=exif.tobytes()))
    assert out.reencoded and (out.width, out.height) == (40, 80)
    assert decode(out.data).size == (40, 80)


def test_huge_images_are_resized_to_max_side():
    out = normalize_image(encode(photo(size=(1200, 600)), "JPEG"), ImagePolicy(max_side=256))
    assert (out.width, out.height) == (256, 128) and out.reencoded


def _png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose header claims another size: the classic decompression bomb shape."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = 8 + 8  # signature, then length + "IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def test_decompression_bomb_is_rejected_from_the_header():
    with pytest.raises(RejectedImage) as err:
        normalize_image(_png_claiming(50_000, 50_000))
    assert err.value.reason == "decompression-bomb"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, I am a text file\n" * 10, "not-an-image"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not-an-image"),
        (encode(photo(), "JPEG")[:600], "truncated"),
        (encode(photo(), "PNG")[:200], "truncated"),
        (encode(Image.new("RGB", (2, 2)), "PNG"), "too-small"),
    ],
    ids=["zero-bytes", "text", "random-bytes", "truncated-jpeg", "truncated-png", "too-small"],
)
def test_bad_inputs_are_rejected_with_a_reason(data, reason):
    with pytest.raises(RejectedImage) as err:
        normalize_image(data)
    assert err.value.reason == reason


def test_corrupt_pixel_data_is_rejected():
    data = bytearray(encode(photo(size=(128, 128)), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 20 : idat + 60] = b"\xff" * 40  # scramble the compressed stream, keep the length
    with pytest.raises(RejectedImage) as err:
        normalize_image(bytes(data))
    assert err.value.reason in ("corrupt", "truncated")


def test_oversized_files_are_rejected_before_decoding():
    with pytest.raises(RejectedImage) as err:
        normalize_image(b"\xff\xd8" + b"\0" * 2000, ImagePolicy(max_bytes=1000))
    assert err.value.reason == "file-too-large"


def test_perceptual_hash_finds_near_duplicates():
    original = photo(size=(96, 96), seed=1)
    recompressed = encode(original.resize((80, 80)), "JPEG", quality=60)
    other = encode(photo(size=(96, 96), seed=2).transpose(Image.Transpose.ROTATE_90), "JPEG")
    h0 = normalize_image(encode(original, "PNG"), with_phash=True).phash
    h1 = normalize_image(recompressed, with_phash=True).phash
    h2 = normalize_image(other, with_phash=True).phash

    def distance(a, b):
        return bin((a ^ b) & (2**64 - 1)).count("1")

    assert distance(h0, h1) <= 6 < distance(h0, h2)


def _jpeg_variants() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 1  # upright: still Pillow's path, which reads it
    return {
        "baseline": encode(photo(size=(72, 56)), "JPEG", quality=85),
        "progressive": encode(photo(size=(72, 56), seed=3), "JPEG", progressive=True),
        "4:4:4": encode(photo(size=(40, 72), seed=4), "JPEG", subsampling=0),
        "restart-markers": encode(photo(size=(64, 64), seed=5), "JPEG", restart_marker_blocks=2),
        "exif-upright": encode(photo(size=(48, 48), seed=6), "JPEG", exif=exif.tobytes()),
        "grayscale": encode(photo(mode="L"), "JPEG"),
        "cmyk": encode(photo(mode="CMYK"), "JPEG"),
    }


def test_plain_rgb_jpegs_take_the_libjpeg_turbo_check_and_the_rest_pillow():
    from pipelines.data.images import _plain_jpeg

    taken = {name for name, data in _jpeg_variants().items() if _plain_jpeg(data, ImagePolicy(), False)}
    assert taken == {"baseline", "progressive", "4:4:4", "restart-markers"}
    assert _plain_jpeg(_jpeg_variants()["baseline"], ImagePolicy(max_side=64), False) is None  # needs a resize


def test_the_fast_jpeg_check_and_pillow_agree_on_damaged_files():
    """Every verdict (kept, re-encoded, or rejected and why) of the libjpeg-turbo check is the one
    Pillow alone gives, over truncations, flipped bytes and cut-out runs of each kind of JPEG."""
    from pipelines.data.images import _normalize_with_pillow

    def verdict(check, data: bytes):
        try:
            out = check(data)
        except RejectedImage as err:
            return err.reason
        return (out.data == data, out.width, out.height, out.source_format, out.source_mode, out.phash)

    rng = np.random.default_rng(0)
    verdicts = []
    for data in _jpeg_variants().values():
        for trial in range(40):
            damaged = bytearray(data)
            at = int(rng.integers(2, len(data) - 12))
            if trial % 3 == 0:
                damaged = damaged[:at]
            elif trial % 3 == 1:
                damaged[at] ^= int(rng.integers(1, 256))
            else:
                del damaged[at : at + int(rng.integers(1, 12))]
            fast = verdict(lambda d: normalize_image(d, with_phash=True), bytes(damaged))
            assert fast == verdict(lambda d: _normalize_with_pillow(d, ImagePolicy(), True), bytes(damaged))
            verdicts.append(fast if isinstance(fast, str) else "kept" if fast[0] else "re-encoded")
    assert {"truncated", "kept", "re-encoded"} <= set(verdicts)  # the cases exercised both paths
