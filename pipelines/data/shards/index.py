"""The index: one row per input sample of the corpus, built by Ray Data tasks, never as a table on the driver.

A corpus is listed in units (a class folder, a part of a row group of the label table, a tar) that tasks index
in parallel. Each row says where the sample's bytes are (a file, or a byte range of a tar), its labels and
split, its listing position (``seq``) and its place in the global shuffle (``order``, a seeded hash of the key).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.common.storage import filesystem, read_json
from pipelines.data.shards.config import ShardConfig, ShardError
from pipelines.data.shards.format import CLASSES_FILE, _key_from_member, _key_from_path, _keys_from_paths, _safe_keys
from pipelines.data.shards.inputs import _check_regular_file, _entry, _ListingCheck

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
SPLIT_DIRS = {"train", "val", "validation", "test", "valid"}
TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl")


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


def _index_unit(
    batch: pa.Table, cfg: ShardConfig, root: str, classes: list[str] | None, only: pa.Array | None = None
) -> Iterator[pa.Table]:
    """Ray Data task: the index rows of one listing unit, in blocks of at most ``_INDEX_CHUNK`` rows. ``only``
    (an incremental run's new inputs) keeps the files of those sources, or the table rows of those identities."""
    unit, spec = int(batch.column("unit")[0].as_py()), json.loads(batch.column("spec")[0].as_py())
    fs, _ = filesystem(cfg.src, cfg.storage_options)
    first = unit * _UNIT_ROWS
    if spec["kind"] == "table":
        import pyarrow.compute as pc

        for table in _table_chunks(fs, spec["path"], spec["part"], cfg):
            rows = table if only is None else table.filter(pc.is_in(_row_identities(table, cfg), value_set=only))
            # seq stays the row's place in the whole table: of repeated keys, the first listed is kept
            yield _label_table_rows(rows, spec["path"], cfg, classes, first)
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
    if only is not None:
        wanted = set(only.to_pylist())
        kept = [i for i, p in enumerate(paths) if p[len(root) + 1 :] in wanted]
        paths, reasons = [paths[i] for i in kept], [reasons[i] for i in kept]
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
    split_column = _table_split_column(table, cfg)
    splits = [str(s) for s in table.column(split_column).to_pylist()] if split_column else [None] * len(keys)
    return _index_table(keys, full, labels, splits, rels, cfg, first)


def _table_split_column(table: pa.Table, cfg: ShardConfig) -> str | None:
    return cfg.split_column or ("split" if "split" in table.column_names else None)


def _row_identities(table: pa.Table, cfg: ShardConfig) -> pa.Array:
    """What identifies each row of a label table: its path, labels, key and split, as read (before any label id is
    named), joined into one string. Two runs compare these to tell rows added from rows changed or removed."""
    import pyarrow.compute as pc

    names = [cfg.path_column, cfg.label_column, cfg.key_column, _table_split_column(table, cfg)]
    parts = []
    for name in dict.fromkeys(n for n in names if n):
        column = table.column(name).combine_chunks() if table.num_rows else pa.array([], table.column(name).type)
        try:
            parts.append(_as_strings(column))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # a type Arrow cannot cast: as JSON, row by row
            parts.append(pa.array([json.dumps(v, default=str) for v in column.to_pylist()], pa.string()))
    return pc.binary_join_element_wise(*parts, "\x1e")


def _as_strings(column: pa.Array) -> pa.Array:
    """A column as strings, nulls as "\\0" and lists joined by "\\x1f" (so [1, 2] and "1,2" stay apart)."""
    import pyarrow.compute as pc

    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        values = column.values.cast(pa.string()).fill_null("\0")
        lists = pa.LargeListArray if pa.types.is_large_list(column.type) else pa.ListArray
        column = lists.from_arrays(column.offsets, values, mask=column.is_null())
        return pc.binary_join(column, "\x1f").fill_null("\0")
    return column.cast(pa.string()).fill_null("\0")


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


def _hash64(seed: int, salt: str, keys: list[str]) -> np.ndarray:
    """A seeded 64-bit hash of each key: a sample's split and place in the shuffle depend on its key alone."""
    prefix = f"{seed}/{salt}/".encode()
    return np.array(
        [int.from_bytes(hashlib.blake2b(prefix + k.encode(), digest_size=8).digest(), "little") for k in keys],
        dtype=np.uint64,
    )


def _url(src_url: str, path: str) -> str:
    """A path of SRC's filesystem as a URL again (fsspec's paths have no protocol)."""
    protocol = src_url.split("://", 1)[0]
    return f"{protocol}://{path}"


def _load_classes(fs, root: str) -> list[str] | None:
    """The corpus's own class list (SRC/classes.json: names, or ``{"id", "name"}`` entries), whose ids are kept."""
    path = f"{root}/{CLASSES_FILE}"
    if not fs.isdir(root) or not fs.exists(path):
        return None
    _check_regular_file(fs, path, "class list")
    entries = read_json(fs, path)
    if entries and isinstance(entries[0], dict):
        entries = [e["name"] for e in sorted(entries, key=lambda e: e["id"])]
    return [str(e) for e in entries]
