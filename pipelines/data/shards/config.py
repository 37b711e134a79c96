"""What a sharding run is asked to do: :class:`ShardConfig`, checked before any work, and its fingerprint, which
decides whether an existing output (finished or not) is this run's."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from pipelines.common.config import check
from pipelines.data.images import ImagePolicy

SourceKind = Literal["auto", "folder", "table", "tars"]


class ShardError(ValueError):
    """A problem with the sharding request itself (not with one image)."""


@dataclass(kw_only=True)
class ShardConfig:
    src: str  # fsspec URL of the corpus: a folder tree, a folder with a label table, or tars
    dst: str  # fsspec URL of the output folder
    source: SourceKind = "auto"
    labels: str | None = None  # label table (parquet/csv/jsonl); default: SRC/labels.{parquet,csv,jsonl}
    path_column: str = "path"  # relative to the table's folder, or absolute URLs
    label_column: str = "labels"  # a name/id or a list of names/ids per row
    key_column: str | None = None  # default: derived from the path
    split_column: str | None = None  # default: a "split" column when the table has one, else val_fraction by key hash
    val_fraction: float = 0.0
    shard_samples: int | None = 10_000  # target samples per shard ...
    shard_bytes: int | None = None  # ... or target bytes per shard (estimated from a sample of inputs)
    seed: int = 0
    max_side: int | None = None  # resize longer sides on ingest
    max_pixels: int = 89_478_485  # Pillow's own default bomb threshold
    jpeg_quality: int = 95
    # Inputs larger than this are rejected (file-too-large) from their listed or stat'ed size, never read
    max_file_bytes: int = 64 * 2**20
    # Symlinks in a folder or tar source are read only when they resolve to a regular file inside SRC
    # (rejected as "symlink" otherwise); True reads those resolving to a regular file anywhere.
    follow_symlinks: bool = False
    eval_sets: list[str] = field(default_factory=list)  # fsspec URLs of downstream sets to de-duplicate against
    dedup_distance: int = 4  # max Hamming distance of 64-bit pHashes counted as a near-duplicate
    storage_options: dict = field(default_factory=dict)  # passed to fsspec (e.g. s3 endpoint, credentials)

    def __post_init__(self) -> None:
        """Settings checked before any work (a negative shard size would otherwise fail only after the whole job)."""
        for name in ("shard_samples", "shard_bytes", "max_side"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{name}: must be at least 1 (or unset), got {value}")
        check(bool(self.shard_samples or self.shard_bytes), "shard_samples: set shard_samples or shard_bytes")
        check(0.0 <= self.val_fraction < 1.0, f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        check(1 <= self.jpeg_quality <= 100, f"jpeg_quality: must be in [1, 100], got {self.jpeg_quality}")
        check(0 <= self.dedup_distance <= 64, f"dedup_distance: must be in [0, 64] bits, got {self.dedup_distance}")
        check(self.max_pixels >= 1, f"max_pixels: must be at least 1, got {self.max_pixels}")
        check(self.max_file_bytes >= 1, f"max_file_bytes: must be at least 1, got {self.max_file_bytes}")

    def fingerprint(self) -> str:
        """What decides the output; the same fingerprint means the same shards, byte for byte."""
        fields = dataclasses.asdict(self)
        fields.pop("storage_options")
        for name, default in _FINGERPRINT_DEFAULTS.items():  # added later: left out at their default, so
            if fields[name] == default:  # outputs made before they existed keep their fingerprint
                fields.pop(name)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(
            max_side=self.max_side,
            max_pixels=self.max_pixels,
            jpeg_quality=self.jpeg_quality,
            max_bytes=self.max_file_bytes,
        )


# 64 MiB was already the limit (checked after reading, as ImagePolicy.max_bytes), so outputs are unchanged
_FINGERPRINT_DEFAULTS = {"max_file_bytes": 64 * 2**20, "follow_symlinks": False}
