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
unfinished run. ``overwrite=True`` replaces only a corpus this module wrote (its hidden ``.vit-corpus`` marker, or
an older corpus's exact layout): never someone else's files.
What the synthetic images show, and how they are drawn, is ``pipelines.data.synth``'s; this module writes them.
"""

from __future__ import annotations

import io
import multiprocessing
import posixpath
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.common.storage import filesystem, join, write_json
from pipelines.data.glyphs import glyph_taxonomy, render_glyph
from pipelines.data.synth import (  # noqa: F401  (the vocabulary, re-exported: the corpus's public names)
    BACKGROUNDS,
    HUES,
    MAX_CLASSES,
    MAX_CLASSES_PER_SUPERCLASS,
    MAX_SUPERCLASSES,
    SHAPES,
    TEXTURES,
    SynthClass,
    Taxonomy,
    plan_labels,
    render_image,
    synth_taxonomy,
)

IMAGES_PER_DIR = 1000  # keeps listings short on local disks and S3 consoles
CHUNK_SIZE = 250  # images per worker task: small enough to balance 2 workers on a few hundred images
JPEG_QUALITY = 90

Layout = Literal["table", "folder"]
Style = Literal["shapes", "glyphs"]  # drawn shapes on textured backgrounds, or handwritten stroke glyphs


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
    style: Style
    scan_size: int
    superclass_labels: bool


def _image_key(index: int, digits: int) -> str:
    return f"img-{index:0{digits}d}"


def _image_path(spec: _SynthSpec, index: int, primary: int) -> str:
    name = f"{_image_key(index, spec.key_digits)}.{'png' if spec.style == 'glyphs' else 'jpg'}"
    if spec.layout == "table":
        return f"images/{index // IMAGES_PER_DIR:05d}/{name}"
    return f"{_folder_name(spec.taxonomy.classes[primary].name)}/{name}"


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
        label_ids = leaf_labels + (ancestors if spec.superclass_labels else [])
        buffer = io.BytesIO()
        if spec.style == "glyphs":
            # PNG: a scan's square pixels and flat ink levels would ring under JPEG (and compress well losslessly)
            glyph = spec.taxonomy.classes[shown[0]]
            render_glyph(rng, glyph, spec.image_size, spec.scan_size).save(buffer, format="PNG")  # type: ignore[arg-type]
        else:
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
    labels_per_image: tuple[int, int] | None = None,
    label_noise: float = 0.1,
    superclasses: int | None = None,
    layout: Layout = "table",
    style: Style = "shapes",
    scan_size: int = 0,
    superclass_labels: bool = True,
    workers: int = 1,
    storage_options: dict | None = None,
    overwrite: bool = False,
) -> CorpusSummary:
    """Write a synthetic JFT-style corpus of image files to ``dst``; the same arguments give the same bytes.

    ``style="shapes"`` (JPEGs): each image shows its primary class's shape large and ``labels_per_image`` (default
    1 to 3) minus one other classes' shapes small. ``style="glyphs"`` (PNGs, ``pipelines.data.glyphs``): each image
    is one handwritten glyph (``labels_per_image`` can only be (1, 1)), scanned at ``scan_size`` pixels when that
    is positive. Labels name the classes shown plus their superclasses; with probability ``label_noise`` one leaf
    label is replaced by a class that is not shown. ``primary_class`` keeps the clean class of the main object.
    ``superclass_labels=False`` leaves the superclasses out of the labels (they stay in ``classes.json``): with
    one glyph an image, every image then has one label, and the shards are single-label (softmax training).

    ``workers`` > 1 renders in worker processes (not for ``memory://``, which only this process sees); as with any
    process pool, a calling script needs the ``if __name__ == "__main__":`` guard.
    """
    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    if style not in ("shapes", "glyphs"):
        raise ValueError(f"style must be 'shapes' or 'glyphs', got {style!r}")
    taxonomy = synth_taxonomy(classes, superclasses) if style == "shapes" else glyph_taxonomy(classes, superclasses)
    if labels_per_image is None:
        labels_per_image = (1, 3) if style == "shapes" else (1, 1)
    lo, hi = labels_per_image
    if not 1 <= lo <= hi <= classes:
        raise ValueError(f"labels_per_image must be (lo, hi) with 1 <= lo <= hi <= classes, got {labels_per_image}")
    if style == "glyphs" and hi > 1:
        raise ValueError(f"labels_per_image must be (1, 1) for glyphs (one glyph an image), got {labels_per_image}")
    if not 0 <= scan_size <= image_size:
        raise ValueError(f"scan_size must be between 0 (no scan) and image_size ({image_size}), got {scan_size}")
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
        style=style,
        scan_size=scan_size,
        superclass_labels=superclass_labels,
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
