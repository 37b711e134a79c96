"""The typed configs of a training run: pretraining (Table 3 of the paper) and fine-tuning (Table 4).

    cfg = load_train_config("pretrain", "my-pretrain.yaml", ["data.shards=s3://bucket/jft", "model=B/16"])

Every check that needs no data lives in the configs themselves (``__post_init__``), so `vit run`, `vit pretrain`,
`vit finetune` and `vit submit` refuse the same mistake with the same message before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import vit
from pipelines.common.config import ConfigError, check
from pipelines.tracking.tracking import TrackingConfig
from vit.train import OptimConfig

Strategy = Literal["ddp", "fsdp"]
Precision = Literal["auto", "fp32", "bf16"]
Recipe = Literal["pretrain", "finetune"]


@dataclass(kw_only=True)
class DataConfig:
    shards: str = ""  # a `vit shard` output folder: a path or an fsspec URL (s3://...)
    train_split: str = "train"
    eval_split: str | None = "auto"  # "auto": val, else test, when the shards have one; null: no evaluation
    image_size: int = 224
    resize_size: int | None = None  # fine-tuning and evaluation resize to this before cropping
    flip: bool = True  # random horizontal flips (off for digits or text, where a mirror image is another class)
    crop_area_min: float = 0.05  # pretraining's Inception crop keeps at least this share of the image (big_vision)
    loader_workers: int = 2  # decoding processes per training worker (0: decode in the training process)
    shuffle_block: int = 2048  # samples of a stream shuffled together as they stream in
    # Logical data streams the epoch is split into, fixed when a run starts (a resume keeps its checkpoint's): the
    # data order depends on them, never on the worker count, so a run resumes on any number of workers that divides
    # them. null: scale.num_workers x max(2, loader_workers), fewer when there are fewer shards.
    streams: int | None = None
    record_keys: bool = False  # debugging: every rank writes each step's sample keys to <run>/keys/ (at checkpoints)
    storage_options: dict = field(default_factory=dict)  # fsspec options for the shards (S3 endpoint, keys)

    def __post_init__(self) -> None:
        check(self.image_size >= 1, f"image_size: must be at least 1, got {self.image_size}")
        check(self.resize_size is None or self.resize_size >= self.image_size,
              f"resize_size: {self.resize_size} is smaller than image_size {self.image_size}")  # fmt: skip
        check(self.loader_workers >= 0, f"loader_workers: must not be negative, got {self.loader_workers}")
        check(0 < self.crop_area_min <= 1, f"crop_area_min: must be in (0, 1], got {self.crop_area_min}")
        check(self.shuffle_block >= 1, f"shuffle_block: must be at least 1, got {self.shuffle_block}")
        check(self.streams is None or self.streams >= 1, f"streams: must be at least 1 (or null), got {self.streams}")


@dataclass(kw_only=True)
class ScaleConfig:
    num_workers: int = 2  # training processes: one per GPU, or CPU workers in local mode
    use_gpu: bool | None = None  # None: when the Ray cluster has GPUs
    cpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    strategy: Strategy = "ddp"
    precision: Precision = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each encoder block

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, f"num_workers: must be at least 1, got {self.num_workers}")
        check(self.cpus_per_worker > 0, f"cpus_per_worker: must be positive, got {self.cpus_per_worker}")


@dataclass(kw_only=True)
class TrainConfig:
    recipe: Recipe = "pretrain"
    name: str = ""  # the run's folder under storage_path; running the same name again resumes it
    storage_path: str = "runs"  # checkpoints and history: a path or s3://...
    storage_options: dict = field(default_factory=dict)  # fsspec options for storage_path
    model: str | None = "B/16"  # a name from `vit models`; null when fine-tuning takes it from init_from
    model_args: dict = field(default_factory=dict)  # ViTConfig fields over the variant's, e.g. {dropout: 0.1}
    representation_layer: bool = True  # the tanh pre-logits layer of pretraining (eq. 4)
    init_from: str | None = None  # weights to start from: a run, a checkpoint folder, or a file (.npz/timm/HF too)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            name="adamw", lr=8e-4, weight_decay=0.1, betas=(0.9, 0.999), schedule="linear", warmup_steps=10_000
        )
    )
    loss: Literal["auto", "softmax", "sigmoid"] = "auto"  # auto: sigmoid for multi-label shards
    batch_size: int = 4096  # global: images per optimizer step over all workers
    micro_batch_size: int | None = None  # images per worker per forward; smaller accumulates gradients
    steps: int | None = None  # total optimizer steps ...
    epochs: float | None = 7.0  # ... or passes over the training split (used when steps is null)
    ema_decay: float | None = None  # Polyak averaging of the weights (the paper uses 0.9999 for fine-tuning)
    log_every: int = 50
    eval_every: int | None = None  # steps between held-out evaluations; null: only at the end
    eval_batch_size: int | None = None  # per worker; default the micro batch
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_failures: int = 3  # restarts of the worker group after a worker or node dies
    seed: int = 0
    halt_after_steps: int | None = None  # stop (with a checkpoint) after this many steps; the same name resumes
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        """Every check that needs no data, so `vit run`, `vit pretrain` and `vit submit` refuse the same mistake
        with the same message before any work (the loader prefixes the section: ``pretrain.batch_size: ...``)."""
        for name in ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            check(getattr(self, name) >= 1, f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("steps", "eval_every", "eval_batch_size", "halt_after_steps", "micro_batch_size"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{name}: must be at least 1 (or null), got {value}")
        check(self.max_failures >= 0, f"max_failures: must not be negative, got {self.max_failures}")
        check(self.steps is not None or self.epochs is not None, "steps: steps or epochs must be given")
        check(self.epochs is None or self.epochs > 0, f"epochs: must be positive, got {self.epochs}")
        check(
            self.ema_decay is None or 0.0 < self.ema_decay < 1.0, f"ema_decay: must be in (0, 1), got {self.ema_decay}"
        )
        if self.model is not None:
            try:
                vit.model_config(self.model)
            except ValueError as err:
                raise ConfigError(f"model: {err}") from None
        workers = self.scale.num_workers
        check(
            self.batch_size % workers == 0,
            f"batch_size: {self.batch_size} does not split evenly over {workers} workers (scale.num_workers)",
        )
        streams = self.data.streams
        if streams is not None:
            check(
                streams % workers == 0,
                f"data.streams: {streams} streams do not split evenly over {workers} workers (scale.num_workers)",
            )
            check(
                self.batch_size % streams == 0,
                f"data.streams: a batch_size of {self.batch_size} does not take the same share of {streams} streams",
            )
        per_worker = self.batch_size // workers
        check(
            per_worker % (self.micro_batch_size or per_worker) == 0,
            f"micro_batch_size: {self.micro_batch_size} does not divide the {per_worker} images per worker and step",
        )
        if self.steps is not None:  # with epochs, the step count follows from the shards: checked in plan_training
            check_warmup(self.optim.warmup_steps, self.steps)


@dataclass(kw_only=True)
class PretrainConfig(TrainConfig):
    """Table 3 of the paper: Adam (0.9, 0.999), weight decay 0.1, batch 4096, 10k warmup steps then
    linear decay, 224 px with inception crop and flip, sigmoid loss (head bias -10) on multi-label data."""

    # In a pipeline: new pretraining images re-run pretraining only when this is true. Pretraining is the
    # expensive step, so by default the earlier pretraining is reused (the log says so) and fine-tuning starts
    # from it; the new images count from the next pretraining with other settings.
    rerun_on_new_data: bool = False


@dataclass(kw_only=True)
class FinetuneConfig(TrainConfig):
    """Table 4: SGD with momentum 0.9, no weight decay, batch 512, cosine decay with warmup, clipping at
    global norm 1, 384 px (position embeddings resampled), a new zero-initialised head, no pre-logits."""

    recipe: Recipe = "finetune"
    model: str | None = None
    representation_layer: bool = False
    data: DataConfig = field(default_factory=lambda: DataConfig(image_size=384))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            name="sgd", lr=0.01, weight_decay=0.0, momentum=0.9, schedule="cosine", warmup_steps=500
        )
    )
    batch_size: int = 512
    steps: int | None = 10_000
    epochs: float | None = None


def check_warmup(warmup_steps: int, steps: int) -> None:
    message = f"optim.warmup_steps: {warmup_steps} warmup steps of a {steps}-step run (warmup must end before it)"
    check(warmup_steps < steps or steps == 1, message)


CONFIGS: dict[str, type[TrainConfig]] = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}


def load_train_config(recipe: Recipe, path: str | None, overrides: tuple[str, ...] | list[str]) -> TrainConfig:
    from pipelines.common.config import load_config

    return load_config(CONFIGS[recipe], path, overrides)
