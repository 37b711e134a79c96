"""The sharding job: :func:`shard_corpus` checks the destination, decides what to do with what it holds (finish an
unfinished run; confirm, extend or replace a finished one), plans (or reads the stored plan), runs a Ray Data task
per shard still to write, and finishes by merging the done-markers into the folder's outputs (finish.py)."""

from __future__ import annotations

import dataclasses
import functools
import os
import posixpath
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from pipelines.common.ray import init_ray
from pipelines.common.storage import filesystem, join, open_for_writing, read_json, write_json
from pipelines.data.shards.config import ShardConfig, ShardError
from pipelines.data.shards.dedup import NearDuplicateIndex, _eval_hashes
from pipelines.data.shards.finish import ShardSummary, confirmed_summary, finish_run
from pipelines.data.shards.format import (
    CLASSES_FILE,
    DONE_DIR,
    MANIFEST_FILE,
    OUTPUT_DIRS,
    OUTPUT_FILES,
    PLAN_FILE,
    SOURCES_FILE,
    SUMMARY_FILE,
    WORK_DIR,
    _is_output,
    _keys_file,
    _shard_name,
    _work_path,
    class_names,
)
from pipelines.data.shards.index import _detect_source, _load_classes
from pipelines.data.shards.plan import Increment, ShardPlan, _make_plan
from pipelines.data.shards.sources import Listing, compare, list_sources, read_source_record, source_record, table_rows
from pipelines.data.shards.write import ShardWriter, _write_shard


def shard_corpus(cfg: ShardConfig, *, overwrite: bool = False, progress: bool = False, log=print) -> ShardSummary:
    """Run (or finish, or confirm, or extend) the sharding of ``cfg.src`` into ``cfg.dst``, on the Ray this process
    joined (``pipelines.common.ray.init_ray``: a cluster's with an address), else on a local one it starts.
    ``progress`` shows a bar of shards and images written (instead of Ray Data's per-operator bars).

    A finished output made with the same settings is compared with a listing of the corpus (sources.py): the
    same listing confirms it (nothing read, nothing written); only new inputs add a generation of new shards
    beside the existing ones, which stay byte for byte as they were; anything changed or deleted replaces the
    output, as ``overwrite`` would. The summary's ``mode`` says which."""
    init_ray()
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ShardError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    started = time.perf_counter()
    src_fs, src = filesystem(cfg.src, cfg.storage_options)
    dst_fs, dst = filesystem(cfg.dst, cfg.storage_options)
    if not src_fs.exists(src):
        raise ShardError(f"source {cfg.src} does not exist")

    fingerprint = cfg.fingerprint()
    _check_destination(src_fs, src, dst_fs, dst, cfg)
    if overwrite and dst_fs.exists(dst):
        _clear_destination(dst_fs, dst, cfg)
    header = _unfinished_run(dst_fs, dst, cfg, fingerprint)
    if header is None:
        start = _decide(cfg, src_fs, src, dst_fs, dst, fingerprint, log)
        if isinstance(start, ShardSummary):
            return start
        header = _plan_run(cfg, src_fs, src, dst_fs, dst, fingerprint, start, log)
    plan = ShardPlan.from_json(header["plan"])
    done = _done_shards(dst_fs, dst)
    work = plan.work(done)
    sizes, num_shards = plan.sizes, plan.num_shards
    log(
        (f"generation {plan.generation}: " if plan.generation else "")
        + f"{sum(sizes.values()):,} samples, {len(plan.classes):,} classes, "
        + ", ".join(f"{s}: {n:,} in {num_shards[s]:,} shards" for s, n in sorted(sizes.items()))
        + (f"; {len(done)} shards already done" if done else "")
    )

    eval_index = None
    if cfg.eval_sets and work:
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
    return finish_run(dst_fs, dst, cfg, plan, header, started, written_now)


@dataclass
class _Start:
    """What a new run is to do, as decided from the destination and a listing of the corpus."""

    mode: str  # "full" or "incremental"
    kind: str  # folder, table or tars
    listing: Listing
    rows: pa.Array | None  # a label table's row identities (the full record of a table corpus needs them)
    replace: bool = False  # the destination holds an output to replace first
    increment: Increment | None = None
    earlier: pa.Table | None = None  # the output's sources record, for the generations of its entries


def _unfinished_run(dst_fs, dst: str, cfg: ShardConfig, fingerprint: str) -> dict | None:
    """The stored plan of a run to finish, or None when there is none: a run killed after its summary.json, while
    removing its work folder, is finished; one killed before its plan was stored starts again, an incremental one
    from the decision (the output it adds to is untouched), a full one from an empty destination (it may have
    been killed while clearing the output it replaces)."""
    plan_path = _work_path(dst, PLAN_FILE)
    if not dst_fs.exists(plan_path):
        return None
    recorded = read_json(dst_fs, plan_path)
    if recorded.get("fingerprint") != fingerprint:
        raise ShardError(f"{cfg.dst} holds an unfinished run with other settings; pass overwrite=True (--overwrite)")
    summary_path = join(dst, SUMMARY_FILE)
    finished = False
    if recorded.get("plan") is not None and dst_fs.exists(summary_path):
        done = read_json(dst_fs, summary_path)
        generation = recorded["plan"].get("generation", 0)
        finished = done.get("fingerprint") == fingerprint and done["summary"].get("generation", 0) >= generation
    if recorded.get("plan") is None and recorded.get("mode") != "incremental":
        _clear_destination(dst_fs, dst, cfg)
    elif recorded.get("plan") is None or finished:
        dst_fs.rm(_work_path(dst), recursive=True)
    else:
        return recorded
    return None


def _decide(cfg: ShardConfig, src_fs, src: str, dst_fs, dst: str, fingerprint: str, log) -> _Start | ShardSummary:
    """A first run, or what to do with the finished output DST holds: a summary when it stands confirmed."""
    kind = _detect_source(src_fs, src, cfg)
    summary_path = join(dst, SUMMARY_FILE)
    if not dst_fs.exists(summary_path):
        if dst_fs.exists(dst) and dst_fs.ls(dst):
            raise ShardError(
                f"{cfg.dst} is not empty and holds no sharding run; choose an empty destination"
                + (
                    ""
                    if _foreign_entries(dst_fs, dst)
                    else ", or pass overwrite=True (--overwrite) to replace its shards"
                )
            )
        listing = list_sources(kind, src_fs, src, dst_fs, dst, cfg)
        return _Start("full", kind, listing, _rows(kind, src_fs, src, cfg))
    done = read_json(dst_fs, summary_path)
    if done.get("fingerprint") != fingerprint:
        raise ShardError(f"{cfg.dst} holds shards made with other settings; pass overwrite=True (--overwrite)")
    recorded = done.get("sources") or {}
    listing = list_sources(kind, src_fs, src, dst_fs, dst, cfg)
    if recorded.get("listing") == listing.fingerprint and recorded.get("kind") == kind:
        log(f"{cfg.dst} already holds these shards (fingerprint {fingerprint}) of an unchanged source; nothing to do")
        return confirmed_summary(done)
    earlier = read_source_record(dst_fs, dst) if recorded.get("listing") else None
    generation = done["summary"].get("generation", 0)
    if earlier is None:
        reason = f"no record of what {cfg.dst} was made from (it predates incremental sharding)"
    elif recorded.get("kind") != kind:
        reason = f"{cfg.src} now reads as a {kind} corpus, not a {recorded.get('kind')} one"
    else:
        rows_now = functools.cache(lambda: table_rows(src_fs, src, cfg))  # read once, only when needed
        changes = compare(earlier, listing, rows_now)
        if changes.mode == "confirmed":
            log(f"{cfg.dst} already holds these shards (fingerprint {fingerprint}); no new inputs; nothing to do")
            return confirmed_summary(done)
        reason = changes.describe()
        # without every earlier generation's keys, a new sample could repeat one
        missing = [g for g in range(generation + 1) if not dst_fs.exists(_keys_file(dst, g))]
        if changes.mode == "incremental" and missing:
            reason += f", but the keys of generation {missing[0]} are missing"
        elif changes.mode == "incremental":
            rows = rows_now() if kind == "table" else None
            increment = _increment(dst_fs, dst, recorded, generation + 1, changes.new)
            return _Start("incremental", kind, listing, rows, increment=increment, earlier=earlier)
    log(f"{cfg.src}: {reason}: full re-shard")
    return _Start("full", kind, listing, _rows(kind, src_fs, src, cfg), replace=True)


def _rows(kind: str, src_fs, src: str, cfg: ShardConfig) -> pa.Array | None:
    return table_rows(src_fs, src, cfg) if kind == "table" else None


def _increment(dst_fs, dst: str, recorded: dict, generation: int, new: list[str]) -> Increment:
    """What generation ``generation`` keeps of the output's earlier ones."""
    import pyarrow.parquet as pq

    with dst_fs.open(join(dst, MANIFEST_FILE), "rb") as f:
        splits = pq.read_table(f, columns=["split"]).column("split").to_pylist()
    return Increment(
        generation=generation,
        classes=class_names(read_json(dst_fs, join(dst, CLASSES_FILE))),
        samples_per_shard=recorded["samples_per_shard"],
        single_label=recorded["single_label"],
        first_shard=dict(Counter(splits)),
        held_keys=[_keys_file(dst, g) for g in range(generation)],
        only=new,
    )


def _plan_run(cfg: ShardConfig, src_fs, src: str, dst_fs, dst: str, fingerprint: str, start: _Start, log) -> dict:
    """Replace the output if asked, record the listing, plan, and store the plan: returns plan.json's content."""
    import pyarrow.parquet as pq

    increment = start.increment
    generation = increment.generation if increment else 0
    header = {
        "fingerprint": fingerprint,
        "config": dataclasses.asdict(cfg) | {"storage_options": {}},
        "mode": start.mode,
        "kind": start.kind,
        "listing": start.listing.fingerprint,
    }
    # first: a run killed from here on, while clearing the output it replaces or while planning, starts again
    write_json(dst_fs, _work_path(dst, PLAN_FILE), header, indent=None)
    if start.replace:
        _clear_destination(dst_fs, dst, cfg, keep=WORK_DIR)
    record = source_record(start.listing, start.rows, start.earlier, generation)
    with open_for_writing(dst_fs, _work_path(dst, SOURCES_FILE), "wb") as f:
        pq.write_table(record, f)
    log(f"indexing {cfg.src} ({start.kind})" + (f": {len(increment.only):,} new inputs" if increment else ""))
    plan = _make_plan(start.kind, src_fs, src, cfg, _load_classes(src_fs, src), log, increment)
    if increment is not None:
        if increment.single_label and not plan.single_label:
            # the earlier shards carry a .cls member per sample, which a multi-label sample cannot have
            log(f"{cfg.src}: new images with several labels each, where every earlier one has one: full re-shard")
            dst_fs.rm(_work_path(dst), recursive=True)
            full = _Start("full", start.kind, start.listing, start.rows, replace=True)
            return _plan_run(cfg, src_fs, src, dst_fs, dst, fingerprint, full, log)
        plan = dataclasses.replace(plan, single_label=increment.single_label)
        log(f"{plan.read:,} new images: generation {generation}, {sum(plan.num_shards.values()):,} new shards")
    header["plan"] = plan.to_json()
    write_json(dst_fs, _work_path(dst, PLAN_FILE), header, indent=None)
    return header


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


def _clear_destination(fs, dst: str, cfg: ShardConfig, keep: str | None = None) -> None:
    """--overwrite, or a full re-shard: remove an earlier run's outputs (all but the entry ``keep``), and only
    when DST holds nothing else."""
    foreign = _foreign_entries(fs, dst)
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise ShardError(
            f"refusing to overwrite {cfg.dst}: it holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
            f"that `vit shard` does not write ({shown}); overwrite only replaces a folder of shards "
            f"({{split}}-NNNNNN.tar, {', '.join(OUTPUT_FILES)}, {', '.join(d + '/' for d in OUTPUT_DIRS)})"
        )
    summary = join(dst, SUMMARY_FILE)
    if fs.exists(summary):  # first: a removal cut short must not leave a "finished" output missing some of its files
        fs.rm(summary)
    entries = [e for e in fs.ls(dst, detail=False, refresh=True) if posixpath.basename(e.rstrip("/")) != keep]
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
