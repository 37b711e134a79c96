"""Stream WebDataset shards into training: the epoch is split into logical streams, each rank reads its own.

An epoch's samples are split into ``streams`` logical streams (whole shards each, when there are enough), and
each stream has its own order: which shards it gets, the order of samples inside its shuffle blocks and every
sample's augmentation are derived from (seed, epoch, stream), never from a rank or the world size. Global step
s takes the same ``step_samples / streams`` samples from every stream, so the samples that form a step do not
depend on who reads them: rank r of a world of w serves the streams k with k % w == r, a rank's loader workers
split its streams between them, and a run resumed at step s on the same or another number of ranks (any that
divides ``streams``) reads exactly the samples an uninterrupted run would have read from step s on, each of
an epoch's samples once. Skipping to that position costs almost nothing: whole shards are passed over by the
sample counts in the shards' ``_info.json``, and inside a shard only tar headers are read, never decoded. The
tars are parsed by ``pipelines.data.shards.format``, beside their writer.

Why this and not Ray Data (``read_webdataset`` + ``get_dataset_shard``), measured by
``bench/train.py`` on 2 cores (Inception crop at 224, batches of 32): this loader delivers 90-93% of
the decode+augment ceiling of the same two processes (medians of three runs: 93.4%, 92.4% and 90.3%
over 6, 12 and 12 passes; 76% with a fresh shared batch per batch, 87-91% with recycled ones sent
whole, before tar headers were parsed by our own reader and batches sent as ring slots), Ray Data's stock
pipeline 23-40%. Beyond speed,
Ray Data's streaming split has no resumable position (a restarted run would re-read an epoch from
the start or skip what it never trained on), it reserves CPUs of its own beside the training
workers (on small machines the two deadlock on the CPU budget), and it moves every sample through
the object store. Reading the shards straight from storage in the training worker's own
DataLoader processes keeps exact resume and costs little beyond the decode itself.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines.common.storage import filesystem, join, read_json
from pipelines.data.shards.format import (
    CLASSES_FILE,
    IMAGE_MEMBERS,
    INFO_FILE,
    ShardReadError,
    ShardsError,
    class_names,
    iter_tar_samples,
    sample_image,
    sample_is_multi_label,
    sample_label_ids,
)
from vit.data import ImageTransform, encode_labels, sample_rng

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = IMAGE_MEMBERS  # the name readers of samples (bench/train.py) know


@dataclass(frozen=True)
class ShardSet:
    """One split of a ``vit shard`` output: its tars, their sample counts, and its label space."""

    root: str
    split: str
    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    num_classes: int
    multi_label: bool
    storage_options: dict = field(default_factory=dict, compare=False)

    @property
    def samples(self) -> int:
        return sum(self.lengths)


def read_info(root: str, storage_options: dict | None = None) -> dict:
    fs, path = filesystem(root, storage_options)
    try:
        return read_json(fs, join(path, INFO_FILE))
    except FileNotFoundError:
        raise ShardsError(f"{root} has no _info.json: is it the output of `vit shard`?") from None


def read_classes(root: str, storage_options: dict | None = None) -> list[str]:
    """The class names of a `vit shard` output, in label-id order (ids as names when it has none)."""
    fs, path = filesystem(root, storage_options)
    try:
        entries = read_json(fs, join(path, CLASSES_FILE))
    except FileNotFoundError:
        return [str(i) for i in range(read_info(root, storage_options)["num_classes"])]
    return class_names(entries)


def open_shards(root: str, split: str, storage_options: dict | None = None) -> ShardSet:
    """The tars of ``split`` under ``root``, from the ``_info.json`` that `vit shard` writes."""
    info = read_info(root, storage_options)
    splits = info.get("splits", {})
    if split not in splits:
        raise ShardsError(f"{root} has no split {split!r}; it has: {', '.join(sorted(splits)) or 'none'}")
    entry = splits[split]
    if not entry["filenames"]:
        raise ShardsError(f"split {split!r} of {root} has no shards")
    multi_label = info.get("multi_label")
    if multi_label is None:  # shards written before _info.json carried it: a sample tells
        multi_label = _first_sample_is_multi_label(root, entry["filenames"][0], storage_options)
    return ShardSet(
        root=root,
        split=split,
        urls=tuple(join(root, name) for name in entry["filenames"]),
        lengths=tuple(int(n) for n in entry["shard_lengths"]),
        num_classes=int(info["num_classes"]),
        multi_label=bool(multi_label),
        storage_options=dict(storage_options or {}),
    )


def _first_sample_is_multi_label(root: str, filename: str, storage_options: dict | None) -> bool:
    url = join(root, filename)
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        for sample in iter_tar_samples(f, shard=url):
            return sample_is_multi_label(sample)
    return False


@dataclass(frozen=True)
class StreamSpec:
    """What one rank reads: its streams of ``shards``, as batches of ``batch_size`` samples."""

    shards: ShardSet
    transform: ImageTransform
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    # Logical streams the epoch is split into, over all ranks: fixed for a run, a multiple of world_size. None: one
    # per reader (world_size x loader workers), for passes that are never resumed (evaluation, benchmarks).
    streams: int | None = None
    # Samples per global step over all ranks (the global batch): each step takes step_samples / streams from every
    # stream, whatever the world size. None: a rank takes whole batches from its streams in turn.
    step_samples: int | None = None
    shuffle_block: int = 2048  # samples of a stream shuffled together; 1 keeps the shard order
    repeat: bool = True  # training: endless epochs; evaluation: one pass
    start_batch: int = 0  # batches this rank already consumed: resume from there (repeat only)
    # Loader workers write into a ring of shared-memory batches instead of a fresh one per batch: allocating and
    # faulting in 5 MB of shared memory per batch costs ~15% of a worker's time. Only for consumers done with a
    # batch when they ask for the next (a training step, an evaluation pass): a kept batch would be overwritten.
    recycle_batches: bool = False
    with_keys: bool = False  # batches carry a 4th element: the keys of the samples read (used and rejected)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")
        if self.streams is not None and (self.streams < 1 or self.streams % self.world_size):
            raise ValueError(f"{self.streams} streams do not split evenly over {self.world_size} ranks")
        if self.step_samples is not None and (self.streams is None or self.step_samples % self.streams):
            raise ValueError(f"step_samples {self.step_samples} must be a multiple of streams ({self.streams})")
        if self.start_batch and not self.repeat:
            raise ValueError("start_batch: a single pass (repeat=False) always starts at its beginning")

    @property
    def piece(self) -> int:
        """Samples a rank takes from one stream at a time: a batch is ``batch_size // piece`` pieces. The
        largest size that divides both a batch and a stream's share of a step, so that no batch straddles
        two steps and every step ends at the same position in every stream, for any world size."""
        if self.step_samples is None or not self.repeat:
            return self.batch_size
        return math.gcd(self.batch_size, self.step_samples // self.streams)

    def local_streams(self, loader_workers: int = 0) -> list[int]:
        """The streams this rank serves: every world_size-th, from its rank on."""
        streams = self.streams or self.world_size * max(1, loader_workers)
        return list(range(self.rank, streams, self.world_size))


@dataclass(frozen=True)
class _Portion:
    """A stream's part of one shard: every sample, or those whose epoch index is ``offset`` mod ``stride``."""

    shard: int
    count: int  # samples of the shard this stream keeps
    first_global: int = 0  # epoch index of the shard's first sample
    stride: int = 1
    offset: int = 0

    def keeps(self, local_index: int) -> bool:
        return (self.first_global + local_index) % self.stride == self.offset


class ShardStream(IterableDataset):
    """Pieces ``(images uint8 (B,3,H,W), targets, bad_samples[, keys])`` of one rank, split over loader workers.

    The rank's pieces go round its streams in turn (piece i from local stream i mod K, its (i // K)-th piece), so
    after the pieces of s steps every stream has given s steps' worth, whatever K. A DataLoader over an
    IterableDataset takes batches from its workers in strict rotation: piece i of the rank comes from worker
    (i - first) mod W, where first is the position the loader starts at (``start_batch``). A worker serves only the
    streams its pieces come from: its own K / W when W divides K, otherwise it reads the pieces of the others in
    its streams too and passes over them undecoded. ``make_loader`` joins pieces into batches of ``batch_size``.
    """

    def __init__(self, spec: StreamSpec, *, slot_batches: bool = False):
        self.spec = spec
        self.slot_batches = slot_batches  # with recycle_batches in workers: send _SlotBatch, not the buffers

    def __iter__(self) -> Iterator[tuple | _SlotBatch]:
        worker = get_worker_info()
        workers, physical = (worker.num_workers, worker.id) if worker else (1, 0)
        spec = self.spec
        size = spec.piece
        if spec.repeat:
            samples = self._rotation(workers, physical)
        else:
            samples = self._passes(workers, physical)
        # Pixels and targets go straight into the batch, which a loader worker allocates in shared memory:
        # two copies per image instead of four (array, contiguous, stack, shared memory).
        ring = worker is not None and spec.recycle_batches and self.slot_batches
        buffers = self._buffers(worker is not None, size)
        (slot, images, targets, first_use), filled, bad, keys = next(buffers), 0, 0, []
        shards = spec.shards

        def finished() -> tuple | _SlotBatch:
            read = tuple(keys) if spec.with_keys else None
            if ring:
                sent = (images, targets) if first_use else (None, None)
                return _SlotBatch(physical, slot, filled, bad, *sent, read)
            return (images[:filled], targets[:filled], bad) + ((read,) if spec.with_keys else ())

        for epoch, sample in samples:
            if spec.with_keys:
                keys.append(sample.get("__key__"))
            try:
                image = self._image(sample, epoch)
                encode_labels(
                    sample_label_ids(sample), shards.num_classes, multi_label=shards.multi_label, out=targets[filled]
                )
            except ValueError as err:
                bad += 1
                log.warning("skipping sample %s: %s", sample.get("__key__"), err)
            else:
                images[filled].copy_(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))
                filled += 1
            if filled + bad == size:
                yield finished()
                (slot, images, targets, first_use), filled, bad, keys = next(buffers), 0, 0, []
        if filled or bad:
            yield finished()

    def _rotation(self, workers: int, physical: int) -> Iterator[tuple[int, dict]]:
        """The samples of this worker's pieces, in order, endlessly."""
        spec = self.spec
        local = spec.local_streams(workers)
        streams, size, count = spec.streams or spec.world_size * workers, spec.piece, len(local)
        cursors: dict[int, list] = {}  # local stream -> [its samples, the next of its pieces they hold]
        piece = spec.start_batch * (spec.batch_size // size) + physical
        while True:
            k, j = piece % count, piece // count
            if k not in cursors:  # a stream's first piece here: skip to it by shard lengths and tar headers
                cursors[k] = [self._samples(local[k], streams, skip=j * size), j]
            cursor = cursors[k]
            for _ in range((j - cursor[1]) * size):  # other workers' pieces of a stream shared with them
                next(cursor[0])
            for _ in range(size):
                yield next(cursor[0])
            cursor[1] = j + 1
            piece += workers

    def _passes(self, workers: int, physical: int) -> Iterator[tuple[int, dict]]:
        """One pass over this worker's share of the rank's streams, one stream after the other."""
        spec = self.spec
        streams = spec.streams or spec.world_size * workers
        for stream in spec.local_streams(workers)[physical::workers]:
            yield from self._samples(stream, streams, skip=0)

    def _buffers(self, shared: bool, batch: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, bool]]:
        """(slot, images, targets, first use) to fill: fresh buffers, or in a loader worker with
        ``recycle_batches`` a ring of PREFETCH_FACTOR + 2 of them.

        A worker has at most PREFETCH_FACTOR batches requested and not yet handed out, and the consumer
        holds the last one handed out; a ring two longer never rewrites a batch still queued or in use."""
        spec = self.spec
        images_shape = (batch, 3, spec.transform.size, spec.transform.size)
        target_shape, target_dtype = _target_layout(spec.shards, batch)

        def new(shape, dtype) -> torch.Tensor:
            if not shared:
                return torch.empty(shape, dtype=dtype)
            # allocated in shared memory directly: share_memory_() would allocate, then copy
            numel = math.prod(shape) * dtype.itemsize
            return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(numel)).view(shape)

        ring: list[tuple[torch.Tensor, torch.Tensor]] = []
        for count in itertools.count():
            if not (shared and spec.recycle_batches):
                yield 0, new(images_shape, torch.uint8), new(target_shape, target_dtype), True
            elif len(ring) < PREFETCH_FACTOR + 2:
                ring.append((new(images_shape, torch.uint8), new(target_shape, target_dtype)))
                yield count, *ring[-1], True
            else:
                yield count % len(ring), *ring[count % len(ring)], False

    # -- what a stream reads

    def plan(self, epoch: int, stream: int, streams: int) -> list[_Portion]:
        """This stream's portions of the shards in ``epoch``: whole shards when there are enough."""
        shards = self.spec.shards
        order = list(range(len(shards.urls)))
        if self.spec.repeat:  # a new shard order every epoch; evaluation keeps the written order
            np.random.default_rng([self.spec.seed, epoch, 0x5EED]).shuffle(order)
        if len(order) >= streams:
            return [_Portion(i, shards.lengths[i]) for i in order[stream::streams]]
        # Fewer shards than streams: every stream reads every shard and keeps every streams-th sample.
        portions, first = [], 0
        for i in order:
            n = shards.lengths[i]
            kept = len(range((stream - first) % streams, n, streams))
            portions.append(_Portion(i, kept, first_global=first, stride=streams, offset=stream))
            first += n
        return portions

    def _samples(self, stream: int, streams: int, skip: int) -> Iterator[tuple[int, dict]]:
        """(epoch, sample) of one stream from its ``skip``-th sample on: endless epochs, or one pass."""
        spec = self.spec
        block = max(1, spec.shuffle_block) if spec.repeat else 1
        epoch = 0
        while True:
            plan = self.plan(epoch, stream, streams)
            total = sum(p.count for p in plan)
            if total == 0:
                if spec.repeat:
                    raise ShardsError(f"stream {stream} of {streams} gets no samples from {spec.shards.root}")
                return
            if spec.repeat and skip >= total:  # a whole epoch already trained on
                skip -= total
                epoch += 1
                continue
            first_block, skip_in_block = divmod(skip, block)
            raw = self._read(plan, start=first_block * block)
            for b, chunk in enumerate(_chunks(raw, block)):
                order = range(len(chunk))
                if block > 1:
                    order = np.random.default_rng([spec.seed, epoch, stream, first_block + b]).permutation(len(chunk))
                for i in order[skip_in_block:]:
                    yield epoch, chunk[i]
                skip_in_block = 0
            if not spec.repeat:
                return
            epoch, skip = epoch + 1, 0

    def _read(self, plan: list[_Portion], start: int) -> Iterator[dict]:
        """The samples of ``plan`` in order, from the ``start``-th on; skipped shards are never opened."""
        shards = self.spec.shards
        for portion in plan:
            if start >= portion.count:
                start -= portion.count
                continue
            url = shards.urls[portion.shard]
            fs, path = filesystem(url, shards.storage_options)
            with fs.open(path, "rb") as f:
                if portion.stride == 1:
                    seen = start
                    for sample in iter_tar_samples(f, skip=start, shard=url):
                        seen += 1
                        yield sample
                else:
                    seen = 0
                    for local, sample in enumerate(iter_tar_samples(f, shard=url)):
                        if portion.keeps(local):
                            seen += 1
                            if seen > start:
                                yield sample
            if seen != portion.count:
                raise ShardReadError(
                    f"{url} holds {seen} samples for this stream; _info.json promised {portion.count}", shard=url
                )
            start = 0

    def _image(self, sample: dict, epoch: int):
        return self.spec.transform.to_image(sample_image(sample), sample_rng(self.spec.seed, epoch, sample["__key__"]))


def _chunks(items: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _target_layout(shards: ShardSet, batch: int) -> tuple[tuple[int, ...], torch.dtype]:
    if shards.multi_label:
        return (batch, shards.num_classes), torch.float32
    return (batch,), torch.int64


class _SlotBatch(NamedTuple):
    """What a loader worker with ``recycle_batches`` sends for a batch: where it wrote it. Sending the
    shared buffers themselves costs both processes a socket connection per tensor (to pass its file
    descriptor), ~1 ms a batch; they travel with a slot's first batch only, and the consumer side
    (``_Loader``) finds them by (worker, slot) after that."""

    worker: int
    slot: int
    filled: int
    bad: int
    images: torch.Tensor | None
    targets: torch.Tensor | None
    keys: tuple[str, ...] | None = None


PREFETCH_FACTOR = 4  # batches each loader worker prepares ahead


def make_loader(spec: StreamSpec, *, workers: int = 2, pin_memory: bool = False) -> Iterable:
    """Batches ``(images, targets, bad[, keys])`` of ``spec``, decoded in ``workers`` processes (0: in this
    process)."""
    # Pinning copies each batch as it arrives, so pinned loaders take the buffers every time.
    slots = spec.recycle_batches and workers > 0 and not pin_memory
    loader = DataLoader(
        ShardStream(spec, slot_batches=slots),
        batch_size=None,  # the stream batches itself
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=PREFETCH_FACTOR if workers else None,
        persistent_workers=False,
        # The loader seeds its workers from its own generator, not the global one: dropout and stochastic
        # depth then draw the same numbers whether a run was resumed (a new loader) or not.
        generator=torch.Generator().manual_seed(spec.seed),
    )
    pieces = _Loader(loader, spec.with_keys) if slots else loader
    if spec.piece < spec.batch_size:
        return _Joined(pieces, spec, pin_memory=pin_memory)
    return pieces


class _Loader:
    """A DataLoader whose workers send ``_SlotBatch``es, seen as plain batches."""

    def __init__(self, loader: DataLoader, with_keys: bool = False):
        self.loader, self.with_keys = loader, with_keys

    def __iter__(self) -> Iterator[tuple]:
        buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # new workers each pass
        for batch in self.loader:
            if batch.images is not None:
                buffers[batch.worker, batch.slot] = (batch.images, batch.targets)
            images, targets = buffers[batch.worker, batch.slot]
            yield (images[: batch.filled], targets[: batch.filled], batch.bad) + (
                (batch.keys,) if self.with_keys else ()
            )


class _Joined:
    """Batches of ``spec.batch_size`` made of ``batch_size // piece`` consecutive pieces: when a step's share of
    one stream is smaller than a micro-batch, a micro-batch holds pieces of several streams. Each piece is
    copied in as it arrives (a loader worker may reuse its buffer after that); with ``recycle_batches`` the
    batch itself is one buffer, refilled each time."""

    def __init__(self, pieces: Iterable, spec: StreamSpec, *, pin_memory: bool = False):
        self.pieces, self.spec, self.pin_memory = pieces, spec, pin_memory

    def __iter__(self) -> Iterator[tuple]:
        spec = self.spec
        per_batch, size = spec.batch_size // spec.piece, spec.transform.size
        target_shape, target_dtype = _target_layout(spec.shards, spec.batch_size)
        buffer = None
        pieces = iter(self.pieces)
        while True:
            if buffer is None or not spec.recycle_batches:
                images = torch.empty(spec.batch_size, 3, size, size, dtype=torch.uint8, pin_memory=self.pin_memory)
                targets = torch.empty(target_shape, dtype=target_dtype, pin_memory=self.pin_memory)
                buffer = images, targets
            images, targets = buffer
            filled, bad, keys = 0, 0, []
            for n in range(per_batch):
                piece = next(pieces, None)
                if piece is None:
                    if n:
                        yield (images[:filled], targets[:filled], bad) + ((tuple(keys),) if spec.with_keys else ())
                    return
                part, part_targets, part_bad, *part_keys = piece
                images[filled : filled + len(part)] = part
                targets[filled : filled + len(part)] = part_targets
                filled, bad = filled + len(part), bad + part_bad
                if spec.with_keys:
                    keys.extend(part_keys[0])
            yield (images[:filled], targets[:filled], bad) + ((tuple(keys),) if spec.with_keys else ())
