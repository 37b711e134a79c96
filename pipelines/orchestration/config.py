"""The pipeline's one config tree: ``PipelineConfig`` composes each stage's own config (the datasets to shard,
pretraining, fine-tuning, evaluation, registration, tracking), and every cross-section rule lives in it, so each
command that reads a config (`vit run`, `vit submit`, `vit schedule add`) refuses a mistake with the same words.
Configs are YAML files, shipped ones by name (``local``, ``jft-b16``), read by :func:`load_pipeline_config`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipelines.common.config import ConfigError, check
from pipelines.data.shards import ShardConfig
from pipelines.evaluation.evaluate import EvaluationSettings
from pipelines.tracking.tracking import TrackingConfig
from pipelines.training.config import FinetuneConfig, PretrainConfig

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"  # package data: there after a plain `pip install .`
LOCAL_CONFIG = CONFIGS_DIR / "local.yaml"


def find_config(name: str) -> Path | None:
    """A config file: ``name`` as a path, else a config shipped with the package (``local``, ``jft-b16``)."""
    if Path(name).is_file():
        return Path(name)
    shipped = CONFIGS_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    return shipped if "/" not in name and shipped.is_file() else None


def shipped_configs() -> str:
    return ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))


def load_pipeline_config(config: str | None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """The pipeline config as `vit run CONFIG OVERRIDES...` reads it: a YAML file, a shipped config's name
    (``local``, ``jft-b16``), ``env:NAME`` (YAML in an environment variable: how `vit submit` hands it to a Ray
    Job), or ``None``: the embedded local demo. Every command and the scheduler read configs here, so a mistake
    gets the same words everywhere."""
    from pipelines.common.config import load_config

    if config is not None and config.startswith("env:"):
        text = os.environ.get(config.removeprefix("env:"))
        if text is None:
            raise ConfigError(f"{config}: the environment variable is not set")
        return load_config(PipelineConfig, overrides=overrides, text=text)
    path = find_config(config) if config is not None else LOCAL_CONFIG
    if path is None:
        raise ConfigError(f"{config}: no such config file (nor a shipped one: {shipped_configs()})")
    return load_config(PipelineConfig, path, overrides)


@dataclass(kw_only=True)
class SynthCorpusConfig:
    """`synth_corpus`'s settings, by their argument names (the corpus step passes them all)."""

    images: int = 6000
    classes: int = 10
    image_size: int = 32
    label_noise: float = 0.1
    seed: int = 0
    style: Literal["shapes", "glyphs"] = "shapes"  # drawn shapes (JPEG), or handwritten stroke glyphs (PNG)
    scan_size: int = 0  # glyphs: scanned at this many pixels, shown with square pixels (the digits' look); 0: smooth
    superclasses: int | None = None  # default: about sqrt(classes)
    superclass_labels: bool = True  # label images with their superclass too (false + glyphs: single-label, softmax)


@dataclass(kw_only=True)
class DatasetConfig:
    """A dataset of the pipeline: the corpus to shard and where its shards go."""

    source: str = ""  # a corpus `vit shard` reads (path or URL); "synth" or "digits": made by the pipeline
    shards: str = ""  # default: {workdir}/shards/{pretrain|finetune}
    shard_samples: int = ShardConfig.shard_samples  # the defaults and checks of `vit shard`'s own settings
    val_fraction: float = ShardConfig.val_fraction  # held-out share when the corpus has no split column
    synth: SynthCorpusConfig = field(default_factory=SynthCorpusConfig)  # when source is "synth"
    # pretraining data only: drop near-duplicates of the fine-tuning evaluation images (paper, section 4.1)
    dedup_against_eval: bool = True
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shard_config(src="", dst="")  # raises what `vit shard` would say of these settings

    def shard_config(
        self, *, src: str, dst: str, storage_options: dict | None = None, eval_sets: Sequence[str] = ()
    ) -> ShardConfig:
        """What `vit shard` is given for this dataset (``storage_options``: default, the dataset's own)."""
        return ShardConfig(
            src=src,
            dst=dst,
            shard_samples=self.shard_samples,
            val_fraction=self.val_fraction,
            eval_sets=list(eval_sets),
            storage_options=self.storage_options if storage_options is None else storage_options,
        )


@dataclass(kw_only=True)
class RegisterConfig:
    model_name: str = "vit"  # the registered model: models:/NAME@champion
    metric: str = "eval/top1"  # what a challenger must beat the champion on (higher is better)
    promote: bool = True  # make the new version champion when it wins
    # eval/top1 is decided on evidence: both models scored on the same images, the challenger promoted only when
    # the one-sided paired-bootstrap lower bound of its gain, at this confidence, is above min_improvement
    confidence: float = 0.95
    min_improvement: float = 0.0  # in accuracy (0.01: one point)
    resamples: int = 10_000

    def __post_init__(self) -> None:
        check(0.5 <= self.confidence < 1.0, f"confidence: must be in [0.5, 1), got {self.confidence}")
        check(0.0 <= self.min_improvement < 1.0, f"min_improvement: must be in [0, 1), got {self.min_improvement}")
        check(self.resamples >= 100, f"resamples: at least 100 for a usable bound, got {self.resamples}")


@dataclass(kw_only=True)
class PipelineConfig:
    name: str = "vit"  # the pipeline's MLflow run is named after it
    workdir: str = "runs/pipeline"  # corpora, shards, runs and the steps' state: a path or s3://...
    storage_options: dict = field(default_factory=dict)  # fsspec options for workdir
    pretrain_data: DatasetConfig = field(default_factory=lambda: DatasetConfig(source="synth"))
    finetune_data: DatasetConfig = field(default_factory=lambda: DatasetConfig(source="digits"))
    pretrain: PretrainConfig | None = field(default_factory=PretrainConfig)  # null: fine-tune finetune.init_from
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluationSettings = field(default_factory=EvaluationSettings)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    lease_seconds: float = 120.0  # a run holds the workdir; a holder silent this long is taken for dead

    def __post_init__(self) -> None:
        """What spans sections (each section checks its own fields when built): here, so that `vit run`,
        `vit submit` and a schedule refuse the same mistake with the same words, before any work."""
        check(
            self.pretrain is not None or bool(self.finetune.init_from),
            "finetune.init_from: with no pretrain step, fine-tuning needs weights to start from",
        )
        for section in ("pretrain_data", "finetune_data"):
            data: DatasetConfig = getattr(self, section)
            if section == "pretrain_data" and self.pretrain is None:
                continue
            check(
                bool(data.source or data.shards),
                f"{section}.source: give a corpus to shard (or synth/digits), or existing shards",
            )
        check(bool(self.register.model_name), "register.model_name: the registered model needs a name")
        check(
            self.lease_seconds >= 5,
            f"lease_seconds: must be at least 5 (heartbeats come every quarter), got {self.lease_seconds}",
        )
