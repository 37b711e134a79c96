"""On a real two-node Ray cluster: sharding gives the same bytes as on one node, and training survives a node dying."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.data.shards import ShardConfig, shard_corpus
from pipelines.training.config import load_train_config
from pipelines.training.driver import run_training


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


@pytest.mark.distributed
def test_a_killed_node_costs_at_most_the_steps_since_the_last_checkpoint(synth_shards, ray_two_nodes, tmp_path):
    cluster, worker_node = ray_two_nodes
    cfg = load_train_config(
        "pretrain",
        None,
        [
            "model=Mu/8",
            f"data.shards={synth_shards}",
            "data.image_size=32",
            "data.loader_workers=0",
            "batch_size=16",
            "steps=240",
            "optim.warmup_steps=10",
            "checkpoint_every=20",
            "log_every=20",
            "max_failures=2",
            "scale.placement_strategy=STRICT_SPREAD",  # one training worker on each node, always
            f"storage_path={tmp_path}",
            "name=node-kill",
        ],
    )
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=run_training(cfg, log=lambda *_: None)))
    runner.start()
    first = tmp_path / "node-kill" / "checkpoint-00000020" / "COMMITTED"  # every rank's part is stored
    deadline = time.monotonic() + 240
    while not first.exists() and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.exists(), "no checkpoint before the deadline"
    cluster.remove_node(worker_node)  # the node and the training worker on it die
    cluster.add_node(num_cpus=2)  # a replacement joins, as an autoscaler would provide
    runner.join(timeout=300)
    assert not runner.is_alive() and "result" in outcome

    result = outcome["result"]
    assert result.steps == 240  # the run finished, with exactly the steps asked for
    (first_start, killed_at), (resumed_at, end) = result.segments
    assert (first_start, end) == (0, 240)
    # the restart began at a checkpoint taken before the kill, so only the steps after it were trained twice
    assert resumed_at % 20 == 0 and 20 <= resumed_at <= killed_at < resumed_at + 20 + 20
    assert [r["step"] for r in result.history] == list(range(20, 241, 20))
    assert sorted(p.name for p in Path(result.run_dir).glob("checkpoint-*"))[-1] == "checkpoint-00000240"
