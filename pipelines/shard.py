"""Corpus -> WebDataset shards, as a Ray Data job.

    index   one row per input sample: key, where its bytes are (a file, or a byte range of a tar),
            its labels and its split. Folder trees and tars are listed; label tables are read.
    assign  shard = hash(seed, key) mod n_shards, order inside a shard by a second hash: a
            deterministic global shuffle with no sort, every shard a uniform random sample, and
            all copies of a key in the same shard (so duplicates are caught where they meet).
    write   per shard (groupby split, shard): read the bytes, normalise or reject each image,
            drop near-duplicates of the evaluation sets, stream the tar to a temporary name,
            rename it into place, then write a done-marker with its manifest row and rejects.
    finish  merge markers into manifest.parquet, rejects.parquet, _info.json (timm's format),
            classes.json and summary.json.

A rerun skips every shard whose marker exists, so a run killed at any point finishes without
duplicates or losses, and a finished run does nothing. Counts always balance:
read = written + rejected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import posixpath
import re
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa

from pipelines.images import ImagePolicy, RejectedImage, normalize_image

SourceKind = Literal["auto", "folder", "table", "tars"]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_DIRS = {"train", "val", "validation", "test", "valid"}
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_MTIME = 1_600_000_000  # fixed tar timestamps: the same inputs give byte-identical shards
WORK_DIR = "_work"


class ShardError(ValueError):
    """A problem with the sharding request itself (not with one image)."""


@dataclass(kw_only=True)
class ShardConfig:
    src: str  # fsspec URL of the corpus: a folder tree, a folder with a label table, or tars
    dst: str  # fsspec URL of the output folder
    source: SourceKind = "auto"
    labels: str | None = None  # label table (parquet/csv/jsonl); default: SRC/labels.{parquet,csv,jsonl}
    path_column: str = "path"  # relative to the table's folder, or absolute URLs
    label_column: str = "labels"  # a name/id or a list of names/ids per row
    key_column: str | None = None  # default: derived from the path
    split_column: str | None = None  # default: a "split" column when the table has one, else val_fraction by key hash
    val_fraction: float = 0.0
    shard_samples: int | None = 10_000  # target samples per shard ...
    shard_bytes: int | None = None  # ... or target bytes per shard (estimated from a sample of inputs)
    seed: int = 0
    max_side: int | None = None  # resize longer sides on ingest
    max_pixels: int = 89_478_485  # Pillow's own default bomb threshold
    jpeg_quality: int = 95
    eval_sets: list[str] = field(default_factory=list)  # fsspec URLs of downstream sets to de-duplicate against
    dedup_distance: int = 4  # max Hamming distance of 64-bit pHashes counted as a near-duplicate
    storage_options: dict = field(default_factory=dict)  # passed to fsspec (e.g. s3 endpoint, credentials)

    def fingerprint(self) -> str:
        """What decides the output; the same fingerprint means the same shards, byte for byte."""
        fields = dataclasses.asdict(self)
        fields.pop("storage_options")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(max_side=self.max_side, max_pixels=self.max_pixels, jpeg_quality=self.jpeg_quality)


@dataclass
class ShardSummary:
    dst: str
    read: int
    written: int
    rejected: int
    rejected_by_reason: dict[str, int]
    shards: int
    shards_written_now: int  # 0 when a finished run was started again
    bytes_written: int
    seconds: float
    splits: dict[str, int]

    @property
    def images_per_second(self) -> float:
        return (self.written + self.rejected) / self.seconds if self.seconds else 0.0

    def table(self) -> str:
        mb = self.bytes_written / 1e6
        lines = [
            f"{'read':<22}{self.read:>12,}",
            f"{'written':<22}{self.written:>12,}   " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.splits.items())),
            f"{'rejected':<22}{self.rejected:>12,}",
        ]
        lines += [f"  {reason:<20}{count:>12,}" for reason, count in sorted(self.rejected_by_reason.items())]
        lines += [
            f"{'shards':<22}{self.shards:>12,}   ({self.shards_written_now} written by this run)",
            f"{'bytes':<22}{mb:>11,.1f}M",
            f"{'time':<22}{self.seconds:>11,.1f}s   {self.images_per_second:,.0f} images/s, "
            f"{mb / self.seconds if self.seconds else 0:,.1f} MB/s",
        ]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ helpers


def _fs(url: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs, path.rstrip("/")


def _open_for_writing(fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb"):
    """``fs.open`` that first creates the parent folder (needed locally, harmless on object stores)."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    return fs.open(path, mode)


def _key_from_path(relpath: str) -> str:
    """A stable WebDataset key: no dots (Ray and webdataset split keys at the first dot)."""
    stem = relpath.rsplit(".", 1)[0] if "." in posixpath.basename(relpath) else relpath
    return _KEY_UNSAFE.sub("_", stem.replace("/", "__"))


def _hash64(seed: int, salt: str, keys: list[str]) -> np.ndarray:
    prefix = f"{seed}/{salt}/".encode()
    return np.array(
        [int.from_bytes(hashlib.blake2b(prefix + k.encode(), digest_size=8).digest(), "little") for k in keys],
        dtype=np.uint64,
    )


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


# ------------------------------------------------------------------------------------ index


INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("path", pa.string()),  # full path inside the filesystem
        ("offset", pa.int64()),  # -1: the whole file; else the byte range [offset, offset + length)
        ("length", pa.int64()),
        ("labels", pa.list_(pa.string())),
        ("split", pa.string()),
        ("source", pa.string()),  # where it came from, relative to SRC, for the json and the rejects
    ]
)


def _default_label_table(fs, root: str) -> str | None:
    """SRC/labels.parquet, .csv or .jsonl, whichever exists first."""
    return next((f"{root}/labels{s}" for s in TABLE_SUFFIXES if fs.exists(f"{root}/labels{s}")), None)


def _detect_source(fs, root: str, cfg: ShardConfig) -> str:
    if cfg.source != "auto":
        return cfg.source
    if cfg.labels or _default_label_table(fs, root):
        return "table"
    if fs.isfile(root) and root.endswith(".tar"):
        return "tars"
    files = fs.find(root, maxdepth=1) if fs.isdir(root) else []
    if files and all(f.endswith(".tar") for f in files):
        return "tars"
    return "folder"


def _index_folder(fs, root: str, cfg: ShardConfig) -> pa.Table:
    """A folder per class (optionally under train/ val/ test/ folders)."""
    listing = fs.find(root, detail=True)
    paths = sorted(p for p, info in listing.items() if info.get("type") == "file")
    rels = [p[len(root) + 1 :] for p in paths]
    rels_visible = [r for r in rels if not any(part.startswith(".") for part in r.split("/"))]
    top = {r.split("/", 1)[0] for r in rels_visible if "/" in r}
    split_layout = bool(top) and top <= SPLIT_DIRS
    keys, full, labels, splits = [], [], [], []
    for rel in rels_visible:
        parts = rel.split("/")
        split = None
        if split_layout and len(parts) > 1:
            split, parts = ("val" if parts[0] in ("validation", "valid") else parts[0]), parts[1:]
        label = parts[0] if len(parts) > 1 else None  # a file at the top has no class
        keys.append(_key_from_path(rel))
        full.append(f"{root}/{rel}")
        labels.append([label] if label else [])
        splits.append(split)
    return _index_table(keys, full, labels, splits, rels_visible, cfg)


def _index_table(keys, paths, labels, splits, sources, cfg: ShardConfig, offsets=None, lengths=None) -> pa.Table:
    n = len(keys)
    if any(s is None for s in splits):
        by_hash = _hash64(cfg.seed, "split", keys).astype(np.float64) / 2.0**64 < cfg.val_fraction
        splits = [s if s is not None else ("val" if v else "train") for s, v in zip(splits, by_hash)]
    return pa.table(
        {
            "key": keys,
            "path": paths,
            "offset": offsets if offsets is not None else [-1] * n,
            "length": lengths if lengths is not None else [-1] * n,
            "labels": labels,
            "split": splits,
            "source": sources,
        },
        schema=INDEX_SCHEMA,
    )


def _read_label_table(fs, url: str) -> pa.Table:
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    with fs.open(url, "rb") as f:
        if url.endswith(".parquet"):
            return pq.read_table(f)
        if url.endswith(".csv"):
            return pcsv.read_csv(f)
        return pjson.read_json(f)


def _index_label_table(fs, root: str, cfg: ShardConfig, classes: list[str] | None) -> pa.Table:
    table_url = cfg.labels
    if table_url is None:
        table_url = _default_label_table(fs, root)
        if table_url is None:
            raise ShardError(f"no label table in {root} (labels.parquet, labels.csv or labels.jsonl); pass labels=")
    else:
        table_url = _fs(table_url, cfg.storage_options)[1]
    table = _read_label_table(fs, table_url)
    for column in (cfg.path_column, cfg.label_column):
        if column not in table.column_names:
            raise ShardError(f"label table {table_url} has no column {column!r} (columns: {table.column_names})")
    base = posixpath.dirname(table_url)
    rels = [str(p) for p in table.column(cfg.path_column).to_pylist()]
    full = [p.split("://", 1)[-1] if "://" in p else f"{base}/{p}" for p in rels]
    raw_labels = table.column(cfg.label_column).to_pylist()
    labels = [_as_label_names(v, classes) for v in raw_labels]
    if cfg.key_column:
        keys = [_KEY_UNSAFE.sub("_", str(k)) for k in table.column(cfg.key_column).to_pylist()]
    else:
        keys = [_key_from_path(r) for r in rels]
    split_column = cfg.split_column or ("split" if "split" in table.column_names else None)
    if split_column:
        if split_column not in table.column_names:
            raise ShardError(f"label table {table_url} has no split column {split_column!r}")
        splits = [str(s) for s in table.column(split_column).to_pylist()]
    else:
        splits = [None] * len(keys)
    return _index_table(keys, full, labels, splits, rels, cfg)


def _as_label_names(value: Any, classes: list[str] | None) -> list[str]:
    """One label or a list, by name or id, to a list of names (ids through ``classes`` when known)."""
    if value is None:
        return []
    values = value if isinstance(value, list | tuple | np.ndarray) else [value]
    names = []
    for v in values:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        if isinstance(v, int | np.integer) and classes is not None and 0 <= int(v) < len(classes):
            names.append(classes[int(v)])
        else:
            names.append(str(v))
    return names


def _scan_tar(path: str, storage_options: dict, root: str, cfg: ShardConfig) -> tuple[pa.Table, list[dict]]:
    """Index one WebDataset tar: image members as byte ranges, labels from the json/cls members."""
    fs, _ = _fs(path, storage_options)
    samples: dict[str, dict] = {}
    order: list[str] = []
    rel = path[len(root) + 1 :] if path.startswith(root + "/") else posixpath.basename(path)
    failure = None
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            _scan_members(tar, samples, order)
    except (tarfile.TarError, OSError, EOFError) as err:
        # Keep what was read before the damage; the rest of the tar is one reject.
        failure = {"key": _key_from_path(rel), "source": rel, "reason": "unreadable-tar", "detail": str(err)[:500]}
    table = _tar_rows(samples, order, path, rel, cfg)
    return table, [failure] if failure else []


def _scan_members(tar: tarfile.TarFile, samples: dict[str, dict], order: list[str]) -> None:
    for member in tar:
        if not member.isfile():
            continue
        name = member.name
        base = posixpath.basename(name)
        if "." not in base:
            continue
        key = posixpath.join(posixpath.dirname(name), base.split(".", 1)[0])
        ext = base.split(".", 1)[1].lower()
        sample = samples.get(key)
        if sample is None:
            sample = samples[key] = {}
            order.append(key)
        if "." + ext in IMAGE_EXTENSIONS and "image" not in sample:
            sample["image"] = (member.offset_data, member.size)
        elif ext in ("json", "cls", "txt") and member.size < 1_000_000:
            sample[ext] = tar.extractfile(member).read()


def _tar_rows(samples: dict[str, dict], order: list[str], path: str, rel: str, cfg: ShardConfig) -> pa.Table:
    keys, paths, offsets, lengths, labels, splits, sources = [], [], [], [], [], [], []
    for key in order:
        sample = samples[key]
        names: list[str] = []
        split = None
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
                names = [str(n) for n in meta.get("labels") or meta.get("label_names") or []]
                split = meta.get("split") if cfg.split_column else None
            except (ValueError, AttributeError):
                names = []
        if not names and "cls" in sample:
            names = [sample["cls"].decode().strip()]
        offset, length = sample.get("image", (-1, 0))
        keys.append(_key_from_path(key))  # member keys carry no extension
        paths.append(path)
        offsets.append(offset if "image" in sample else -2)  # -2: no image member at all
        lengths.append(length)
        labels.append(names)
        splits.append(split)
        sources.append(f"{rel}:{key}")
    return _index_table(keys, paths, labels, splits, sources, cfg, offsets, lengths)


# ------------------------------------------------------------------------------------ evaluation sets


def _eval_hashes(urls: list[str], storage_options: dict) -> dict[int, str]:
    """pHash of every image in the evaluation sets (folder trees or single files)."""
    hashes: dict[int, str] = {}
    policy = ImagePolicy(min_side=1)
    for url in urls:
        fs, root = _fs(url, storage_options)
        files = [root] if fs.isfile(root) else sorted(fs.find(root))
        files = [p for p in files if posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS]
        if not files:
            raise ShardError(f"evaluation set {url} holds no images")
        for start in range(0, len(files), 256):
            chunk = files[start : start + 256]
            for path, data in fs.cat(chunk, on_error="return").items():
                if isinstance(data, Exception):
                    continue
                try:
                    hashes.setdefault(normalize_image(data, policy, with_phash=True).phash, path)
                except RejectedImage:
                    continue
    return hashes


class NearDuplicateIndex:
    """Hamming-ball lookup of 64-bit hashes by the pigeonhole principle: two hashes within distance
    d agree exactly on at least one of d + 1 disjoint bit blocks, so only those buckets are checked."""

    def __init__(self, hashes: dict[int, str], max_distance: int):
        self.max_distance = max_distance
        self.blocks = max_distance + 1
        self.width = -(-64 // self.blocks)
        self.tables: list[dict[int, list[int]]] = [{} for _ in range(self.blocks)]
        self.names = hashes
        for h in hashes:
            for b, part in enumerate(self._parts(h)):
                self.tables[b].setdefault(part, []).append(h)

    def _parts(self, h: int) -> list[int]:
        u = h & (2**64 - 1)
        mask = (1 << self.width) - 1
        return [(u >> (b * self.width)) & mask for b in range(self.blocks)]

    def match(self, h: int) -> str | None:
        u = h & (2**64 - 1)
        for b, part in enumerate(self._parts(h)):
            for candidate in self.tables[b].get(part, ()):
                if bin(u ^ (candidate & (2**64 - 1))).count("1") <= self.max_distance:
                    return self.names[candidate]
        return None

    def __len__(self) -> int:
        return len(self.names)


# ------------------------------------------------------------------------------------ writing


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what passes through on its way to ``sink``."""

    def __init__(self, sink):
        self.sink, self.sha256, self.bytes = sink, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sink.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)


def _member_header(name: str, size: int) -> bytes:
    """A ustar header for a regular read-only file. ``tarfile`` builds PAX headers at about 60 us a
    member, a third of the cost of checking the image itself; this builds the same bytes directly."""
    encoded = name.encode()
    if len(encoded) > 100:  # ustar's limit; tarfile's GNU format handles the rare long key
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, _MTIME, 0o444
        return info.tobuf(tarfile.GNU_FORMAT)
    header = bytearray(512)
    header[0 : len(encoded)] = encoded
    header[100:108] = b"0000444\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % _MTIME
    header[148:156] = b" " * 8  # checksum field counts as spaces while summing
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _write_member(sink, name: str, data: bytes) -> None:
    sink.write(_member_header(name, len(data)))
    sink.write(data)
    if len(data) % 512:
        sink.write(b"\0" * (512 - len(data) % 512))


class ShardWriter:
    """The per-shard task: called by Ray Data with one row per shard, holding that shard's index rows."""

    def __init__(self, cfg: ShardConfig, class_ids: dict[str, int], single_label: bool, eval_index):
        self.cfg, self.class_ids, self.single_label, self.eval_index = cfg, class_ids, single_label, eval_index
        self.policy = cfg.image_policy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.cfg
        fs, dst = _fs(cfg.dst, cfg.storage_options)
        split, index = batch.column("split")[0].as_py(), int(batch.column("shard")[0].as_py())
        rows = _from_ipc(batch.column("members")[0].as_py()).sort_by("order").to_pylist()
        name = _shard_name(split, index)
        tmp = f"{dst}/{WORK_DIR}/tmp/{name}.{uuid.uuid4().hex}"
        rejects: list[dict] = []
        histogram: Counter = Counter()
        written = 0
        with _open_for_writing(fs, tmp, "wb") as raw:
            sink = _HashingWriter(raw)
            for row, data in self._read(fs, rows):
                reason, detail = None, ""
                if isinstance(data, Exception):
                    reason, detail = _read_failure(data)
                elif not row["labels"]:
                    reason = "no-labels"
                else:
                    try:
                        image = normalize_image(data, self.policy, with_phash=bool(self.eval_index))
                    except RejectedImage as err:
                        reason, detail = err.reason, err.detail
                    else:
                        match = self.eval_index.match(image.phash) if self.eval_index else None
                        if match:
                            reason, detail = "duplicate-of-eval", match
                if reason:
                    rejects.append(self._reject(row, reason, detail, split, index))
                    continue
                ids = [self.class_ids[n] for n in row["labels"]]
                meta = {
                    "labels": row["labels"],
                    "label_ids": ids,
                    "source": row["source"],
                    "width": image.width,
                    "height": image.height,
                    "source_format": image.source_format,
                    "reencoded": image.reencoded,
                }
                _write_member(sink, f"{row['key']}.jpg", image.data)
                _write_member(sink, f"{row['key']}.json", json.dumps(meta, sort_keys=True).encode())
                if self.single_label:
                    _write_member(sink, f"{row['key']}.cls", str(ids[0]).encode())
                histogram.update(ids)
                written += 1
            sink.write(b"\0" * 1024)  # end-of-archive marker: two zero blocks
        fs.mv(tmp, f"{dst}/{name}")  # the commit: the shard appears whole or not at all
        entry = {
            "split": split,
            "shard": index,
            "filename": name,
            "samples": written,
            "bytes": sink.bytes,
            "sha256": sink.sha256.hexdigest(),
            "label_histogram": json.dumps({str(k): v for k, v in sorted(histogram.items())}),
            "rejected": len(rejects),
        }
        # The marker goes last: a shard without one is redone (identically) by the next run.
        marker = {"manifest": entry, "rejects": rejects}
        with _open_for_writing(fs, f"{dst}/{WORK_DIR}/done/{split}-{index:06d}.json", "w") as f:
            json.dump(marker, f)
        return pa.table({"split": [split], "shard": [index], "samples": [written], "rejected": [len(rejects)]})

    def _read(self, fs, rows: list[dict]) -> Iterator[tuple[dict, bytes | Exception]]:
        """Bytes of each row, fetched concurrently in chunks (S3 latency hides behind the decode)."""
        chunk = 64
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(self._fetch, fs, rows[:chunk])
            for start in range(0, len(rows), chunk):
                data = future.result()
                if start + chunk < len(rows):
                    future = pool.submit(self._fetch, fs, rows[start + chunk : start + 2 * chunk])
                yield from zip(rows[start : start + chunk], data)

    @staticmethod
    def _fetch(fs, rows: list[dict]) -> list[bytes | Exception]:
        out: list[bytes | Exception] = [b""] * len(rows)
        whole = [i for i, r in enumerate(rows) if r["offset"] == -1]
        ranged = [i for i, r in enumerate(rows) if r["offset"] >= 0]
        for i, r in enumerate(rows):
            if r["offset"] == -2:
                out[i] = LookupError("tar sample has no image member")
        if whole:
            fetched = fs.cat([rows[i]["path"] for i in whole], on_error="return")
            for i in whole:
                out[i] = fetched.get(rows[i]["path"], FileNotFoundError(rows[i]["path"]))
        if ranged:
            paths = [rows[i]["path"] for i in ranged]
            starts = [rows[i]["offset"] for i in ranged]
            ends = [rows[i]["offset"] + rows[i]["length"] for i in ranged]
            try:
                for i, data in zip(ranged, fs.cat_ranges(paths, starts, ends, on_error="return")):
                    out[i] = data
            except Exception as err:  # the whole tar is unreadable
                for i in ranged:
                    out[i] = err
        return out

    @staticmethod
    def _reject(row: dict, reason: str, detail: str, split: str, index: int) -> dict:
        return {
            "key": row["key"],
            "source": row["source"],
            "reason": reason,
            "detail": detail[:500],
            "split": split,
            "shard": index,
        }


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


def _read_failure(err: Exception) -> tuple[str, str]:
    if isinstance(err, FileNotFoundError):
        return "missing-file", str(err)
    if isinstance(err, LookupError):
        return "no-image", str(err)
    return "read-error", f"{type(err).__name__}: {err}"


# ------------------------------------------------------------------------------------ the job

REJECTS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("split", pa.string()),
        ("shard", pa.int64()),
    ]
)
MANIFEST_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("shard", pa.int64()),
        ("filename", pa.string()),
        ("samples", pa.int64()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("label_histogram", pa.string()),
        ("rejected", pa.int64()),
    ]
)


def shard_corpus(cfg: ShardConfig, *, overwrite: bool = False, progress: bool = False, log=print) -> ShardSummary:
    """Run (or finish, or confirm) the sharding of ``cfg.src`` into ``cfg.dst``. Needs Ray initialised
    (``ray.init()`` on a laptop, ``ray.init(address=...)`` on a cluster); starts a local one otherwise.
    ``progress`` shows a bar of shards and images written (instead of Ray Data's per-operator bars)."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    if not cfg.shard_samples and not cfg.shard_bytes:
        raise ShardError("set shard_samples or shard_bytes")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ShardError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    started = time.perf_counter()
    src_fs, src = _fs(cfg.src, cfg.storage_options)
    dst_fs, dst = _fs(cfg.dst, cfg.storage_options)
    if not src_fs.exists(src):
        raise ShardError(f"source {cfg.src} does not exist")

    fingerprint = cfg.fingerprint()
    plan_path = f"{dst}/{WORK_DIR}/plan.json"
    summary_path = f"{dst}/summary.json"
    if overwrite and dst_fs.exists(dst):
        dst_fs.rm(dst, recursive=True)
    if dst_fs.exists(summary_path):
        done = json.loads(dst_fs.cat_file(summary_path))
        if done.get("fingerprint") == fingerprint:
            log(f"{cfg.dst} already holds these shards (fingerprint {fingerprint}); nothing to do")
            return ShardSummary(**{**done["summary"], "shards_written_now": 0, "seconds": 0.0})
        raise ShardError(f"{cfg.dst} holds shards made with other settings; pass overwrite=True (--overwrite)")
    if dst_fs.exists(plan_path):
        plan = json.loads(dst_fs.cat_file(plan_path))
        if plan.get("fingerprint") != fingerprint:
            raise ShardError(
                f"{cfg.dst} holds an unfinished run with other settings; pass overwrite=True (--overwrite)"
            )
    elif dst_fs.exists(dst) and dst_fs.ls(dst):
        raise ShardError(f"{cfg.dst} is not empty and holds no sharding run; choose an empty destination")

    kind = _detect_source(src_fs, src, cfg)
    classes_in = _load_classes(src_fs, src)
    log(f"indexing {cfg.src} ({kind})")
    index, plan_rejects = _build_index(kind, src_fs, src, cfg, classes_in)
    if index.num_rows == 0 and not plan_rejects:
        raise ShardError(f"no samples found in {cfg.src}")
    index, duplicates = _drop_duplicate_keys(index)
    plan_rejects += duplicates
    read = index.num_rows + len(plan_rejects)

    all_labels = index.column("labels").to_pylist()
    classes = _class_list(classes_in, sorted({n for labels in all_labels for n in labels}))
    class_ids = {name: i for i, name in enumerate(classes)}
    single_label = all(len(labels) <= 1 for labels in all_labels)
    samples_per_shard = cfg.shard_samples or _samples_for_bytes(src_fs, index, cfg.shard_bytes)
    index, num_shards = _assign_shards(index, samples_per_shard, cfg.seed)
    splits, shard = index.column("split").to_pylist(), index.column("shard").to_pylist()
    per_split = Counter(splits)

    with _open_for_writing(dst_fs, plan_path, "w") as f:
        json.dump({"fingerprint": fingerprint, "config": dataclasses.asdict(cfg) | {"storage_options": {}}}, f)
    with _open_for_writing(dst_fs, f"{dst}/{WORK_DIR}/plan_rejects.json", "w") as f:
        json.dump(plan_rejects, f)
    done = _done_shards(dst_fs, dst)
    todo = [(s, i) for s, n in sorted(num_shards.items()) for i in range(n) if (s, i) not in done]
    log(
        f"{index.num_rows:,} samples, {len(classes):,} classes, "
        + ", ".join(f"{s}: {n:,} in {num_shards[s]:,} shards" for s, n in sorted(per_split.items()))
        + (f"; {len(done)} shards already done" if done else "")
    )

    eval_index = None
    if cfg.eval_sets:
        eval_index = NearDuplicateIndex(_eval_hashes(cfg.eval_sets, cfg.storage_options), cfg.dedup_distance)
        log(f"de-duplicating against {len(eval_index):,} evaluation images (pHash distance <= {cfg.dedup_distance})")

    written_now = 0
    if todo:
        import ray.data

        # One row per shard, its members as Arrow IPC bytes: the driver already knows every shard's
        # members, so no Ray Data shuffle (and none of its operators competing for CPUs) is needed.
        work = []
        todo_set = set(todo)
        by_shard: dict[tuple[str, int], list[int]] = {}
        for row, (s_, i_) in enumerate(zip(splits, shard)):
            if (s_, i_) in todo_set:
                by_shard.setdefault((s_, i_), []).append(row)
        for (s_, i_), rows in sorted(by_shard.items()):
            members = index.take(pa.array(rows, pa.int64()))
            work.append({"split": s_, "shard": i_, "members": _to_ipc(members)})
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        ds = ray.data.from_items(work, override_num_blocks=len(work))
        results = ds.map_batches(
            ShardWriter,
            fn_constructor_args=(cfg, class_ids, single_label, eval_index),
            batch_size=1,
            batch_format="pyarrow",
            # a fixed pool: an autoscaling one starts with a single actor and shards would queue behind it
            concurrency=max(1, min(len(work), cpus)),
        )
        if progress:
            ds.context.enable_progress_bars = False
        written_now = _drain(results, len(work), sum(len(r) for r in by_shard.values()), progress)
    summary = _finish(dst_fs, dst, cfg, classes, single_label, num_shards, read, fingerprint, started, written_now)
    return summary


def _drain(results, shards: int, images: int, progress: bool) -> int:
    """Consume the writers' one-row results (this is what runs the job); returns the shards written."""
    from tqdm.auto import tqdm

    done = 0
    with tqdm(total=images, unit="img", unit_scale=True, disable=not progress, desc="sharding") as bar:
        for row in results.iter_rows():
            done += 1
            bar.update(row["samples"] + row["rejected"])
            bar.set_postfix_str(f"{done}/{shards} shards")
    return done


def _build_index(kind: str, fs, root: str, cfg: ShardConfig, classes: list[str] | None):
    """The index table, and the inputs rejected while building it (unreadable tars)."""
    if kind == "folder":
        if not fs.isdir(root):
            raise ShardError(f"{cfg.src} is not a folder")
        return _index_folder(fs, root, cfg), []
    if kind == "table":
        return _index_label_table(fs, root, cfg, classes), []
    if kind == "tars":
        tars = [root] if fs.isfile(root) else sorted(p for p in fs.find(root) if p.endswith(".tar"))
        if not tars:
            raise ShardError(f"no .tar files in {cfg.src}")
        import ray

        @ray.remote
        def scan(path: str) -> tuple[pa.Table, list[dict]]:
            return _scan_tar(path, cfg.storage_options, root, cfg)

        scanned = ray.get([scan.remote(p if "://" not in cfg.src else _url(cfg.src, p)) for p in tars])
        return pa.concat_tables([t for t, _ in scanned]), [r for _, rejects in scanned for r in rejects]
    raise ShardError(f"unknown source kind {kind!r}; expected folder, table or tars")


def _url(src_url: str, path: str) -> str:
    protocol = src_url.split("://", 1)[0]
    return f"{protocol}://{path}"


def _load_classes(fs, root: str) -> list[str] | None:
    path = f"{root}/classes.json"
    if not fs.isdir(root) or not fs.exists(path):
        return None
    entries = json.loads(fs.cat_file(path))
    if entries and isinstance(entries[0], dict):
        entries = [e["name"] for e in sorted(entries, key=lambda e: e["id"])]
    return [str(e) for e in entries]


def _class_list(given: list[str] | None, seen: list[str]) -> list[str]:
    """The given class list (its ids are kept), extended by any label it does not name."""
    if given is None:
        return seen
    known = set(given)
    return list(given) + [n for n in seen if n not in known]


def _drop_duplicate_keys(index: pa.Table) -> tuple[pa.Table, list[dict]]:
    """Keep the first row of each key (in listing/table order); the others are rejects."""
    keys = index.column("key").to_pylist()
    first: dict[str, int] = {}
    keep = np.ones(len(keys), dtype=bool)
    rejects = []
    sources = index.column("source").to_pylist()
    for i, key in enumerate(keys):
        if key in first:
            keep[i] = False
            rejects.append(
                {
                    "key": key,
                    "source": sources[i],
                    "reason": "duplicate-key",
                    "detail": f"same key as {sources[first[key]]}",
                }
            )
        else:
            first[key] = i
    return (index if keep.all() else index.filter(pa.array(keep))), rejects


def _assign_shards(index: pa.Table, samples_per_shard: int, seed: int) -> tuple[pa.Table, dict[str, int]]:
    """A seeded permutation of each split, cut into consecutive shards of exactly ``samples_per_shard``
    (the last one shorter): deterministic, and every shard a uniform random sample of its split."""
    order = _hash64(seed, "order", index.column("key").to_pylist())
    splits = np.array(index.column("split").to_pylist(), dtype=object)
    shard = np.zeros(index.num_rows, dtype=np.int64)
    num_shards = {}
    for split in sorted(set(splits)):
        members = np.flatnonzero(splits == split)
        rank = np.empty(len(members), dtype=np.int64)
        rank[np.argsort(order[members], kind="stable")] = np.arange(len(members))
        shard[members] = rank // samples_per_shard
        num_shards[split] = -(-len(members) // samples_per_shard)
    index = index.append_column("shard", pa.array(shard)).append_column("order", pa.array(order))
    return index, num_shards


def _samples_for_bytes(fs, index: pa.Table, target_bytes: int) -> int:
    """Samples per shard for a byte target, from the mean size of up to 256 sampled inputs."""
    lengths = np.array(index.column("length").to_pylist())
    known = lengths[lengths > 0]
    if known.size == 0:
        step = max(1, index.num_rows // 256)
        paths = index.column("path").to_pylist()[::step][:256]
        known = np.array([fs.size(p) for p in paths if fs.exists(p)] or [100_000])
    per_sample = float(known.mean()) + 1536  # tar headers and the json sidecar
    return max(1, int(target_bytes // per_sample))


def _done_shards(fs, dst: str) -> set[tuple[str, int]]:
    done_dir = f"{dst}/{WORK_DIR}/done"
    if not fs.exists(done_dir):
        return set()
    out = set()
    for path in fs.ls(done_dir, detail=False):
        name = posixpath.basename(path).removesuffix(".json")
        split, _, index = name.rpartition("-")
        if fs.exists(f"{dst}/{_shard_name(split, int(index))}"):
            out.add((split, int(index)))
    return out


def _finish(fs, dst, cfg, classes, single_label, num_shards, read, fingerprint, started, written_now) -> ShardSummary:
    import pyarrow.parquet as pq

    manifest_rows = []
    reject_rows = [
        {**r, "split": None, "shard": None} for r in json.loads(fs.cat_file(f"{dst}/{WORK_DIR}/plan_rejects.json"))
    ]
    for split, n in sorted(num_shards.items()):
        for i in range(n):
            marker = json.loads(fs.cat_file(f"{dst}/{WORK_DIR}/done/{split}-{i:06d}.json"))
            manifest_rows.append(marker["manifest"])
            reject_rows += marker["rejects"]
    manifest = pa.Table.from_pylist(manifest_rows, schema=MANIFEST_SCHEMA)
    rejects = pa.Table.from_pylist(reject_rows, schema=REJECTS_SCHEMA)
    written = sum(r["samples"] for r in manifest_rows)
    if written + len(reject_rows) != read:
        raise RuntimeError(f"counts do not balance: read {read} != written {written} + rejected {len(reject_rows)}")
    with _open_for_writing(fs, f"{dst}/manifest.parquet", "wb") as f:
        pq.write_table(manifest, f)
    with _open_for_writing(fs, f"{dst}/rejects.parquet", "wb") as f:
        pq.write_table(rejects, f)
    with _open_for_writing(fs, f"{dst}/classes.json", "w") as f:
        json.dump([{"id": i, "name": n} for i, n in enumerate(classes)], f, indent=0)
    splits_info = {}
    for split in sorted(num_shards):
        rows = [r for r in manifest_rows if r["split"] == split]
        splits_info[split] = {
            "name": split,
            "num_samples": sum(r["samples"] for r in rows),
            "filenames": [r["filename"] for r in rows],
            "shard_lengths": [r["samples"] for r in rows],
        }
    # multi_label tells the trainer which loss to use (sigmoid for multi-hot targets, softmax otherwise)
    info = {
        "name": posixpath.basename(dst),
        "num_classes": len(classes),
        "multi_label": not single_label,
        "splits": splits_info,
    }
    with _open_for_writing(fs, f"{dst}/_info.json", "w") as f:
        json.dump(info, f, indent=1)
    summary = ShardSummary(
        dst=cfg.dst,
        read=read,
        written=written,
        rejected=len(reject_rows),
        rejected_by_reason=dict(Counter(r["reason"] for r in reject_rows)),
        shards=len(manifest_rows),
        shards_written_now=written_now,
        bytes_written=sum(r["bytes"] for r in manifest_rows),
        seconds=time.perf_counter() - started,
        splits={s: v["num_samples"] for s, v in splits_info.items()},
    )
    # summary.json is written last: its presence with this fingerprint means "finished".
    with _open_for_writing(fs, f"{dst}/summary.json", "w") as f:
        json.dump({"fingerprint": fingerprint, "summary": dataclasses.asdict(summary)}, f, indent=1)
    fs.rm(f"{dst}/{WORK_DIR}", recursive=True)  # markers served their purpose: summary.json says "done"
    return summary


# ------------------------------------------------------------------------------------ verify


def verify_shards(dst_url: str, storage_options: dict | None = None, workers: int = 8) -> list[str]:
    """Recheck every shard against the manifest: sha256, size, sample count. Returns the problems."""
    import pyarrow.parquet as pq

    fs, dst = _fs(dst_url, storage_options or {})
    if not fs.exists(f"{dst}/manifest.parquet"):
        return [f"no manifest.parquet in {dst_url}"]
    with fs.open(f"{dst}/manifest.parquet", "rb") as f:
        manifest = pq.read_table(f).to_pylist()

    def check(entry: dict) -> list[str]:
        path = f"{dst}/{entry['filename']}"
        if not fs.exists(path):
            return [f"{entry['filename']}: missing"]
        sha, size, keys = hashlib.sha256(), 0, set()
        try:
            with fs.open(path, "rb") as raw:
                reader = _HashingReader(raw, sha)
                with tarfile.open(fileobj=reader, mode="r|") as tar:
                    for member in tar:
                        keys.add(posixpath.basename(member.name).split(".", 1)[0])
                reader.drain()
                size = reader.bytes
        except tarfile.TarError as err:
            return [f"{entry['filename']}: not a readable tar ({err})"]
        problems = []
        if size != entry["bytes"]:
            problems.append(f"{entry['filename']}: {size} bytes, manifest says {entry['bytes']}")
        if sha.hexdigest() != entry["sha256"]:
            problems.append(f"{entry['filename']}: sha256 differs from the manifest")
        if len(keys) != entry["samples"]:
            problems.append(f"{entry['filename']}: {len(keys)} samples, manifest says {entry['samples']}")
        return problems

    with ThreadPoolExecutor(workers) as pool:
        return [p for problems in pool.map(check, manifest) for p in problems]


class _HashingReader(io.RawIOBase):
    def __init__(self, source, sha):
        self.source, self.sha, self.bytes = source, sha, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass
