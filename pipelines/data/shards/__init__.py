"""Corpus -> WebDataset shards, as Ray Data jobs. Nothing per image is held on the driver but the corpus's listing
(a path, a size and a version per file), which tells a re-run what changed.

    index   (index.py) Ray Data tasks list the corpus a unit at a time (a class folder, a part of a row group
            of the label table, a tar): one row per input sample with its key, where its bytes are (a file, or
            a byte range of a tar), its labels, its split, and ``order``, a seeded hash of the key. What is
            read at all, and how, is inputs.py's: regular files within a size cap.
    plan    (plan.py) a global shuffle with no global sort: the top bits of ``order`` cut the rows into
            buckets (one groupby), each sorted, cleared of repeated keys and stored as parquet by one task.
            Running sums of the per-bucket counts rank every row in its split, and shard i holds ranks
            [i * n, (i + 1) * n): every shard a uniform random sample, deterministic. The result, a
            ``ShardPlan``, is stored in DST/_work/plan.json before any shard is written.
    write   (write.py) per shard: read its rows from the buckets that cover them, read the bytes, normalise or
            reject each image, drop near-duplicates of the evaluation sets (dedup.py), stream the tar to a
            temporary name, rename it into place, then write a done-marker with its manifest row and rejects.
    finish  (finish.py) merge the markers (and the earlier generations' rows) into manifest.parquet,
            rejects.parquet, _info.json (timm's format), classes.json, sources.parquet, _keys/ and summary.json,
            written aside and moved into place, summary.json last.

``shard_corpus`` (job.py) runs the whole; ``verify_shards`` (verify.py) rechecks a finished folder against its
manifest. format.py holds the layout of a shard folder, and the writer and the reader of its tars (input tars,
whoever wrote them, are indexed with ``tarfile``, which reads more kinds of tar).

Re-running on a finished output with the same settings lists the corpus (sources.py: paths, sizes and the store's
versions, never the bytes) and compares the listing with the one the output records: the same listing confirms
it; only new inputs (new files, or rows appended to a label table) are sharded as a new generation, new shards
beside the old ones, which are never rewritten; a changed or deleted input replaces the output, as --overwrite
would. An incremental run plans its new inputs alone and looks their keys up among the earlier generations'
(_keys/), so no key is written twice.

The plan is stored before any shard is written and a rerun skips every shard whose marker exists,
so a run killed at any point (incremental ones too) finishes without duplicates or losses, and a finished run
does nothing. Counts always balance, over the output and within each generation: read = written + rejected.
"""

from __future__ import annotations

from pipelines.data.shards.config import ShardConfig, ShardError, SourceKind
from pipelines.data.shards.dedup import NearDuplicateIndex
from pipelines.data.shards.finish import ShardSummary
from pipelines.data.shards.format import (
    CLASSES_FILE,
    INFO_FILE,
    KEY_SUFFIX,
    KEYS_DIR,
    KEYS_SCHEMA,
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    OUTPUT_FILES,
    PLAN_DIR,
    REJECTS_FILE,
    REJECTS_SCHEMA,
    SOURCES_FILE,
    SOURCES_SCHEMA,
    SPLIT_NAME,
    SUMMARY_FILE,
    WORK_DIR,
)
from pipelines.data.shards.index import IMAGE_EXTENSIONS, INDEX_SCHEMA, SPLIT_DIRS, TABLE_SUFFIXES
from pipelines.data.shards.job import shard_corpus
from pipelines.data.shards.plan import ShardPlan
from pipelines.data.shards.verify import verify_shards
from pipelines.data.shards.write import ShardWriter

__all__ = [
    "CLASSES_FILE",
    "IMAGE_EXTENSIONS",
    "INDEX_SCHEMA",
    "INFO_FILE",
    "KEY_SUFFIX",
    "KEYS_DIR",
    "KEYS_SCHEMA",
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA",
    "OUTPUT_FILES",
    "PLAN_DIR",
    "REJECTS_FILE",
    "REJECTS_SCHEMA",
    "SOURCES_FILE",
    "SOURCES_SCHEMA",
    "SPLIT_DIRS",
    "SPLIT_NAME",
    "SUMMARY_FILE",
    "TABLE_SUFFIXES",
    "WORK_DIR",
    "NearDuplicateIndex",
    "ShardConfig",
    "ShardError",
    "ShardPlan",
    "ShardSummary",
    "ShardWriter",
    "SourceKind",
    "shard_corpus",
    "verify_shards",
]
