"""Shared fixtures for the pipeline tests: a local S3 (moto's standalone server), started once per session.

The server runs in a thread of the test process and listens on 127.0.0.1, so subprocesses (the ``vit`` command,
spawned workers, Ray workers) reach it too. While it runs, the fake credentials and ``AWS_ENDPOINT_URL`` are in the
environment: boto3, s3fs and pyarrow all honour the endpoint variable, so no test can reach a real bucket.
"""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Iterator

import pytest

S3_BUCKET = "vit-test"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of a moto S3 server shared by the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            env.delenv(name, raising=False)
        yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def s3_storage_options(s3_endpoint: str) -> dict:
    """fsspec ``storage_options`` for the moto server (explicit, though the environment already points there)."""
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}


@pytest.fixture
def s3_bucket(s3_endpoint: str, s3_storage_options: dict) -> str:
    """``s3://vit-test``, empty: the server's state is reset first, so tests never see each other's objects."""
    import s3fs

    request = urllib.request.Request(f"{s3_endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass
    fs = s3fs.S3FileSystem(**s3_storage_options)
    fs.invalidate_cache()  # the instance is shared (fsspec caches it) and may remember a previous test's listings
    fs.mkdir(S3_BUCKET)
    return f"s3://{S3_BUCKET}"


@pytest.fixture(scope="session")
def synth_shards(ray_local, tmp_path_factory) -> str:
    """A small synthetic JFT-style corpus (multi-label, 32 px) sharded by `vit shard`: 8 train shards and val."""
    from pipelines.data.corpus import synth_corpus
    from pipelines.data.shards import ShardConfig, shard_corpus

    root = tmp_path_factory.mktemp("synth")
    synth_corpus(str(root / "corpus"), images=480, classes=6, image_size=32, seed=0)
    cfg = ShardConfig(src=str(root / "corpus"), dst=str(root / "shards"), shard_samples=54, val_fraction=0.1)
    shard_corpus(cfg, log=lambda *_: None)
    return cfg.dst


@pytest.fixture(scope="session")
def digits_shards(ray_local, tmp_path_factory) -> str:
    """The real bundled digits (single-label, 32 px RGB) sharded into train and test splits."""
    from pipelines.data.corpus import import_digits
    from pipelines.data.shards import ShardConfig, shard_corpus

    root = tmp_path_factory.mktemp("digits")
    import_digits(str(root / "corpus"))
    cfg = ShardConfig(src=str(root / "corpus"), dst=str(root / "shards"), shard_samples=300)
    shard_corpus(cfg, log=lambda *_: None)
    return cfg.dst


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
    """Weights to fine-tune from without pretraining (`pretrain: null`, `finetune.init_from`): a 2-block width-48
    ViT at 16 px in this platform's format, so a whole pipeline runs in seconds of training."""
    import torch

    import vit

    torch.manual_seed(0)
    config = vit.ViTConfig(
        img_size=16, patch_size=8, width=48, depth=2, num_heads=4, mlp_dim=96, num_classes=5, representation_size=24
    )
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    vit.save_checkpoint(vit.VisionTransformer(config), path)
    return str(path)


# A pipeline's fine-tuning from `tiny_weights` at toy size (with "pretrain=null", f"finetune.init_from={path}").
TINY_FINETUNE = [
    "finetune.steps=6",
    "finetune.optim.warmup_steps=2",
    "evaluate.shots=[1,5]",
    "finetune.data.loader_workers=0",
]


@pytest.fixture(scope="session")
def tiny_finetune(tiny_weights) -> list[str]:
    """Overrides of the local pipeline that skip pretraining and fine-tune `tiny_weights` for a few steps."""
    return [*TINY_FINETUNE, "pretrain=null", f"finetune.init_from={tiny_weights}"]


@pytest.fixture
def kill_session():
    """SIGKILL every process of a ``Popen``'s session and wait until all are gone: Ray's workers run in process
    groups of their own, so killing the group alone let a writer commit one more shard after the count."""
    import os
    import signal

    import psutil

    def kill(proc) -> None:
        def in_session(p: psutil.Process) -> bool:
            try:
                return os.getsid(p.pid) == proc.pid
            except OSError:
                return False

        os.killpg(proc.pid, signal.SIGKILL)
        members = [p for p in psutil.process_iter() if in_session(p)]
        for p in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        proc.wait()
        psutil.wait_procs(members, timeout=30)

    return kill
