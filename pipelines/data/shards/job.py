"""The sharding job: :func:`shard_corpus` checks the destination, plans (or reads the stored plan), runs a Ray
Data task per shard still to write, and finishes by merging the done-markers into the folder's outputs."""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from pipelines.common.ray import init_ray
from pipelines.common.storage import filesystem, join, open_for_writing, read_json, write_atomically, write_json
from pipelines.data.shards.config import ShardConfig, ShardError
from pipelines.data.shards.dedup import NearDuplicateIndex, _eval_hashes
from pipelines.data.shards.format import (
    CLASSES_FILE,
    DONE_DIR,
    INFO_FILE,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    OUTPUT_FILES,
    PLAN_DIR,
    PLAN_FILE,
    REJECTS_FILE,
    REJECTS_SCHEMA,
    SUMMARY_FILE,
    WORK_DIR,
    _classes_record,
    _done_marker,
    _info_record,
    _is_output,
    _shard_name,
    _work_path,
)
from pipelines.data.shards.index import _detect_source, _load_classes
from pipelines.data.shards.plan import ShardPlan, _make_plan
from pipelines.data.shards.write import ShardWriter, _write_shard


@dataclass
class ShardSummary:
    """What a run did, or a finished run had done (``summary.json`` keeps it); counts balance: read = written +
    rejected."""

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
    plan_path = _work_path(dst, PLAN_FILE)
    summary_path = join(dst, SUMMARY_FILE)
    _check_destination(src_fs, src, dst_fs, dst, cfg)
    if overwrite and dst_fs.exists(dst):
        _clear_destination(dst_fs, dst, cfg)
    if dst_fs.exists(summary_path):
        done = read_json(dst_fs, summary_path)
        if done.get("fingerprint") == fingerprint:
            log(f"{cfg.dst} already holds these shards (fingerprint {fingerprint}); nothing to do")
            return ShardSummary(**{**done["summary"], "shards_written_now": 0, "seconds": 0.0})
        raise ShardError(f"{cfg.dst} holds shards made with other settings; pass overwrite=True (--overwrite)")
    recorded: dict = {}
    if dst_fs.exists(plan_path):
        recorded = read_json(dst_fs, plan_path)
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
    plan = ShardPlan.from_json(recorded["plan"]) if recorded.get("plan") is not None else None
    header = {"fingerprint": fingerprint, "config": dataclasses.asdict(cfg) | {"storage_options": {}}}
    if plan is None:
        write_json(dst_fs, plan_path, header, indent=None)  # a run killed while planning plans again
        kind = _detect_source(src_fs, src, cfg)
        log(f"indexing {cfg.src} ({kind})")
        plan = _make_plan(kind, src_fs, src, cfg, _load_classes(src_fs, src), log)
        write_json(dst_fs, plan_path, header | {"plan": plan.to_json()}, indent=None)
    done = _done_shards(dst_fs, dst)
    work = plan.work(done)
    sizes, num_shards = plan.sizes, plan.num_shards
    log(
        f"{sum(sizes.values()):,} samples, {len(plan.classes):,} classes, "
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


def _done_shards(fs, dst: str) -> set[tuple[str, int]]:
    done_dir = _work_path(dst, DONE_DIR)
    if not fs.exists(done_dir):
        return set()
    out = set()
    for path in fs.ls(done_dir, detail=False):
        name = posixpath.basename(path)
        if not name.endswith(".json"):  # a marker's temporary name, left by a run killed while writing it
            continue
        split, _, index = name.removesuffix(".json").rpartition("-")
        if fs.exists(join(dst, _shard_name(split, int(index)))):
            out.add((split, int(index)))
    return out


def _finish(
    fs, dst: str, cfg: ShardConfig, plan: ShardPlan, fingerprint: str, started: float, written_now: int
) -> ShardSummary:
    """Merge the markers into the manifest and the rejects (streamed: nothing per image is held)."""
    import pyarrow.parquet as pq

    manifest_rows = []
    rejected_by_reason: Counter = Counter()
    with open_for_writing(fs, join(dst, REJECTS_FILE), "wb") as f, pq.ParquetWriter(f, REJECTS_SCHEMA) as rejects:

        def add_rejects(table: pa.Table) -> None:
            rejected_by_reason.update(table.column("reason").to_pylist())
            rejects.write_table(table)

        for path in sorted(fs.glob(_work_path(dst, PLAN_DIR, "rejects-*.parquet"))):
            with fs.open(path, "rb") as part:
                add_rejects(pq.read_table(part, schema=REJECTS_SCHEMA))
        for split, n in sorted(plan.num_shards.items()):
            for i in range(n):
                marker = read_json(fs, _done_marker(dst, split, i))
                manifest_rows.append(marker["manifest"])
                if marker["rejects"]:
                    add_rejects(pa.Table.from_pylist(marker["rejects"], schema=REJECTS_SCHEMA))
    rejected = sum(rejected_by_reason.values())
    written = sum(r["samples"] for r in manifest_rows)
    if written + rejected != plan.read:
        raise RuntimeError(f"counts do not balance: read {plan.read} != written {written} + rejected {rejected}")
    with open_for_writing(fs, join(dst, MANIFEST_FILE), "wb") as f:
        pq.write_table(pa.Table.from_pylist(manifest_rows, schema=MANIFEST_SCHEMA), f)
    write_json(fs, join(dst, CLASSES_FILE), _classes_record(plan.classes), indent=0)
    info = _info_record(posixpath.basename(dst), plan.classes, not plan.single_label, manifest_rows)
    # byte for byte as before: a dataset's fingerprint (pipelines.tracking) hashes this file
    write_atomically(fs, join(dst, INFO_FILE), json.dumps(info, indent=1).encode())
    summary = ShardSummary(
        dst=cfg.dst,
        read=plan.read,
        written=written,
        rejected=rejected,
        rejected_by_reason=dict(rejected_by_reason),
        shards=len(manifest_rows),
        shards_written_now=written_now,
        bytes_written=sum(r["bytes"] for r in manifest_rows),
        seconds=time.perf_counter() - started,
        splits={s: v["num_samples"] for s, v in info["splits"].items()},
    )
    # summary.json is written last: its presence with this fingerprint means "finished".
    write_json(fs, join(dst, SUMMARY_FILE), {"fingerprint": fingerprint, "summary": dataclasses.asdict(summary)})
    fs.rm(_work_path(dst), recursive=True)  # markers served their purpose: summary.json says "done"
    return summary
