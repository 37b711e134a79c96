"""How the training spreads a model over ranks, on two real gloo ranks: FSDP2 built on the meta device and
materialised shard by shard, against the whole model built on one CPU from the same seed.

The test runs this file as a script (``torch.multiprocessing`` spawns the ranks, which must import their
function by the file's path); each rank writes what it found to a JSON file, which the test reads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETTINGS = [
    "model=Mu/8",
    "data.image_size=32",
    "batch_size=8",
    "steps=4",
    "optim.warmup_steps=0",
    "scale.strategy=fsdp",
    "model_args={dropout: 0.0}",
]
NUM_CLASSES = 10


def _rank_main(rank: int, world: int, port: int, folder: str) -> None:
    import warnings

    import torch
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        facts = {"fresh": _fresh(rank, world), "pretrained": _pretrained(rank, world, Path(folder))}
        facts["step"] = _one_step(rank, world)
    finally:
        dist.destroy_process_group()
    Path(folder, f"rank-{rank}.json").write_text(json.dumps(facts))


def _config(*extra: str):
    from pipelines.training.config import load_train_config

    return load_train_config("pretrain", None, [*SETTINGS, *extra])


def _spread(cfg, rank: int, world: int, seed: int = 0):
    import torch

    from pipelines.training.parallel import spread_model

    torch.manual_seed(seed)
    return spread_model(cfg, NUM_CLASSES, False, rank=rank, world=world, device=torch.device("cpu"))


def _built_whole(cfg, seed: int = 0):
    """The old way, and the reference: the whole model on this CPU from the same seed."""
    import torch

    from pipelines.training.weights import build_model

    torch.manual_seed(seed)
    return build_model(cfg, NUM_CLASSES, False)


def _compare(full: dict, reference) -> dict:
    """What the gathered weights (rank 0's) share with a reference model: names, and equal values."""
    import torch

    state = reference.state_dict()
    return {
        "same_names": sorted(full) == sorted(state),
        "unequal": [k for k in state if k in full and not torch.equal(full[k], state[k])],
    }


def _fresh(rank: int, world: int) -> dict:
    import torch
    from torch.distributed.tensor import DTensor, Shard

    cfg = _config()
    parallel = _spread(cfg, rank, world)
    params = dict(parallel.model.named_parameters())
    facts = {
        "strategy": parallel.strategy,
        "not_dtensor": [n for n, p in params.items() if not isinstance(p, DTensor)],
        "not_dim0_shards": [n for n, p in params.items() if tuple(p.placements) != (Shard(0),)],
        "meta": [n for n, p in params.items() if p.is_meta or p.to_local().is_meta],
        "local_numel": sum(p.to_local().numel() for p in params.values()),
        "full_numel": sum(p.numel() for p in params.values()),
        "non_finite": [n for n, p in params.items() if not torch.isfinite(p.to_local()).all()],
    }
    full = parallel.full_weights()  # every rank takes part; rank 0 gets the weights
    if rank == 0:
        facts.update(_compare(full, _built_whole(cfg)))
        fc1 = full["blocks.0.mlp.fc1.weight"]
        halves = fc1.chunk(world)  # what rank 0 and rank 1 drew: a shared RNG stream would make them equal
        facts["halves_differ"] = not torch.equal(halves[0], halves[1])
        facts["pos_embed_std"] = full["pos_embed"].std().item()
        other_seed = _spread(cfg, rank, world, seed=1).full_weights()
    else:
        _spread(cfg, rank, world, seed=1).full_weights()
    if rank == 0:
        facts["seed_changes_weights"] = not torch.equal(other_seed["pos_embed"], full["pos_embed"])
    return facts


def _pretrained(rank: int, world: int, folder: Path) -> dict:
    """init_from under FSDP: rank 0 reads the file, every rank gets its shards; E_pos resampled, head afresh."""
    import torch
    import torch.distributed as dist

    import vit

    path = folder / "pretrained.safetensors"
    if rank == 0:
        torch.manual_seed(7)
        source = vit.create_model("Mu/8", img_size=32, num_classes=3, representation_size=64)
        with torch.no_grad():
            source.head.weight.normal_()  # a trained head, which fine-tuning must not keep
        vit.save_checkpoint(source, path)
    dist.barrier()
    # 48 px: a 6x6 patch grid where the weights have 4x4, so E_pos is resampled
    cfg = _config(f"init_from={path}", "model=null", "data.image_size=48", "representation_layer=false")
    parallel = _spread(cfg, rank, world)
    full = parallel.full_weights()
    if rank != 0:
        return {}
    reference = _built_whole(cfg)
    return {
        **_compare(full, reference),
        "head_zero": torch.count_nonzero(full["head.weight"]).item() == 0,
        "pos_embed_tokens": full["pos_embed"].shape[1],
    }


def _one_step(rank: int, world: int) -> dict:
    """One step of vit.train.train_step on each rank's half of a global batch, two micro-batches each, against
    the whole model's step on the whole batch in one process."""
    import torch

    from vit.train import build_optimizer, train_step

    cfg = _config()
    parallel = _spread(cfg, rank, world)
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(8, 3, 32, 32, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (8,), generator=generator)
    mine = images.chunk(world)[rank], targets.chunk(world)[rank]
    micro_batches = list(zip(mine[0].chunk(2), mine[1].chunk(2)))
    metrics = train_step(
        parallel.wrapped,
        build_optimizer(parallel.model, cfg.optim),
        lr=1e-2,
        micro_batches=micro_batches,
        no_sync=parallel.no_sync,
        autocast=parallel.autocast,
    )
    full = parallel.full_weights()
    if rank != 0:
        return {"grad_norm": metrics["train/grad_norm"]}
    whole = _built_whole(cfg)
    reference = train_step(whole, build_optimizer(whole, cfg.optim), images, targets, lr=1e-2)
    state = whole.state_dict()
    return {
        "grad_norm": metrics["train/grad_norm"],
        "reference_grad_norm": reference["train/grad_norm"],
        "max_weight_difference": max((full[k] - state[k]).abs().max().item() for k in state),
        "max_update": max((full[k] - v).abs().max().item() for k, v in _built_whole(cfg).state_dict().items()),
    }


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_on_meta_materialises_the_seeded_weights_and_trains(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, __file__, str(port), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]

    for facts in (r["fresh"] for r in ranks):
        assert facts["strategy"] == "fsdp"
        assert facts["not_dtensor"] == facts["not_dim0_shards"] == facts["meta"] == facts["non_finite"] == []
    # each rank holds its half (dimension 0 of odd size splits unevenly) and the halves make the whole
    assert sum(r["fresh"]["local_numel"] for r in ranks) == ranks[0]["fresh"]["full_numel"]
    assert ranks[0]["fresh"]["local_numel"] < 0.6 * ranks[0]["fresh"]["full_numel"]

    fresh = ranks[0]["fresh"]
    assert fresh["same_names"] and fresh["unequal"] == []  # bit for bit the whole model built from the seed
    assert fresh["halves_differ"] and fresh["seed_changes_weights"]
    assert fresh["pos_embed_std"] == pytest.approx(0.02, rel=0.1)

    pretrained = ranks[0]["pretrained"]
    assert pretrained["same_names"] and pretrained["unequal"] == []
    assert pretrained["head_zero"] and pretrained["pos_embed_tokens"] == 6 * 6 + 1

    step = ranks[0]["step"]
    assert step["grad_norm"] == ranks[1]["step"]["grad_norm"]  # the global norm, over both ranks' shards
    assert step["grad_norm"] == pytest.approx(step["reference_grad_norm"], rel=1e-4)
    assert step["max_update"] > 1e-4  # the step moved the weights ...
    assert step["max_weight_difference"] < 1e-5  # ... as the whole model's step on the whole batch does


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2)
