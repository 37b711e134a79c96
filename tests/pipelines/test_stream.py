"""Shard streams: every sample once per epoch over streams, ranks and loader workers, the same samples in every
step whatever the world size, exact resume (also on another world size), bad input."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import signal
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.data.stream import (
    ShardReadError,
    ShardsError,
    ShardStream,
    StreamSpec,
    iter_tar_samples,
    make_loader,
    open_shards,
)
from vit.data import build_transform

NUM_CLASSES = 5


def _jpeg(index: int, size: int = 20) -> bytes:
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, (size, size + index % 7, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    root: Path, lengths: dict[str, list[int]], *, multi_label: bool = False, broken: dict[str, bytes] | None = None
) -> Path:
    """Shards in `vit shard`'s layout: ``{split}-{i:06d}.tar`` of jpg+json samples and an _info.json."""
    root.mkdir(parents=True, exist_ok=True)
    splits, index = {}, 0
    for split, sizes in lengths.items():
        names = []
        for shard, size in enumerate(sizes):
            name = f"{split}-{shard:06d}.tar"
            with tarfile.open(root / name, "w") as tar:
                for _ in range(size):
                    key = f"s{index:05d}"
                    labels = [index % NUM_CLASSES] + ([(index + 1) % NUM_CLASSES] if multi_label else [])
                    _add(tar, f"{key}.jpg", (broken or {}).get(key, _jpeg(index)))
                    _add(tar, f"{key}.json", json.dumps({"label_ids": labels}).encode())
                    index += 1
            names.append(name)
        splits[split] = {"name": split, "num_samples": sum(sizes), "filenames": names, "shard_lengths": sizes}
    info = {"name": root.name, "num_classes": NUM_CLASSES, "multi_label": multi_label, "splits": splits}
    (root / "_info.json").write_text(json.dumps(info))
    return root


def _spec(shards, **kw) -> StreamSpec:
    kw.setdefault("batch_size", 4)
    return StreamSpec(shards=shards, transform=build_transform("finetune", 16, 18), **kw)


def _epoch_keys(shards, *, streams: int) -> Counter:
    """Keys every logical stream yields in its first epoch."""
    keys = Counter()
    stream = ShardStream(_spec(shards, streams=streams, shuffle_block=7))
    for k in range(streams):
        per_epoch = sum(p.count for p in stream.plan(0, k, streams))
        keys.update(sample["__key__"] for epoch, sample in islice(stream._samples(k, streams, skip=0), per_epoch))
    return keys


@pytest.mark.parametrize(
    "lengths", [[6, 5, 7, 6, 3, 8, 6, 5], [23, 17]], ids=["whole-shards", "fewer-shards-than-streams"]
)
@pytest.mark.parametrize("streams", [1, 2, 4, 6])
def test_an_epoch_reads_every_sample_exactly_once(tmp_path, lengths, streams):
    shards = open_shards(str(write_shards(tmp_path / "s", {"train": lengths})), "train")
    keys = _epoch_keys(shards, streams=streams)
    assert sum(keys.values()) == shards.samples
    assert set(keys.values()) == {1}


def test_evaluation_is_one_pass_in_order(tmp_path):
    shards = open_shards(str(write_shards(tmp_path / "s", {"val": [9, 4]})), "val")
    stream = ShardStream(_spec(shards, repeat=False, world_size=1))
    keys = [s["__key__"] for _, s in stream._samples(0, 1, skip=0)]
    assert keys == [f"s{i:05d}" for i in range(13)]
    batches = list(make_loader(_spec(shards, repeat=False, batch_size=5), workers=0))
    assert [len(b[0]) for b in batches] == [5, 5, 3]  # the last batch is partial, nothing dropped


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    "layout",
    [{}, {"streams": 4, "step_samples": 16, "batch_size": 4}, {"streams": 8, "step_samples": 16, "batch_size": 4}],
    ids=["stream-per-reader", "piece-per-batch", "batches-of-two-streams"],
)
def test_a_resumed_stream_continues_with_the_same_batches(tmp_path, workers, layout):
    shards = open_shards(str(write_shards(tmp_path / "s", {"train": [7, 9, 6, 8]})), "train")
    spec = _spec(shards, rank=1, world_size=2, seed=3, shuffle_block=5, **layout)
    whole = list(islice(make_loader(spec, workers=workers), 14))  # past an epoch: 15 samples per rank
    for start in (1, 5, 9):
        resumed = StreamSpec(**{**spec.__dict__, "start_batch": start})
        tail = list(islice(make_loader(resumed, workers=workers), 14 - start))
        for (a_img, a_tgt, _), (b_img, b_tgt, _) in zip(whole[start:], tail, strict=True):
            assert torch.equal(a_img, b_img) and torch.equal(a_tgt, b_tgt)


# ------------------------------------------------------------------------------ elastic: the world size changes

STEP = 16  # the global batch of the elastic tests: 4 streams x 4 samples


def _step_keys(shards, *, world: int, micro: int | None = None, workers: int = 0, start: int = 0, steps: int = 12):
    """The keys of the samples each global step from ``start`` on reads, over all ranks of a world of ``world``, each
    rank taking batches of ``micro`` (default: its whole share of a step) as the training loop does."""
    per_rank = STEP // world
    micro = micro or per_rank
    accum = per_rank // micro
    read = [Counter() for _ in range(steps)]
    for rank in range(world):
        spec = _spec(
            shards, batch_size=micro, rank=rank, world_size=world, streams=4, step_samples=STEP, seed=3,
            shuffle_block=5, start_batch=start * accum, with_keys=True, recycle_batches=True,
        )  # fmt: skip
        for i, (images, _, bad, keys) in enumerate(islice(make_loader(spec, workers=workers), steps * accum)):
            assert len(images) + bad == len(keys) == micro
            read[i // accum].update(keys)
    return read


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """Streams of different lengths: they cross into the next epoch at different steps."""
    root = write_shards(tmp_path_factory.mktemp("uneven"), {"train": [10, 9, 11, 8, 12, 10, 7, 13]})
    return open_shards(str(root), "train")


@pytest.fixture(scope="module")
def reference_steps(uneven_shards):
    return _step_keys(uneven_shards, world=1, micro=4)


@pytest.mark.parametrize(
    "world,micro,workers",
    [(1, None, 0), (2, 4, 0), (2, None, 2), (4, 4, 0), (4, None, 2), (1, 8, 2)],
    ids=["1-joined", "2-micro4", "2-whole-2workers", "4-micro4", "4-whole-2workers-sharing", "1-micro8-2workers"],
)
def test_every_world_size_reads_the_same_samples_at_every_step(uneven_shards, reference_steps, world, micro, workers):
    """Step s takes the same 4 samples from each of the 4 streams whether 1, 2 or 4 ranks read them, in whole
    micro-batches, in micro-batches joined from several streams, or with loader workers sharing a stream."""
    steps = _step_keys(uneven_shards, world=world, micro=micro, workers=workers)
    assert all(sum(step.values()) == STEP and set(step.values()) == {1} for step in steps)
    assert steps == reference_steps


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (4, 2), (1, 4)])
def test_a_resume_on_another_world_size_continues_with_the_same_steps(uneven_shards, reference_steps, before, after):
    halted = 5  # mid-epoch: 80 samples are 5 steps, and the streams' epochs end at different steps
    first = _step_keys(uneven_shards, world=before, steps=halted)
    rest = _step_keys(uneven_shards, world=after, start=halted, steps=12 - halted)
    assert first + rest == reference_steps


def test_an_epoch_of_steps_reads_every_sample_once_on_any_world_size(tmp_path):
    shards = open_shards(str(write_shards(tmp_path / "s", {"train": [10] * 8})), "train")  # 5 steps an epoch
    for world in (1, 2, 4):
        read = sum(_step_keys(shards, world=world, steps=5), Counter())
        assert sorted(read) == [f"s{i:05d}" for i in range(80)] and set(read.values()) == {1}


def test_streams_that_the_world_size_does_not_divide_are_refused(tmp_path):
    shards = open_shards(str(write_shards(tmp_path / "s", {"train": [4] * 4})), "train")
    with pytest.raises(ValueError, match="4 streams do not split evenly over 3 ranks"):
        _spec(shards, world_size=3, streams=4)
    with pytest.raises(ValueError, match="step_samples 10 must be a multiple of streams"):
        _spec(shards, streams=4, step_samples=10)


def test_recycled_batch_buffers_hold_the_same_batches_for_a_consumer_that_uses_each_at_once(tmp_path):
    """A training step is done with its batch before it asks for the next: the ring of shared-memory buffers
    (PREFETCH_FACTOR + 2 per worker) must then never overwrite a batch before its turn, over several laps. A
    consumer that keeps batches sees them overwritten: that is why only such loops opt in."""
    shards = open_shards(str(write_shards(tmp_path / "s", {"train": [7, 9, 6, 8]})), "train")
    spec = _spec(shards, seed=1, shuffle_block=4)
    kept = list(islice(make_loader(spec, workers=2), 40))  # fresh buffers: keeping them is safe
    recycled = StreamSpec(**{**spec.__dict__, "recycle_batches": True})
    used_at_once = []
    for img, tgt, _ in islice(make_loader(recycled, workers=2), 40):
        used_at_once.append((img.clone(), tgt.clone()))
    for (a_img, a_tgt, _), (b_img, b_tgt) in zip(kept, used_at_once, strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_tgt, b_tgt)
    kept_recycled = [img for img, _, _ in islice(make_loader(recycled, workers=2), 40)]
    overwritten = sum(not torch.equal(a, b) for (a, _, _), b in zip(kept, kept_recycled, strict=True))
    assert overwritten > 0  # the buffers really are reused


def test_epochs_and_seeds_change_the_order(tmp_path):
    shards = open_shards(str(write_shards(tmp_path / "s", {"train": [10, 10, 10]})), "train")

    def order(seed):
        stream = ShardStream(_spec(shards, seed=seed, shuffle_block=8))
        return [s["__key__"] for _, s in islice(stream._samples(0, 1, skip=0), 60)]

    first = order(0)
    assert first[:30] != first[30:] and sorted(first[:30]) == sorted(first[30:])
    assert first == order(0) and first != order(1)


def test_batches_hold_images_and_targets(tmp_path):
    shards = open_shards(str(write_shards(tmp_path / "s", {"train": [8]}, multi_label=True)), "train")
    assert shards.multi_label and shards.num_classes == NUM_CLASSES
    images, targets, bad = next(iter(make_loader(_spec(shards, shuffle_block=1), workers=0)))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    assert targets.shape == (4, NUM_CLASSES) and targets.sum(dim=1).tolist() == [2.0] * 4
    assert bad == 0


def test_an_undecodable_image_is_skipped_and_counted(tmp_path):
    root = write_shards(tmp_path / "s", {"train": [8]}, broken={"s00002": b"not a jpeg"})
    shards = open_shards(str(root), "train")
    batches = list(islice(make_loader(_spec(shards, shuffle_block=1), workers=0), 2))
    assert [(len(images), bad) for images, _, bad in batches] == [(3, 1), (4, 0)]


def test_damaged_and_inconsistent_shards_are_errors(tmp_path):
    root = write_shards(tmp_path / "s", {"train": [6, 6]})
    data = (root / "train-000001.tar").read_bytes()
    (root / "train-000001.tar").write_bytes(data[: len(data) // 2 + 100])
    stream = ShardStream(_spec(open_shards(str(root), "train"), shuffle_block=1))
    with pytest.raises(ShardsError, match="damaged tar|promised"):
        list(islice(stream._samples(0, 1, skip=0), 12))

    info = json.loads((root / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"] = [7, 6]  # the manifest disagrees with the tar
    (root / "_info.json").write_text(json.dumps(info))
    stream = ShardStream(_spec(open_shards(str(root), "train"), shuffle_block=1, repeat=False))
    with pytest.raises(ShardsError, match="promised 7"):
        list(stream._samples(0, 1, skip=0))


def test_missing_metadata_and_unknown_splits_are_clear(tmp_path):
    with pytest.raises(ShardsError, match="no _info.json"):
        open_shards(str(tmp_path), "train")
    root = write_shards(tmp_path / "s", {"train": [3]})
    with pytest.raises(ShardsError, match="no split 'val'; it has: train"):
        open_shards(str(root), "val")


def test_tar_reader_skips_without_reading_and_refuses_links(tmp_path):
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(4):
            _add(tar, f"dir/k{i}.jpg", b"x" * (i + 1))
            _add(tar, f"dir/k{i}.cls", str(i).encode())
        link = tarfile.TarInfo("evil.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with open(path, "rb") as f:
        samples = list(iter_tar_samples(f, skip=2))
    assert [s["__key__"] for s in samples] == ["dir/k2", "dir/k3"]
    assert samples[0] == {"__key__": "dir/k2", "jpg": b"xxx", "cls": b"2"}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_reads_what_tarfile_writes_in_every_format(tmp_path, fmt):
    long_dir = "deep/" + "d" * 90 if fmt == tarfile.USTAR_FORMAT else "deep/" + "d" * 140  # ustar: prefix field
    names = [f"{long_dir}/k0.jpg", f"{long_dir}/k0.json", "plain/k1.jpg", "big/k2.jpg"]
    if fmt == tarfile.PAX_FORMAT:
        names.append("ünïcode/k3.jpg")
    payloads = {name: (name * 37).encode()[: 100 + 700 * i] for i, name in enumerate(names)}
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("a-folder"))  # passed over, as links are
        for name, data in payloads.items():
            _add(tar, name, data)
    with open(path, "rb") as f:
        samples = list(iter_tar_samples(f))
    expected = {}
    for name, data in payloads.items():
        key, ext = name.rsplit(".", 1)
        expected.setdefault(key, {"__key__": key})[ext] = data
    assert samples == list(expected.values())

    with tarfile.open(path) as tar:
        header = tar.getmembers()[2].offset_data - 512  # the header just before the second file's data
    data = bytearray(path.read_bytes())
    data[header + 5] ^= 0xFF
    with pytest.raises(ShardsError, match="checksum"):
        list(iter_tar_samples(io.BytesIO(bytes(data))))


# --------------------------------------------------------------------------------------------- hostile tars


@contextlib.contextmanager
def no_hang(seconds: float = 10.0):
    """Fails the test, instead of hanging it, when the body runs longer than ``seconds`` (a parser that
    does not move forward spins in Python code, where the alarm's handler runs)."""

    def alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the tar reader does not move forward")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def raw_header(name: bytes, size_field: bytes, kind: bytes = b"0") -> bytes:
    """A ustar header written byte by byte, any size field allowed, with a correct checksum."""
    header = bytearray(512)
    header[: len(name)] = name
    header[100:108] = b"0000644\0"
    header[108:124] = b"0000000\x000000000\0"
    header[124:136] = size_field.ljust(12, b"\0")[:12]
    header[136:148] = b"00000000000\0"
    header[148:156] = b" " * 8
    header[156:157] = kind
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def raw_member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    return raw_header(name, b"%011o" % len(data), kind) + data + b"\0" * (-len(data) % 512)


def pax_member(records: bytes) -> bytes:
    return raw_member(b"././@PaxHeader", records, b"x")


GOOD_SAMPLE = raw_member(b"k0.jpg", b"jpeg bytes") + raw_member(b"k0.cls", b"1")
END = b"\0" * 1024

# the bytes after a good sample; where the fault is, from the end of that sample; the message; (False: no end blocks)
HOSTILE_TARS = {
    # PAX records whose length would not move the parser forward, or points nowhere
    "pax-length-zero": (pax_member(b"0 ") + raw_member(b"k1.jpg", b"x"), 0, "shorter than its own header"),
    "pax-length-zero-record": (pax_member(b"0 path=x\n"), 0, "shorter than its own header"),
    "pax-length-below-header": (pax_member(b"1 path=evil.jpg\n"), 0, "shorter than its own header"),
    "pax-length-cuts-the-record": (pax_member(b"3 path=evil.jpg\n"), 0, "malformed"),
    "pax-length-negative": (pax_member(b"-16 path=evil.jpg\n"), 0, "without a length"),
    "pax-length-garbage": (pax_member(b"zz path=evil.jpg\n"), 0, "without a length"),
    "pax-length-past-the-data": (pax_member(b"99 path=evil.jpg\n"), 0, "running past"),
    "pax-no-newline": (pax_member(b"17 path=evil.jpgX"), 0, "malformed"),
    "pax-no-equals": (pax_member(b"16 pathevil.jpg\n"), 0, "malformed"),
    "pax-negative-size": (pax_member(b"12 size=-50\n") + raw_member(b"k1.jpg", b"x"), 1024, "not a size"),
    "pax-garbage-size": (pax_member(b"12 size=1e9\n") + raw_member(b"k1.jpg", b"x"), 1024, "not a size"),
    # header size fields that are not sizes, or sizes that no data backs
    "size-negative-octal": (raw_header(b"k1.jpg", b"-0000000005"), 0, "not a size"),
    "size-garbage": (raw_header(b"k1.jpg", b"0000000zz17"), 0, "not a size"),
    "size-python-literal": (raw_header(b"k1.jpg", b"0o17"), 0, "not a size"),
    "size-negative-base256": (raw_header(b"k1.jpg", b"\xff" * 11 + b"\xfb"), 0, "not a size"),
    "size-past-the-end-read": (raw_header(b"k1.jpg", b"%011o" % 5000) + b"x" * 600, 512, "cut short"),
    "size-past-the-end-skipped": (raw_header(b"folder", b"%011o" % 10**9, b"5") + END, 512, "past the end"),
    "metadata-too-large": (raw_header(b"././@LongLink", b"%011o" % (1 << 30), b"L"), 0, "metadata"),
    "header-cut-short": (raw_header(b"k1.jpg", b"%011o" % 1)[:300], 0, "header cut short", False),
}


@pytest.mark.parametrize("case", HOSTILE_TARS.values(), ids=HOSTILE_TARS.keys())
def test_a_hostile_tar_is_an_error_naming_the_shard_and_the_place_never_a_hang(case):
    tail, offset, message, *ended = case
    data = GOOD_SAMPLE + tail + (END if ended != [False] else b"")
    with no_hang(), pytest.raises(ShardReadError, match=message) as caught:
        list(iter_tar_samples(io.BytesIO(data), shard="s3://bucket/train-000007.tar"))
    err = caught.value
    assert isinstance(err, ShardsError) and isinstance(err, ValueError)  # callers of either still catch it
    assert err.shard == "s3://bucket/train-000007.tar" and "train-000007.tar" in str(err)
    assert err.offset == len(GOOD_SAMPLE) + offset
    assert f"byte {err.offset}" in str(err)


def test_a_hostile_tar_read_as_a_stream_is_refused_without_reading_its_claimed_size():
    """A non-seekable stream cannot check sizes against its end: skipping must not allocate what the header
    claims (8 GiB here, in base-256), only read, a block at a time, what is there."""

    class Stream(io.RawIOBase):
        def __init__(self, data: bytes):
            self.data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            return self.data.readinto(buffer)

    claim = b"\x80" + (8 << 30).to_bytes(11, "big")
    data = GOOD_SAMPLE + raw_header(b"folder", claim, b"5") + b"y" * 4096
    with no_hang(), pytest.raises(ShardReadError, match="cut short") as caught:
        list(iter_tar_samples(io.BufferedReader(Stream(data)), shard="pipe"))
    assert caught.value.member == "folder" and caught.value.shard == "pipe"


def test_the_member_is_named_when_its_data_is_bad(tmp_path):
    path = tmp_path / "train-000003.tar"
    path.write_bytes(GOOD_SAMPLE + raw_header(b"dir/k1.jpg", b"%011o" % 4000) + b"x" * 100)
    with open(path, "rb") as f, pytest.raises(ShardReadError) as caught:
        list(iter_tar_samples(f))
    assert caught.value.shard == str(path)  # the file object's name when none is given
    assert caught.value.member == "dir/k1.jpg" and caught.value.offset == len(GOOD_SAMPLE) + 512


def test_a_shard_read_error_keeps_its_attributes_through_pickling():
    err = ShardReadError("damaged", shard="a.tar", member="k.jpg", offset=1024)
    copy = pickle.loads(pickle.dumps(err))
    assert (type(copy), str(copy), copy.shard, copy.member, copy.offset) == (
        ShardReadError,
        "damaged",
        "a.tar",
        "k.jpg",
        1024,
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_a_structurally_broken_shard_stops_training_with_a_shard_read_error(tmp_path, workers):
    """A bad image is a bad sample, counted and skipped; a broken tar is an error that names the shard, also
    out of a DataLoader worker (where torch re-raises the same type)."""
    root = write_shards(tmp_path / "s", {"train": [4, 4]}, broken={"s00001": b"not a jpeg"})
    shard = root / "train-000001.tar"
    good = shard.read_bytes()
    with tarfile.open(shard) as tar:
        at = tar.getmembers()[4].offset  # the header of the shard's third sample
    shard.write_bytes(good[:at] + pax_member(b"0 ") + good[at:])  # a zero-length PAX record before it
    shards = open_shards(str(root), "train")
    loader = make_loader(_spec(shards, shuffle_block=1, repeat=False, batch_size=2), workers=workers)
    with no_hang(60), pytest.raises(ShardReadError, match="train-000001.tar") as caught:
        bad = [b for _, _, b in loader]
    if workers == 0:
        assert caught.value.shard == str(shard) and caught.value.offset == at
    shard.write_bytes(good)
    bad = [b for _, _, b in make_loader(_spec(shards, shuffle_block=1, repeat=False, batch_size=2), workers=workers)]
    assert sum(bad) == 1  # the undecodable image: skipped and counted, not an error
