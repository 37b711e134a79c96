"""Runs that follow the data: a pipeline re-run after new, changed or deleted images does exactly what they ask
(incremental or full re-shard, fine-tune, evaluate, register with promotion on evidence), and nothing when nothing
changed. Real digit images in an ImageFolder corpus, a real MLflow server."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images * (255 / 16)).astype(np.uint8), digits.target


def _write(corpus, split: str, indices, images, labels) -> None:
    for i in indices:
        folder = corpus / split / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(images[i]).resize((32, 32), Image.NEAREST).convert("RGB").save(buffer, format="PNG")
        (folder / f"d{i:04d}.png").write_bytes(buffer.getvalue())


def _manifest(shards) -> dict[str, dict]:
    rows = pq.read_table(shards / "manifest.parquet").to_pylist()
    return {row["filename"]: row for row in rows}


@pytest.fixture
def user_corpus(tmp_path):
    """A downstream set as users bring it: ImageFolder with train/ and test/, 600 + 200 real digits."""
    images, labels = _digits()
    corpus = tmp_path / "digits-corpus"
    _write(corpus, "train", range(600), images, labels)
    _write(corpus, "test", range(1500, 1700), images, labels)
    return corpus, images, labels


def test_new_images_reshard_incrementally_and_retrain_nothing_changed_costs_nothing(
    ray_local, mlflow_uri, user_corpus, tiny_finetune, tmp_path
):
    from pipelines.common.config import load_config
    from pipelines.orchestration.config import LOCAL_CONFIG, PipelineConfig
    from pipelines.orchestration.workflow import run_pipeline

    corpus, images, labels = user_corpus
    workdir = tmp_path / "work"
    overrides = [
        *tiny_finetune,
        f"finetune_data.source={corpus}",
        "finetune_data.shard_samples=100",
        f"workdir={workdir}",
        "tracking.experiment=data-aware",
        "register.model_name=data-aware",
    ]
    cfg = load_config(PipelineConfig, LOCAL_CONFIG, overrides)

    def run() -> tuple[list[str], str]:
        said: list[str] = []
        result = run_pipeline(cfg, log=said.append)
        return result.ran, "\n".join(said)

    ran, log = run()
    assert ran == ["shard", "finetune", "evaluate", "register"], log
    shards = workdir / "shards" / "digits-corpus"
    first = _manifest(shards)
    assert sum(r["samples"] for r in first.values()) == 800 and "generation 0" in log

    ran, log = run()  # nothing changed: a listing, then every step cached
    assert ran == [] and log.count("skipped") == 4, log

    _write(corpus, "train", range(600, 800), images, labels)  # a week's new labelled images
    ran, log = run()
    assert ran == ["shard", "finetune", "evaluate", "register"], log
    assert "generation 1; 200 new images" in log and "reusing" not in log
    second = _manifest(shards)
    assert {name: second[name]["sha256"] for name in first} == {name: row["sha256"] for name, row in first.items()}
    new = {name: row for name, row in second.items() if name not in first}
    assert sum(r["samples"] for r in new.values()) == 200 and {r["generation"] for r in new.values()} == {1}
    assert "re-scoring the data-aware champion (version 1) on the same images" in log
    assert "paired bootstrap" in log and ("champion: " in log or "not promoted: " in log)

    import mlflow

    version = mlflow.MlflowClient().get_model_version("data-aware", "2")
    assert version.tags["promotion.images"] == "200" and version.tags["promotion.champion_version"] == "1"

    (corpus / "train" / str(labels[0]) / "d0000.png").unlink()  # a deleted image: all is re-sharded
    ran, log = run()
    assert ran == ["shard", "finetune", "evaluate", "register"], log
    assert "1 deleted: full re-shard" in log
    assert sum(r["samples"] for r in _manifest(shards).values()) == 999


def test_new_images_in_an_s3_corpus_reach_the_shards_and_fine_tuning(
    ray_local, s3_bucket, s3_storage_options, user_corpus, tiny_finetune, tmp_path
):
    import s3fs

    from pipelines.common.config import load_config
    from pipelines.orchestration.config import LOCAL_CONFIG, PipelineConfig
    from pipelines.orchestration.workflow import run_pipeline

    corpus, images, labels = user_corpus
    fs = s3fs.S3FileSystem(**s3_storage_options)

    def upload(folder) -> None:  # object by object: the keys are exactly the corpus's relative paths
        for path in sorted(folder.rglob("*.png")):
            fs.pipe(f"{s3_bucket}/digits/{path.relative_to(folder)}", path.read_bytes())

    upload(corpus)
    cfg = load_config(
        PipelineConfig,
        LOCAL_CONFIG,
        [
            *tiny_finetune,
            f"finetune_data.source={s3_bucket}/digits",
            "finetune_data.shard_samples=100",
            f"workdir={tmp_path / 'work'}",
            "tracking.enabled=false",
        ],
    )
    cfg.finetune_data.storage_options = s3_storage_options  # kept out of any override: a credential

    said: list[str] = []
    assert run_pipeline(cfg, log=said.append).ran == ["shard", "finetune", "evaluate", "register"]
    extra = tmp_path / "extra"
    _write(extra, "train", range(600, 650), images, labels)
    upload(extra)
    fs.invalidate_cache()
    said.clear()
    result = run_pipeline(cfg, log=said.append)
    assert result.ran == ["shard", "finetune", "evaluate", "register"], said
    assert any("generation 1; 50 new images" in line for line in said), said


def test_new_pretraining_images_reuse_the_pretraining_unless_asked(ray_local, user_corpus, tmp_path):
    from pipelines.common.config import load_config
    from pipelines.orchestration.config import LOCAL_CONFIG, PipelineConfig
    from pipelines.orchestration.workflow import run_pipeline

    corpus, images, labels = user_corpus
    upstream = tmp_path / "upstream"  # a pretraining corpus: class folders, no split folders
    for i in range(900, 1200):
        _write(upstream, "all", [i], images, labels)
    overrides = [
        "pretrain.steps=4", "pretrain.optim.warmup_steps=1", "pretrain.checkpoint_every=4",
        "pretrain.data.loader_workers=0", f"pretrain_data.source={upstream / 'all'}",
        "pretrain_data.shard_samples=100", "pretrain_data.val_fraction=0.1", "pretrain_data.dedup_against_eval=false",
        "finetune.steps=4", "finetune.optim.warmup_steps=1", "finetune.data.loader_workers=0",
        f"finetune_data.source={corpus}", "finetune_data.shard_samples=200", "evaluate.shots=[1]",
        f"workdir={tmp_path / 'work'}", "tracking.enabled=false",
    ]  # fmt: skip

    def run(*extra: str) -> tuple[list[str], str]:
        said: list[str] = []
        result = run_pipeline(load_config(PipelineConfig, LOCAL_CONFIG, [*overrides, *extra]), log=said.append)
        return result.ran, "\n".join(said)

    ran, log = run()
    assert ran == ["shard", "pretrain", "finetune", "evaluate", "register"], log
    _write(upstream, "all", range(1200, 1250), images, labels)
    ran, log = run()  # only the shards take the new images; the expensive pretraining is reused, and said so
    assert ran == ["shard"], log
    assert "50 new images" in log and "reusing it (pretrain.rerun_on_new_data is false" in log
    ran, log = run("pretrain.rerun_on_new_data=true")
    assert ran == ["pretrain", "finetune", "evaluate", "register"], log
