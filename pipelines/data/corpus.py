"""Corpora for the sharding job: a synthetic JFT-style generator and the real digits bundled with scikit-learn.

A corpus lives at an fsspec URL (a local folder, ``s3://bucket/prefix``, ``memory://name``) in one of two layouts:

    table   {root}/images/{00000..}/{key}.jpg, labels.parquet, classes.json   multi-label, like JFT
    folder  {root}/{class}/{key}.jpg, classes.json                            ImageFolder, single-label

``labels.parquet`` has one row per image: ``path`` (relative to the root), ``key`` (no dots, so it survives
WebDataset's key splitting), ``labels`` (names), ``label_ids`` (ints, sorted), ``primary_class`` (the clean class of
the dominant object: for evaluation, never for training) and, where the corpus is split, ``split``.
``classes.json`` is the label vocabulary, ``[{"id", "name", "superclass"}]``: leaf classes first (ids 0..K-1, so a
``primary_class`` indexes a leaf directly), then the superclasses (ids K..K+S-1, ``superclass`` null).

``classes.json`` is written first and ``labels.parquet`` last, so a table corpus without the label table is an
unfinished run. ``overwrite=True`` replaces only folders holding a ``classes.json``: never someone else's files.
"""

from __future__ import annotations

import colorsys
import io
import math
import multiprocessing
import posixpath
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipelines.common.storage import filesystem, join, write_json

# The visual vocabulary. A superclass is a (shape, background) pair, so every class in it shares both traits;
# a class inside it is a (hue, texture) pair. No shape is a rotation of another (hence no diamond beside the square).
SHAPES = ("circle", "square", "triangle", "cross", "star", "ring", "crescent", "bars", "chevron", "ellipse")
BACKGROUNDS = ("plain", "speckled", "gradient", "grid")
HUES = ("red", "orange", "yellow", "lime", "green", "jade", "cyan", "azure", "blue", "violet", "purple", "magenta")
TEXTURES = ("solid", "striped", "dotted", "hollow", "checked", "twotone")
MAX_SUPERCLASSES = len(SHAPES) * len(BACKGROUNDS)  # 40
MAX_CLASSES_PER_SUPERCLASS = len(HUES) * len(TEXTURES)  # 72
MAX_CLASSES = MAX_SUPERCLASSES * MAX_CLASSES_PER_SUPERCLASS  # 2,880

IMAGES_PER_DIR = 1000  # keeps listings short on local disks and S3 consoles
CHUNK_SIZE = 250  # images per worker task: small enough to balance 2 workers on a few hundred images
JPEG_QUALITY = 90
_SUPERSAMPLE = 2  # shape masks are drawn at 2x and box-filtered, for anti-aliased edges

Layout = Literal["table", "folder"]


@dataclass(frozen=True)
class SynthClass:
    id: int
    name: str  # "speckled-star/red-striped": superclass/class, readable in confusion matrices
    superclass: int  # index among the superclasses (its label id is num_classes + superclass)
    shape: str
    background: str
    hue: str
    texture: str


@dataclass(frozen=True)
class Taxonomy:
    classes: tuple[SynthClass, ...]
    superclasses: tuple[str, ...]

    def vocabulary(self) -> list[dict[str, Any]]:
        """The ``classes.json`` entries: leaf classes, then superclasses."""
        leaves = [{"id": c.id, "name": c.name, "superclass": self.superclasses[c.superclass]} for c in self.classes]
        k = len(self.classes)
        return leaves + [{"id": k + s, "name": name, "superclass": None} for s, name in enumerate(self.superclasses)]


@dataclass(frozen=True)
class CorpusSummary:
    root: str  # the corpus URL as given
    layout: Layout
    images: int
    classes: int  # leaf classes; the label vocabulary adds the superclasses
    superclasses: int
    bytes: int  # encoded image bytes written
    seconds: float
    classes_file: str
    labels: str | None  # the label table's URL; None for the folder layout, whose folders are the labels
    splits: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


SynthSummary = CorpusSummary  # what synth_corpus returns; import_digits returns the same record


def synth_taxonomy(classes: int, superclasses: int | None = None) -> Taxonomy:
    """Name ``classes`` leaf classes and group them into superclasses (about sqrt(classes) by default)."""
    if not 2 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be between 2 and {MAX_CLASSES} (distinct visual classes), got {classes}")
    fewest = math.ceil(classes / MAX_CLASSES_PER_SUPERCLASS)
    if superclasses is None:
        superclasses = min(MAX_SUPERCLASSES, max(fewest, round(math.sqrt(classes))))
    elif not max(1, fewest) <= superclasses <= min(MAX_SUPERCLASSES, classes):
        raise ValueError(
            f"superclasses must be between {max(1, fewest)} and {min(MAX_SUPERCLASSES, classes)} for {classes} "
            f"classes (each holds at most {MAX_CLASSES_PER_SUPERCLASS}), got {superclasses}"
        )
    # Superclass s gets shape s mod 10 and a background that also varies among the first ten; (shape, background)
    # stays unique up to 40 because s and s + 10k differ by 11k (not a multiple of 4) in the background index.
    shapes = [SHAPES[s % len(SHAPES)] for s in range(superclasses)]
    backgrounds = [BACKGROUNDS[(s + s // len(SHAPES)) % len(BACKGROUNDS)] for s in range(superclasses)]
    names = tuple(f"{background}-{shape}" for background, shape in zip(backgrounds, shapes))
    leaves = []
    for s in range(superclasses):
        first, stop = s * classes // superclasses, (s + 1) * classes // superclasses
        for j in range(stop - first):
            # Step 5 is coprime to 12, so consecutive classes sit 150 degrees apart on the hue circle. A hue comes back
            # every 12 classes, by when the texture index has moved on by 13 (1 mod 6): no (hue, texture) repeats
            # among the 72 classes a superclass can hold.
            hue = HUES[(5 * j + 3 * s) % len(HUES)]
            texture = TEXTURES[(j + j // len(HUES) + s) % len(TEXTURES)]
            leaves.append(
                SynthClass(
                    id=first + j,
                    name=f"{names[s]}/{hue}-{texture}",
                    superclass=s,
                    shape=shapes[s],
                    background=backgrounds[s],
                    hue=hue,
                    texture=texture,
                )
            )
    return Taxonomy(classes=tuple(leaves), superclasses=names)


# --------------------------------------------------------------------------------------------------------------------
# Labels and pixels of one image. Everything random comes from the image's own generator, seeded by (seed, index):
# an image depends on nothing else, so chunking and the worker count cannot change a byte.


def plan_labels(
    rng: np.random.Generator, num_classes: int, labels_per_image: tuple[int, int], label_noise: float
) -> tuple[list[int], list[int]]:
    """Draw the classes shown in an image (primary first) and its noisy leaf labels (sorted ids)."""
    count = int(rng.integers(labels_per_image[0], labels_per_image[1] + 1))
    shown = [int(c) for c in rng.choice(num_classes, size=count, replace=False)]
    labels = list(shown)
    if rng.random() < label_noise and count < num_classes:
        # One annotation goes wrong: it names a class that is not in the picture.
        absent = np.setdiff1d(np.arange(num_classes), shown)
        labels[int(rng.integers(count))] = int(absent[rng.integers(len(absent))])
    return shown, sorted(labels)


def render_image(rng: np.random.Generator, shown: Sequence[int], taxonomy: Taxonomy, size: int) -> Image.Image:
    """An RGB image: the primary class's shape large, the others' small, on its superclass's background."""
    primary = taxonomy.classes[shown[0]]
    canvas = _background(rng, primary.background, size)
    for rank, class_id in enumerate(shown):
        cls = taxonomy.classes[class_id]
        radius = size * (rng.uniform(0.24, 0.36) if rank == 0 else rng.uniform(0.10, 0.16))
        margin = radius * (0.8 if rank == 0 else 1.0)  # the primary may be cropped a little, like a real photo
        cx, cy = rng.uniform(margin, size - margin, size=2)
        theta = rng.uniform(0.0, 2 * math.pi)
        mask = _shape_mask(cls.shape, size, cx, cy, radius, theta, hollow=cls.texture == "hollow")
        fill = _texture(rng, cls, size, cx, cy)
        canvas += mask[..., None] * (fill - canvas)
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(4.0, 12.0)
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.meshgrid(np.arange(size, dtype=np.float32) + 0.5, np.arange(size, dtype=np.float32) + 0.5)
    return x, y


def _background(rng: np.random.Generator, style: str, size: int) -> np.ndarray:
    # A random, low-saturation base colour per image, so that only the style (a superclass trait) carries signal.
    base = rng.uniform(50, 205) + rng.uniform(-25, 25, size=3)
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = base
    x, y = _grid(size)
    if style == "gradient":
        phi = rng.uniform(0, 2 * math.pi)
        ramp = ((x - size / 2) * math.cos(phi) + (y - size / 2) * math.sin(phi)) / size
        canvas += ramp[..., None] * rng.uniform(80, 140)
    elif style == "speckled":
        cell = max(1, size // 64)  # specks keep their share of the image at any resolution
        cells = -(-size // cell)
        specks = (rng.random((cells, cells)) < 0.07) * rng.uniform(-90, 90, size=(cells, cells))
        canvas += np.kron(specks, np.ones((cell, cell)))[:size, :size, None].astype(np.float32)
    elif style == "grid":
        period, width = size / rng.uniform(4.5, 7.0), max(1.0, size / 48)
        dx, dy = rng.uniform(0, period, size=2)
        lines = ((x + dx) % period < width) | ((y + dy) % period < width)
        canvas[lines] += rng.choice([-1.0, 1.0]) * rng.uniform(45, 70)
    return canvas


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, theta: float, hollow: bool) -> np.ndarray:
    """Coverage in [0, 1] of a shape centred at (cx, cy) with radius r, turned by theta."""
    ss = _SUPERSAMPLE
    image = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(image)
    _draw_shape(draw, shape, cx * ss, cy * ss, r * ss, theta, fill=255)
    if hollow:
        _draw_shape(draw, shape, cx * ss, cy * ss, r * ss * 0.72, theta, fill=0)  # thinner than a ring (0.52)
    return np.asarray(image.reduce(ss), dtype=np.float32) * (1 / 255)


def _ring_of_points(radii: Sequence[float], start: float = math.pi / 2) -> list[tuple[float, float]]:
    """Points at the given radii, evenly spaced in angle (a regular polygon, or a star with alternating radii)."""
    step = 2 * math.pi / len(radii)
    return [(r * math.cos(start + k * step), r * math.sin(start + k * step)) for k, r in enumerate(radii)]


# Polygon outlines in units of the shape's radius, centred on the origin, before rotation; scaled so that the shapes
# cover similar areas. Circles, rings, crescents and bars are drawn in _draw_shape.
_ARM = 0.33  # half-width of the cross's arms
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": _ring_of_points([1.15] * 3),
    "star": _ring_of_points([1.15, 0.48] * 5),
    "ellipse": [(1.25 * x, 0.6 * y) for x, y in _ring_of_points([1.0] * 32)],
    "cross": [
        (_ARM, 1),
        (_ARM, _ARM),
        (1, _ARM),
        (1, -_ARM),
        (_ARM, -_ARM),
        (_ARM, -1),
        (-_ARM, -1),
        (-_ARM, -_ARM),
        (-1, -_ARM),
        (-1, _ARM),
        (-_ARM, _ARM),
        (-_ARM, 1),
    ],
    "chevron": [(-1, 0.3), (0, -0.7), (1, 0.3), (1, 0.8), (0, -0.2), (-1, 0.8)],
}
_BARS = [[(-1, y - 0.2), (1, y - 0.2), (1, y + 0.2), (-1, y + 0.2)] for y in (-0.66, 0.0, 0.66)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, theta: float, fill: int) -> None:
    cos, sin = math.cos(theta), math.sin(theta)

    def place(u: float, v: float) -> tuple[float, float]:
        return cx + r * (u * cos - v * sin), cy + r * (u * sin + v * cos)

    def disc(u: float, v: float, radius: float, value: int) -> None:
        x, y = place(u, v)
        draw.ellipse((x - r * radius, y - r * radius, x + r * radius, y + r * radius), fill=value)

    if shape == "circle":
        disc(0, 0, 1.0, fill)
    elif shape == "ring":
        disc(0, 0, 1.05, fill)
        disc(0, 0, 0.55, 0)
    elif shape == "crescent":
        disc(0, 0, 1.05, fill)
        disc(0.45, 0, 0.85, 0)
    elif shape == "bars":
        for bar in _BARS:
            draw.polygon([place(u, v) for u, v in bar], fill=fill)
    elif shape in _OUTLINES:
        draw.polygon([place(u, v) for u, v in _OUTLINES[shape]], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _texture(rng: np.random.Generator, cls: SynthClass, size: int, cx: float, cy: float) -> np.ndarray:
    """The colour field a shape is cut from: the class hue (jittered) in the class's pattern."""
    hue = (HUES.index(cls.hue) * 30 + rng.uniform(-8, 8)) % 360
    fg = np.array(colorsys.hsv_to_rgb(hue / 360, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)), np.float32) * 255
    if cls.texture in ("solid", "hollow"):
        return np.broadcast_to(fg, (size, size, 3))
    x, y = _grid(size)
    phi = rng.uniform(0, math.pi)
    u = (x - cx) * math.cos(phi) + (y - cy) * math.sin(phi)
    v = (y - cy) * math.cos(phi) - (x - cx) * math.sin(phi)
    period = size / 9 * rng.uniform(0.85, 1.15)
    dark, light = fg * 0.3, fg * 0.4 + 255 * 0.6
    if cls.texture == "striped":
        on, other = (u / period) % 1 < 0.5, dark
    elif cls.texture == "dotted":
        on, other = ((u % period) - period / 2) ** 2 + ((v % period) - period / 2) ** 2 < (0.3 * period) ** 2, dark
    elif cls.texture == "checked":
        on, other = (np.floor(u / period) + np.floor(v / period)) % 2 == 0, light
    elif cls.texture == "twotone":
        on, other = u < 0, light
    else:
        raise ValueError(f"unknown texture {cls.texture!r}")
    return np.where(on[..., None], other, fg)


# --------------------------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class _SynthSpec:
    """What one worker needs to write any image of the corpus, picklable for a spawned process."""

    dst: str
    storage_options: dict[str, Any]
    taxonomy: Taxonomy
    seed: int
    image_size: int
    labels_per_image: tuple[int, int]
    label_noise: float
    layout: Layout
    key_digits: int


def _image_key(index: int, digits: int) -> str:
    return f"img-{index:0{digits}d}"


def _image_path(spec: _SynthSpec, index: int, primary: int) -> str:
    key = _image_key(index, spec.key_digits)
    if spec.layout == "table":
        return f"images/{index // IMAGES_PER_DIR:05d}/{key}.jpg"
    return f"{_folder_name(spec.taxonomy.classes[primary].name)}/{key}.jpg"


def _folder_name(class_name: str) -> str:
    return class_name.replace("/", "__")


def _write_chunk(spec: _SynthSpec, start: int, stop: int) -> dict[str, list]:
    """Render, encode and write images ``start..stop-1``; return only their metadata."""
    fs, root = filesystem(spec.dst, spec.storage_options)
    num_classes = len(spec.taxonomy.classes)
    rows: dict[str, list] = {"path": [], "key": [], "labels": [], "label_ids": [], "primary_class": [], "bytes": []}
    vocabulary = [c.name for c in spec.taxonomy.classes] + list(spec.taxonomy.superclasses)
    encoded: dict[str, bytes] = {}
    for index in range(start, stop):
        rng = np.random.default_rng([spec.seed, index])
        shown, leaf_labels = plan_labels(rng, num_classes, spec.labels_per_image, spec.label_noise)
        # Superclass labels follow the final leaf labels, as a label pipeline adding ancestors would: a wrong leaf
        # label brings its (possibly wrong) superclass with it.
        ancestors = sorted({num_classes + spec.taxonomy.classes[c].superclass for c in leaf_labels})
        label_ids = leaf_labels + ancestors
        buffer = io.BytesIO()
        render_image(rng, shown, spec.taxonomy, spec.image_size).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        path = _image_path(spec, index, shown[0])
        encoded[f"{root}/{path}"] = buffer.getvalue()
        rows["path"].append(path)
        rows["key"].append(_image_key(index, spec.key_digits))
        rows["labels"].append([vocabulary[i] for i in label_ids])
        rows["label_ids"].append(label_ids)
        rows["primary_class"].append(shown[0])
        rows["bytes"].append(buffer.getbuffer().nbytes)
    _make_parents(fs, encoded)
    # One call per chunk: object stores upload the files concurrently (one request per image at a time would leave a
    # worker waiting on latency), local disks write them one by one. A chunk's JPEGs are a few MB at most.
    fs.pipe(encoded)
    return rows


# Folders this process has made during the current run (synth_corpus clears it; pool workers start empty). Folders
# are made only when an image goes there, so a folder-layout corpus has no empty class folders, which ImageFolder
# readers reject; the memo keeps it to one makedirs per folder, as each costs a request on S3.
_made_folders: set[str] = set()


def _make_parents(fs: fsspec.AbstractFileSystem, paths: Iterable[str]) -> None:
    for folder in sorted({path.rsplit("/", 1)[0] for path in paths} - _made_folders):
        fs.makedirs(folder, exist_ok=True)
        _made_folders.add(folder)


def _run_chunk(args: tuple[_SynthSpec, int, int]) -> dict[str, list]:
    return _write_chunk(*args)


def _map_chunks(tasks: list[tuple[_SynthSpec, int, int]], workers: int) -> Iterator[dict[str, list]]:
    """Results in task order, from a pool of worker processes when ``workers`` > 1."""
    if workers == 1 or len(tasks) == 1:
        yield from map(_run_chunk, tasks)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=_worker_context()) as pool:
        yield from pool.map(_run_chunk, tasks)


def _worker_context() -> multiprocessing.context.BaseContext:
    # Not fork: the caller may run threads (s3fs's event loop, a test's moto server) whose locks a forked child would
    # inherit mid-use. A fork server starts clean and imports this module once, so later pools start faster than with
    # spawn. Like spawn, each worker re-imports the caller's __main__: scripts need the `if __name__` guard.
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # no effect once the server runs; then children import it themselves
    return context


def synth_corpus(
    dst: str,
    *,
    images: int,
    classes: int,
    seed: int = 0,
    image_size: int = 64,
    labels_per_image: tuple[int, int] = (1, 3),
    label_noise: float = 0.1,
    superclasses: int | None = None,
    layout: Layout = "table",
    workers: int = 1,
    storage_options: dict | None = None,
    overwrite: bool = False,
) -> CorpusSummary:
    """Write a synthetic JFT-style corpus of JPEG files to ``dst``; the same arguments give the same bytes.

    Each image shows its primary class's shape large and ``labels_per_image`` minus one other classes' shapes small.
    Its labels name the classes shown plus their superclasses; with probability ``label_noise`` one leaf label is
    replaced by a class that is not shown. ``primary_class`` keeps the clean class of the large shape.

    ``workers`` > 1 renders in worker processes (not for ``memory://``, which only this process sees); as with any
    process pool, a calling script needs the ``if __name__ == "__main__":`` guard.
    """
    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    taxonomy = synth_taxonomy(classes, superclasses)
    lo, hi = labels_per_image
    if not 1 <= lo <= hi <= classes:
        raise ValueError(f"labels_per_image must be (lo, hi) with 1 <= lo <= hi <= classes, got {labels_per_image}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels for the shapes to be recognisable, got {image_size}")
    if layout not in ("table", "folder"):
        raise ValueError(f"layout must be 'table' or 'folder', got {layout!r}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")

    started = time.perf_counter()
    storage_options = dict(storage_options or {})
    fs, root = filesystem(dst, storage_options)
    _prepare_root(fs, root, dst, overwrite)
    write_json(fs, f"{root}/classes.json", taxonomy.vocabulary())
    spec = _SynthSpec(
        dst=dst,
        storage_options=storage_options,
        taxonomy=taxonomy,
        seed=seed,
        image_size=image_size,
        labels_per_image=(lo, hi),
        label_noise=label_noise,
        layout=layout,
        key_digits=max(8, len(str(images - 1))),
    )
    _made_folders.clear()  # an earlier run's folders may have been deleted since
    if _is_process_local(fs):
        workers = 1  # a memory:// filesystem lives in this process; a worker's writes would vanish with it

    tasks = [(spec, start, min(start + CHUNK_SIZE, images)) for start in range(0, images, CHUNK_SIZE)]
    batches, written = [], 0
    for rows in _map_chunks(tasks, workers):
        written += sum(rows.pop("bytes"))
        if layout == "table":
            batches.append(_label_batch(rows))  # metadata only: about 150 bytes an image
    labels_url = None
    if layout == "table":
        _write_parquet(fs, f"{root}/labels.parquet", batches)
        labels_url = join(dst, "labels.parquet")
    fs.invalidate_cache(root)  # other processes wrote under it
    return CorpusSummary(
        root=dst,
        layout=layout,
        images=images,
        classes=classes,
        superclasses=len(taxonomy.superclasses),
        bytes=written,
        seconds=time.perf_counter() - started,
        classes_file=join(dst, "classes.json"),
        labels=labels_url,
    )


def import_digits(
    dst: str,
    *,
    scale: int = 4,
    split_fraction: float = 0.2,
    seed: int = 0,
    storage_options: dict | None = None,
    overwrite: bool = False,
) -> CorpusSummary:
    """Write scikit-learn's 1,797 real handwritten digits as a labelled downstream set of RGB PNGs.

    ImageFolder layout ``{dst}/{train|test}/{digit}/{key}.png``, upscaled ``scale`` times (nearest neighbour), with a
    stratified test split of ``split_fraction``, plus ``labels.parquet`` (with a ``split`` column) and ``classes.json``.
    """
    if scale < 1:
        raise ValueError(f"scale must be at least 1, got {scale}")
    if not 0.0 < split_fraction < 1.0:
        raise ValueError(f"split_fraction must be strictly between 0 and 1, got {split_fraction}")
    from sklearn.datasets import load_digits  # a second to import: only when the digits are wanted
    from sklearn.model_selection import train_test_split

    started = time.perf_counter()
    fs, root = filesystem(dst, storage_options)
    _prepare_root(fs, root, dst, overwrite)
    write_json(fs, f"{root}/classes.json", [{"id": d, "name": str(d), "superclass": None} for d in range(10)])

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 ink levels -> 0..255
    targets = digits.target.astype(int)
    _, test_index = train_test_split(
        np.arange(len(targets)), test_size=split_fraction, stratify=targets, random_state=seed
    )
    splits = np.full(len(targets), "train", dtype=object)
    splits[test_index] = "test"
    _made_folders.clear()

    side = 8 * scale
    encoded: dict[str, bytes] = {}  # under 2 MB at scale 4: written in one concurrent call, as a synth chunk is
    paths, keys = [], []
    for index, (image, digit, split) in enumerate(zip(pixels, targets, splits)):
        keys.append(f"digit-{index:05d}")
        paths.append(f"{split}/{digit}/{keys[-1]}.png")
        buffer = io.BytesIO()
        Image.fromarray(image).resize((side, side), Image.NEAREST).convert("RGB").save(buffer, format="PNG")
        encoded[f"{root}/{paths[-1]}"] = buffer.getvalue()
    _make_parents(fs, encoded)
    fs.pipe(encoded)
    rows = {
        "path": paths,
        "key": keys,
        "labels": [[str(d)] for d in targets],
        "label_ids": [[int(d)] for d in targets],
        "primary_class": [int(d) for d in targets],
        "split": list(splits),
    }
    _write_parquet(fs, f"{root}/labels.parquet", [_label_batch(rows)])
    return CorpusSummary(
        root=dst,
        layout="folder",
        images=len(targets),
        classes=10,
        superclasses=0,
        bytes=sum(map(len, encoded.values())),
        seconds=time.perf_counter() - started,
        classes_file=join(dst, "classes.json"),
        labels=join(dst, "labels.parquet"),
        splits={split: int((splits == split).sum()) for split in ("train", "test")},
    )


# --------------------------------------------------------------------------------------------------------------------
# Storage helpers: one code path for every fsspec filesystem.


MARKER = ".vit-corpus"  # written first into every corpus made here: what --overwrite may replace (hidden: not sharded)
# A corpus written before the marker existed: only these entries, at the top (a folder-layout corpus of class
# folders cannot be told from a user's own ImageFolder tree, so it needs the marker).
_LEGACY_ENTRIES = {"classes.json", "labels.parquet", "images", "train", "test"}


def _prepare_root(fs: fsspec.AbstractFileSystem, root: str, dst: str, overwrite: bool) -> None:
    """Make ``root`` an empty folder holding the marker; replace an earlier corpus made here only when asked."""
    if fs.exists(root):
        if fs.isfile(root):
            raise FileExistsError(f"{dst} is a file, not a folder")
        entries = fs.ls(root, detail=False, refresh=True)
        if entries:
            if not overwrite:
                raise FileExistsError(f"{dst} is not empty; pass --overwrite (overwrite=True) to replace it")
            names = {posixpath.basename(e.rstrip("/")) for e in entries}
            if MARKER not in names and not ("classes.json" in names and names <= _LEGACY_ENTRIES):
                raise FileExistsError(
                    f"{dst} is not empty and is not a corpus written by `vit corpus` (no {MARKER}); "
                    "refusing to delete it even with --overwrite"
                )
            fs.rm(entries, recursive=True)  # the contents, not the root: on S3 the root may be a whole bucket
            fs.invalidate_cache(root)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{MARKER}", b'{"written_by": "vit corpus"}\n')


def _is_process_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "memory" in protocols


def _label_batch(rows: dict[str, list]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict(rows, schema=_label_schema("split" in rows))


def _label_schema(with_split: bool) -> pa.Schema:
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("labels", pa.list_(pa.string()), nullable=False),
        pa.field("label_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("primary_class", pa.int64(), nullable=False),
    ]
    if with_split:
        fields.append(pa.field("split", pa.string(), nullable=False))
    return pa.schema(fields)


def _write_parquet(fs: fsspec.AbstractFileSystem, path: str, batches: list[pa.RecordBatch]) -> None:
    with fs.open(path, "wb") as f:
        pq.write_table(pa.Table.from_batches(batches), f)
