"""Temporary: the sharding job is ``pipelines.data.shards`` now; this module goes once its last importers move."""

from __future__ import annotations

from pipelines.data.shards import *  # noqa: F403
from pipelines.data.shards import ShardConfig, ShardError, shard_corpus, verify_shards

__all__ = ["ShardConfig", "ShardError", "shard_corpus", "verify_shards"]
