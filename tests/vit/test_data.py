"""Decoding, the three augmentation recipes, label encoding and per-sample generators."""

from __future__ import annotations

import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from vit.data import (
    ImageTransform,
    build_transform,
    decode_image,
    encode_labels,
    inception_crop_box,
    normalize,
    sample_rng,
)


def encode(array: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient(height: int, width: int) -> np.ndarray:
    """A smooth RGB image: red grows left to right, green top to bottom."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return load_sample_images().images[0]  # a real 427x640 photo


@pytest.fixture(scope="module")
def big_jpeg(photo) -> bytes:
    """A 1920x1281 JPEG, large enough for the decoder to downscale by 4 for a 224 crop."""
    return encode(np.asarray(Image.fromarray(photo).resize((1920, 1281), Image.Resampling.BICUBIC)), quality=92)


# --- decoding ---------------------------------------------------------------------------------------


def test_decode_image_rgb(photo):
    image = decode_image(encode(photo))
    assert image.mode == "RGB" and image.size == (640, 427)
    gray = decode_image(encode(photo[..., 0]))  # an "L" JPEG comes back as RGB
    assert gray.mode == "RGB" and gray.size == (640, 427)
    png = decode_image(encode(photo, "PNG"), draft=(10, 10))  # draft is a no-op for other formats
    assert np.array_equal(np.asarray(png), photo)


def test_draft_downscales_but_stays_above_target(big_jpeg):
    full = decode_image(big_jpeg)
    small = decode_image(big_jpeg, draft=(300, 300))
    assert full.size == (1920, 1281)
    assert small.size == (480, 321)  # 1/4: 1/8 would leave 161 < 300 rows
    # Drafted pixel (i, j) covers full pixels [4i, 4i + 4) x [4j, 4j + 4); row 320 only covers row 1280.
    reference = np.asarray(full.resize((480, 320), Image.Resampling.BOX, box=(0, 0, 1920, 1280)), dtype=np.float32)
    assert np.abs(np.asarray(small, dtype=np.float32)[:320] - reference).mean() < 1.5


@pytest.mark.parametrize("recipe", ["pretrain", "finetune", "eval"])
def test_draft_matches_full_decode(big_jpeg, recipe):
    for seed in range(3):
        fast = ImageTransform(recipe, 224)(big_jpeg, np.random.default_rng(seed))
        exact = ImageTransform(recipe, 224, draft=False)(big_jpeg, np.random.default_rng(seed))
        assert fast.shape == exact.shape == (3, 224, 224)
        assert (fast.float() - exact.float()).abs().mean() < 2.0  # resampling noise (~1), not a shifted crop


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 50],
    ids=["empty", "garbage", "bad-header"],
)
def test_undecodable_bytes_raise(data):
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(data)
    with pytest.raises(ValueError, match="cannot decode"):
        build_transform("eval", 32)(data)


def test_truncated_jpeg_raises(photo):
    data = encode(photo)
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot decode"):
        build_transform("pretrain", 32)(data[: len(data) // 2], np.random.default_rng(0))


def test_oversized_image_raises(monkeypatch):
    data = encode(gradient(100, 100))
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(data, max_pixels=9_999)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    # Above Pillow's own limit: its warning never escapes; our limit decides (ValueError or a decode).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(data, max_pixels=6_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(data, max_pixels=20_000).size == (100, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000)
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(data)


# --- transforms -------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["pretrain", "finetune", "eval"])
@pytest.mark.parametrize("shape", [(427, 640), (640, 300), (7, 5), (1, 1)], ids=["wide", "tall", "tiny", "pixel"])
def test_transform_shape_dtype(photo, recipe, shape):
    array = np.asarray(Image.fromarray(photo).resize(shape[::-1]))
    out = build_transform(recipe, 32)(encode(array), np.random.default_rng(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8 and out.is_contiguous()
    assert out.float().std() > 0 or shape == (1, 1)


def test_eval_is_resize_then_central_crop(photo):
    data = encode(photo)
    out = ImageTransform("eval", 48, resize_size=64, draft=False)(data)
    reference = np.asarray(decode_image(data).resize((64, 64), Image.Resampling.BILINEAR))[8:56, 8:56]
    assert np.abs(out.permute(1, 2, 0).numpy().astype(int) - reference).max() <= 1
    assert torch.equal(out, ImageTransform("eval", 48, resize_size=64, draft=False)(data, np.random.default_rng(5)))


def test_eval_crop_is_centered():
    # A 200x100 image, blue, with a red rectangle over the region the central crop keeps after the
    # square resize to 64: x in [50, 150), y in [25, 75).
    array = np.zeros((100, 200, 3), np.uint8)
    array[..., 2] = 255
    array[25:75, 50:150] = (255, 0, 0)
    out = build_transform("eval", 32, resize_size=64)(encode(array, "PNG")).int()
    inner = out[:, 2:-2, 2:-2]
    assert (inner[0] > 240).all() and (inner[2] < 15).all()


def test_default_resize_size():
    assert build_transform("eval", 224).resize_size == 256
    assert build_transform("finetune", 384).resize_size == 439
    assert build_transform("pretrain", 224).resize_size is None
    with pytest.raises(ValueError, match="resize_size"):
        build_transform("eval", 224, resize_size=200)
    with pytest.raises(ValueError, match="recipe"):
        build_transform("train", 224)


def test_random_recipes_need_a_generator(photo):
    with pytest.raises(ValueError, match="generator"):
        build_transform("pretrain", 32)(encode(photo))


@pytest.mark.parametrize("recipe", ["pretrain", "finetune"])
def test_same_seed_same_output(photo, recipe):
    data, transform = encode(photo), build_transform(recipe, 32)
    first = transform(data, np.random.default_rng(7))
    assert torch.equal(first, transform(data, np.random.default_rng(7)))
    outputs = [transform(data, np.random.default_rng(seed)) for seed in range(5)]
    assert len({bytes(o.numpy()) for o in outputs}) == 5


def test_flip_happens_half_the_time():
    # With resize_size == size the finetune crop is the whole image, so the output is the image or its mirror.
    array = gradient(40, 40)
    transform = build_transform("finetune", 16, resize_size=16)
    plain = build_transform("eval", 16, resize_size=16)(encode(array, "PNG"))
    mirrored = plain.flip(-1)
    flips = 0
    for seed in range(400):
        out = transform(encode(array, "PNG"), np.random.default_rng(seed))
        assert torch.equal(out, plain) or torch.equal(out, mirrored)
        flips += torch.equal(out, mirrored)
    assert 0.4 < flips / 400 < 0.6


def test_inception_crop_statistics():
    rng = np.random.default_rng(0)
    width, height = 400, 300
    boxes = np.array([inception_crop_box(width, height, rng) for _ in range(3000)])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    area, ratio = w * h / (width * height), w / h
    assert area.min() >= 0.05 * 0.97 and area.max() <= 1.0
    assert ratio.min() >= 3 / 4 * 0.99 and ratio.max() <= 4 / 3 * 1.01
    assert area.min() < 0.07 and area.max() > 0.95  # the whole range is used
    assert np.log(ratio).min() < -0.25 and np.log(ratio).max() > 0.25
    assert 0.4 < area.mean() < 0.6
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    assert abs(centres.mean() - width / 2) < 5  # placed uniformly, no side favoured


def test_inception_crop_fallback_is_central():
    # 1000x10: no crop of >= 5% area with aspect <= 4/3 fits in 10 rows, so every attempt fails.
    assert inception_crop_box(1000, 10, np.random.default_rng(0)) == (493, 0, 506, 10)
    assert inception_crop_box(10, 1000, np.random.default_rng(0)) == (0, 493, 10, 506)
    assert inception_crop_box(1, 1, np.random.default_rng(0)) == (0, 0, 1, 1)


def test_crop_area_min_bounds_the_pretraining_crop_and_one_keeps_the_whole_image():
    photo = io.BytesIO()
    Image.fromarray(load_sample_images().images[0][:400, :400]).save(photo, format="PNG")  # square, as a glyph
    whole = build_transform("pretrain", 32, flip=False, crop_area_min=1.0)
    resized = torch.from_numpy(np.array(Image.open(photo).convert("RGB").resize((32, 32), Image.BILINEAR)))
    for seed in range(5):  # no crop fits at area 1 with another aspect: the fallback is the image itself
        assert torch.equal(whole(photo.getvalue(), np.random.default_rng(seed)), resized.permute(2, 0, 1))
    rng = np.random.default_rng(0)
    areas = [np.prod(np.diff(np.reshape(inception_crop_box(400, 300, rng, area_range=(0.5, 1.0)), (2, 2)), axis=0))
             for _ in range(500)]  # fmt: skip
    assert min(areas) >= 0.5 * 400 * 300 * 0.97
    with pytest.raises(ValueError, match="crop_area_min"):
        build_transform("pretrain", 32, crop_area_min=0.0)


def test_transform_pickles():
    transform = build_transform("finetune", 64)
    clone = pickle.loads(pickle.dumps(transform))
    assert clone == transform
    data = encode(gradient(50, 70))
    assert torch.equal(clone(data, np.random.default_rng(1)), transform(data, np.random.default_rng(1)))


def test_normalize():
    batch = torch.tensor([0, 255, 127], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = normalize(batch)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    assert out[0, 0].eq(-1).all() and out[0, 1].eq(1).all() and out[0, 2].abs().max() < 0.01
    assert normalize(batch, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="uint8"):
        normalize(out)


# --- labels, batching, generators -------------------------------------------------------------------


def test_encode_labels():
    single = encode_labels([3, 1], 5, multi_label=False)
    assert single.dtype == torch.int64 and single.shape == () and single.item() == 3
    multi = encode_labels([3, 1], 5, multi_label=True)
    assert multi.dtype == torch.float32 and multi.tolist() == [0, 1, 0, 1, 0]
    for bad in ([5], [-1], [0, 7]):
        with pytest.raises(ValueError, match="outside"):
            encode_labels(bad, 5, multi_label=True)
    with pytest.raises(ValueError, match="no labels"):
        encode_labels([], 5, multi_label=False)


def test_sample_rng():
    draw = lambda *args: sample_rng(*args).integers(0, 2**31, size=4).tolist()  # noqa: E731
    assert draw(0, 1, "shard-000/img-1") == draw(0, 1, "shard-000/img-1")
    distinct = {tuple(draw(*args)) for args in [(0, 1, "a"), (1, 1, "a"), (0, 2, "a"), (0, 1, "b"), (0, 1, "ab")]}
    assert len(distinct) == 5
