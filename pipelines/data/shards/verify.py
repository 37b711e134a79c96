"""Checking a shard folder against its manifest, with the same tar reader training uses."""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor

from pipelines.common.storage import filesystem, join
from pipelines.data.shards.format import MANIFEST_FILE, ShardReadError, iter_tar_samples


def verify_shards(dst_url: str, storage_options: dict | None = None, workers: int = 8) -> list[str]:
    """Recheck every shard against the manifest: sha256, size, sample count. Returns the problems."""
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
        return [p for problems in pool.map(check, manifest) for p in problems]


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
