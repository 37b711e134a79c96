"""Elastic resume: a run continued on fewer or more workers keeps the global batch and trains on every sample of
the epoch exactly once, the same samples at every step as an uninterrupted run.

The stream-level guarantees (every world size reads the same samples at every step, a resume on another world size
continues with them) are tested without Ray in ``test_stream.py``; here a run goes 2 -> 1 -> 2 workers, recording
the sample keys every rank consumed (``data.record_keys``). The 2-worker segments are Ray Train fits on the session
Ray; the 1-worker one runs the same worker loop in this process (a fit costs ~20 s here, whatever its steps).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from itertools import islice
from pathlib import Path

import pytest
import torch

from pipelines.common.config import ConfigError
from pipelines.data.stream import StreamSpec, make_loader, open_shards
from pipelines.training.config import load_train_config
from pipelines.training.driver import plan_training, run_training
from pipelines.training.loop import KEYS_FOLDER, STATE_FILE, _Loop
from pipelines.training.weights import COMMITTED_FILE
from vit.data import build_transform

# 432 training images (8 shards of 54) in steps of 16: one epoch is 27 steps. 4 streams of 2 shards (the default
# for 2 workers without loader processes), each giving 4 samples a step; micro-batches of 4 accumulate 2 steps on 2
# workers, 4 on 1.
ELASTIC = [
    "model=Mu/8",
    "data.image_size=32",
    "data.loader_workers=0",
    "data.shuffle_block=16",
    "data.eval_split=null",
    "data.record_keys=true",
    "batch_size=16",
    "micro_batch_size=4",
    "epochs=1",
    "optim.warmup_steps=2",
    "log_every=9",
    "checkpoint_every=100",
    "tracking.enabled=false",
]
EPOCH_STEPS = 27


def elastic_config(shards: str, storage: Path, workers: int, *extra: str):
    overrides = [*ELASTIC, f"data.shards={shards}", f"storage_path={storage}", "name=elastic"]
    return load_train_config("pretrain", None, [*overrides, f"scale.num_workers={workers}", *extra])


def recorded_steps(run_dir: str) -> dict[int, dict[int, list[str]]]:
    """{step: {rank: keys}} from the files ``data.record_keys`` wrote; a step recorded twice is an error."""
    steps: dict[int, dict[int, list[str]]] = defaultdict(dict)
    for path in sorted((Path(run_dir) / KEYS_FOLDER).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            assert record["rank"] not in steps[record["step"]], f"step {record['step']} recorded twice"
            steps[record["step"]][record["rank"]] = record["keys"]
    return dict(steps)


def uninterrupted_steps(shards: str, steps: int, world: int = 2) -> list[set[str]]:
    """The keys each step of an uninterrupted run of ``world`` workers reads, from the stream API (the spec
    the training loop builds, at its defaults: seed 0, 4 streams)."""
    train = open_shards(shards, "train")
    per_rank = 16 // world
    read = [set() for _ in range(steps)]
    for rank in range(world):
        spec = StreamSpec(
            shards=train, transform=build_transform("pretrain", 32), batch_size=per_rank, rank=rank, world_size=world,
            streams=4, step_samples=16, shuffle_block=16, with_keys=True,
        )  # fmt: skip
        for step, (_, _, _, keys) in enumerate(islice(make_loader(spec, workers=0), steps)):
            read[step].update(keys)
    return read


def train_in_process(cfg, monkeypatch) -> dict:
    """A one-worker run (or resume) of ``cfg`` through the worker loop in this process, Ray's part replaced by
    what it amounts to with local storage: the driver's plan, the latest committed checkpoint, reports copied."""
    import shutil

    import ray.train

    plan = plan_training(cfg)

    def report(metrics, *, checkpoint, checkpoint_dir_name):
        shutil.copytree(checkpoint.path, Path(plan.run_dir) / checkpoint_dir_name)

    with monkeypatch.context() as patch:
        patch.setattr(ray.train, "report", report)
        patch.setattr(ray.train, "get_checkpoint", lambda: None)
        return _Loop(cfg, plan, rank=0, world=1, device=torch.device("cpu")).run()


@pytest.mark.slow
@pytest.mark.distributed
def test_a_run_resumed_on_fewer_then_more_workers_reads_every_sample_once(
    synth_shards, tmp_path, ray_local, monkeypatch
):
    quiet = {"log": lambda *_: None}
    first = run_training(elastic_config(synth_shards, tmp_path, 2, "halt_after_steps=9"), **quiet)
    assert first.steps == 9
    shrunk = train_in_process(elastic_config(synth_shards, tmp_path, 1, "halt_after_steps=18"), monkeypatch)
    assert shrunk["status"] == "halted" and shrunk["step"] == 18  # a node lost: one worker goes on
    grown = run_training(elastic_config(synth_shards, tmp_path, 2), **quiet)  # and one added again
    assert grown.steps == EPOCH_STEPS and grown.segments == [[0, 9], [9, 18], [18, 27]]

    states = {
        step: json.loads((Path(grown.run_dir) / f"checkpoint-{step:08d}" / STATE_FILE).read_text())
        for step in (9, 18, 27)
    }
    layout = {s: (st["world_size"], st["streams"], st["micro_batch"], st["accum_steps"]) for s, st in states.items()}
    assert layout == {9: (2, 4, 4, 2), 18: (1, 4, 4, 4), 27: (2, 4, 4, 2)}  # the global batch stays 16

    steps = recorded_steps(grown.run_dir)
    assert sorted(steps) == list(range(1, EPOCH_STEPS + 1))
    for step, ranks in steps.items():
        world = 1 if 9 < step <= 18 else 2
        assert sorted(ranks) == list(range(world)), step
        assert [len(keys) for keys in ranks.values()] == [16 // world] * world, step  # each rank its share

    consumed = Counter(key for ranks in steps.values() for keys in ranks.values() for key in keys)
    train = open_shards(synth_shards, "train")
    assert sum(consumed.values()) == train.samples == 16 * EPOCH_STEPS
    assert set(consumed.values()) == {1}  # every sample of the epoch exactly once, none skipped

    # The same samples at every step as an uninterrupted 2-worker run, whoever read them.
    by_step = [{key for keys in steps[s].values() for key in keys} for s in range(1, EPOCH_STEPS + 1)]
    assert by_step == uninterrupted_steps(synth_shards, EPOCH_STEPS)

    # A worker count that does not divide the run's streams is refused before anything starts, saying what works.
    with pytest.raises(ConfigError, match=r"4 streams and cannot resume on 3 workers; it resumes on 1, 2 or 4"):
        plan_training(elastic_config(synth_shards, tmp_path, 3, "batch_size=24"))


# --------------------------------------------------------------------------------------------- without Ray


@pytest.fixture
def listed_shards(tmp_path) -> str:
    """A shard listing (``_info.json``) of 8 training shards: planning reads no tar."""
    root = tmp_path / "shards"
    root.mkdir()
    names = [f"train-{i:06d}.tar" for i in range(8)]
    split = {"name": "train", "num_samples": 800, "filenames": names, "shard_lengths": [100] * 8}
    info = {"name": "listed", "num_classes": 5, "multi_label": False, "splits": {"train": split}}
    (root / "_info.json").write_text(json.dumps(info))
    return str(root)


def checkpoint(storage: Path, name: str, **state) -> None:
    folder = storage / name / "checkpoint-00000005"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({"step": 5, **state}))
    (folder / COMMITTED_FILE).write_text("5")


def test_a_resume_keeps_the_streams_and_the_micro_batch_and_refuses_what_cannot_work(listed_shards, tmp_path):
    def plan(name, *extra):
        overrides = ["model=Mu/8", "steps=10", "optim.warmup_steps=1", "data.eval_split=null", "batch_size=64"]
        overrides = [*overrides, f"data.shards={listed_shards}", f"storage_path={tmp_path}", f"name={name}", *extra]
        return plan_training(load_train_config("pretrain", None, overrides))

    # New runs: workers x max(2, loader workers) streams where the shards and the batch allow
    assert plan("a", "scale.num_workers=2").streams == 4  # loader_workers=2 by default
    assert plan("b", "scale.num_workers=2", "data.loader_workers=4").streams == 8
    assert plan("c", "scale.num_workers=4", "data.loader_workers=4").streams == 8  # only 8 shards
    assert plan("d", "scale.num_workers=2", "data.streams=2").streams == 2

    # A run of 2 workers with micro-batches of 32 (no micro_batch_size: its whole share) resumed on 1 and on 4
    checkpoint(tmp_path, "run", streams=4, micro_batch=32, world_size=2)
    one = plan("run", "scale.num_workers=1")
    assert (one.streams, one.micro_batch, one.accum_steps) == (4, 32, 2)  # the same memory per worker
    four = plan("run", "scale.num_workers=4")
    assert (four.streams, four.micro_batch, four.accum_steps) == (4, 16, 1)
    with pytest.raises(ConfigError, match=r"cannot resume on 8 workers; it resumes on 1, 2 or 4 workers"):
        plan("run", "scale.num_workers=8")
    with pytest.raises(ConfigError, match=r"data.streams: run 'run' reads its data as 4 streams, fixed when"):
        plan("run", "scale.num_workers=2", "data.streams=8")
    with pytest.raises(ConfigError, match=r"data.streams: 6 streams do not split evenly over 4 workers"):
        plan("new", "scale.num_workers=4", "data.streams=6")
