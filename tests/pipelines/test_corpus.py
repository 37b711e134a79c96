"""Corpus writers: the synthetic JFT-style generator, the bundled digits, and the ``vit corpus`` command."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.data import corpus
from pipelines.data.corpus import (
    BACKGROUNDS,
    IMAGES_PER_DIR,
    MAX_CLASSES,
    SHAPES,
    import_digits,
    synth_corpus,
    synth_taxonomy,
)

VIT = shutil.which("vit", path=str(Path(sys.executable).parent)) or "vit"


def tree_bytes(url: str, storage_options: dict | None = None) -> dict[str, bytes]:
    """Every file under ``url``, by path relative to it."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return {path[len(root) + 1 :]: data for path, data in fs.cat(fs.find(root)).items()}  # s3fs fetches concurrently


def read_labels(url: str, storage_options: dict | None = None) -> list[dict]:
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    with fs.open(f"{root}/labels.parquet", "rb") as f:
        return pq.read_table(f).to_pylist()


def read_classes(url: str) -> list[dict]:
    return json.loads(Path(url, "classes.json").read_text())


def run_vit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VIT, *args], capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------------------------------------
# The synthetic corpus


def test_taxonomy_groups_classes_that_share_a_visual_trait():
    taxonomy = synth_taxonomy(100)
    assert len(taxonomy.classes) == 100 and len(taxonomy.superclasses) == 10
    assert len({c.name for c in taxonomy.classes}) == 100
    for cls in taxonomy.classes:
        superclass = taxonomy.superclasses[cls.superclass]
        assert cls.name.startswith(f"{superclass}/") and superclass == f"{cls.background}-{cls.shape}"
    assert len({c.background for c in taxonomy.classes}) > 1  # backgrounds vary even with few superclasses
    # The largest vocabulary still has no two classes that look alike by construction.
    largest = synth_taxonomy(MAX_CLASSES)
    assert len({(c.shape, c.background, c.hue, c.texture) for c in largest.classes}) == MAX_CLASSES
    assert len(set(largest.superclasses)) == len(SHAPES) * len(BACKGROUNDS)


def test_same_arguments_give_identical_bytes_whatever_the_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK_SIZE", 100)  # three chunks, so two workers share the work
    args = dict(images=260, classes=6, image_size=24)
    synth_corpus(str(tmp_path / "one"), workers=1, **args)
    synth_corpus(str(tmp_path / "two"), workers=2, **args)
    one, two = tree_bytes(str(tmp_path / "one")), tree_bytes(str(tmp_path / "two"))
    assert len(one) == 260 + 3 and one == two  # the images, classes.json, labels.parquet, the .vit-corpus marker
    synth_corpus(str(tmp_path / "seed1"), seed=1, **args)
    other_seed = tree_bytes(str(tmp_path / "seed1"))
    first = "images/00000/img-00000000.jpg"
    assert other_seed.keys() == one.keys() and other_seed[first] != one[first]


def test_every_file_is_a_jpeg_of_the_requested_size(tmp_path):
    summary = synth_corpus(str(tmp_path), images=60, classes=5, image_size=48)
    files = tree_bytes(str(tmp_path))
    images = {path: data for path, data in files.items() if path.endswith(".jpg")}
    assert len(images) == 60 and sum(map(len, images.values())) == summary.bytes
    for data in images.values():
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (48, 48)
            image.load()  # decodes the whole stream, not just the header


def test_label_table_is_consistent(tmp_path):
    classes, images = 12, 300
    summary = synth_corpus(str(tmp_path), images=images, classes=classes, superclasses=3)
    rows = read_labels(str(tmp_path))
    vocabulary = read_classes(str(tmp_path))
    names = {entry["id"]: entry["name"] for entry in vocabulary}
    parent = {entry["id"]: entry["superclass"] for entry in vocabulary}
    assert [e["id"] for e in vocabulary] == list(range(classes + 3))
    assert all(parent[i] is not None for i in range(classes)) and all(parent[classes + s] is None for s in range(3))

    assert summary.labels == f"{tmp_path}/labels.parquet" and len(rows) == images
    on_disk = {path for path in tree_bytes(str(tmp_path)) if path.endswith(".jpg")}
    assert {row["path"] for row in rows} == on_disk  # every path exists, and no file is unlisted
    assert len({row["key"] for row in rows}) == images
    for row in rows:
        assert "." not in row["key"] and row["path"].endswith(f"/{row['key']}.jpg")
        assert row["labels"] == [names[i] for i in row["label_ids"]] and row["label_ids"] == sorted(row["label_ids"])
        leaves = [i for i in row["label_ids"] if i < classes]
        superclasses = {names[i] for i in row["label_ids"] if i >= classes}
        assert 1 <= len(leaves) <= 3
        assert superclasses == {parent[i] for i in leaves}  # every leaf brings its superclass, and nothing else
        assert 0 <= row["primary_class"] < classes
    multi_label = sum(len([i for i in row["label_ids"] if i < classes]) > 1 for row in rows)
    assert multi_label > images / 2  # (1, 3) labels per image: two thirds have more than one
    clean = sum(row["primary_class"] in row["label_ids"] for row in rows)
    assert clean > 0.9 * images


@pytest.mark.parametrize("noise", [0.0, 0.25])
def test_label_noise_rate_is_as_requested(tmp_path, noise):
    synth_corpus(str(tmp_path), images=1200, classes=10, image_size=16, label_noise=noise)
    rows = read_labels(str(tmp_path))
    # A noisy image has one of its n leaf labels replaced, uniformly: the primary is lost with chance 1/n, so
    # n * [primary missing] estimates the noise rate without knowing which images were hit.
    estimate = np.mean(
        [len([i for i in r["label_ids"] if i < 10]) * (r["primary_class"] not in r["label_ids"]) for r in rows]
    )
    assert abs(estimate - noise) < 0.07, estimate


def test_classes_are_distinguishable_by_a_linear_classifier(tmp_path):
    from sklearn.linear_model import LogisticRegression

    synth_corpus(str(tmp_path), images=400, classes=4, image_size=32, seed=3)
    rows = read_labels(str(tmp_path))
    pixels = np.stack(
        [
            np.asarray(Image.open(tmp_path / row["path"]).resize((8, 8), Image.BOX), np.float32).ravel() / 255
            for row in rows
        ]
    )
    targets = np.array([row["primary_class"] for row in rows])
    assert np.bincount(targets, minlength=4).min() > 60
    classifier = LogisticRegression(max_iter=2000).fit(pixels[:300], targets[:300])
    # Chance is 25%; seeds 0..3 give 85-94% here, so a threshold of 60% is far from both.
    assert classifier.score(pixels[300:], targets[300:]) > 0.6


def test_folder_layout_sorts_the_same_images_by_primary_class(tmp_path):
    args = dict(images=40, classes=4, image_size=24)
    synth_corpus(str(tmp_path / "table"), layout="table", **args)
    summary = synth_corpus(str(tmp_path / "folder"), layout="folder", **args)
    assert summary.labels is None
    by_key = {Path(path).stem: data for path, data in tree_bytes(str(tmp_path / "table")).items() if ".jpg" in path}
    folder = {path: data for path, data in tree_bytes(str(tmp_path / "folder")).items() if ".jpg" in path}
    names = {entry["id"]: entry["name"] for entry in read_classes(str(tmp_path / "folder"))}
    for row in read_labels(str(tmp_path / "table")):
        path = f"{names[row['primary_class']].replace('/', '__')}/{row['key']}.jpg"
        assert folder.pop(path) == by_key[row["key"]]
    assert not folder

    sparse = tmp_path / "sparse"  # more classes than images: folders only for classes that have an image
    synth_corpus(str(sparse), images=5, classes=20, layout="folder")
    folders = {p.name for p in sparse.iterdir() if p.is_dir()}
    assert 1 <= len(folders) <= 5 and all(any(p.iterdir()) for p in sparse.iterdir() if p.is_dir())


def test_writes_to_s3_through_the_same_code_path(tmp_path, s3_bucket, s3_storage_options, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK_SIZE", 30)  # spawned workers write too, each with its own s3fs client
    args = dict(images=60, classes=5, image_size=24)
    url = f"{s3_bucket}/corpora/synth"
    summary = synth_corpus(url, workers=2, storage_options=s3_storage_options, **args)
    assert summary.labels == f"{url}/labels.parquet"
    synth_corpus(str(tmp_path), workers=1, **args)
    assert tree_bytes(url, s3_storage_options) == tree_bytes(str(tmp_path))
    rows = read_labels(url, s3_storage_options)
    assert len(rows) == 60 and rows[-1]["path"] == "images/00000/img-00000059.jpg"


def test_memory_filesystem_is_written_in_process():
    url = "memory://corpus-test/synth"
    try:
        synth_corpus(url, images=30, classes=3, image_size=16, workers=2)  # workers would write to their own memory
        assert len(read_labels(url)) == 30 and len(tree_bytes(url)) == 33  # + classes.json, labels.parquet, .vit-corpus
    finally:
        fsspec.filesystem("memory").rm("/corpus-test", recursive=True)


def test_existing_destination_is_kept_unless_overwrite(tmp_path):
    dst = tmp_path / "corpus"
    synth_corpus(str(dst), images=1200, classes=3, image_size=16)
    assert (dst / "images" / "00001").is_dir() and IMAGES_PER_DIR == 1000
    with pytest.raises(FileExistsError, match="not empty"):
        synth_corpus(str(dst), images=10, classes=3, image_size=16)
    synth_corpus(str(dst), images=10, classes=3, image_size=16, overwrite=True)
    assert not (dst / "images" / "00001").exists()  # no stale images of the bigger run
    assert len(read_labels(str(dst))) == 10

    stranger = tmp_path / "not-a-corpus"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing"):
        synth_corpus(str(stranger), images=10, classes=3, overwrite=True)
    assert (stranger / "thesis.tex").read_text() == "precious"
    # A folder with a classes.json is not ours for that alone: a user's ImageFolder tree, or a shard output.
    (stranger / "classes.json").write_text('["cat", "dog"]')
    (stranger / "cat").mkdir()
    (stranger / "cat" / "tom.jpg").write_bytes(b"a photo")
    with pytest.raises(FileExistsError, match="not a corpus written by `vit corpus`"):
        synth_corpus(str(stranger), images=10, classes=3, overwrite=True)
    assert (stranger / "cat" / "tom.jpg").read_bytes() == b"a photo"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(images=0), "images must be at least 1"),
        (dict(classes=1), "classes must be between 2"),
        (dict(classes=MAX_CLASSES + 1), "classes must be between 2"),
        (dict(superclasses=9), "superclasses must be between"),
        (dict(labels_per_image=(2, 5)), "labels_per_image"),
        (dict(label_noise=1.5), "label_noise"),
        (dict(image_size=8), "image_size"),
        (dict(workers=0), "workers"),
        (dict(layout="tar"), "layout"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, overrides, message):
    args = dict(images=10, classes=4) | overrides
    with pytest.raises(ValueError, match=message):
        synth_corpus(str(tmp_path / "corpus"), **args)
    assert not (tmp_path / "corpus").exists()


# --------------------------------------------------------------------------------------------------------------------
# The bundled digits


def test_digits_are_written_as_a_stratified_labelled_png_set(tmp_path):
    from sklearn.datasets import load_digits

    dst = str(tmp_path / "digits")
    summary = import_digits(dst, scale=4, split_fraction=0.2)
    digits = load_digits()
    rows = read_labels(dst)
    files = tree_bytes(dst)
    assert summary.images == len(rows) == 1797 and len(files) == 1797 + 3
    assert summary.splits == {"train": 1437, "test": 360}
    assert [e["name"] for e in read_classes(dst)] == [str(d) for d in range(10)]
    counts = np.bincount(digits.target)
    for digit in range(10):
        in_test = sum(row["split"] == "test" and row["label_ids"] == [digit] for row in rows)
        assert abs(in_test - 0.2 * counts[digit]) <= 1  # stratified: every digit keeps its share
    for index, row in enumerate(rows):
        digit = int(digits.target[index])
        assert row["path"] == f"{row['split']}/{digit}/{row['key']}.png"
        assert row["labels"] == [str(digit)] and row["label_ids"] == [digit] and row["primary_class"] == digit
    for index in (0, 1, 1796):
        with Image.open(io.BytesIO(files[rows[index]["path"]])) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
            pixels = np.asarray(image)
        expected = np.rint(digits.images[index] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(pixels[::4, ::4, 0], expected)  # lossless, nearest-neighbour upscaling
        np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    import_digits(str(tmp_path / "again"))
    assert tree_bytes(str(tmp_path / "again")) == files  # deterministic, PNG encoding included


# --------------------------------------------------------------------------------------------------------------------
# The command


def test_cli_synth_writes_and_summarises(tmp_path):
    dst = tmp_path / "synth"
    result = run_vit("corpus", "synth", str(dst), "--images", "30", "--classes", "3", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert f"wrote 30 images (3 classes, 2 superclasses) to {dst}" in result.stdout
    assert "images/s" in result.stdout and "MB" in result.stdout
    assert len(read_labels(str(dst))) == 30

    refused = run_vit("corpus", "synth", str(dst), "--images", "30", "--classes", "3")
    assert refused.returncode == 2 and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    folder = run_vit(
        "corpus", "synth", str(dst), "--images", "12", "--classes", "3", "--layout", "folder", "--overwrite"
    )
    assert folder.returncode == 0, folder.stderr
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        [
            ".vit-corpus",
            "classes.json",
            *(e["name"].replace("/", "__") for e in read_classes(str(dst)) if e["superclass"]),
        ]
    )


def test_cli_synth_writes_scanned_glyphs(tmp_path):
    dst = tmp_path / "glyphs"
    args = ["--images", "6", "--classes", "3", "--image-size", "32", "--style", "glyphs", "--scan-size", "8"]
    result = run_vit("corpus", "synth", str(dst), *args)
    assert result.returncode == 0, result.stderr
    pngs = sorted(dst.rglob("*.png"))
    assert len(pngs) == 6 and len(read_labels(str(dst))) == 6
    with Image.open(pngs[0]) as image:
        blocks = np.asarray(image.convert("L")).reshape(8, 4, 8, 4)
    assert (blocks == blocks[:, :1, :, :1]).all()  # scanned at 8 px
    refused = run_vit("corpus", "synth", str(tmp_path / "x"), *args[:-1], "64")
    assert refused.returncode == 2 and "scan_size must be between 0" in refused.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--images", "0", "--classes", "3"], "images must be at least 1"),
        (["--images", "5", "--classes", "1"], "classes must be between 2"),
        (["--images", "5", "--classes", "3", "--layout", "tar"], "tar"),
        (["--classes", "3"], "--images"),
    ],
)
def test_cli_synth_refuses_bad_arguments(tmp_path, args, message):
    result = run_vit("corpus", "synth", str(tmp_path / "synth"), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "synth").exists()


def test_cli_digits(tmp_path):
    result = run_vit("corpus", "digits", str(tmp_path / "digits"), "--scale", "2")
    assert result.returncode == 0, result.stderr
    assert "wrote 1,797 images (10 classes)" in result.stdout and "train 1,437, test 360" in result.stdout
    with Image.open(next((tmp_path / "digits" / "test" / "7").iterdir())) as image:
        assert image.size == (16, 16)
    bad = run_vit("corpus", "digits", str(tmp_path / "other"), "--scale", "0")
    assert bad.returncode == 2 and "scale must be at least 1" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------------------------------------------------
# The glyph style: handwritten strokes, scanned like the digits


def test_glyph_families_share_a_stroke_and_the_alphabet_does_not_depend_on_the_corpus_seed():
    from pipelines.data.glyphs import glyph_taxonomy

    taxonomy = glyph_taxonomy(60, superclasses=6)
    assert len(taxonomy.classes) == 60 and len(set(taxonomy.superclasses)) == 6
    for family in range(6):
        members = [c for c in taxonomy.classes if c.superclass == family]
        assert len(members) == 10 and len({c.strokes[0] for c in members}) == 1  # the family's stroke
        assert len({c.strokes[1:] for c in members}) == 10  # each glyph its own strokes
    assert len({c.strokes[0] for c in taxonomy.classes}) == 6
    assert glyph_taxonomy(60, superclasses=6) == taxonomy
    with pytest.raises(ValueError, match="superclasses must be between 1 and 60"):
        glyph_taxonomy(60, superclasses=61)


def test_glyph_corpus_is_png_scans_with_one_glyph_and_its_family_per_image(tmp_path):
    summary = synth_corpus(
        str(tmp_path / "g"), images=80, classes=8, superclasses=2, image_size=32, style="glyphs", scan_size=8,
        label_noise=0.0,
    )  # fmt: skip
    files = tree_bytes(str(tmp_path / "g"))
    pngs = {path: data for path, data in files.items() if path.endswith(".png")}
    assert len(pngs) == 80 == summary.images and sum(map(len, pngs.values())) == summary.bytes
    levels = set()
    for data in pngs.values():
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.size == (32, 32)
            pixels = np.asarray(image.convert("RGB"))
        assert (pixels == pixels[..., :1]).all()  # grey ink
        blocks = pixels[..., 0].reshape(8, 4, 8, 4)
        assert (blocks == blocks[:, :1, :, :1]).all()  # an 8 px scan shown with square 4x4 pixels
        levels |= set(np.unique(pixels).tolist())
    assert levels <= {round(i * 255 / 16) for i in range(17)} and len(levels) > 8  # the digits' 17 ink levels
    for row in read_labels(str(tmp_path / "g")):
        leaf, family = row["label_ids"]
        assert leaf == row["primary_class"] and family == 8 + leaf * 2 // 8
    same = synth_corpus(str(tmp_path / "again"), images=80, classes=8, superclasses=2, image_size=32,
                        style="glyphs", scan_size=8, label_noise=0.0)  # fmt: skip
    assert same.bytes == summary.bytes and tree_bytes(str(tmp_path / "again")) == files


def test_glyph_corpus_refuses_several_objects_and_a_scan_larger_than_the_image(tmp_path):
    with pytest.raises(ValueError, match=r"\(1, 1\) for glyphs"):
        synth_corpus(str(tmp_path / "a"), images=4, classes=4, style="glyphs", labels_per_image=(1, 2))
    with pytest.raises(ValueError, match="scan_size must be between 0"):
        synth_corpus(str(tmp_path / "b"), images=4, classes=4, image_size=32, style="glyphs", scan_size=64)
    with pytest.raises(ValueError, match="style must be"):
        synth_corpus(str(tmp_path / "c"), images=4, classes=4, style="letters")  # type: ignore[arg-type]
