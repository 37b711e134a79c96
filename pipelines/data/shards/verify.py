"""Checking a shard folder against its manifest, with the same tar reader training uses: every shard of every
generation, and the records that tie the generations together."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from pipelines.common.storage import filesystem, join, read_json
from pipelines.data.shards.format import (
    INFO_FILE,
    MANIFEST_FILE,
    REJECTS_FILE,
    SUMMARY_FILE,
    ShardReadError,
    _keys_file,
    iter_tar_samples,
)


def verify_shards(dst_url: str, storage_options: dict | None = None, workers: int = 8) -> list[str]:
    """Recheck every shard against the manifest (sha256, size, sample count), ``_info.json`` against the manifest,
    and each generation's counts and keys against summary.json. Returns the problems."""
    import pyarrow.parquet as pq

    fs, dst = filesystem(dst_url, storage_options or {})
    if not fs.exists(join(dst, MANIFEST_FILE)):
        return [f"no {MANIFEST_FILE} in {dst_url}"]
    with fs.open(join(dst, MANIFEST_FILE), "rb") as f:
        manifest = pq.read_table(f).to_pylist()

    def check(entry: dict) -> list[str]:
        path = join(dst, entry["filename"])
        if not fs.exists(path):
            return [f"{entry['filename']}: missing"]
        sha = hashlib.sha256()
        try:
            with fs.open(path, "rb") as raw:
                reader = _HashingReader(raw, sha)
                samples = sum(1 for _ in iter_tar_samples(reader, shard=entry["filename"]))
                reader.drain()
                size = reader.bytes
        except ShardReadError as err:
            return [f"{entry['filename']}: not a readable tar ({err})"]
        problems = []
        if size != entry["bytes"]:
            problems.append(f"{entry['filename']}: {size} bytes, manifest says {entry['bytes']}")
        if sha.hexdigest() != entry["sha256"]:
            problems.append(f"{entry['filename']}: sha256 differs from the manifest")
        if samples != entry["samples"]:
            problems.append(f"{entry['filename']}: {samples} samples, manifest says {entry['samples']}")
        return problems

    with ThreadPoolExecutor(workers) as pool:
        problems = [p for found in pool.map(check, manifest) for p in found]
    return problems + _check_info(fs, dst, manifest) + _check_generations(fs, dst, manifest)


def _check_info(fs, dst: str, manifest: list[dict]) -> list[str]:
    """``_info.json`` (what training reads) must list the manifest's shards, split by split, with its lengths."""
    if not fs.exists(join(dst, INFO_FILE)):
        return [f"no {INFO_FILE}"]
    splits = json.loads(fs.cat_file(join(dst, INFO_FILE))).get("splits", {})
    problems = []
    for split in sorted(set(splits) | {r["split"] for r in manifest}):
        rows = [r for r in manifest if r["split"] == split]
        entry = splits.get(split, {})
        if entry.get("filenames") != [r["filename"] for r in rows]:
            problems.append(f"{INFO_FILE}: the shards of {split} differ from the manifest's")
        elif entry.get("shard_lengths") != [r["samples"] for r in rows]:
            problems.append(f"{INFO_FILE}: the shard lengths of {split} differ from the manifest's")
    return problems


def _check_generations(fs, dst: str, manifest: list[dict]) -> list[str]:
    """Each generation summary.json records must balance (read = written + rejected, from the manifest and the
    rejects) and have its keys; an output made before generations were recorded has nothing to check here."""
    import pyarrow.parquet as pq

    if not fs.exists(join(dst, SUMMARY_FILE)):
        return []
    generations = (read_json(fs, join(dst, SUMMARY_FILE)).get("sources") or {}).get("generations")
    if not generations:
        return []
    rejected: Counter = Counter()
    if fs.exists(join(dst, REJECTS_FILE)):
        with fs.open(join(dst, REJECTS_FILE), "rb") as f:
            rejects = pq.ParquetFile(f)
            if "generation" in rejects.schema_arrow.names:
                for batch in rejects.iter_batches(columns=["generation"]):
                    rejected.update(batch.column(0).to_pylist())
    problems = []
    recorded = {g["generation"] for g in generations}
    strays = sorted({r.get("generation", 0) for r in manifest} - recorded)
    if strays:
        problems.append(f"{MANIFEST_FILE}: shards of generation(s) {strays}, which summary.json does not record")
    for entry in generations:
        g = entry["generation"]
        written = sum(r["samples"] for r in manifest if r.get("generation", 0) == g)
        shards = sum(1 for r in manifest if r.get("generation", 0) == g)
        if (written, rejected[g], shards) != (entry["written"], entry["rejected"], entry["shards"]):
            problems.append(
                f"generation {g}: {written} written + {rejected[g]} rejected in {shards} shards, summary.json says "
                f"{entry['written']} + {entry['rejected']} in {entry['shards']}"
            )
        if entry["read"] != entry["written"] + entry["rejected"]:
            problems.append(f"generation {g}: read {entry['read']} != written + rejected")
        if not fs.exists(_keys_file(dst, g)):
            problems.append(f"generation {g}: its keys ({_keys_file(dst, g)}) are missing")
    return problems


class _HashingReader(io.RawIOBase):
    """Hashes and counts what is read through it; ``drain`` reads on to the end of the file, past the tar's end."""

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
