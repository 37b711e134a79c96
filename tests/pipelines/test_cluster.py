"""On a real two-node Ray cluster, sharding gives the same bytes as on one node. (Nodes dying during sharding and
training, with tracking, on a cluster started as an operator would: tests/pipelines/test_cluster_e2e.py.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.data.shards import ShardConfig, shard_corpus


@pytest.mark.distributed
def test_sharding_on_two_nodes_writes_the_same_shards_as_one(synth_shards, ray_two_nodes, tmp_path):
    corpus = str(Path(synth_shards).parent / "corpus")  # the fixture sharded this corpus on the local Ray
    cfg = ShardConfig(src=corpus, dst=str(tmp_path / "shards"), shard_samples=54, val_fraction=0.1)
    summary = shard_corpus(cfg, log=lambda *_: None)
    assert summary.read == summary.written + summary.rejected == 480

    def digests(root):
        rows = pq.read_table(Path(root) / "manifest.parquet").to_pylist()
        return [(r["split"], r["shard"], r["samples"], r["sha256"]) for r in rows]

    assert digests(cfg.dst) == digests(synth_shards)
