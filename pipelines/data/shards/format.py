"""The layout of a shard folder: its files, their schemas, and how its WebDataset tars are written and read.

    DST/
      {split}-NNNNNN.tar   the samples of a split, a uniform random share each (of one generation); per sample,
                           members {key}.{ext}:
                             .jpg    the image, RGB JPEG
                             .json   {"labels", "label_ids", "source", "width", "height", "source_format",
                                     "reencoded"}
                             .cls    its label id, only when every sample of the output has a single label
      manifest.parquet     a row per shard: samples, bytes, sha256, label histogram, rejects, generation
                           (MANIFEST_SCHEMA)
      rejects.parquet      a row per input not written, with its reason and generation (REJECTS_SCHEMA)
      _info.json           timm's format: num_classes, multi_label, and per split its shards and their lengths;
                           from generation 1 on, also the generation
      classes.json         [{"id", "name"}], in id order; a later generation appends new classes, never renumbers
      sources.parquet      what the last generation listed of the corpus: a row per file (path, size, version) and,
                           for a label table, per table row (SOURCES_SCHEMA); absent from outputs made before it was
      _keys/               keys-GGGGGG.parquet: the key of every sample generation G planned (written, or rejected
                           while writing), sorted by ``order`` (KEYS_SCHEMA): no later generation gives one again
      summary.json         {"fingerprint", "summary", "sources"}: written last, so its presence means "finished";
                           "sources" holds the listing's fingerprint, what a later generation keeps (shard size,
                           label kind) and each generation's counts
      _work/               a run in progress, removed when it finishes: plan.json, sources.parquet (the record it
                           will commit), plan/ (the bucket files), done/ (a marker per written shard), tmp/ (shards
                           being written), out/ (the merged outputs, before they are moved into place)

A generation is one sharding run's contribution: 0 for the first (or a full re-shard), then one more per run that
found only new inputs; its shards continue the numbering of each split. A key holds no dot: WebDataset and Ray
split a member name into key and extension at the first dot of its base name. Tars are written by
:func:`_sample_members` as ustar (a GNU header for a name over 100 bytes), every field fixed but name and size, so
the same inputs give byte-identical shards; training and ``verify_shards`` read them back with
:func:`iter_tar_samples`, which trusts no length it has not checked.
"""

from __future__ import annotations

import itertools
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator

import pyarrow as pa

from pipelines.common.storage import join


class ShardsError(ValueError):
    """The shards cannot be read as asked: missing metadata, an unknown split, or a damaged tar."""


class ShardReadError(ShardsError):
    """A training shard whose bytes are wrong: a damaged, truncated or hostile tar, or fewer samples than
    ``_info.json`` promises. A data error, not an I/O one: reading the shard again reads the same bytes, so
    do not retry it. ``shard`` names the tar, ``member`` the member being read (None between members) and
    ``offset`` the byte of the tar where the fault was found (None when it is not about one place).

    Raised by ``iter_tar_samples`` (every structural fault of a tar) and by ``pipelines.data.stream.ShardStream``
    (sample counts). Only the message survives a DataLoader worker (torch re-raises ``type(message)``); pickling
    (Ray) keeps the attributes too. An image that fails to decode is not this: the stream counts it as a bad
    sample."""

    def __init__(self, message: str, *, shard: str | None = None, member: str | None = None, offset: int | None = None):
        super().__init__(message)
        self.shard, self.member, self.offset = shard, member, offset


# ------------------------------------------------------------------------------------ the folder

# Everything shard_corpus writes in DST, and nothing else: a DST holding anything more is not replaced.
MANIFEST_FILE, INFO_FILE, CLASSES_FILE = "manifest.parquet", "_info.json", "classes.json"
REJECTS_FILE, SUMMARY_FILE, SOURCES_FILE = "rejects.parquet", "summary.json", "sources.parquet"
OUTPUT_FILES = (MANIFEST_FILE, INFO_FILE, CLASSES_FILE, REJECTS_FILE, SOURCES_FILE, SUMMARY_FILE)
WORK_DIR = "_work"  # the plan, done-markers and temporary shards of a run; removed when it finishes
KEYS_DIR = "_keys"  # the keys of every generation
OUTPUT_DIRS = (WORK_DIR, KEYS_DIR)
PLAN_FILE, PLAN_DIR, DONE_DIR, TMP_DIR, OUT_DIR = "plan.json", "plan", "done", "tmp", "out"  # what WORK_DIR holds
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")  # a split names shard files: no "/", no ".."
_SHARD_FILE = re.compile(rf"(?:{SPLIT_NAME.pattern})-[0-9]{{6,}}\.tar")  # _shard_name's names


def _shard_name(split: str, index: int) -> str:
    """A shard's file name (``_SHARD_FILE`` matches every one: keep the two together)."""
    return f"{split}-{index:06d}.tar"


def _work_path(dst: str, *names: str) -> str:
    return join(dst, WORK_DIR, *names)


def _done_marker(dst: str, split: str, index: int) -> str:
    """Where a shard's done-marker goes: written after the shard, so a shard without one is written again."""
    return _work_path(dst, DONE_DIR, f"{split}-{index:06d}.json")


def _keys_file(dst: str, generation: int) -> str:
    """Where the keys of a generation are kept."""
    return join(dst, KEYS_DIR, f"keys-{generation:06d}.parquet")


def _is_output(name: str, kind: str | None) -> bool:
    """Whether an entry of DST is something shard_corpus writes there (and so may replace)."""
    if kind == "directory":
        return name in OUTPUT_DIRS
    return kind == "file" and (name in OUTPUT_FILES or _SHARD_FILE.fullmatch(name) is not None)


REJECTS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("split", pa.string()),
        ("shard", pa.int64()),
        ("generation", pa.int64()),  # added with generations: a file without it is generation 0
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
        ("generation", pa.int64()),  # added with generations: a file without it is generation 0
    ]
)
# sources.parquet: entry "file" is a file of the listed folder (path relative to it, size and the store's version);
# entry "row" is a row of the label table (path: the row's identity, its path, labels, key and split joined).
# generation: the one that first listed it.
SOURCES_SCHEMA = pa.schema(
    [
        ("entry", pa.string()),
        ("path", pa.string()),
        ("size", pa.int64()),
        ("version", pa.string()),
        ("generation", pa.int64()),
    ]
)
# _keys/keys-GGGGGG.parquet: every key a generation gave, with what it was read from; ``order`` (the seeded hash of
# the key the index derived, before any "~" suffix) sorts the file, so a later run looks up only its own keys.
KEYS_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("split", pa.string()), ("order", pa.uint64())])


def with_generation(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A manifest or rejects table as ``schema`` has it: one written before generations existed gets generation 0."""
    if "generation" not in table.column_names:
        table = table.append_column("generation", pa.array([0] * table.num_rows, pa.int64()))
    return table.select(schema.names).cast(schema)


def _classes_record(classes: list[str]) -> list[dict]:
    """``classes.json``: the label names with their ids."""
    return [{"id": i, "name": n} for i, n in enumerate(classes)]


def class_names(entries: list[dict]) -> list[str]:
    """The names of a ``classes.json``, in id order."""
    return [entry["name"] for entry in sorted(entries, key=lambda e: e["id"])]


def _info_record(name: str, classes: list[str], multi_label: bool, manifest_rows: list[dict], generation: int) -> dict:
    """``_info.json``: timm's format, which readers find the shards by, per split in manifest order. Generation 0
    leaves its number out, so a first sharding's file is what it was before generations existed (a dataset's
    fingerprint hashes it); every later generation writes its own, so the file, and the fingerprint, change even
    when the generation added no shard."""
    splits = {}
    for split in sorted({r["split"] for r in manifest_rows}):
        rows = [r for r in manifest_rows if r["split"] == split]
        splits[split] = {
            "name": split,
            "num_samples": sum(r["samples"] for r in rows),
            "filenames": [r["filename"] for r in rows],
            "shard_lengths": [r["samples"] for r in rows],
        }
    # multi_label tells the trainer which loss to use (sigmoid for multi-hot targets, softmax otherwise)
    info = {"name": name, "num_classes": len(classes), "multi_label": multi_label, "splits": splits}
    return info | ({"generation": generation} if generation else {})


# ------------------------------------------------------------------------------------ keys

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
# Keys made unique when two files of a folder share a stem (img1.jpg, img1.png): the later one listed gets
# "~" and its extension (img1~png). Keys derived from paths never hold "~", so such a key cannot meet one.
KEY_SUFFIX = "~"
_TAR_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-~]")  # keys read back from tars keep the suffix


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


# ------------------------------------------------------------------------------------ writing a tar

_MTIME = 1_600_000_000  # fixed tar timestamps: the same inputs give byte-identical shards
_ZERO_BLOCK = bytes(512)
END_OF_ARCHIVE = 2 * _ZERO_BLOCK


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


def _sample_members(key: str, jpeg: bytes, meta: dict, class_id: int | None) -> list[bytes]:
    """A sample's members, as the writer appends them to the tar: the image, its json, and its class id when
    the run is single-label (``class_id`` None otherwise)."""
    members = [_member(f"{key}.jpg", jpeg), _member(f"{key}.json", json.dumps(meta, sort_keys=True).encode())]
    if class_id is not None:
        members.append(_member(f"{key}.cls", str(class_id).encode()))
    return members


# ------------------------------------------------------------------------------------ reading a tar

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # a sample's image: the first of these members it has
MAX_MEMBER_BYTES = 256 << 20  # a tar member larger than this is not an image we trained on: refuse it


def sample_image(sample: dict) -> bytes:
    """The image bytes of a sample from ``iter_tar_samples``; ValueError when it has none."""
    data = next((sample[ext] for ext in IMAGE_MEMBERS if ext in sample), None)
    if data is None:
        raise ValueError(f"no image member (one of {', '.join(IMAGE_MEMBERS)})")
    return data


def sample_label_ids(sample: dict) -> list[int]:
    """The label ids of a sample from ``iter_tar_samples``: its json's, else its cls; ValueError when it has none."""
    if "json" in sample:
        return json.loads(sample["json"])["label_ids"]
    if "cls" in sample:
        return [int(sample["cls"])]
    raise ValueError("no label (json with label_ids, or cls)")


def sample_is_multi_label(sample: dict) -> bool:
    """Whether the shards holding ``sample`` are multi-label: a single-label run gives every sample a cls member."""
    return "cls" not in sample


def iter_tar_samples(fileobj, skip: int = 0, *, shard: str | None = None) -> Iterator[dict[str, bytes | str]]:
    """Samples of a WebDataset tar as ``{"__key__": key, ext: bytes, ...}``; the first ``skip`` unread.

    Members are grouped by key (the name up to the first dot of its basename, as WebDataset does).
    Nothing is extracted to disk, so hostile member names cannot escape anywhere; links, folders
    and oversized members are refused.

    The headers are parsed here rather than by ``tarfile``, whose stream mode costs ~40 us a member
    (a few percent of a decode at 224 px); ustar, GNU long names and PAX path/size records are read,
    and every header's checksum is checked. Every read moves forward, and every length is checked
    before it is used (numbers, PAX records, metadata and member sizes, data running past the end of
    a seekable file), so a damaged or hostile tar raises :class:`ShardReadError` naming ``shard`` (by
    default the file object's path or name), the member and the byte offset; it never hangs.
    """
    tar = _TarReader(fileobj, shard)
    key, sample, index = None, {}, 0
    for name, size, regular in _tar_members(tar):
        prefix, base = posixpath.split(name)
        stem, dot, ext = base.partition(".")
        if not regular or not dot:  # a link, a folder, or a name without an extension: passed over
            tar.skip(size + -size % 512)
            continue
        member_key = posixpath.join(prefix, stem) if prefix else stem
        if member_key != key:
            if key is not None:
                if index >= skip:
                    yield sample
                index += 1
            key, sample = member_key, {"__key__": member_key}
        if index < skip:
            tar.skip(size + -size % 512)  # a resumed reader moves past the data without keeping it
            continue
        if size > MAX_MEMBER_BYTES:
            raise tar.error(f"a member of {size} bytes, above {MAX_MEMBER_BYTES}")
        sample[ext.lower()] = tar.read(size)
        tar.skip(-size % 512)
    if key is not None and index >= skip:
        yield sample


_REGULAR_TYPES = (b"0", b"\0", b"7")
_MAX_METADATA_BYTES = 1 << 20  # a GNU long name or a PAX header: a few hundred bytes in any real tar
_OCTAL_DIGITS = re.compile(rb"[0-7]+")


class _TarReader:
    """A tar file object read forward only, with the position kept for error messages and, when the file
    can tell its size, every skip checked against its end (a seek past the end reads as a clean end)."""

    def __init__(self, f, shard: str | None):
        self.f = f
        self.shard = shard or str(getattr(f, "path", None) or getattr(f, "name", None) or "<tar stream>")
        self.member: str | None = None  # the member whose data comes next, for messages
        self.pos = 0  # bytes consumed since the start of the archive
        self.end = self._size_left(f)
        self.seekable = f.seekable()

    @staticmethod
    def _size_left(f) -> int | None:
        """Bytes from the current position to the end of ``f``, when it can tell without reading."""
        try:
            if not f.seekable():
                return None
            here = f.tell()
            end = f.seek(0, 2)
            f.seek(here)
            return end - here
        except (OSError, ValueError, AttributeError):
            return None

    def error(self, what: str, *, offset: int | None = None) -> ShardReadError:
        offset = self.pos if offset is None else offset
        where = f"byte {offset}" + (f", member {self.member!r}" if self.member is not None else "")
        return ShardReadError(
            f"damaged tar {self.shard} ({where}): {what}", shard=self.shard, member=self.member, offset=offset
        )

    def header(self) -> bytes | None:
        """The next 512-byte header, or None at the end of the archive."""
        header = self.f.read(512)
        if not header or header == _ZERO_BLOCK:
            return None  # end of archive (or a tar cut exactly at a member boundary, which the counts catch)
        if len(header) < 512:
            raise self.error(f"a header cut short ({len(header)} of 512 bytes)")
        self.pos += 512
        return header

    def read(self, size: int) -> bytes:
        data = self.f.read(size)
        if len(data) != size:
            raise self.error(f"data cut short ({len(data)} of {size} bytes)")
        self.pos += size
        return data

    def skip(self, size: int) -> None:
        if size <= 0:
            return
        if self.end is not None and self.pos + size > self.end:
            raise self.error(f"{size} bytes of data run past the end of the file ({self.end - self.pos} left)")
        if self.seekable:
            self.f.seek(size, 1)  # past the data without reading it (local files and object stores alike)
            self.pos += size
            return
        while size > 0:  # a stream: read and drop, a block at a time (a hostile size must not allocate)
            step = min(size, 1 << 20)
            self.read(step)
            size -= step


def _tar_members(tar: _TarReader) -> Iterator[tuple[str, int, bool]]:
    """(name, size, is a regular file) of each member, with the file positioned at its data; long names
    (GNU ``L`` members, PAX ``path`` records) and PAX ``size`` records applied."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        tar.member = None
        at = tar.pos
        header = tar.header()
        if header is None:
            return
        checksum = _number(header[148:156])
        if checksum is None or _checksum(header) != checksum:
            raise tar.error("a header with a wrong checksum", offset=at)
        size = _number(header[124:136])
        if size is None:
            raise tar.error(f"a header whose size field {header[124:136]!r} is not a size", offset=at)
        kind = header[156:157]
        if kind in (b"L", b"x"):  # metadata for the next member
            if size > _MAX_METADATA_BYTES:
                raise tar.error(f"a {kind.decode()!r} metadata header of {size} bytes", offset=at)
            data = tar.read(size).rstrip(b"\0")
            tar.skip(-size % 512)
            if kind == b"L":
                long_name = data.decode("utf-8", "surrogateescape")
            else:
                pax = _pax_records(data, tar, at)
            continue
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        name = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
        name = pax.get("path", long_name or name)
        if "size" in pax:
            if not pax["size"].isascii() or not pax["size"].isdigit():
                raise tar.error(f"a PAX size {pax['size'][:40]!r} that is not a size", offset=at)
            size = int(pax["size"])
        long_name, pax = None, {}
        tar.member = name
        yield name, size, kind in _REGULAR_TYPES


def _checksum(header: bytes) -> int:
    return sum(header[:148]) + 8 * 32 + sum(header[156:])  # the checksum field counts as spaces


def _number(field: bytes) -> int | None:
    """A numeric header field (octal digits, or GNU base-256 for sizes beyond 8 GiB); None when it is
    not a non-negative number (a negative base-256 value, a sign, garbage)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big") if field[0] == 0x80 else None  # 0xff: negative
    digits = field.split(b"\0", 1)[0].strip()
    if not digits:
        return 0
    return int(digits, 8) if _OCTAL_DIGITS.fullmatch(digits) else None


def _pax_records(data: bytes, tar: _TarReader, at: int) -> dict[str, str]:
    """'<length> <key>=<value>\\n' records, the length counting the whole record; only path and size
    matter here. Each record must move forward, fit in the header data and end with a newline."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():  # ASCII digits only: no sign, no blank, no garbage
            raise tar.error(f"a PAX record without a length at {pos}: {data[pos : pos + 20]!r}", offset=at)
        end = pos + int(digits)
        if end < space + 2:  # shorter than its own "<length> " (a length of 0 would never move on)
            raise tar.error(f"a PAX record of length {int(digits)}, shorter than its own header", offset=at)
        if end > len(data):
            raise tar.error(f"a PAX record of length {int(digits)} running past the header's data", offset=at)
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if data[end - 1 : end] != b"\n" or not eq:
            raise tar.error(f"a malformed PAX record {data[pos:end][:60]!r}", offset=at)
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def dataset_fingerprint(shards: str, storage_options: dict | None = None) -> str:
    """Identifies a `vit shard` output: the sharding run's fingerprint and a hash of its ``_info.json`` (which
    changes with every generation added)."""
    import hashlib

    from pipelines.common.storage import filesystem

    fs, root = filesystem(shards, storage_options)
    digest = hashlib.sha256(fs.cat_file(join(root, INFO_FILE)))
    summary = join(root, SUMMARY_FILE)
    if fs.exists(summary):
        digest.update(json.loads(fs.cat_file(summary)).get("fingerprint", "").encode())
    return digest.hexdigest()[:16]
