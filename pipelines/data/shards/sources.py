"""What a sharding read of its corpus, and what changed in it since: the record that lets a re-run with the same
settings confirm an output, add only the new inputs to it, or replace it.

The record is a listing, never the bytes (``pipelines.common.storage.list_files``: path, size and the store's
version of each file, an ETag on S3, else the mtime), of the folder a run reads:

    folder   SRC: every visible file (no part of its path starts with a dot, as the index has it)
    tars     SRC: every .tar file (or SRC itself, when it is one tar)
    table    the label table's folder, where its relative paths point (SRC's classes.json beside it when SRC is
             elsewhere), plus one identity per table row: its path, labels, key and split, as read

DST/sources.parquet keeps it (with the generation that first listed each entry), summary.json its fingerprint.
A re-run compares the two: the same fingerprint confirms the output without reading anything else; files only
added (for a table: rows only added, every file they and the earlier rows name unchanged) make an increment;
any file changed or deleted, or any table row changed or removed, asks for a full re-shard. Files a label table
names by URL outside its folder are known by their rows alone: such a file replaced in place goes unseen.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from pipelines.common.storage import ListedFile, join, list_files, listing_fingerprint, relative_path
from pipelines.data.shards.config import ShardConfig
from pipelines.data.shards.format import CLASSES_FILE, SOURCES_FILE, SOURCES_SCHEMA
from pipelines.data.shards.index import _label_table_url, _row_identities, _table_chunks, _table_parts

# The entry for SRC's classes.json when a label table's folder is listed instead of SRC: a name no path
# relative to that folder can have.
SOURCE_CLASSES = f"<source>/{CLASSES_FILE}"


@dataclass(frozen=True)
class Listing:
    """The files a run reads from, as listed now."""

    kind: str  # folder, table or tars
    files: list[ListedFile]  # paths relative to the listed folder
    table: str | None = None  # the label table among ``files``: its rows are compared instead

    @property
    def fingerprint(self) -> str:
        return listing_fingerprint(self.files)


def list_sources(kind: str, src_fs, src: str, dst_fs, dst: str, cfg: ShardConfig) -> Listing:
    """The listing of what a run of ``kind`` reads (see the module docstring); DST is left out when it lies in
    the listed folder (a label table's folder may hold it)."""
    if kind == "table":
        table_path = _label_table_url(src_fs, src, cfg)
        root = posixpath.dirname(table_path)
        output = _inside(dst_fs, dst, src_fs, root)
        files = [
            f
            for f in _visible(list_files(src_fs.unstrip_protocol(root), cfg.storage_options))
            if not _under(f.path, output)
        ]
        classes = join(src, CLASSES_FILE)
        if root != src and src_fs.isfile(classes):  # its ids are kept: a change renumbers labels
            listed = list_files(src_fs.unstrip_protocol(classes), cfg.storage_options)[0]
            files.append(ListedFile(SOURCE_CLASSES, listed.size, listed.version))
        return Listing(kind, files, table=relative_path(table_path, root))
    files = list_files(cfg.src, cfg.storage_options)
    if kind == "tars":
        return Listing(kind, files if src_fs.isfile(src) else [f for f in files if f.path.endswith(".tar")])
    return Listing(kind, _visible(files))


def table_rows(src_fs, src: str, cfg: ShardConfig) -> pa.Array:
    """The identity of every row of the label table, read as the index reads them (the identifying columns only,
    a part at a time)."""
    url = _label_table_url(src_fs, src, cfg)
    chunks = [
        _row_identities(table, cfg)
        for part in _table_parts(src_fs, url, cfg)
        for table in _table_chunks(src_fs, url, part, cfg)
    ]
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


def _visible(files: list[ListedFile]) -> list[ListedFile]:
    return [f for f in files if not any(part.startswith(".") for part in f.path.split("/"))]


def _inside(dst_fs, dst: str, fs, root: str) -> str | None:
    """DST's path relative to ``root`` when it lies inside it (on the same filesystem), else None."""
    if type(dst_fs) is not type(fs):
        return None
    if isinstance(fs, LocalFileSystem):
        dst, root = os.path.realpath(dst), os.path.realpath(root)
    return relative_path(dst, root) if dst.startswith(root.rstrip("/") + "/") else None


def _under(path: str, folder: str | None) -> bool:
    return folder is not None and (path == folder or path.startswith(folder + "/"))


@dataclass
class Changes:
    """What changed in a corpus since its output's last generation."""

    new: list[str] = field(default_factory=list)  # new inputs: file paths (folder, tars) or row identities (table)
    changed: int = 0  # files whose size or version differ
    deleted: int = 0
    rows_gone: int = 0  # label-table rows changed or removed
    unusable: str | None = None  # why the record cannot be compared at all

    @property
    def mode(self) -> str:
        if self.unusable or self.changed or self.deleted or self.rows_gone:
            return "full"
        return "incremental" if self.new else "confirmed"

    def describe(self) -> str:
        """The reason, in words: "3 changed, 1 deleted", "12 new", ..."""
        if self.unusable:
            return self.unusable
        counts = [
            (self.changed, "changed"),
            (self.deleted, "deleted"),
            (self.rows_gone, "label-table rows changed or removed"),
            (len(self.new), "new"),
        ]
        return ", ".join(f"{n:,} {what}" for n, what in counts if n) or "nothing changed"


def compare(recorded: pa.Table, listing: Listing, current_rows) -> Changes:
    """``recorded`` (sources.parquet) against ``listing``; ``current_rows()`` gives the label table's row identities
    now, asked only when the table file itself changed."""
    import pyarrow.compute as pc

    files = recorded.filter(pc.equal(recorded.column("entry"), "file"))
    before = dict(
        zip(
            files.column("path").to_pylist(), zip(files.column("size").to_pylist(), files.column("version").to_pylist())
        )
    )
    now = {f.path: (f.size, f.version) for f in listing.files}
    compared = [p for p in now if p != listing.table]
    changes = Changes(
        changed=sum(1 for p in compared if p in before and before[p] != now[p]),
        deleted=sum(1 for p in before if p not in now and p != listing.table),
    )
    if listing.kind != "table":
        changes.new = [p for p in compared if p not in before]
        return changes
    if listing.table in before and before[listing.table] == now[listing.table]:
        return changes  # the same table: files it does not name may come and go
    rows_before = recorded.filter(pc.equal(recorded.column("entry"), "row")).column("path").combine_chunks()
    rows_now = pc.unique(current_rows())
    changes.rows_gone = len(rows_before) - pc.sum(pc.is_in(rows_before, value_set=rows_now)).as_py()
    changes.new = rows_now.filter(pc.invert(pc.is_in(rows_now, value_set=rows_before))).to_pylist()
    return changes


def source_record(listing: Listing, rows: pa.Array | None, earlier: pa.Table | None, generation: int) -> pa.Table:
    """sources.parquet for a generation: the listing and the table's distinct rows, each with the generation that
    first listed it (``earlier``: the output's record, for the entries it already had)."""
    import pyarrow.compute as pc

    first_seen: dict[tuple[str, str], int] = {}
    if earlier is not None:
        first_seen = {
            (entry, path): g
            for entry, path, g in zip(*(earlier.column(c).to_pylist() for c in ("entry", "path", "generation")))
        }
    entries = [("file", f.path, f.size, f.version) for f in listing.files]
    if rows is not None:
        entries += [("row", r, 0, "") for r in pc.unique(rows).to_pylist()]
    columns = list(zip(*entries)) if entries else [[], [], [], []]
    generations = [first_seen.get((entry, path), generation) for entry, path, *_ in entries]
    return pa.table([*map(list, columns), generations], schema=SOURCES_SCHEMA)


def read_source_record(fs, dst: str) -> pa.Table | None:
    """The output's sources.parquet, or None when it has none (made before sources were recorded)."""
    import pyarrow.parquet as pq

    path = join(dst, SOURCES_FILE)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return pq.read_table(f, schema=SOURCES_SCHEMA)
