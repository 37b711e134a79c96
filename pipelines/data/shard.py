"""Corpus -> WebDataset shards, as Ray Data jobs. Nothing per image is held on the driver.

    index   Ray Data tasks list the corpus a unit at a time (a class folder, a part of a row group
            of the label table, a tar): one row per input sample with its key, where its bytes are (a file, or a
            byte range of a tar), its labels, its split, and ``order``, a seeded hash of the key.
    plan    a global shuffle with no global sort: the top bits of ``order`` cut the rows into
            buckets (one groupby), each sorted, cleared of repeated keys and stored as parquet by
            one task. Running sums of the per-bucket counts rank every row in its split, and shard i
            holds ranks [i * n, (i + 1) * n): every shard a uniform random sample, deterministic.
    write   per shard: read its rows from the buckets that cover them, read the bytes, normalise or
            reject each image, drop near-duplicates of the evaluation sets, stream the tar to a
            temporary name, rename it into place, then write a done-marker with its manifest row
            and rejects.
    finish  merge markers into manifest.parquet, rejects.parquet, _info.json (timm's format),
            classes.json and summary.json.

The plan is stored before any shard is written and a rerun skips every shard whose marker exists,
so a run killed at any point finishes without duplicates or losses, and a finished run does
nothing. Counts always balance: read = written + rejected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import itertools
import json
import math
import os
import posixpath
import re
import stat
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from pipelines.common.config import check
from pipelines.common.ray import init_ray
from pipelines.common.storage import filesystem, open_for_writing
from pipelines.data.images import ImagePolicy, RejectedImage, normalize_image

SourceKind = Literal["auto", "folder", "table", "tars"]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_DIRS = {"train", "val", "validation", "test", "valid"}
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
# Keys made unique when two files of a folder share a stem (img1.jpg, img1.png): the later one listed gets
# "~" and its extension (img1~png). Keys derived from paths never hold "~", so such a key cannot meet one.
KEY_SUFFIX = "~"
_TAR_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-~]")  # keys read back from tars keep the suffix
_MTIME = 1_600_000_000  # fixed tar timestamps: the same inputs give byte-identical shards
_WRITE_BYTES = 1 << 20  # a shard is written in pieces of about this size

# Everything shard_corpus writes in DST, and nothing else: a DST holding anything more is not replaced.
WORK_DIR = "_work"  # the plan, done-markers and temporary shards of a run; removed when it finishes
MANIFEST_FILE, INFO_FILE, CLASSES_FILE = "manifest.parquet", "_info.json", "classes.json"
REJECTS_FILE, SUMMARY_FILE = "rejects.parquet", "summary.json"
OUTPUT_FILES = (MANIFEST_FILE, INFO_FILE, CLASSES_FILE, REJECTS_FILE, SUMMARY_FILE)
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")  # a split names shard files: no "/", no ".."
_SHARD_FILE = re.compile(rf"(?:{SPLIT_NAME.pattern})-[0-9]{{6,}}\.tar")  # _shard_name's names


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
    # Inputs larger than this are rejected (file-too-large) from their listed or stat'ed size, never read
    max_file_bytes: int = 64 * 2**20
    # Symlinks in a folder or tar source are read only when they resolve to a regular file inside SRC
    # (rejected as "symlink" otherwise); True reads those resolving to a regular file anywhere.
    follow_symlinks: bool = False
    eval_sets: list[str] = field(default_factory=list)  # fsspec URLs of downstream sets to de-duplicate against
    dedup_distance: int = 4  # max Hamming distance of 64-bit pHashes counted as a near-duplicate
    storage_options: dict = field(default_factory=dict)  # passed to fsspec (e.g. s3 endpoint, credentials)

    def __post_init__(self) -> None:
        """Settings checked before any work (a negative shard size would otherwise fail only after the whole job)."""
        for name in ("shard_samples", "shard_bytes", "max_side"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{name}: must be at least 1 (or unset), got {value}")
        check(bool(self.shard_samples or self.shard_bytes), "shard_samples: set shard_samples or shard_bytes")
        check(0.0 <= self.val_fraction < 1.0, f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        check(1 <= self.jpeg_quality <= 100, f"jpeg_quality: must be in [1, 100], got {self.jpeg_quality}")
        check(0 <= self.dedup_distance <= 64, f"dedup_distance: must be in [0, 64] bits, got {self.dedup_distance}")
        check(self.max_pixels >= 1, f"max_pixels: must be at least 1, got {self.max_pixels}")
        check(self.max_file_bytes >= 1, f"max_file_bytes: must be at least 1, got {self.max_file_bytes}")

    def fingerprint(self) -> str:
        """What decides the output; the same fingerprint means the same shards, byte for byte."""
        fields = dataclasses.asdict(self)
        fields.pop("storage_options")
        for name, default in _FINGERPRINT_DEFAULTS.items():  # added later: left out at their default, so
            if fields[name] == default:  # outputs made before they existed keep their fingerprint
                fields.pop(name)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(
            max_side=self.max_side,
            max_pixels=self.max_pixels,
            jpeg_quality=self.jpeg_quality,
            max_bytes=self.max_file_bytes,
        )


# 64 MiB was already the limit (checked after reading, as ImagePolicy.max_bytes), so outputs are unchanged
_FINGERPRINT_DEFAULTS = {"max_file_bytes": 64 * 2**20, "follow_symlinks": False}


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


def _key_from_path(relpath: str) -> str:
    """A stable WebDataset key: no dots (Ray and webdataset split keys at the first dot)."""
    stem = relpath.rsplit(".", 1)[0] if "." in posixpath.basename(relpath) else relpath
    return _KEY_UNSAFE.sub("_", stem.replace("/", "__"))


def _key_from_member(key: str) -> str:
    """The key of a sample read from a tar: as ``_key_from_path``, but a ``KEY_SUFFIX`` made by an earlier
    sharding is kept, so re-sharding keeps every key."""
    return _TAR_KEY_UNSAFE.sub("_", key.replace("/", "__"))


def _suffixed_key(key: str, source: str, taken: set[str]) -> str:
    """A key for a file whose derived ``key`` an earlier file of the same stem holds: ``key~ext``
    (``key~ext~2``, ... if even that is taken, as for ``a b.jpg`` beside ``a_b.jpg``)."""
    name = posixpath.basename(source)
    ext = _KEY_UNSAFE.sub("_", name.rsplit(".", 1)[1]) if "." in name else ""
    base = f"{key}{KEY_SUFFIX}{ext}" if ext else key
    numbered = (f"{base}{KEY_SUFFIX}{n}" for n in itertools.count(2))
    return next(c for c in itertools.chain([base] if ext else [], numbered) if c not in taken)


def _keys_from_paths(relpaths: pa.Array) -> list[str]:
    """``_key_from_path`` of each path, in Arrow: the Python version costs ~3 us a path."""
    import pyarrow.compute as pc

    stems = pc.replace_substring_regex(relpaths, pattern=r"\.[^./]*$", replacement="", max_replacements=1)
    return _safe_keys(pc.replace_substring(stems, pattern="/", replacement="__"))


def _safe_keys(keys: pa.Array) -> list[str]:
    import pyarrow.compute as pc

    return pc.replace_substring_regex(keys, pattern=_KEY_UNSAFE.pattern, replacement="_").to_pylist()


def _hash64(seed: int, salt: str, keys: list[str]) -> np.ndarray:
    prefix = f"{seed}/{salt}/".encode()
    return np.array(
        [int.from_bytes(hashlib.blake2b(prefix + k.encode(), digest_size=8).digest(), "little") for k in keys],
        dtype=np.uint64,
    )


def _shard_name(split: str, index: int) -> str:
    """A shard's file name (``_SHARD_FILE`` matches every one: keep the two together)."""
    return f"{split}-{index:06d}.tar"


# ------------------------------------------------------------------------------------ index
#
# The index is a Ray Data dataset, never a table on the driver: listing units (a class folder, a row
# group of the label table, a tar) are indexed by tasks, and each row carries its listing position
# (``seq``) and its place in the global shuffle (``order``, a seeded hash of the key).


INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        # full path inside the filesystem; null when it is the plan's ``path_base`` joined with ``source``
        # (every file of a folder or label-table source: a quarter of the index's bytes saved)
        ("path", pa.string()),
        # -1: the whole file; -2: no image at all; else the byte range [offset, offset + length)
        ("offset", pa.int64()),
        ("length", pa.int64()),
        ("labels", pa.list_(pa.string())),
        ("split", pa.string()),
        ("source", pa.string()),  # where it came from, relative to SRC, for the json and the rejects
        ("order", pa.uint64()),  # position in the global shuffle
        ("seq", pa.int64()),  # listing order: of rows sharing a key, the first listed is kept
        ("reason", pa.string()),  # set when the input is rejected while listing (a FIFO, an unreadable tar)
        ("detail", pa.string()),
    ]
)
_UNIT_ROWS = 1 << 32  # seq = unit number * _UNIT_ROWS + row within the unit
_INDEX_CHUNK = 65_536  # rows per block a listing unit yields (~20 MB)
_TABLE_PART_ROWS = 65_536  # rows of a label table one task indexes


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


def _visible(name: str) -> bool:
    return not posixpath.basename(name.rstrip("/")).startswith(".")


# ------------------------------------------------------------------------------------ what is read
#
# Only regular files are read, and none larger than ``max_file_bytes``: both are decided from the
# listing's own metadata (fsspec's ``ls``/``find`` with details: type and size at no extra cost, locally
# and on object stores) and checked again on the open file before reading (a local file is opened
# non-blocking and fstat'ed, an object is read by a ranged request of at most the cap). A FIFO, socket or
# device is rejected as ``not-a-regular-file``, never opened for a blocking read. Symlinks (local only) are
# read when they resolve to a regular file inside SRC (anywhere with ``follow_symlinks``), else rejected
# as ``symlink``; symlinked folders are never descended into. A label table names its files itself: those
# are read wherever they are, links followed, but only when regular and within the cap.


class _Refused(Exception):
    """An input refused before its bytes are read, with its reject reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _entry(path: str, info: dict) -> list:
    """What the listing says of a file: [path, type, size, is a symlink] (compact: it travels in unit specs)."""
    return [path.rstrip("/"), info.get("type"), info.get("size"), bool(info.get("islink"))]


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


class _ListingCheck:
    """Rejects decided from the listing alone: nothing is opened, symlinks are resolved, nothing else stat'ed."""

    def __init__(self, fs, root: str, cfg: ShardConfig, *, cap: int | None = -1):
        self.cap = cfg.max_file_bytes if cap == -1 else cap  # None: no cap (tars)
        self.follow = cfg.follow_symlinks
        self.real_root = os.path.realpath(root) if isinstance(fs, LocalFileSystem) else None

    def reason(self, path: str, kind: str | None, size: int | None, link: bool) -> tuple[str, str] | None:
        if link and self.real_root is not None:
            return self._link(path)
        if kind not in ("file", None):  # None: a filesystem that does not say; the read checks
            return "not-a-regular-file", self._kind(path, kind)
        if self.cap is not None and size is not None and size > self.cap:
            return "file-too-large", f"{size} bytes > {self.cap}"
        return None

    def reasons(self, paths: list[str], infos: list[dict]) -> list[tuple[str, str] | None]:
        """``reason`` of each file from its listing details (fsspec's info dicts), in one pass."""
        cap = self.cap if self.cap is not None else float("inf")
        return [
            None
            if info.get("type") == "file" and not info.get("islink") and (info.get("size") or 0) <= cap
            else self.reason(path, info.get("type"), info.get("size"), bool(info.get("islink")))
            for path, info in zip(paths, infos)
        ]

    def _link(self, path: str) -> tuple[str, str] | None:
        try:
            target = os.path.realpath(path, strict=True)
            info = os.stat(target)
        except OSError as err:
            return "symlink", f"a broken link ({err.strerror})"
        if not stat.S_ISREG(info.st_mode):
            return "symlink", f"a link to {_file_kind(info.st_mode)} ({target})"
        if not self.follow and not target.startswith(self.real_root + os.sep):
            return "symlink", f"a link to {target}, outside the source"
        if self.cap is not None and info.st_size > self.cap:
            return "file-too-large", f"{info.st_size} bytes > {self.cap}"
        return None

    def _kind(self, path: str, kind: str) -> str:
        if self.real_root is None:
            return f"listed as {kind!r}"
        try:
            return _file_kind(os.lstat(path).st_mode)
        except OSError as err:
            return f"{kind} ({err.strerror})"


def _read_whole(fs, paths: list[str], cap: int) -> list[bytes | Exception]:
    """The bytes of each file, or the exception that stands for its reject; never more than ``cap`` + 1
    bytes of one file are read."""
    if isinstance(fs, LocalFileSystem):  # fsspec's cat costs ~20 us a file here, open() ~5
        return [_read_local(p, cap) for p in paths]
    got = fs.cat_ranges(paths, [0] * len(paths), [cap + 1] * len(paths), on_error="return")
    out: list[bytes | Exception] = []
    for path, data in zip(paths, got):
        if isinstance(data, Exception) and not isinstance(data, FileNotFoundError):
            # S3 refuses any range of an empty object (416): such an error is checked against the size
            # (asked afresh: a long-lived worker's filesystem may hold a listing from before the object)
            with contextlib.suppress(Exception):
                fs.invalidate_cache(path)
                data = b"" if fs.size(path) == 0 else data
        elif not isinstance(data, Exception) and len(data) > cap:
            data = _Refused("file-too-large", f"more than {cap} bytes")
        out.append(data)
    return out


def _read_local(path: str, cap: int) -> bytes | Exception:
    """A local file's bytes, or the exception that stands for its reject. Opened non-blocking (opening a
    FIFO would wait for a writer) and checked on the open file: a regular file, within ``cap``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:  # missing, unreadable: a reject, as fsspec's cat(on_error="return") gives
        if err.errno == errno.ENXIO:  # a socket
            return _Refused("not-a-regular-file", f"cannot be opened as a file ({err.strerror})")
        return err
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > cap:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            return _Refused("not-a-regular-file", _file_kind(info.st_mode))
        return _Refused("file-too-large", f"{info.st_size} bytes > {cap}")
    with open(fd, "rb") as f:
        data = f.read(info.st_size + 1)  # one byte more: a file that grew since is read on, to the cap
        if len(data) > info.st_size:
            data += f.read(cap + 1 - len(data))
        if len(data) > cap:
            return _Refused("file-too-large", f"more than {cap} bytes")
        return data


def _check_regular_file(fs, path: str, what: str) -> None:
    """A label table or class list must be a regular file: reading a FIFO would wait forever."""
    kind = fs.info(path).get("type")
    if kind not in ("file", None):
        raise ShardError(f"{what} {path} is not a regular file ({kind})")


def _listing_units(kind: str, fs, root: str, cfg: ShardConfig) -> list[dict]:
    """The units the index is built from, listed on the driver: one per class folder, label-table
    row group, or tar; a few thousand even for a JFT-sized corpus."""
    if kind == "folder":
        if not fs.isdir(root):
            raise ShardError(f"{cfg.src} is not a folder")
        return _folder_units(fs, root)
    if kind == "table":
        url = _label_table_url(fs, root, cfg)
        return [{"kind": "table", "path": url, "part": part} for part in _table_parts(fs, url, cfg)]
    if kind == "tars":
        info = fs.info(root)
        if info["type"] != "directory":  # one tar, named by the user: a link to it is fine
            tars = [_entry(root, info | {"islink": False})]
        else:
            tars = [_entry(p, i) for p, i in sorted(fs.find(root, detail=True).items()) if p.endswith(".tar")]
        if not tars:
            raise ShardError(f"no .tar files in {cfg.src}")
        return [{"kind": "tar", "path": e[0], "entry": e} for e in tars]
    raise ShardError(f"unknown source kind {kind!r}; expected folder, table or tars")


def _folder_units(fs, root: str) -> list[dict]:
    """A folder per class, optionally under train/ val/ test/ folders; files outside any class
    folder are listed too (and rejected for having no labels)."""
    entries = sorted(_entry(e["name"], e) for e in fs.ls(root, detail=True) if _visible(e["name"]))
    dirs = [e[0] for e in entries if e[1] == "directory" and not e[3]]  # symlinked folders: not descended
    names = {posixpath.basename(p) for p in dirs}
    units = [{"kind": "files", "entries": [e for e in entries if e[0] not in dirs], "split": None}]
    if names and names <= SPLIT_DIRS:
        for split_dir in dirs:
            name = posixpath.basename(split_dir)
            split = "val" if name in ("validation", "valid") else name
            inner = sorted(_entry(e["name"], e) for e in fs.ls(split_dir, detail=True) if _visible(e["name"]))
            inner_dirs = [e[0] for e in inner if e[1] == "directory" and not e[3]]
            units.append({"kind": "files", "entries": [e for e in inner if e[0] not in inner_dirs], "split": split})
            units += [{"kind": "dir", "path": p, "split": split} for p in inner_dirs]
    else:
        units += [{"kind": "dir", "path": p, "split": None} for p in dirs]
    return [u for u in units if u["kind"] == "dir" or u["entries"]]


def _label_table_url(fs, root: str, cfg: ShardConfig) -> str:
    if cfg.labels is None:
        url = _default_label_table(fs, root)
        if url is None:
            raise ShardError(f"no label table in {root} (labels.parquet, labels.csv or labels.jsonl); pass labels=")
        return url
    return filesystem(cfg.labels, cfg.storage_options)[1]


def _table_parts(fs, url: str, cfg: ShardConfig) -> list[list[int] | None]:
    """Checks the table's columns up front. Parquet tables are indexed in parts of at most
    ``_TABLE_PART_ROWS`` rows of a row group, [group, start, stop], one task each; CSV and JSONL
    tables by one task that streams them (None)."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    if not fs.exists(url):
        raise ShardError(f"label table {url} does not exist")
    _check_regular_file(fs, url, "label table")
    with fs.open(url, "rb") as f:
        if url.endswith(".parquet"):
            meta = pq.ParquetFile(f).metadata
            columns = meta.schema.to_arrow_schema().names
            parts = [
                [g, start, min(start + _TABLE_PART_ROWS, meta.row_group(g).num_rows)]
                for g in range(meta.num_row_groups)
                for start in range(0, meta.row_group(g).num_rows, _TABLE_PART_ROWS)
            ]
        elif url.endswith(".csv"):
            columns, parts = pcsv.open_csv(f).schema.names, [None]
        else:
            columns, parts = pjson.open_json(f).schema.names, [None]
    split_column = cfg.split_column
    for column in (cfg.path_column, cfg.label_column, cfg.key_column, split_column):
        if column and column not in columns:
            raise ShardError(f"label table {url} has no column {column!r} (columns: {columns})")
    return parts


def _index_unit(batch: pa.Table, cfg: ShardConfig, root: str, classes: list[str] | None) -> Iterator[pa.Table]:
    """Ray Data task: the index rows of one listing unit, in blocks of at most ``_INDEX_CHUNK`` rows."""
    unit, spec = int(batch.column("unit")[0].as_py()), json.loads(batch.column("spec")[0].as_py())
    fs, _ = filesystem(cfg.src, cfg.storage_options)
    first = unit * _UNIT_ROWS
    if spec["kind"] == "table":
        for table in _table_chunks(fs, spec["path"], spec["part"], cfg):
            yield _label_table_rows(table, spec["path"], cfg, classes, first)
            first += table.num_rows
        return
    if spec["kind"] == "tar":
        path = spec["path"] if "://" not in cfg.src else _url(cfg.src, spec["path"])
        refused = _ListingCheck(fs, root, cfg, cap=None).reason(*spec["entry"])
        yield (
            _scan_tar(path, root, cfg, first)
            if refused is None
            else _tar_rows({}, [], path, _rel(path, root), cfg, first, refused)
        )
        return
    check = _ListingCheck(fs, root, cfg)
    if spec["kind"] == "dir":  # the listing's details (type, size, link) come with it at no extra cost
        found = fs.find(spec["path"], detail=True)
        # hidden: any part of the path below SRC starting with a dot
        paths = [p for p in sorted(found) if "/." not in p[len(root) :]]
        reasons = check.reasons(paths, [found[p] for p in paths])
    else:
        paths = [e[0] for e in spec["entries"]]
        reasons = check.reasons(paths, [{"type": t, "size": n, "islink": link} for _, t, n, link in spec["entries"]])
    split = spec["split"]
    for start in range(0, len(paths), _INDEX_CHUNK):
        chunk = paths[start : start + _INDEX_CHUNK]
        rels = [p[len(root) + 1 :] for p in chunk]
        # the class is the first folder below the split folder; a file outside any has none
        depth = 1 if split else 0
        labels = [[r.split("/")[depth]] if r.count("/") > depth else [] for r in rels]
        keys = _keys_from_paths(pa.array(rels, pa.string()))
        chunk_reasons = reasons[start : start + _INDEX_CHUNK]
        yield _index_table(keys, None, labels, [split] * len(chunk), rels, cfg, first + start, reasons=chunk_reasons)


def _index_table(
    keys, paths, labels, splits, sources, cfg: ShardConfig, first: int, offsets=None, lengths=None, reasons=None
) -> pa.Table:
    n = len(keys)
    if cfg.val_fraction == 0:
        splits = [s if s is not None else "train" for s in splits]
    elif any(s is None for s in splits):
        by_hash = _hash64(cfg.seed, "split", keys).astype(np.float64) / 2.0**64 < cfg.val_fraction
        splits = [s if s is not None else ("val" if v else "train") for s, v in zip(splits, by_hash)]
    reasons = reasons or [None] * n
    return pa.table(
        {
            "key": keys,
            "path": paths if paths is not None else pa.nulls(n, pa.string()),
            "offset": offsets if offsets is not None else [-1] * n,
            "length": lengths if lengths is not None else [-1] * n,
            "labels": labels,
            "split": splits,
            "source": sources,
            "order": _hash64(cfg.seed, "order", keys),
            "seq": np.arange(first, first + n, dtype=np.int64),
            "reason": [r[0] if r else None for r in reasons],
            "detail": [r[1] if r else None for r in reasons],
        },
        schema=INDEX_SCHEMA,
    )


def _table_chunks(fs, url: str, part: list[int] | None, cfg: ShardConfig) -> Iterator[pa.Table]:
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    with fs.open(url, "rb") as f:
        if part is not None:
            group, start, stop = part
            parquet = pq.ParquetFile(f)
            wanted = (cfg.path_column, cfg.label_column, cfg.key_column, cfg.split_column or "split")
            columns = [c for c in dict.fromkeys(wanted) if c and c in parquet.schema_arrow.names]
            # Streamed in batches, not read whole: a task's memory then follows its part, not the row group
            # (a million-row group read whole leaves ~200 MB in the worker's allocator).
            kept, seen = [], 0
            for batch in parquet.iter_batches(batch_size=8_192, row_groups=[group], columns=columns):
                lo, hi = max(0, start - seen), min(batch.num_rows, stop - seen)
                if hi > lo:
                    kept.append(batch.slice(lo, hi - lo))
                seen += batch.num_rows
                if seen >= stop:
                    break
            yield pa.Table.from_batches(kept, schema=kept[0].schema) if kept else parquet.schema_arrow.empty_table()
            return
        reader = pcsv.open_csv(f) if url.endswith(".csv") else pjson.open_json(f)
        for batch in reader:
            yield pa.Table.from_batches([batch])


def _label_table_rows(table: pa.Table, url: str, cfg: ShardConfig, classes: list[str] | None, first: int) -> pa.Table:
    import pyarrow.compute as pc

    rels = table.column(cfg.path_column).combine_chunks().cast(pa.string()).fill_null("")
    # a path with a protocol is kept (without it); any other is the table's folder joined with it
    has_protocol = pc.match_substring(rels, "://")
    if pc.any(has_protocol).as_py():
        stripped = pc.replace_substring_regex(rels, pattern="^.*?://", replacement="", max_replacements=1)
        full = pc.if_else(has_protocol, stripped, pa.scalar(None, pa.string()))
    else:  # a bare null column: if_else's result would still carry the other branch's bytes
        full = pa.nulls(len(rels), pa.string())
    labels = _label_names(table.column(cfg.label_column), classes)
    if cfg.key_column:
        keys = _safe_keys(table.column(cfg.key_column).combine_chunks().cast(pa.string()).fill_null("None"))
    else:
        keys = _keys_from_paths(rels)
    split_column = cfg.split_column or ("split" if "split" in table.column_names else None)
    splits = [str(s) for s in table.column(split_column).to_pylist()] if split_column else [None] * len(keys)
    return _index_table(keys, full, labels, splits, rels, cfg, first)


def _label_names(column: pa.ChunkedArray, classes: list[str] | None) -> pa.Array | list[list[str]]:
    """A label column (one label or a list per row, by name or id) as lists of names, in Arrow for the
    usual types (strings, integers, lists of either): a Python loop here cost ~3 us a row, as much as
    the rest of the index. Other types (floats from a CSV with gaps, ...) go row by row."""
    import pyarrow.compute as pc

    column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = column.fill_null([]) if column.null_count else column
        values, parents = pc.list_flatten(column), pc.list_parent_indices(column)
    else:
        values, parents = column, pa.array(np.arange(len(column)))
    if not (
        pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_integer(values.type)
    ):
        return [_as_label_names(v, classes) for v in column.to_pylist()]
    valid = pc.is_valid(values)
    values, parents = values.filter(valid), parents.filter(valid)
    if pa.types.is_integer(values.type):
        ids = values.cast(pa.int64())
        names = ids.cast(pa.string())
        if classes is not None:
            known = pc.and_(pc.greater_equal(ids, 0), pc.less(ids, len(classes)))
            by_id = pa.array(classes, pa.string()).take(pc.if_else(known, ids, 0))
            names = pc.if_else(known, by_id, names)
        values = names
    counts = np.bincount(parents.to_numpy(zero_copy_only=False), minlength=len(column))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values.cast(pa.string()))


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


def _scan_tar(path: str, root: str, cfg: ShardConfig, first: int) -> pa.Table:
    """Index one WebDataset tar: image members as byte ranges, labels from the json/cls members."""
    fs, _ = filesystem(path, cfg.storage_options)
    samples: dict[str, dict] = {}
    order: list[str] = []
    failure = None
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            _scan_members(tar, samples, order)
    except (tarfile.TarError, OSError, EOFError) as err:
        # Keep what was read before the damage; the rest of the tar is one reject.
        failure = ("unreadable-tar", str(err)[:500])
    return _tar_rows(samples, order, path, _rel(path, root), cfg, first, failure)


def _rel(path: str, root: str) -> str:
    """A tar's name relative to SRC (its basename when SRC is the tar itself, or a URL)."""
    return path[len(root) + 1 :] if path.startswith(root + "/") else posixpath.basename(path)


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


def _tar_rows(
    samples: dict[str, dict],
    order: list[str],
    path: str,
    rel: str,
    cfg: ShardConfig,
    first: int,
    failure: tuple[str, str] | None,
) -> pa.Table:
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
        keys.append(_key_from_member(key))  # member keys carry no extension
        paths.append(path)
        offsets.append(offset if "image" in sample else -2)  # -2: no image member at all
        lengths.append(length)
        labels.append(names)
        splits.append(split)
        sources.append(f"{rel}:{key}")
    reasons = [None] * len(keys)
    if failure is not None:  # the unreadable rest of the tar (or a tar not read at all) is one reject
        keys.append(_key_from_path(rel))
        paths.append(path)
        offsets.append(-2)
        lengths.append(0)
        labels.append([])
        splits.append("train")
        sources.append(rel)
        reasons.append(failure)
    return _index_table(keys, paths, labels, splits, sources, cfg, first, offsets, lengths, reasons)


# ------------------------------------------------------------------------------------ evaluation sets


def _eval_hashes(urls: list[str], storage_options: dict, max_bytes: int = ImagePolicy.max_bytes) -> dict[int, str]:
    """pHash of every image in the evaluation sets (folder trees or single files); files that are not
    regular, or larger than ``max_bytes``, are passed over unread."""
    hashes: dict[int, str] = {}
    policy = ImagePolicy(min_side=1, max_bytes=max_bytes)
    for url in urls:
        fs, root = filesystem(url, storage_options)
        files = [root] if fs.isfile(root) else sorted(fs.find(root))
        files = [p for p in files if posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS]
        if not files:
            raise ShardError(f"evaluation set {url} holds no images")
        for start in range(0, len(files), 256):
            chunk = files[start : start + 256]
            for path, data in zip(chunk, _read_whole(fs, chunk, max_bytes)):
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


def _ustar_template() -> tuple[bytes, int]:
    """The fields every member header shares, and their share of the checksum (the checksum field
    itself counts as eight spaces while summing)."""
    header = bytearray(512)
    header[100:108] = b"0000444\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[136:148] = b"%011o\0" % _MTIME
    header[148:156] = b" " * 8
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    return bytes(header), sum(header)


_USTAR, _USTAR_SUM = _ustar_template()


def _member_header(name: str, size: int) -> bytes:
    """A ustar header for a regular read-only file. ``tarfile`` builds PAX headers at about 60 us a
    member, a third of the cost of checking the image itself; this fills in a fixed template."""
    encoded = name.encode()
    if len(encoded) > 100:  # ustar's limit; tarfile's GNU format handles the rare long key
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, _MTIME, 0o444
        return info.tobuf(tarfile.GNU_FORMAT)
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_USTAR_SUM + sum(encoded) + sum(size_field))
    return b"".join((encoded, _USTAR[len(encoded) : 124], size_field, _USTAR[136:148], checksum, _USTAR[156:]))


def _member(name: str, data: bytes) -> bytes:
    """A tar member: header, data, padding to the 512-byte block."""
    return b"".join((_member_header(name, len(data)), data, b"\0" * (-len(data) % 512)))


class ShardWriter:
    """The per-shard task: called by Ray Data with one row per shard: its split, index, rank range and buckets."""

    def __init__(self, cfg: ShardConfig, plan: dict, eval_index):
        self.cfg, self.plan, self.eval_index = cfg, plan, eval_index
        self.class_ids = {name: i for i, name in enumerate(plan["classes"])}
        self.single_label = plan["single_label"]
        self.policy = cfg.image_policy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.cfg
        fs, dst = filesystem(cfg.dst, cfg.storage_options)
        split, index = batch.column("split")[0].as_py(), int(batch.column("shard")[0].as_py())
        lo, hi = int(batch.column("lo")[0].as_py()), int(batch.column("hi")[0].as_py())
        buckets = json.loads(batch.column("buckets")[0].as_py())
        rows = _shard_members(fs, dst, split, lo, hi, buckets, self.plan.get("path_base", ""))
        name = _shard_name(split, index)
        tmp = f"{dst}/{WORK_DIR}/tmp/{name}.{uuid.uuid4().hex}"
        rejects: list[dict] = []
        histogram: Counter = Counter()
        written = pending_bytes = 0
        pending: list[bytes] = []
        with open_for_writing(fs, tmp, "wb") as raw:
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
                members = [
                    _member(f"{row['key']}.jpg", image.data),
                    _member(f"{row['key']}.json", json.dumps(meta, sort_keys=True).encode()),
                ]
                if self.single_label:
                    members.append(_member(f"{row['key']}.cls", str(ids[0]).encode()))
                pending += members
                pending_bytes += sum(map(len, members))
                if pending_bytes >= _WRITE_BYTES:  # a write (and hash update) per MiB, not per member
                    sink.write(b"".join(pending))
                    pending, pending_bytes = [], 0
                histogram.update(ids)
                written += 1
            sink.write(b"".join([*pending, b"\0" * 1024]))  # end-of-archive marker: two zero blocks
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
        with open_for_writing(fs, f"{dst}/{WORK_DIR}/done/{split}-{index:06d}.json", "w") as f:
            json.dump(marker, f)
        return pa.table({"split": [split], "shard": [index], "samples": [written], "rejected": [len(rejects)]})

    def _read(self, fs, rows: list[dict]) -> Iterator[tuple[dict, bytes | Exception]]:
        """Bytes of each row, fetched concurrently in chunks (S3 latency hides behind the decode)."""
        chunk = 64
        if isinstance(fs, LocalFileSystem):  # no latency to hide: a thread would only contend for the GIL
            for start in range(0, len(rows), chunk):
                yield from zip(rows[start : start + chunk], self._fetch(fs, rows[start : start + chunk]))
            return
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(self._fetch, fs, rows[:chunk])
            for start in range(0, len(rows), chunk):
                data = future.result()
                if start + chunk < len(rows):
                    future = pool.submit(self._fetch, fs, rows[start + chunk : start + 2 * chunk])
                yield from zip(rows[start : start + chunk], data)

    def _fetch(self, fs, rows: list[dict]) -> list[bytes | Exception]:
        cap = self.cfg.max_file_bytes
        out: list[bytes | Exception] = [b""] * len(rows)
        whole = [i for i, r in enumerate(rows) if r["offset"] == -1]
        ranged = []
        for i, r in enumerate(rows):
            if r["offset"] == -2:
                out[i] = LookupError("tar sample has no image member")
            elif r["offset"] >= 0 and r["length"] > cap:  # a tar member: its size is known, it is not read
                out[i] = _Refused("file-too-large", f"{r['length']} bytes > {cap}")
            elif r["offset"] >= 0:
                ranged.append(i)
        if whole:
            for i, data in zip(whole, _read_whole(fs, [rows[i]["path"] for i in whole], cap)):
                out[i] = data
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


def _write_shard(batch: pa.Table, writer: ShardWriter) -> pa.Table:
    return writer(batch)


def _read_failure(err: Exception) -> tuple[str, str]:
    if isinstance(err, _Refused):
        return err.reason, err.detail
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


# ------------------------------------------------------------------------------------ plan
#
# A global shuffle without a global sort: ``order`` is a uniform hash, so its top bits cut the rows
# into buckets of about equal size, each a contiguous range of the shuffled order. One Ray Data
# groupby brings every bucket together in one task, which sorts it, drops repeated keys (the
# copies of a key hash alike, so they meet in the same bucket) and stores it as a parquet file.
# The driver only sees counts per bucket and split: their running sums give every row its rank
# in its split, and shard i of a split holds ranks [i * n, (i + 1) * n), read back from the one or
# few bucket files that cover them.

PLAN_DIR = "plan"
# Buckets of at least this many rows: each costs the shuffle tasks (100k rows took 2.3 s to plan in 16
# buckets, 0.4 s in 2) ...
_BUCKET_ROWS = 65_536
_MAX_BUCKETS = 4_096  # ... and at most this many, so the driver's per-bucket counts stay small


def _bucket_bits(rows: int) -> int:
    per_bucket = max(_BUCKET_ROWS, -(-rows // _MAX_BUCKETS))
    return max(0, math.ceil(math.log2(max(1, rows / per_bucket))))


def _with_bucket(batch: pa.Table, bits: int) -> pa.Table:
    order = batch.column("order").to_numpy()
    bucket = (order >> np.uint64(64 - bits)).astype(np.int64) if bits else np.zeros(len(order), np.int64)
    return batch.append_column("bucket", pa.array(bucket))


def _bucket_path(dst: str, bucket: int) -> str:
    return f"{dst}/{WORK_DIR}/{PLAN_DIR}/bucket-{bucket:06d}.parquet"


def _plan_bucket(rows: pa.Table, cfg: ShardConfig) -> pa.Table:
    """Ray Data task for one bucket: shuffle order, duplicate keys out, ranks per split, to storage.
    Returns one summary row (counts, labels seen) for the driver."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, dst = filesystem(cfg.dst, cfg.storage_options)
    bucket = int(rows.column("bucket")[0].as_py())
    listed_rejects = rows.filter(pc.is_valid(rows.column("reason")))
    rows = rows.filter(pc.is_null(rows.column("reason")))
    rows = rows.sort_by([("order", "ascending"), ("key", "ascending"), ("seq", "ascending")])
    keys = rows.column("key").to_pylist()
    rejects = [
        {"key": k, "source": s, "reason": r, "detail": d, "split": None, "shard": None}
        for k, s, r, d in zip(*(listed_rejects.column(c).to_pylist() for c in ("key", "source", "reason", "detail")))
    ]
    repeated = [i for i in range(1, len(keys)) if keys[i] == keys[i - 1]]
    if repeated:  # rare: only then are sources and offsets looked at
        keep, keys = _unique_keys(rows, keys, repeated, cfg, rejects)
        rows = rows.set_column(rows.schema.get_field_index("key"), "key", pa.array(keys, pa.string())).filter(keep)
    kept = rows.sort_by([("split", "ascending"), ("order", "ascending"), ("key", "ascending")])
    splits = kept.column("split").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, splits[1:] != splits[:-1]]) if len(splits) else np.array([], np.int64)
    local_rank = np.arange(len(splits)) - np.repeat(starts, np.diff(np.r_[starts, len(splits)]))
    kept = kept.select(["key", "path", "offset", "length", "labels", "split", "source", "order"])
    kept = kept.append_column("local_rank", pa.array(local_rank, pa.int64()))
    with open_for_writing(fs, _bucket_path(dst, bucket), "wb") as f:
        pq.write_table(kept, f, row_group_size=4_096)  # small row groups: readers skip by rank statistics
    if rejects:
        with open_for_writing(fs, f"{dst}/{WORK_DIR}/{PLAN_DIR}/rejects-{bucket:06d}.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), f)
    lengths = kept.column("length").to_numpy()
    labels = kept.column("labels")
    return pa.table(
        {
            "bucket": [bucket],
            "counts": [json.dumps(dict(Counter(splits.tolist())))],
            "rejected": [len(rejects)],
            "labels": pa.array([pc.unique(pc.list_flatten(labels)).to_pylist()], pa.list_(pa.string())),
            "max_labels": [int(pc.max(pc.list_value_length(labels)).as_py() or 0) if len(kept) else 0],
            "known_bytes": [int(lengths[lengths > 0].sum())],
            "known_count": [int((lengths > 0).sum())],
        }
    )


def _unique_keys(
    rows: pa.Table, keys: list[str], repeated: list[int], cfg: ShardConfig, rejects: list[dict]
) -> tuple[pa.Array, list[str]]:
    """Rows sharing a key (sorted by order, key, seq: a key's rows are together, first listed first): the
    first keeps it. A later one is a duplicate-key reject when it repeats an earlier row's source (the same
    path listed twice), or when the key is not derived from a file name (a key column, a tar's member key);
    otherwise it is another file of the same stem (img1.jpg, img1.png) and gets ``_suffixed_key``. Its
    ``order`` is the key's own, so it stays in this bucket, next to its sibling, whatever the bucketing."""
    sources, offsets = rows.column("source").to_pylist(), rows.column("offset").to_pylist()
    unique, keep = list(keys), np.ones(len(keys), dtype=bool)
    repeats = set(repeated)
    first, taken, seen = 0, set(), set()
    for i in repeated:
        if i - 1 not in repeats:  # row i - 1 is the first of its key
            first, taken, seen = i - 1, {keys[i - 1]}, {sources[i - 1]}
        if cfg.key_column is None and offsets[i] == -1 and sources[i] not in seen:
            unique[i] = _suffixed_key(keys[first], sources[i], taken)
            taken.add(unique[i])
            seen.add(sources[i])
            continue
        keep[i] = False
        detail = f"same key as {sources[first]}"
        rejects.append(
            {
                "key": keys[i],
                "source": sources[i],
                "reason": "duplicate-key",
                "detail": detail,
                "split": None,
                "shard": None,
            }
        )
    return pa.array(keep), unique


def _make_plan(kind: str, src_fs, src: str, cfg: ShardConfig, classes_in: list[str] | None, log) -> dict:
    """Index and bucket the corpus with Ray Data; returns what the writers and the finish need."""
    import pyarrow.compute as pc
    import ray.data
    from ray.data.context import DataContext, ShuffleStrategy

    dst_fs, dst = filesystem(cfg.dst, cfg.storage_options)
    if dst_fs.exists(f"{dst}/{WORK_DIR}/{PLAN_DIR}"):  # an interrupted plan: start it over
        dst_fs.rm(f"{dst}/{WORK_DIR}/{PLAN_DIR}", recursive=True)
    units = _listing_units(kind, src_fs, src, cfg)
    if not units:
        raise ShardError(f"no samples found in {cfg.src}")
    # what a row's source is relative to when its path is left null: the label table's folder, or SRC
    path_base = posixpath.dirname(units[0]["path"]) if kind == "table" else src
    if len(units) >= 2**31:
        raise ShardError(f"{len(units):,} listing units is more than the index can number")
    items = [{"unit": i, "spec": json.dumps(u)} for i, u in enumerate(units)]
    context = DataContext.get_current()
    saved = context.shuffle_strategy, context.enable_progress_bars
    # the sort-based shuffle starts no aggregator actors: on a small cluster it is several times faster
    context.shuffle_strategy, context.enable_progress_bars = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED, False
    try:
        index = (
            ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(
                _index_unit,
                batch_size=1,
                batch_format="pyarrow",
                fn_kwargs={"cfg": cfg, "root": src, "classes": classes_in},
            )
            .materialize()
        )
        listed = index.count()
        log(f"listed {listed:,} inputs in {len(units):,} units")
        if listed == 0:
            raise ShardError(f"no samples found in {cfg.src}")
        bits = _bucket_bits(listed)
        planned = (
            index.map_batches(_with_bucket, batch_format="pyarrow", fn_kwargs={"bits": bits})
            .groupby("bucket")
            .map_groups(_plan_bucket, batch_format="pyarrow", fn_kwargs={"cfg": cfg})
        )
        counts: dict[str, dict[int, int]] = {}
        seen = pa.array([], pa.string())
        rejected = max_labels = known_bytes = known_count = 0
        for batch in planned.iter_batches(batch_format="pyarrow", batch_size=256):
            for bucket, bucket_counts in zip(batch.column("bucket").to_pylist(), batch.column("counts").to_pylist()):
                for split, n in json.loads(bucket_counts).items():
                    counts.setdefault(split, {})[bucket] = n
            seen = pc.unique(pa.concat_arrays([seen, *pc.list_flatten(batch.column("labels")).chunks]))
            rejected += pc.sum(batch.column("rejected")).as_py()
            max_labels = max(max_labels, pc.max(batch.column("max_labels")).as_py())
            known_bytes += pc.sum(batch.column("known_bytes")).as_py()
            known_count += pc.sum(batch.column("known_count")).as_py()
        del index
    finally:
        context.shuffle_strategy, context.enable_progress_bars = saved
    unsafe = sorted(split for split in counts if not SPLIT_NAME.fullmatch(split))
    if unsafe:  # a split names shard files: "../x" or "a/b" would write outside DST or into folders of it
        raise ShardError(f"split names must be letters, digits, '_', '-' or '.' (not first), at most 64: {unsafe[:5]}")
    classes = _class_list(classes_in, sorted(seen.to_pylist()))
    sizes = {split: sum(per_bucket.values()) for split, per_bucket in counts.items()}
    if cfg.shard_samples:
        samples_per_shard = cfg.shard_samples
    else:
        mean = known_bytes / known_count if known_count else _mean_file_size(dst_fs, dst, src_fs, counts, path_base)
        samples_per_shard = max(1, int(cfg.shard_bytes // (mean + 1536)))  # + tar headers and the json sidecar
    buckets = {}
    for split, per_bucket in counts.items():
        start, ranges = 0, []
        for bucket in sorted(per_bucket):
            ranges.append([bucket, start, per_bucket[bucket]])
            start += per_bucket[bucket]
        buckets[split] = ranges
    return {
        "read": sum(sizes.values()) + rejected,
        "classes": classes,
        "single_label": max_labels <= 1,
        "samples_per_shard": samples_per_shard,
        "sizes": sizes,
        "num_shards": {split: -(-n // samples_per_shard) for split, n in sizes.items()},
        "buckets": buckets,
        "path_base": path_base,
    }


def _mean_file_size(dst_fs, dst: str, src_fs, counts: dict[str, dict[int, int]], path_base: str) -> float:
    """Mean input size from up to 256 files of the first bucket (a uniform sample: buckets are hash ranges)."""
    import pyarrow.parquet as pq

    if not counts:
        return 100_000.0
    bucket = min(b for per_bucket in counts.values() for b in per_bucket)
    with dst_fs.open(_bucket_path(dst, bucket), "rb") as f:
        rows = _with_paths(pq.read_table(f, columns=["path", "source"]).slice(0, 256).to_pylist(), path_base)
    paths = [row["path"] for row in rows]
    sizes = [src_fs.size(p) for p in paths if src_fs.exists(p)]
    return float(np.mean(sizes)) if sizes else 100_000.0


def _shard_work(plan: dict, done: set[tuple[str, int]]) -> list[dict]:
    """One row per shard still to write: its rank range and the buckets that hold it."""
    work = []
    per_shard = plan["samples_per_shard"]
    for split, ranges in sorted(plan["buckets"].items()):
        r = 0
        for index in range(plan["num_shards"][split]):
            lo, hi = index * per_shard, min((index + 1) * per_shard, plan["sizes"][split])
            while ranges[r][1] + ranges[r][2] <= lo:
                r += 1
            if (split, index) in done:
                continue
            covering, j = [], r
            while j < len(ranges) and ranges[j][1] < hi:
                covering.append(ranges[j][:2])
                j += 1
            work.append({"split": split, "shard": index, "lo": lo, "hi": hi, "buckets": json.dumps(covering)})
    return work


def _with_paths(rows: list[dict], path_base: str) -> list[dict]:
    for row in rows:
        if row["path"] is None:
            row["path"] = f"{path_base}/{row['source']}"
    return rows


def _shard_members(fs, dst: str, split: str, lo: int, hi: int, buckets: list[list[int]], path_base: str) -> list[dict]:
    """The index rows of ranks [lo, hi) of ``split``, in shuffle order."""
    import pyarrow.parquet as pq

    parts = []
    for bucket, start in buckets:
        where = [("split", "==", split), ("local_rank", ">=", lo - start), ("local_rank", "<", hi - start)]
        with fs.open(_bucket_path(dst, bucket), "rb") as f:
            parts.append(pq.read_table(f, filters=where))
    return _with_paths(pa.concat_tables(parts).to_pylist(), path_base)  # buckets: consecutive ranges of the order


def shard_corpus(cfg: ShardConfig, *, overwrite: bool = False, progress: bool = False, log=print) -> ShardSummary:
    """Run (or finish, or confirm) the sharding of ``cfg.src`` into ``cfg.dst``. Needs Ray initialised
    (``ray.init()`` on a laptop, ``ray.init(address=...)`` on a cluster); starts a local one otherwise.
    ``progress`` shows a bar of shards and images written (instead of Ray Data's per-operator bars)."""
    import ray

    init_ray()
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ShardError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    started = time.perf_counter()
    src_fs, src = filesystem(cfg.src, cfg.storage_options)
    dst_fs, dst = filesystem(cfg.dst, cfg.storage_options)
    if not src_fs.exists(src):
        raise ShardError(f"source {cfg.src} does not exist")

    fingerprint = cfg.fingerprint()
    plan_path = f"{dst}/{WORK_DIR}/plan.json"
    summary_path = f"{dst}/{SUMMARY_FILE}"
    _check_destination(src_fs, src, dst_fs, dst, cfg)
    if overwrite and dst_fs.exists(dst):
        _clear_destination(dst_fs, dst, cfg)
    if dst_fs.exists(summary_path):
        done = json.loads(dst_fs.cat_file(summary_path))
        if done.get("fingerprint") == fingerprint:
            log(f"{cfg.dst} already holds these shards (fingerprint {fingerprint}); nothing to do")
            return ShardSummary(**{**done["summary"], "shards_written_now": 0, "seconds": 0.0})
        raise ShardError(f"{cfg.dst} holds shards made with other settings; pass overwrite=True (--overwrite)")
    recorded: dict = {}
    if dst_fs.exists(plan_path):
        recorded = json.loads(dst_fs.cat_file(plan_path))
        if recorded.get("fingerprint") != fingerprint:
            raise ShardError(
                f"{cfg.dst} holds an unfinished run with other settings; pass overwrite=True (--overwrite)"
            )
    elif dst_fs.exists(dst) and dst_fs.ls(dst):
        raise ShardError(
            f"{cfg.dst} is not empty and holds no sharding run; choose an empty destination"
            + ("" if _foreign_entries(dst_fs, dst) else ", or pass overwrite=True (--overwrite) to replace its shards")
        )

    # The plan is made once: a resumed run writes the shards the first one planned, even if the
    # source changed since.
    plan = recorded.get("plan")
    header = {"fingerprint": fingerprint, "config": dataclasses.asdict(cfg) | {"storage_options": {}}}
    if plan is None:
        with open_for_writing(dst_fs, plan_path, "w") as f:
            json.dump(header, f)
        kind = _detect_source(src_fs, src, cfg)
        log(f"indexing {cfg.src} ({kind})")
        plan = _make_plan(kind, src_fs, src, cfg, _load_classes(src_fs, src), log)
        with open_for_writing(dst_fs, plan_path, "w") as f:
            json.dump(header | {"plan": plan}, f)
    done = _done_shards(dst_fs, dst)
    work = _shard_work(plan, done)
    sizes, num_shards = plan["sizes"], plan["num_shards"]
    log(
        f"{sum(sizes.values()):,} samples, {len(plan['classes']):,} classes, "
        + ", ".join(f"{s}: {n:,} in {num_shards[s]:,} shards" for s, n in sorted(sizes.items()))
        + (f"; {len(done)} shards already done" if done else "")
    )

    eval_index = None
    if cfg.eval_sets:
        eval_index = NearDuplicateIndex(
            _eval_hashes(cfg.eval_sets, cfg.storage_options, cfg.max_file_bytes), cfg.dedup_distance
        )
        log(f"de-duplicating against {len(eval_index):,} evaluation images (pHash distance <= {cfg.dedup_distance})")

    written_now = 0
    if work:
        import ray.data

        ds = ray.data.from_items(work, override_num_blocks=len(work))
        # Tasks, not actors: they run in the same worker processes as the index tasks before them, so a
        # run holds as many processes as CPUs whatever the corpus size.
        results = ds.map_batches(
            _write_shard,
            fn_kwargs={"writer": ShardWriter(cfg, plan, eval_index)},
            batch_size=1,
            batch_format="pyarrow",
        )
        if progress:
            ds.context.enable_progress_bars = False
        written_now = _drain(results, len(work), sum(w["hi"] - w["lo"] for w in work), progress)
    return _finish(dst_fs, dst, cfg, plan, fingerprint, started, written_now)


def _comparable(fs, path: str) -> tuple[tuple[str, ...], str]:
    """Where a path is, comparably: its filesystem's protocols and, locally, its real path (links resolved)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if isinstance(fs, LocalFileSystem):
        return ("file",), os.path.realpath(path)
    return protocols, path.rstrip("/")


def _check_destination(src_fs, src: str, dst_fs, dst: str, cfg: ShardConfig) -> None:
    """DST must be a folder (or nothing yet) apart from SRC: never SRC itself, above it, or (for a folder
    or tar source, which are listed recursively) inside it, where the shards would be read back as input."""
    (src_protocols, src_real), (dst_protocols, dst_real) = _comparable(src_fs, src), _comparable(dst_fs, dst)
    if set(src_protocols) & set(dst_protocols):
        if dst_real == src_real:
            raise ShardError(f"{cfg.dst} is the source {cfg.src}: choose another destination")
        if src_real.startswith(dst_real.rstrip("/") + "/"):
            raise ShardError(f"{cfg.dst} contains the source {cfg.src}: choose a destination outside it")
        if dst_real.startswith(src_real + "/") and _detect_source(src_fs, src, cfg) in ("folder", "tars"):
            raise ShardError(
                f"{cfg.dst} is inside the source {cfg.src}, which is read recursively: its shards would be "
                "read back as input; choose a destination outside it"
            )
    if dst_fs.exists(dst) and dst_fs.info(dst).get("type") != "directory":
        raise ShardError(f"{cfg.dst} exists and is not a folder")


def _is_output(name: str, kind: str | None) -> bool:
    """Whether an entry of DST is something shard_corpus writes there (and so may replace)."""
    if kind == "directory":
        return name == WORK_DIR
    return kind == "file" and (name in OUTPUT_FILES or _SHARD_FILE.fullmatch(name) is not None)


def _foreign_entries(fs, dst: str) -> list[str]:
    """The entries of DST that shard_corpus does not write (folders with a trailing /)."""
    foreign = []
    for entry in fs.ls(dst, detail=True, refresh=True):
        name = posixpath.basename(entry["name"].rstrip("/"))
        if not _is_output(name, entry.get("type")) or entry.get("islink"):
            foreign.append(name + ("/" if entry.get("type") == "directory" else ""))
    return sorted(foreign)


def _clear_destination(fs, dst: str, cfg: ShardConfig) -> None:
    """--overwrite: remove an earlier run's outputs, and only when DST holds nothing else."""
    foreign = _foreign_entries(fs, dst)
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise ShardError(
            f"refusing to overwrite {cfg.dst}: it holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
            f"that `vit shard` does not write ({shown}); overwrite only replaces a folder of shards "
            f"({{split}}-NNNNNN.tar, {', '.join(OUTPUT_FILES)}, {WORK_DIR}/)"
        )
    entries = fs.ls(dst, detail=False, refresh=True)
    if entries:  # the entries, not DST itself: on an object store it may be a whole bucket
        fs.rm(entries, recursive=True)
    fs.invalidate_cache(dst)


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


def _url(src_url: str, path: str) -> str:
    protocol = src_url.split("://", 1)[0]
    return f"{protocol}://{path}"


def _load_classes(fs, root: str) -> list[str] | None:
    path = f"{root}/{CLASSES_FILE}"
    if not fs.isdir(root) or not fs.exists(path):
        return None
    _check_regular_file(fs, path, "class list")
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


def _finish(fs, dst: str, cfg: ShardConfig, plan: dict, fingerprint: str, started: float, written_now: int):
    """Merge the markers into the manifest and the rejects (streamed: nothing per image is held)."""
    import pyarrow.parquet as pq

    manifest_rows = []
    rejected_by_reason: Counter = Counter()
    with open_for_writing(fs, f"{dst}/{REJECTS_FILE}", "wb") as f, pq.ParquetWriter(f, REJECTS_SCHEMA) as rejects:

        def add_rejects(table: pa.Table) -> None:
            rejected_by_reason.update(table.column("reason").to_pylist())
            rejects.write_table(table)

        for path in sorted(fs.glob(f"{dst}/{WORK_DIR}/{PLAN_DIR}/rejects-*.parquet")):
            with fs.open(path, "rb") as part:
                add_rejects(pq.read_table(part, schema=REJECTS_SCHEMA))
        for split, n in sorted(plan["num_shards"].items()):
            for i in range(n):
                marker = json.loads(fs.cat_file(f"{dst}/{WORK_DIR}/done/{split}-{i:06d}.json"))
                manifest_rows.append(marker["manifest"])
                if marker["rejects"]:
                    add_rejects(pa.Table.from_pylist(marker["rejects"], schema=REJECTS_SCHEMA))
    rejected = sum(rejected_by_reason.values())
    written = sum(r["samples"] for r in manifest_rows)
    if written + rejected != plan["read"]:
        raise RuntimeError(f"counts do not balance: read {plan['read']} != written {written} + rejected {rejected}")
    with open_for_writing(fs, f"{dst}/{MANIFEST_FILE}", "wb") as f:
        pq.write_table(pa.Table.from_pylist(manifest_rows, schema=MANIFEST_SCHEMA), f)
    with open_for_writing(fs, f"{dst}/{CLASSES_FILE}", "w") as f:
        json.dump([{"id": i, "name": n} for i, n in enumerate(plan["classes"])], f, indent=0)
    splits_info = {}
    for split in sorted(plan["num_shards"]):
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
        "num_classes": len(plan["classes"]),
        "multi_label": not plan["single_label"],
        "splits": splits_info,
    }
    with open_for_writing(fs, f"{dst}/{INFO_FILE}", "w") as f:
        json.dump(info, f, indent=1)
    summary = ShardSummary(
        dst=cfg.dst,
        read=plan["read"],
        written=written,
        rejected=rejected,
        rejected_by_reason=dict(rejected_by_reason),
        shards=len(manifest_rows),
        shards_written_now=written_now,
        bytes_written=sum(r["bytes"] for r in manifest_rows),
        seconds=time.perf_counter() - started,
        splits={s: v["num_samples"] for s, v in splits_info.items()},
    )
    # summary.json is written last: its presence with this fingerprint means "finished".
    with open_for_writing(fs, f"{dst}/{SUMMARY_FILE}", "w") as f:
        json.dump({"fingerprint": fingerprint, "summary": dataclasses.asdict(summary)}, f, indent=1)
    fs.rm(f"{dst}/{WORK_DIR}", recursive=True)  # markers served their purpose: summary.json says "done"
    return summary


# ------------------------------------------------------------------------------------ verify


def verify_shards(dst_url: str, storage_options: dict | None = None, workers: int = 8) -> list[str]:
    """Recheck every shard against the manifest: sha256, size, sample count. Returns the problems."""
    import pyarrow.parquet as pq

    fs, dst = filesystem(dst_url, storage_options or {})
    if not fs.exists(f"{dst}/{MANIFEST_FILE}"):
        return [f"no {MANIFEST_FILE} in {dst_url}"]
    with fs.open(f"{dst}/{MANIFEST_FILE}", "rb") as f:
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
