"""Near-duplicates of the evaluation sets: their images' perceptual hashes, and a lookup by Hamming distance that
the writers use to drop training images an evaluation would otherwise be measured on."""

from __future__ import annotations

import posixpath

from pipelines.common.storage import filesystem
from pipelines.data.images import ImagePolicy, RejectedImage, normalize_image
from pipelines.data.shards.config import ShardError
from pipelines.data.shards.index import IMAGE_EXTENSIONS
from pipelines.data.shards.inputs import _read_whole


def _eval_hashes(urls: list[str], storage_options: dict, max_bytes: int = ImagePolicy.max_bytes) -> dict[int, str]:
    """pHash of every image in the evaluation sets (folder trees or single files); files that are not
    regular, or larger than ``max_bytes``, are passed over unread."""
    hashes: dict[int, str] = {}
    policy = ImagePolicy(min_side=1, max_bytes=max_bytes)
    for url in urls:
        fs, root = filesystem(url, storage_options)
        files = [root] if fs.isfile(root) else sorted(fs.find(root))
        files = [p for p in files if posixpath.splitext(p)[1].lower() in IMAGE_EXTENSIONS]
        if not files:
            raise ShardError(f"evaluation set {url} holds no images")
        for start in range(0, len(files), 256):
            chunk = files[start : start + 256]
            for path, data in zip(chunk, _read_whole(fs, chunk, max_bytes)):
                if isinstance(data, Exception):
                    continue
                try:
                    hashes.setdefault(normalize_image(data, policy, with_phash=True).phash, path)
                except RejectedImage:
                    continue
    return hashes


class NearDuplicateIndex:
    """Hamming-ball lookup of 64-bit hashes by the pigeonhole principle: two hashes within distance
    d agree exactly on at least one of d + 1 disjoint bit blocks, so only those buckets are checked."""

    def __init__(self, hashes: dict[int, str], max_distance: int):
        self.max_distance = max_distance
        self.blocks = max_distance + 1
        self.width = -(-64 // self.blocks)
        self.tables: list[dict[int, list[int]]] = [{} for _ in range(self.blocks)]
        self.names = hashes
        for h in hashes:
            for b, part in enumerate(self._parts(h)):
                self.tables[b].setdefault(part, []).append(h)

    def _parts(self, h: int) -> list[int]:
        u = h & (2**64 - 1)
        mask = (1 << self.width) - 1
        return [(u >> (b * self.width)) & mask for b in range(self.blocks)]

    def match(self, h: int) -> str | None:
        u = h & (2**64 - 1)
        for b, part in enumerate(self._parts(h)):
            for candidate in self.tables[b].get(part, ()):
                if bin(u ^ (candidate & (2**64 - 1))).count("1") <= self.max_distance:
                    return self.names[candidate]
        return None

    def __len__(self) -> int:
        return len(self.names)
