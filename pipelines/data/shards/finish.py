"""The end of a run: merge the done-markers with the earlier generations' outputs, then move the new outputs into
place, summary.json last.

Everything is first written under DST/_work/out/ and then moved (a rename on a local disk, a copy on an object
store), so a reader never sees half a file. The merge reads the earlier generations' rows from DST itself, keeping
those of generations below this run's: a run killed after moving some files finishes again to the same outputs.
Shards are all written before the merge, so no manifest ever names a shard that is not there.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from pipelines.common.storage import join, open_for_writing, read_json, write_atomically, write_json
from pipelines.data.shards.config import ShardConfig
from pipelines.data.shards.format import (
    CLASSES_FILE,
    INFO_FILE,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    OUT_DIR,
    PLAN_DIR,
    REJECTS_FILE,
    REJECTS_SCHEMA,
    SOURCES_FILE,
    SUMMARY_FILE,
    _classes_record,
    _done_marker,
    _info_record,
    _keys_file,
    _work_path,
    with_generation,
)
from pipelines.data.shards.plan import ShardPlan, _write_keys


@dataclass
class ShardSummary:
    """What a run did, or a finished run had done (``summary.json`` keeps it). The counts are the whole output's,
    over every generation, and balance: read = written + rejected."""

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
    generation: int = 0  # the output's latest generation
    # what this call did: "full" (a first sharding or a full re-shard), "incremental" (new inputs added as a new
    # generation) or "confirmed" (nothing new: the output was left as it was)
    mode: str = "full"
    new: int = 0  # inputs this call's generation read (0 when confirmed)
    new_bytes: int = 0  # bytes of this call's generation's shards

    @property
    def images_per_second(self) -> float:
        return self.new / self.seconds if self.seconds else 0.0

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
            f"{'generation':<22}{self.generation:>12,}   ({self.mode}, {self.new:,} new inputs read)",
            f"{'bytes':<22}{mb:>11,.1f}M",
            f"{'time':<22}{self.seconds:>11,.1f}s   {self.images_per_second:,.0f} images/s, "
            f"{self.new_bytes / 1e6 / self.seconds if self.seconds else 0:,.1f} MB/s",
        ]
        return "\n".join(lines)


def confirmed_summary(done: dict) -> ShardSummary:
    """A finished output's summary.json, as a run that found nothing to do reports it."""
    confirmed = {"shards_written_now": 0, "seconds": 0.0, "mode": "confirmed", "new": 0, "new_bytes": 0}
    return ShardSummary(**(done["summary"] | confirmed))


def finish_run(
    fs, dst: str, cfg: ShardConfig, plan: ShardPlan, header: dict, started: float, written_now: int
) -> ShardSummary:
    """Merge this run's markers with the earlier generations into the outputs, and commit them (see the module
    docstring). Nothing per image is held: the rejects are streamed, the manifest has a row per shard."""
    import pyarrow.parquet as pq

    generation = plan.generation
    out = _work_path(dst, OUT_DIR)
    earlier_manifest = _earlier(fs, join(dst, MANIFEST_FILE), MANIFEST_SCHEMA, generation)
    manifest_rows = [row for table in earlier_manifest for row in table.to_pylist()]
    rejected_by_reason: Counter = Counter()
    rejected_by_generation: Counter = Counter()
    with open_for_writing(fs, join(out, REJECTS_FILE), "wb") as f, pq.ParquetWriter(f, REJECTS_SCHEMA) as rejects:

        def add_rejects(table: pa.Table) -> None:
            rejected_by_reason.update(table.column("reason").to_pylist())
            rejected_by_generation.update(table.column("generation").to_pylist())
            rejects.write_table(table)

        for table in _earlier(fs, join(dst, REJECTS_FILE), REJECTS_SCHEMA, generation):
            add_rejects(table)
        for path in sorted(fs.glob(_work_path(dst, PLAN_DIR, "rejects-*.parquet"))):
            with fs.open(path, "rb") as part:
                add_rejects(_of_generation(pq.read_table(part), generation))
        for split, index in plan.shards():
            marker = read_json(fs, _done_marker(dst, split, index))
            manifest_rows.append({"generation": generation} | marker["manifest"])  # markers of older runs lack it
            if marker["rejects"]:
                add_rejects(_of_generation(pa.Table.from_pylist(marker["rejects"]), generation))
    new_rows = [r for r in manifest_rows if r["generation"] == generation]
    written_in_generation = sum(r["samples"] for r in new_rows)
    if written_in_generation + rejected_by_generation[generation] != plan.read:
        raise RuntimeError(
            f"counts do not balance in generation {generation}: read {plan.read} != written {written_in_generation} "
            f"+ rejected {rejected_by_generation[generation]}"
        )
    manifest_rows.sort(key=lambda r: (r["split"], r["shard"]))
    with open_for_writing(fs, join(out, MANIFEST_FILE), "wb") as f:
        pq.write_table(pa.Table.from_pylist(manifest_rows, schema=MANIFEST_SCHEMA), f)
    buckets = sorted({r.bucket for ranges in plan.buckets.values() for r in ranges})
    _write_keys(fs, dst, buckets, join(out, "keys.parquet"))

    generations = _per_generation(manifest_rows, rejected_by_generation, generation)
    info = _info_record(posixpath.basename(dst), plan.classes, not plan.single_label, manifest_rows, generation)
    summary = ShardSummary(
        dst=cfg.dst,
        read=sum(g["read"] for g in generations),
        written=sum(r["samples"] for r in manifest_rows),
        rejected=sum(rejected_by_reason.values()),
        rejected_by_reason=dict(rejected_by_reason),
        shards=len(manifest_rows),
        shards_written_now=written_now,
        bytes_written=sum(r["bytes"] for r in manifest_rows),
        seconds=time.perf_counter() - started,
        splits={s: v["num_samples"] for s, v in info["splits"].items()},
        generation=generation,
        mode=header.get("mode", "full"),
        new=plan.read,
        new_bytes=sum(r["bytes"] for r in new_rows),
    )
    sources = {
        "listing": header.get("listing"),  # None: not recorded (a run begun before sources were)
        "kind": header.get("kind"),
        "samples_per_shard": plan.samples_per_shard,
        "single_label": plan.single_label,
        "generations": generations,
    }
    _commit(
        fs,
        dst,
        out,
        plan,
        info,
        {"fingerprint": header["fingerprint"], "summary": dataclasses.asdict(summary), "sources": sources},
    )
    return summary


def _commit(fs, dst: str, out: str, plan: ShardPlan, info: dict, summary_record: dict) -> None:
    """Move the merged outputs into place: classes first (new ids only append, so readers of the earlier
    generations lose nothing), then the records, the manifest and _info.json, and summary.json last: its
    presence with this generation means "finished"."""
    write_json(fs, join(dst, CLASSES_FILE), _classes_record(plan.classes), indent=0)
    _move(fs, join(out, "keys.parquet"), _keys_file(dst, plan.generation))
    record = _work_path(dst, SOURCES_FILE)
    if fs.exists(record):  # gone once moved: a run killed after this point moved it already
        _move(fs, record, join(dst, SOURCES_FILE))
    _move(fs, join(out, REJECTS_FILE), join(dst, REJECTS_FILE))
    _move(fs, join(out, MANIFEST_FILE), join(dst, MANIFEST_FILE))
    # byte for byte as before for generation 0: a dataset's fingerprint (format.dataset_fingerprint) hashes this file
    write_atomically(fs, join(dst, INFO_FILE), json.dumps(info, indent=1).encode())
    write_json(fs, join(dst, SUMMARY_FILE), summary_record)
    fs.rm(_work_path(dst), recursive=True)  # markers served their purpose: summary.json says "done"


def _move(fs, source: str, target: str) -> None:
    fs.makedirs(posixpath.dirname(target), exist_ok=True)  # needed locally, harmless on object stores
    fs.mv(source, target)


def _earlier(fs, path: str, schema: pa.Schema, generation: int):
    """The manifest or the rejects at ``path``, a batch at a time, as its schema has it now, with only the rows of
    generations before ``generation`` (a killed run may have moved its own into place already). Nothing for
    generation 0: a first sharding, or a full re-shard, adds to nothing."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not generation or not fs.exists(path):
        return
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=65_536):
            table = with_generation(pa.Table.from_batches([batch]), schema)
            yield table.filter(pc.less(table.column("generation"), generation))


def _of_generation(table: pa.Table, generation: int) -> pa.Table:
    """Rejects of this run as REJECTS_SCHEMA has them (those of a run begun before generations have none)."""
    import pyarrow.compute as pc

    if "generation" not in table.column_names:
        table = table.append_column("generation", pa.nulls(table.num_rows, pa.int64()))
    table = table.select(REJECTS_SCHEMA.names).cast(REJECTS_SCHEMA)
    filled = pc.fill_null(table.column("generation"), generation)
    return table.set_column(table.schema.get_field_index("generation"), "generation", filled)


def _per_generation(manifest_rows: list[dict], rejected: Counter, last: int) -> list[dict]:
    """read, written, rejected and shards of each generation up to ``last``: each balances on its own."""
    out = []
    for g in range(last + 1):
        rows = [r for r in manifest_rows if r["generation"] == g]
        written = sum(r["samples"] for r in rows)
        out.append(
            {
                "generation": g,
                "read": written + rejected[g],
                "written": written,
                "rejected": rejected[g],
                "shards": len(rows),
            }
        )
    return out
