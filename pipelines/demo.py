"""The laptop demo: the whole platform at toy size, on a local Ray, in a few minutes on 2 cores.

    synthetic JFT-style corpus -> shards -> pretrain a tiny ViT (Ray Train, 2 CPU workers)
    bundled real digits        -> shards -> fine-tune it (new head, the paper's SGD recipe) -> evaluate

The same code as on a GPU cluster: only ``configs/local.yaml`` differs (sizes, steps, learning rates).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import vit
from pipelines.config import ConfigError, to_dict
from pipelines.evaluate import EvaluateConfig, evaluate_model
from pipelines.train import FinetuneConfig, PretrainConfig, run_training

LOCAL_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "local.yaml"


@dataclass(kw_only=True)
class SynthCorpusConfig:
    images: int = 6000
    classes: int = 10
    image_size: int = 32
    label_noise: float = 0.1
    shard_samples: int = 500
    val_fraction: float = 0.05
    seed: int = 0


@dataclass(kw_only=True)
class LocalDemoConfig:
    workdir: str = "runs/demo"  # corpora, shards and runs all go under here
    corpus: SynthCorpusConfig = field(default_factory=SynthCorpusConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    fewshot_shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])


@dataclass
class DemoResult:
    top1: float
    top5: float
    fewshot_pretrained: dict[str, float]  # the frozen pretrained representation on the digits
    pretrain_run: str
    finetune_run: str
    model_path: str
    seconds: dict[str, float]


def run_local_demo(cfg: LocalDemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    """Run every step; a step whose output is already complete in ``cfg.workdir`` is skipped."""
    import ray

    from pipelines.corpus import import_digits, synth_corpus
    from pipelines.shard import ShardConfig, shard_corpus

    for section in (cfg.pretrain, cfg.finetune):  # fail before minutes of work, not after
        if section.model is not None:
            try:
                vit.model_config(section.model)
            except ValueError as err:
                raise ConfigError(f"{section.recipe}.model: {err}") from None
    work = Path(cfg.workdir).resolve()
    seconds: dict[str, float] = {}
    quiet = lambda *_: None  # noqa: E731 - the steps' own reports are summarised below

    def step(name: str, fn):
        started = time.perf_counter()
        out = fn()
        seconds[name] = time.perf_counter() - started
        return out

    if not ray.is_initialized():
        import os

        if os.environ.get("RAY_ADDRESS"):  # inside a Ray Job: that cluster
            ray.init(log_to_driver=False)
        else:  # a Ray of our own, never one that happens to run on this machine
            cpus = max(4, os.cpu_count() or 1)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)

    c = cfg.corpus
    synth, digits = work / "corpus" / "synth", work / "corpus" / "digits"
    if not (synth / "labels.parquet").exists():
        log(f"[1/6] synthetic corpus: {c.images} images of {c.classes} classes at {c.image_size} px")
        step(
            "corpus",
            lambda: synth_corpus(
                str(synth),
                images=c.images,
                classes=c.classes,
                image_size=c.image_size,
                label_noise=c.label_noise,
                seed=c.seed,
                workers=2,
                overwrite=True,
            ),
        )
    if not (digits / "labels.parquet").exists():
        log("[2/6] digits: the 1,797 real handwritten digits bundled with scikit-learn")
        step("digits", lambda: import_digits(str(digits), overwrite=True))
    synth_shards, digit_shards = str(work / "shards" / "synth"), str(work / "shards" / "digits")
    log("[3/6] sharding both with Ray Data")
    step(
        "shard",
        lambda: (
            shard_corpus(
                ShardConfig(
                    src=str(synth), dst=synth_shards, shard_samples=c.shard_samples, val_fraction=c.val_fraction
                ),
                log=quiet,
            ),
            shard_corpus(ShardConfig(src=str(digits), dst=digit_shards, shard_samples=400), log=quiet),
        ),
    )

    runs = str(work / "runs")
    pretrain = cfg.pretrain
    pretrain.data.shards, pretrain.storage_path = synth_shards, runs
    # A run's name carries its settings' fingerprint: the same settings resume (or skip) it, new ones start afresh.
    pretrain.name = pretrain.name or f"pretrain-{_fingerprint(pretrain, c)}"
    log(f"[4/6] pretraining ViT-{pretrain.model} on the synthetic shards ({pretrain.scale.num_workers} workers)")
    pretrained = step("pretrain", lambda: run_training(pretrain, log=log))
    log(f"      pretraining top-1 on its held-out split: {pretrained.metrics.get('eval/top1', float('nan')):.2%}")

    finetune = cfg.finetune
    finetune.data.shards, finetune.storage_path = digit_shards, runs
    finetune.init_from = finetune.init_from or pretrained.run_dir
    finetune.name = finetune.name or f"finetune-{_fingerprint(finetune)}"
    log("[5/6] fine-tuning on the digits: new zero-initialised head, SGD with momentum, cosine decay")
    tuned = step("finetune", lambda: run_training(finetune, log=log))

    log("[6/6] evaluating on the 360 held-out digits")
    shots = cfg.fewshot_shots
    evaluation = step(
        "evaluate",
        lambda: evaluate_model(
            EvaluateConfig(
                model=tuned.run_dir,
                shards=digit_shards,
                shots=shots,
                resize_size=finetune.data.resize_size,
                loader_workers=0,
            ),
            log=quiet,
        ),
    )
    before = evaluate_model(
        EvaluateConfig(
            model=pretrained.run_dir,
            shards=digit_shards,
            shots=shots,
            image_size=finetune.data.image_size,
            resize_size=finetune.data.resize_size,
            loader_workers=0,
        ),
        log=quiet,
    )
    return DemoResult(
        top1=evaluation["eval/top1"],
        top5=evaluation["eval/top5"],
        fewshot_pretrained={k: v for k, v in before.items() if k.startswith("fewshot/")},
        pretrain_run=pretrained.run_dir,
        finetune_run=tuned.run_dir,
        model_path=posixpath.join(tuned.checkpoint, "model.safetensors"),
        seconds=seconds,
    )


def _fingerprint(*configs) -> str:
    return hashlib.sha256(json.dumps([to_dict(c) for c in configs], sort_keys=True).encode()).hexdigest()[:8]
