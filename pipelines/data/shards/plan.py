"""The plan: which sample goes into which shard, decided once, before any shard is written, and stored.

A global shuffle without a global sort: ``order`` is a uniform hash, so its top bits cut the index into buckets
of about equal size, each a contiguous range of the shuffled order. One Ray Data groupby brings every bucket
together in one task, which sorts it, drops repeated keys (the copies of a key hash alike, so they meet in the
same bucket) and stores it as a parquet file. The driver only sees counts per bucket and split: their running
sums give every row its rank in its split, and shard i of a split holds ranks [i * n, (i + 1) * n), read back
from the one or few bucket files that cover them. Every shard is thus a uniform random sample, deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from pipelines.common.storage import filesystem, open_for_writing
from pipelines.data.shards.config import ShardConfig, ShardError
from pipelines.data.shards.format import (
    KEYS_SCHEMA,
    PLAN_DIR,
    REJECTS_SCHEMA,
    SPLIT_NAME,
    _suffixed_key,
    _work_path,
)
from pipelines.data.shards.index import _index_unit, _listing_units, _rel


class BucketRange(NamedTuple):
    """The rows of one split that one bucket holds: ranks [start, start + count) of the split."""

    bucket: int
    start: int
    count: int


@dataclass(frozen=True)
class ShardPlan:
    """What the index and the buckets decided, stored in ``plan.json`` before any shard is written: a resumed
    run writes the shards the first run planned, even if the source changed since."""

    read: int  # inputs listed: every one ends up written or rejected
    classes: list[str]  # label names, by id
    single_label: bool  # no sample has more than one label: each gets a .cls member
    samples_per_shard: int
    sizes: dict[str, int]  # samples per split, repeated keys dropped
    num_shards: dict[str, int]
    buckets: dict[str, list[BucketRange]]  # per split, the buckets that hold its ranks, in rank order
    # what a row's source is relative to when its path is left null: the label table's folder, or SRC
    path_base: str = ""
    generation: int = 0  # which sharding of the output this is: 0, or one more per incremental run
    first_shard: dict[str, int] = field(default_factory=dict)  # per split, the index of its first shard in this plan

    def to_json(self) -> dict:
        """The ``plan`` entry of plan.json; ``from_json`` reads what any version wrote, so any run can resume."""
        buckets = {split: [list(r) for r in ranges] for split, ranges in self.buckets.items()}
        return dataclasses.asdict(self) | {"buckets": buckets}

    @classmethod
    def from_json(cls, data: dict) -> ShardPlan:
        return cls(
            read=data["read"],
            classes=list(data["classes"]),
            single_label=data["single_label"],
            samples_per_shard=data["samples_per_shard"],
            sizes=dict(data["sizes"]),
            num_shards=dict(data["num_shards"]),
            buckets={split: [BucketRange(*r) for r in ranges] for split, ranges in data["buckets"].items()},
            path_base=data.get("path_base", ""),  # stored since rows may leave their path null
            generation=data.get("generation", 0),  # stored since generations exist
            first_shard=dict(data.get("first_shard", {})),
        )

    def work(self, done: set[tuple[str, int]]) -> list[dict]:
        """One row per shard still to write: its split and index, its rank range [lo, hi) among this plan's rows
        and the [bucket, start] of each bucket that holds part of it."""
        work = []
        per_shard = self.samples_per_shard
        for split, ranges in sorted(self.buckets.items()):
            r, first = 0, self.first_shard.get(split, 0)
            for local in range(self.num_shards[split]):
                lo, hi = local * per_shard, min((local + 1) * per_shard, self.sizes[split])
                while ranges[r].start + ranges[r].count <= lo:
                    r += 1
                index = first + local
                if (split, index) in done:
                    continue
                covering, j = [], r
                while j < len(ranges) and ranges[j].start < hi:
                    covering.append([ranges[j].bucket, ranges[j].start])
                    j += 1
                work.append({"split": split, "shard": index, "lo": lo, "hi": hi, "buckets": json.dumps(covering)})
        return work

    def shards(self) -> list[tuple[str, int]]:
        """(split, index) of every shard this plan writes."""
        return [
            (split, self.first_shard.get(split, 0) + local)
            for split, n in sorted(self.num_shards.items())
            for local in range(n)
        ]


@dataclass(frozen=True)
class Increment:
    """What an incremental run adds to: the earlier generations' choices it keeps, and which inputs are new."""

    generation: int
    classes: list[str]  # the output's class list: new labels get ids after these
    samples_per_shard: int
    single_label: bool
    first_shard: dict[str, int]  # per split, the number of shards the earlier generations wrote
    held_keys: list[str]  # the key files of the earlier generations
    # the new inputs: paths of files (folder) or tars (tars) relative to SRC, or label-table row identities
    only: list[str]


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
    return _work_path(dst, PLAN_DIR, f"bucket-{bucket:06d}.parquet")


def _plan_bucket(rows: pa.Table, cfg: ShardConfig, generation: int = 0, held_keys: list[str] | None = None) -> pa.Table:
    """Ray Data task for one bucket: shuffle order, duplicate keys out, ranks per split, to storage.
    Returns one summary row (counts, labels seen) for the driver. ``held_keys``: the key files of earlier
    generations, whose keys this bucket's rows must not be given again."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, dst = filesystem(cfg.dst, cfg.storage_options)
    bucket = int(rows.column("bucket")[0].as_py())
    listed_rejects = rows.filter(pc.is_valid(rows.column("reason")))
    rows = rows.filter(pc.is_null(rows.column("reason")))
    rows = rows.sort_by([("order", "ascending"), ("key", "ascending"), ("seq", "ascending")])
    keys = rows.column("key").to_pylist()
    rejects = [
        _planning_reject(k, s, r, d, generation)
        for k, s, r, d in zip(*(listed_rejects.column(c).to_pylist() for c in ("key", "source", "reason", "detail")))
    ]
    held = _held_keys(fs, held_keys or [], rows.column("order").to_numpy())
    repeated = [i for i in range(1, len(keys)) if keys[i] == keys[i - 1]]
    if repeated or held:  # rare (a repeated key, or one given before): only then are sources and offsets looked at
        keep, keys = _unique_keys(rows, keys, cfg, rejects, held, generation)
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
        with open_for_writing(fs, _work_path(dst, PLAN_DIR, f"rejects-{bucket:06d}.parquet"), "wb") as f:
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


def _planning_reject(key: str, source: str, reason: str, detail: str, generation: int) -> dict:
    """A reject decided while planning (no split or shard yet)."""
    return {
        "key": key,
        "source": source,
        "reason": reason,
        "detail": detail,
        "split": None,
        "shard": None,
        "generation": generation,
    }


def _unique_keys(
    rows: pa.Table,
    keys: list[str],
    cfg: ShardConfig,
    rejects: list[dict],
    held: dict[int, dict[str, str]],
    generation: int,
) -> tuple[pa.Array, list[str]]:
    """Rows sharing a key (sorted by order, key, seq: a key's rows are together, first listed first), or meeting
    a key an earlier generation gave (``held``: per ``order``, its keys and their sources): the first holder keeps
    it. A later row is a duplicate-key reject when it repeats a holder's source (the same path listed twice), or
    when the key is not derived from a file name (a key column, a tar's member key); otherwise it is another file
    of the same stem (img1.jpg, img1.png) and gets ``_suffixed_key``. Its ``order`` is the key's own, so it stays
    in this bucket, next to its sibling, whatever the bucketing; an earlier generation's suffixed keys share that
    ``order`` too, so they are among ``held``."""
    sources, offsets = rows.column("source").to_pylist(), rows.column("offset").to_pylist()
    orders = rows.column("order").to_pylist()
    unique, keep = list(keys), np.ones(len(keys), dtype=bool)
    group_starts = [i for i in range(len(keys)) if i == 0 or keys[i] != keys[i - 1]]
    for start, stop in zip(group_starts, [*group_starts[1:], len(keys)]):
        earlier = held.get(orders[start], {})
        if stop - start == 1 and keys[start] not in earlier:
            continue
        taken, seen = set(earlier), set(earlier.values())
        holder = earlier.get(keys[start])
        for i in range(start, stop):
            if keys[i] not in taken:  # the first row of a key no earlier generation gave
                taken.add(keys[i])
                seen.add(sources[i])
                holder = sources[i]
                continue
            if cfg.key_column is None and offsets[i] == -1 and sources[i] not in seen:
                unique[i] = _suffixed_key(keys[i], sources[i], taken)
                taken.add(unique[i])
                seen.add(sources[i])
                continue
            keep[i] = False
            detail = f"same key as {holder}" + (" (sharded earlier)" if keys[i] in earlier else "")
            rejects.append(_planning_reject(keys[i], sources[i], "duplicate-key", detail, generation))
    return pa.array(keep), unique


def _held_keys(fs, paths: list[str], orders: np.ndarray) -> dict[int, dict[str, str]]:
    """The keys earlier generations gave (with their sources) whose ``order`` is one of ``orders``: each key file
    is sorted by order, so only the row groups whose order range holds one of them are read."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    held: dict[int, dict[str, str]] = {}
    wanted = np.unique(orders) if paths else []
    if not len(wanted):
        return held
    for path in paths:
        with fs.open(path, "rb") as f:
            keys_file = pq.ParquetFile(f)
            column = keys_file.schema_arrow.get_field_index("order")
            groups = [
                g
                for g in range(keys_file.num_row_groups)
                if _may_hold(keys_file.metadata.row_group(g).column(column).statistics, wanted)
            ]
            if not groups:
                continue
            found = keys_file.read_row_groups(groups, columns=["key", "source", "order"])
        found = found.filter(pc.is_in(found.column("order"), value_set=pa.array(wanted, pa.uint64())))
        for key, source, order in zip(*(found.column(c).to_pylist() for c in ("key", "source", "order"))):
            held.setdefault(order, {})[key] = source
    return held


def _may_hold(stats, wanted: np.ndarray) -> bool:
    """Whether a row group whose order statistics are ``stats`` may hold one of the sorted ``wanted`` orders."""
    if stats is None or not stats.has_min_max:
        return True
    first = np.searchsorted(wanted, np.uint64(stats.min))
    return bool(first < len(wanted) and wanted[first] <= np.uint64(stats.max))


def _write_keys(fs, dst: str, buckets: list[int], path: str) -> int:
    """The keys of this plan (every row a bucket kept), sorted by ``order``, to ``path``; returns how many. The
    buckets are consecutive ranges of the order, so sorting each and writing them in turn sorts the whole, one
    bucket in memory at a time."""
    import pyarrow.parquet as pq

    written = 0
    with open_for_writing(fs, path, "wb") as f, pq.ParquetWriter(f, KEYS_SCHEMA) as writer:
        for bucket in sorted(buckets):
            with fs.open(_bucket_path(dst, bucket), "rb") as part:
                keys = pq.read_table(part, columns=KEYS_SCHEMA.names).sort_by([("order", "ascending")])
            # row groups of 16k keys: a later lookup reads only the groups its orders fall in
            writer.write_table(keys.cast(KEYS_SCHEMA), row_group_size=16_384)
            written += keys.num_rows
    return written


def _make_plan(
    kind: str,
    src_fs,
    src: str,
    cfg: ShardConfig,
    classes_in: list[str] | None,
    log,
    increment: Increment | None = None,
) -> ShardPlan:
    """Index and bucket the corpus with Ray Data; returns what the writers and the finish need. With an
    ``increment``, only its new inputs: an empty plan when none of them is left to list, and ``single_label``
    tells whether the new ones alone have at most one label each (the caller checks it against the output's)."""
    import pyarrow.compute as pc
    import ray.data
    from ray.data.context import DataContext, ShuffleStrategy

    dst_fs, dst = filesystem(cfg.dst, cfg.storage_options)
    if dst_fs.exists(_work_path(dst, PLAN_DIR)):  # an interrupted plan: start it over
        dst_fs.rm(_work_path(dst, PLAN_DIR), recursive=True)
    units = _listing_units(kind, src_fs, src, cfg)
    if not units:
        raise ShardError(f"no samples found in {cfg.src}")
    # what a row's source is relative to when its path is left null: the label table's folder, or SRC
    path_base = posixpath.dirname(units[0]["path"]) if kind == "table" else src
    only = None
    if increment is not None:
        if kind == "tars":  # a tar is new or not as a whole: the old ones are not even opened
            new_tars = set(increment.only)
            units = [u for u in units if _rel(u["path"], src) in new_tars]
        else:
            only = pa.array(increment.only, pa.string())
        if not units:
            return _empty_plan(increment, path_base)
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
                fn_kwargs={"cfg": cfg, "root": src, "classes": classes_in, "only": only},
            )
            .materialize()
        )
        listed = index.count()
        log(f"listed {listed:,} {'new ' if increment else ''}inputs in {len(units):,} units")
        if listed == 0:
            if increment is not None:
                return _empty_plan(increment, path_base)
            raise ShardError(f"no samples found in {cfg.src}")
        bits = _bucket_bits(listed)
        planned = (
            index.map_batches(_with_bucket, batch_format="pyarrow", fn_kwargs={"bits": bits})
            .groupby("bucket")
            .map_groups(
                _plan_bucket,
                batch_format="pyarrow",
                fn_kwargs={
                    "cfg": cfg,
                    "generation": increment.generation if increment else 0,
                    "held_keys": increment.held_keys if increment else None,
                },
            )
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
    # an increment keeps the output's ids (SRC's classes.json first) and appends labels it has not seen
    classes = _class_list(increment.classes if increment else classes_in, sorted(seen.to_pylist()))
    sizes = {split: sum(per_bucket.values()) for split, per_bucket in counts.items()}
    if increment is not None:
        samples_per_shard = increment.samples_per_shard
    elif cfg.shard_samples:
        samples_per_shard = cfg.shard_samples
    else:
        mean = known_bytes / known_count if known_count else _mean_file_size(dst_fs, dst, src_fs, counts, path_base)
        samples_per_shard = max(1, int(cfg.shard_bytes // (mean + 1536)))  # + tar headers and the json sidecar
    buckets = {}
    for split, per_bucket in counts.items():
        start, ranges = 0, []
        for bucket in sorted(per_bucket):
            ranges.append(BucketRange(bucket, start, per_bucket[bucket]))
            start += per_bucket[bucket]
        buckets[split] = ranges
    return ShardPlan(
        read=sum(sizes.values()) + rejected,
        classes=classes,
        single_label=max_labels <= 1,
        samples_per_shard=samples_per_shard,
        sizes=sizes,
        num_shards={split: -(-n // samples_per_shard) for split, n in sizes.items()},
        buckets=buckets,
        path_base=path_base,
        generation=increment.generation if increment else 0,
        first_shard={split: increment.first_shard.get(split, 0) for split in sizes} if increment else {},
    )


def _empty_plan(increment: Increment, path_base: str) -> ShardPlan:
    """An increment whose new files hold no input (a new tar with no member, ...): nothing to write, but the
    generation is still recorded, so these files are not new again next time."""
    return ShardPlan(
        read=0,
        classes=list(increment.classes),
        single_label=increment.single_label,
        samples_per_shard=increment.samples_per_shard,
        sizes={},
        num_shards={},
        buckets={},
        path_base=path_base,
        generation=increment.generation,
    )


def _class_list(given: list[str] | None, seen: list[str]) -> list[str]:
    """The given class list (its ids are kept), extended by any label it does not name."""
    if given is None:
        return seen
    known = set(given)
    return list(given) + [n for n in seen if n not in known]


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


def _with_paths(rows: list[dict], path_base: str) -> list[dict]:
    """Rows whose path was left null in the index get it back: ``path_base`` joined with their source."""
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
