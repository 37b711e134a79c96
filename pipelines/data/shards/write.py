"""Writing one shard: a Ray Data task reads its samples' bytes, checks and normalises each image, drops
near-duplicates of the evaluation sets, streams the tar to a temporary name and renames it into place, then
leaves a done-marker with the shard's manifest row and its rejects."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from pipelines.common.storage import filesystem, join, open_for_writing, write_json
from pipelines.data.images import RejectedImage, normalize_image
from pipelines.data.shards.config import ShardConfig
from pipelines.data.shards.dedup import NearDuplicateIndex
from pipelines.data.shards.format import END_OF_ARCHIVE, TMP_DIR, _done_marker, _sample_members, _shard_name, _work_path
from pipelines.data.shards.inputs import _read_failure, _read_whole, _Refused
from pipelines.data.shards.plan import ShardPlan, _shard_members

_WRITE_BYTES = 1 << 20  # a shard is written in pieces of about this size


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


class ShardWriter:
    """The per-shard task: called by Ray Data with one row per shard: its split, index, rank range and buckets."""

    def __init__(self, cfg: ShardConfig, plan: ShardPlan, eval_index: NearDuplicateIndex | None):
        self.cfg, self.plan, self.eval_index = cfg, plan, eval_index
        self.class_ids = {name: i for i, name in enumerate(plan.classes)}
        self.policy = cfg.image_policy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.cfg
        fs, dst = filesystem(cfg.dst, cfg.storage_options)
        # The inputs live on the corpus's filesystem, which need not be the output's (an s3:// corpus sharded
        # into a local folder, or the other way round): the plan's paths are paths on it.
        source_fs, _ = filesystem(cfg.src, cfg.storage_options)
        split, index = batch.column("split")[0].as_py(), int(batch.column("shard")[0].as_py())
        lo, hi = int(batch.column("lo")[0].as_py()), int(batch.column("hi")[0].as_py())
        buckets = json.loads(batch.column("buckets")[0].as_py())
        rows = _shard_members(fs, dst, split, lo, hi, buckets, self.plan.path_base)
        name = _shard_name(split, index)
        tmp = _work_path(dst, TMP_DIR, f"{name}.{uuid.uuid4().hex}")
        rejects: list[dict] = []
        histogram: Counter = Counter()
        written = pending_bytes = 0
        pending: list[bytes] = []
        with open_for_writing(fs, tmp, "wb") as raw:
            sink = _HashingWriter(raw)
            for row, data in self._read(source_fs, rows):
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
                    rejects.append(self._reject(row, reason, detail, split, index, self.plan.generation))
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
                members = _sample_members(row["key"], image.data, meta, ids[0] if self.plan.single_label else None)
                pending += members
                pending_bytes += sum(map(len, members))
                if pending_bytes >= _WRITE_BYTES:  # a write (and hash update) per MiB, not per member
                    sink.write(b"".join(pending))
                    pending, pending_bytes = [], 0
                histogram.update(ids)
                written += 1
            sink.write(b"".join([*pending, END_OF_ARCHIVE]))
        fs.mv(tmp, join(dst, name))  # the commit: the shard appears whole or not at all
        entry = {
            "split": split,
            "shard": index,
            "filename": name,
            "samples": written,
            "bytes": sink.bytes,
            "sha256": sink.sha256.hexdigest(),
            "label_histogram": json.dumps({str(k): v for k, v in sorted(histogram.items())}),
            "rejected": len(rejects),
            "generation": self.plan.generation,
        }
        # The marker goes last: a shard without one is redone (identically) by the next run.
        write_json(fs, _done_marker(dst, split, index), {"manifest": entry, "rejects": rejects}, indent=None)
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
    def _reject(row: dict, reason: str, detail: str, split: str, index: int, generation: int) -> dict:
        return {
            "key": row["key"],
            "source": row["source"],
            "reason": reason,
            "detail": detail[:500],
            "split": split,
            "shard": index,
            "generation": generation,
        }


def _write_shard(batch: pa.Table, writer: ShardWriter) -> pa.Table:
    return writer(batch)
