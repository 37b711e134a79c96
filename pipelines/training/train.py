"""Pretraining and fine-tuning on Ray Train: the driver, and the loop every worker runs.

    cfg = load_config(PretrainConfig, "configs/jft-b16.yaml", ["data.shards=s3://bucket/jft"])
    result = run_training(cfg)

One loop serves both recipes, both strategies (DDP, FSDP2) and both device kinds (CPU with gloo,
GPU with nccl). The whole training state is checkpointed through ``ray.train.report``: model and
optimizer with ``torch.distributed.checkpoint`` (each rank writes its own shard, Ray gathers them
into one folder), each rank's RNG, and the step, from which the learning rate and the data position
follow. A restarted worker group (``FailureConfig``) or a re-run with the same ``name`` continues
from the latest checkpoint and reads exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import posixpath
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
import torch
import torch.distributed as dist
from torch import nn

import vit
from pipelines.common.config import ConfigError, check, from_dict, to_dict
from pipelines.common.redaction import redact
from pipelines.data.stream import ShardsError, ShardSet, StreamSpec, make_loader, open_shards, read_info
from pipelines.tracking.tracking import LiveMetrics, LiveTarget, Tracker, TrackingConfig, metrics_of
from pipelines.training.progress import ProgressChannel, RankZeroProgress
from vit.data import build_transform, normalize
from vit.evaluate import topk_hits
from vit.model import VisionTransformer
from vit.train import OptimConfig, build_optimizer, classification_loss, lr_at, set_lr

# Ray Train sends its workers' log records (INFO and up) to the driver; print() would be shown twice.
log = logging.getLogger(__name__)

Strategy = Literal["ddp", "fsdp"]
Precision = Literal["auto", "fp32", "bf16"]
Recipe = Literal["pretrain", "finetune"]

MODEL_FILE = "model.safetensors"  # the portable weights in every checkpoint: vit.load_model reads them
STATE_FILE = "trainer_state.json"
HISTORY_FILE = "metrics.jsonl"  # a record per logged step: loss (window mean), health figures, evaluation
STEPS_FILE = "steps.jsonl"  # every step's own [step, loss, lr, gradient norm]: what MLflow is reconciled with
STEP_KEYS = ("train/loss", "train/lr", "train/grad_norm")
_REASON_BYTES = 2048  # the longest data-error message sent from one rank to the others
COMMITTED_FILE = "COMMITTED"  # written once every rank's part of a checkpoint is in storage

# Dense bf16 peak FLOP/s of accelerators we know, for MFU (model FLOPs utilisation).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the last good checkpoint is kept."""


class TrainingDataError(RuntimeError):
    """A shard could not be read (damaged, truncated, hostile): the same bytes fail again, so it is not retried."""


class _DataErrorStop(Exception):
    """Raised on every rank at once, after they agreed that one of them met a data error."""


@dataclass(kw_only=True)
class DataConfig:
    shards: str = ""  # a `vit shard` output folder: a path or an fsspec URL (s3://...)
    train_split: str = "train"
    eval_split: str | None = "auto"  # "auto": val, else test, when the shards have one; null: no evaluation
    image_size: int = 224
    resize_size: int | None = None  # fine-tuning and evaluation resize to this before cropping
    flip: bool = True  # random horizontal flips (off for digits or text, where a mirror image is another class)
    loader_workers: int = 2  # decoding processes per training worker (0: decode in the training process)
    shuffle_block: int = 2048  # samples shuffled together as they stream in
    storage_options: dict = field(default_factory=dict)  # fsspec options for the shards (S3 endpoint, keys)

    def __post_init__(self) -> None:
        check(self.image_size >= 1, f"image_size: must be at least 1, got {self.image_size}")
        check(self.resize_size is None or self.resize_size >= self.image_size,
              f"resize_size: {self.resize_size} is smaller than image_size {self.image_size}")  # fmt: skip
        check(self.loader_workers >= 0, f"loader_workers: must not be negative, got {self.loader_workers}")
        check(self.shuffle_block >= 1, f"shuffle_block: must be at least 1, got {self.shuffle_block}")


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


@dataclass
class TrainResult:
    name: str
    run_dir: str  # the run's folder: checkpoints and history
    checkpoint: str  # the latest checkpoint folder (holds model.safetensors)
    model_path: str  # the trained weights, loadable with vit.load_model
    steps: int
    metrics: dict[str, float]  # of the final step and evaluation
    history: list[dict]  # a record per logged step
    segments: list[list[int]]  # [first, last) steps trained by each attempt, resumes included
    mlflow_run_id: str | None = None


@dataclass(frozen=True)
class _Plan:
    """What the driver works out once and every worker needs."""

    config: dict
    total_steps: int
    micro_batch: int
    accum_steps: int
    num_classes: int
    multi_label: bool
    train_samples: int
    eval_split: str | None
    name: str  # the run's folder under storage_path
    run_dir: str  # storage_path/name: a path or a URL
    tracking: dict | None = None  # a LiveTarget's fields: where rank 0 logs its metrics
    progress: Any = None  # a Ray queue: rank 0's log lines and steps, shown by the driver (pipelines.training.progress)


# ------------------------------------------------------------------------------------------------------------- driver


def plan_training(cfg: TrainConfig) -> _Plan:
    """Check ``cfg`` against the shards and work out steps, micro batches and the label space."""
    if not cfg.data.shards:
        raise ConfigError("data.shards: no shards given (the output folder of `vit shard`)")
    if cfg.recipe == "finetune" and cfg.init_from is None:
        raise ConfigError("init_from: fine-tuning needs the weights to start from (a run, checkpoint or file)")
    if cfg.model is None and cfg.init_from is None:
        raise ConfigError("model: no model given and no init_from to take one from")
    if cfg.model is None:  # the variant comes from the weights: refused here, not in every worker, when it cannot
        init_model_config(cfg)
    info = read_info(cfg.data.shards, cfg.data.storage_options)
    train = open_shards(cfg.data.shards, cfg.data.train_split, cfg.data.storage_options)
    eval_split = cfg.data.eval_split
    if eval_split == "auto":
        eval_split = next((s for s in ("val", "test") if s in info.get("splits", {})), None)
    elif eval_split is not None and eval_split not in info.get("splits", {}):
        raise ConfigError(f"data.eval_split: the shards have no split {eval_split!r}")

    per_worker = cfg.batch_size // cfg.scale.num_workers  # divisibility: checked by the config itself
    micro = cfg.micro_batch_size or per_worker
    steps = cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * train.samples / cfg.batch_size)
    if steps < 1:
        raise ConfigError("steps: the run would take no steps")
    check_warmup(cfg.optim.warmup_steps, steps)
    name = cfg.name or f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = to_dict(cfg)
    # Workers run in folders of their own: every local path they are given must be absolute.
    config["data"]["shards"] = _absolute(cfg.data.shards)
    config["storage_path"] = _absolute(cfg.storage_path)
    if cfg.init_from:
        config["init_from"] = _absolute(cfg.init_from)
    return _Plan(
        config=config,
        total_steps=steps,
        micro_batch=micro,
        accum_steps=per_worker // micro,
        num_classes=train.num_classes,
        multi_label=train.multi_label,
        train_samples=train.samples,
        eval_split=eval_split,
        name=name,
        run_dir=posixpath.join(config["storage_path"], name),
    )


def run_training(
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> TrainResult:
    """Train on the current Ray cluster (``ray.init`` first); resume the run ``cfg.name`` if it exists.

    With tracking on, the run is an MLflow run (the same one again when the training resumes): the
    config as params, rank 0's metrics every step, the shards as its input, and at the end the
    curves, the config and the final weights as artifacts."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    plan = plan_training(cfg)
    tracker = Tracker.open(cfg.tracking)  # before any work: an unusable server is a config error
    name = plan.name
    storage_path, storage_filesystem = _storage(cfg)
    use_gpu = cfg.scale.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    what = cfg.model or f"the model of {cfg.init_from}"
    log(
        f"{cfg.recipe}: {what} on {plan.train_samples} images "
        f"({plan.num_classes} classes, {'multi' if plan.multi_label else 'single'}-label), "
        f"{plan.total_steps} steps of {cfg.batch_size} = {cfg.scale.num_workers} workers x {plan.micro_batch} "
        f"x {plan.accum_steps} accumulation, {cfg.scale.strategy} on {'GPU' if use_gpu else 'CPU'}; run {name!r}"
    )
    run_id = None
    if tracker is not None:
        run_id = _start_tracked_run(tracker, cfg, plan, parent_run_id, tags or {})
        target = LiveTarget(
            uri=tracker.uri,
            run_id=run_id,
            system_metrics=cfg.tracking.system_metrics,
            skip_through_step=tracker.last_logged_step(run_id),
        )
        plan = dataclasses.replace(plan, tracking=dataclasses.asdict(target))
        url = tracker.run_url(run_id)
        log(f"MLflow run {run_id}" + (f": {url}" if url else f" in {tracker.uri}"))
    progress = ProgressChannel.open()
    plan = dataclasses.replace(plan, progress=progress.queue)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)},
        scaling_config=ScalingConfig(
            num_workers=cfg.scale.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scale.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=cfg.scale.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    progress.follow(plan.total_steps, cfg.batch_size, log, desc=cfg.recipe)
    try:
        result = trainer.fit()
    except BaseException:
        if tracker is not None:
            _finish_quietly(tracker, run_id, "FAILED")
        raise
    finally:
        progress.close()
    outcome = result.return_value or {}
    if outcome.get("status") == "data-error":
        if tracker is not None:
            _finish_quietly(tracker, run_id, "FAILED")
        raise TrainingDataError(
            f"{outcome['reason']} (at step {outcome['step']}); a data error is not retried: re-shard the corpus, "
            "or check the shards with `vit shard verify`"
        )
    if outcome.get("status") == "diverged":
        if tracker is not None:
            _finish_quietly(tracker, run_id, "FAILED")
        raise TrainingDivergedError(
            f"{outcome['reason']} at step {outcome['step']}; stopped. The last good checkpoint is "
            f"{result.checkpoint.path if result.checkpoint else 'none (it diverged before the first)'}"
        )
    run_dir = plan.run_dir
    checkpoint = posixpath.join(run_dir, posixpath.basename(result.checkpoint.path))
    trained = TrainResult(
        name=name,
        run_dir=run_dir,
        checkpoint=checkpoint,
        model_path=posixpath.join(checkpoint, MODEL_FILE),
        steps=outcome.get("step", 0),
        metrics=outcome.get("metrics", {}),
        history=outcome.get("history", []),
        segments=outcome.get("segments", []),
        mlflow_run_id=run_id,
    )
    if tracker is not None:
        _finish_tracked_run(tracker, cfg, trained, outcome.get("unsent_metrics", []), outcome.get("status"), log)
    return trained


def _start_tracked_run(tracker: Tracker, cfg: TrainConfig, plan: _Plan, parent_run_id, tags: dict) -> str:
    from pipelines.tracking.tracking import dataset_fingerprint

    shards = cfg.data.shards.rstrip("/")
    digest = dataset_fingerprint(shards, cfg.data.storage_options)
    dataset = posixpath.basename(shards)
    model = cfg.model or "from " + posixpath.basename(str(cfg.init_from).rstrip("/"))
    run_id = tracker.start_run(
        key=plan.run_dir,
        name=f"{cfg.recipe} {model} on {dataset}",
        parent_id=parent_run_id,
        tags={
            "vit.step": cfg.recipe,
            "vit.run_dir": plan.run_dir,
            "vit.dataset": shards,
            "vit.dataset_fingerprint": digest,
            **({"vit.init_from": cfg.init_from} if cfg.init_from else {}),
            **tags,
        },
        description=(
            f"{'Pretraining' if cfg.recipe == 'pretrain' else 'Fine-tuning'} of ViT-{model} on `{shards}` "
            f"({plan.train_samples} images, {plan.num_classes} classes): {plan.total_steps} steps of "
            f"{cfg.batch_size} images, {cfg.optim.name} at lr {cfg.optim.lr}. Checkpoints: `{plan.run_dir}`."
        ),
    )
    tracker.log_params(run_id, {k: v for k, v in plan.config.items() if k != "tracking"})
    tracker.log_params(run_id, {"plan.total_steps": plan.total_steps, "plan.num_classes": plan.num_classes})
    tracker.log_dataset(run_id, shards, context="training", digest=digest, name=dataset)
    info = read_info(shards, cfg.data.storage_options)
    splits = {name: split.get("num_samples") for name, split in info.get("splits", {}).items()}
    lineage = {"shards": shards, "fingerprint": digest, "num_classes": info.get("num_classes"), "splits": splits}
    tracker.log_dict(run_id, lineage, "shards.json")
    return run_id


def _finish_tracked_run(tracker: Tracker, cfg: TrainConfig, result: TrainResult, unsent, status, log) -> None:
    """Reconcile the metric history with what MLflow holds, then the artifacts; the run ends FINISHED."""
    from pipelines.common.config import dump_config
    from pipelines.tracking.tracking import training_curves

    run_id = result.mlflow_run_id
    # Each step's own values last: at a logged step they, not the window's mean loss, are what MLflow should hold.
    missing = tracker.sync_metrics(run_id, [*result.history, *unsent, *step_records(result.checkpoint, cfg)])
    if missing:
        log(f"MLflow had missed {missing} metric values (the server was unreachable for a while); sent them now")
    if result.metrics:
        tracker.log_metrics(run_id, {k: v for k, v in result.metrics.items() if k.startswith("eval/")}, result.steps)
    tracker.log_text(run_id, dump_config(cfg), "config.yaml")
    if result.history:
        figure = training_curves(result.history, title=result.name)
        tracker.log_figure(run_id, figure, "training_curves.png")
    for filename in (MODEL_FILE, STATE_FILE, HISTORY_FILE, STEPS_FILE):
        try:
            path = local_weights(posixpath.join(result.checkpoint, filename), cfg.storage_options)
        except FileNotFoundError:
            continue
        if os.path.exists(path):
            tracker.log_file(run_id, path, "checkpoint")
    tracker.set_tags(run_id, {"vit.checkpoint": result.checkpoint, "vit.status": status or "finished"})
    # A halted run (halt_after_steps) is resumable: KILLED until a later attempt finishes it.
    tracker.finish(run_id, "FINISHED" if status == "finished" else "KILLED")


def step_records(checkpoint: str, cfg: TrainConfig) -> list[dict]:
    """Every step's own loss, learning rate and gradient norm up to ``checkpoint``, as history records."""
    fs, path = fsspec.core.url_to_fs(posixpath.join(checkpoint, STEPS_FILE), **cfg.storage_options)
    try:
        lines = fs.cat_file(path).decode().splitlines()
    except FileNotFoundError:
        return []
    return [dict(zip(("step", *STEP_KEYS), json.loads(line))) for line in lines if line]


def _finish_quietly(tracker: Tracker, run_id: str | None, status: str) -> None:
    try:
        if run_id is not None:
            tracker.finish(run_id, status)
    except Exception as err:  # the training's own error is the one to report
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, err)


def load_train_config(recipe: Recipe, path: str | None, overrides: tuple[str, ...] | list[str]) -> TrainConfig:
    from pipelines.common.config import load_config

    return load_config(CONFIGS[recipe], path, overrides)


def _absolute(location: str) -> str:
    return location if "://" in location else os.path.abspath(location)


def _storage(cfg: TrainConfig):
    """Ray's storage path and, for fsspec options (an S3 endpoint), a pyarrow filesystem wrapping s3fs."""
    if "://" not in cfg.storage_path:
        return os.path.abspath(cfg.storage_path), None
    if not cfg.storage_options:
        return cfg.storage_path, None  # pyarrow resolves s3:// itself (AWS_* variables)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(cfg.storage_path, **cfg.storage_options)
    return path, PyFileSystem(FSSpecHandler(fs))


# ------------------------------------------------------------------------------------------------------------- worker


def _train_worker(plan_dict: dict) -> dict:
    """The loop every Ray Train worker runs (Ray has set up the process group)."""
    import ray.train
    import ray.train.torch

    plan = _Plan(**plan_dict)
    cfg = from_dict(CONFIGS[plan.config["recipe"]], plan.config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    loop = _Loop(cfg, plan, rank=rank, world=world, device=device)
    return loop.run()


class _Loop:
    def __init__(self, cfg: TrainConfig, plan: _Plan, *, rank: int, world: int, device: torch.device):
        self.cfg, self.plan, self.rank, self.world, self.device = cfg, plan, rank, world, device
        self.bf16 = cfg.scale.precision == "bf16" or (cfg.scale.precision == "auto" and device.type == "cuda")
        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
        self.model = build_model(cfg, plan.num_classes, plan.multi_label)
        self.model.to(device)
        self.flops_per_image = self.model.flops_per_image()
        self.wrapped = self._parallelize(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.ema = [p.detach().clone() for p in self.model.parameters()] if cfg.ema_decay else None
        self.step = 0
        self.history: list[dict] = []
        self.step_values: list[list[float]] = []  # [step, *STEP_KEYS] per step; ~40 bytes each in the checkpoint
        self.segments: list[list[int]] = []
        self.eval_metrics: dict[str, float] = {}
        self.progress = RankZeroProgress(plan.progress if rank == 0 else None)

    # -- setup

    def _parallelize(self, model: VisionTransformer) -> nn.Module:
        scale = self.cfg.scale
        if scale.activation_checkpointing:
            model.set_grad_checkpointing(True)
        if scale.compile:
            for block in model.blocks:
                block.compile()
        if self.world == 1:
            return model
        if scale.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else None
            kwargs = {"mp_policy": policy} if policy else {}
            for block in model.blocks:  # one all-gather per block, overlapped with the previous block's compute
                fully_shard(block, **kwargs)
            fully_shard(model, **kwargs)
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def _loader(self, split: str, *, train: bool, start_batch: int = 0):
        cfg, plan = self.cfg, self.plan
        shards: ShardSet = open_shards(cfg.data.shards, split, cfg.data.storage_options)
        recipe = cfg.recipe if train else "eval"
        spec = StreamSpec(
            shards=shards,
            transform=build_transform(recipe, cfg.data.image_size, cfg.data.resize_size, flip=cfg.data.flip),
            batch_size=plan.micro_batch if train else (cfg.eval_batch_size or plan.micro_batch),
            seed=cfg.seed,
            rank=self.rank,
            world_size=self.world,
            shuffle_block=cfg.data.shuffle_block if train else 1,
            repeat=train,
            start_batch=start_batch,
            recycle_batches=True,  # each batch is normalised into a new tensor before the next is asked for
        )
        return make_loader(spec, workers=cfg.data.loader_workers, pin_memory=self.device.type == "cuda")

    # -- the run

    def run(self) -> dict:

        with self._latest_checkpoint() as folder:
            if folder is not None:
                self._restore(folder)
        first_step = self.step
        self.segments.append([first_step, first_step])
        with self.progress:
            return self._run_from(first_step)

    def _run_from(self, first_step: int) -> dict:
        if self.rank == 0:
            how = f"resuming at step {first_step}" if first_step else "starting"
            log.info("[vit] %s: %d steps", how, self.plan.total_steps)

        live = LiveMetrics(LiveTarget(**self.plan.tracking)) if self.plan.tracking and self.rank == 0 else None
        try:
            outcome = self._run_steps(live, self.progress)
        except _DataErrorStop as stop:  # every rank is here, at the same step: Ray must not restart the group
            if self.rank == 0:
                log.error("[vit] %s: stopping at step %d", stop, self.step + 1)
            outcome = {"status": "data-error", "reason": str(stop), "step": self.step + 1, "segments": self.segments}
        finally:
            unsent = live.close() if live is not None else []
        return {**outcome, "unsent_metrics": unsent}

    def _run_steps(self, live: LiveMetrics | None, progress: RankZeroProgress) -> dict:
        total = self.plan.total_steps
        stop_at = min(total, self.cfg.halt_after_steps or total)
        batches = iter(
            self._loader(self.cfg.data.train_split, train=True, start_batch=self.step * self.plan.accum_steps)
        )
        window = _Window()
        while self.step < stop_at:
            lr = lr_at(self.step, total, self.cfg.optim)
            metrics = self._train_step(batches, lr, window)
            if metrics is None:  # diverged: every rank sees the same global gradient norm, so all stop here
                return self._diverged(window.last_reason)
            self.step += 1
            self.segments[-1][1] = self.step
            step_metrics = dict(metrics)  # this step's own loss, lr and gradient norm
            self.step_values.append([self.step, *(round(metrics[k], 7) for k in STEP_KEYS)])
            if live is not None:
                live.log(self.step, step_metrics)
            progress.step(self.step, metrics["train/loss"])
            finished = self.step == stop_at
            evaluate = self.plan.eval_split and (
                self.step == total or (self.cfg.eval_every and self.step % self.cfg.eval_every == 0)
            )
            if evaluate:
                with window.paused():
                    self.eval_metrics = self.evaluate(self.plan.eval_split)
                metrics.update(self.eval_metrics)
            if self.step % self.cfg.log_every == 0 or finished or evaluate:
                record = {"step": self.step, "epoch": self._epoch(), **metrics, **window.flush(self)}
                self.history.append(record)
                if live is not None:  # the step's own loss went out above; the window's mean stays in the history
                    live.log(self.step, metrics_of({k: v for k, v in record.items() if k not in step_metrics}))
                if self.rank == 0:
                    log.info("[vit] %s", _format_record(record))
            # Only checkpoints are reported: Ray takes one report per controller poll (2 s), so reporting
            # every log line would stall fast steps. The health figures live in the history instead.
            if self.step % self.cfg.checkpoint_every == 0 or finished:
                with window.paused():
                    self._checkpoint(metrics)
        status = "finished" if self.step == total else "halted"
        return {
            "status": status,
            "step": self.step,
            "metrics": {**(self.history[-1] if self.history else {}), **self.eval_metrics},
            "history": self.history,
            "segments": self.segments,
        }

    def _epoch(self) -> float:
        return self.step * self.cfg.batch_size / max(1, self.plan.train_samples)

    def _train_step(self, batches: Iterator, lr: float, window: _Window) -> dict[str, float] | None:
        """One optimizer step over ``accum_steps`` micro-batches; None when the gradients are not finite."""
        model, optimizer, accum = self.wrapped, self.optimizer, self.plan.accum_steps
        set_lr(optimizer, lr)
        model.train()
        loss_sum, images_seen, bad = 0.0, 0, 0
        data_error = None
        for micro in range(accum):
            started = time.perf_counter()
            if data_error is None:
                try:
                    images, targets, n_bad = next(batches)
                except ShardsError as err:  # this rank's shard is damaged; the others learn it below
                    data_error = _data_error_message(err)
            if data_error is not None:  # still take part in this step's collectives, with nothing to learn from
                size = self.cfg.data.image_size
                images, targets, n_bad = torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0), 0
            window.data_seconds += time.perf_counter() - started
            images = normalize(images.to(self.device, non_blocking=True))
            targets = targets.to(self.device, non_blocking=True)
            last = micro == accum - 1
            with self._no_sync(not last), self._autocast():
                logits = model(images)
                if len(images):
                    loss = classification_loss(logits.float(), targets)
                else:  # every sample of this micro-batch was undecodable: still take part in the collectives
                    loss = logits.sum() * 0.0
            (loss / accum).backward()
            loss_sum += loss.detach().float().item() if len(images) else 0.0
            images_seen += len(images)
            bad += n_bad
        data_error = self._agree_on_data_error(data_error)
        if data_error is not None:
            optimizer.zero_grad(set_to_none=True)
            raise _DataErrorStop(data_error)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
        grad_norm = _local(grad_norm).item()
        if not math.isfinite(grad_norm) or not math.isfinite(loss_sum):
            optimizer.zero_grad(set_to_none=True)
            window.last_reason = f"non-finite {'gradient norm' if math.isfinite(loss_sum) else 'loss'}"
            return None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for avg, p in zip(self.ema, self.model.parameters()):
                    avg.lerp_(p.detach(), 1.0 - self.cfg.ema_decay)
        window.images += images_seen
        window.bad += bad
        window.loss += loss_sum / accum
        window.steps += 1
        return {"train/loss": loss_sum / accum, "train/lr": lr, "train/grad_norm": grad_norm}

    def _agree_on_data_error(self, reason: str | None) -> str | None:
        """Whether any rank met a data error, and the lowest such rank's message, known to every rank: one
        scalar all-reduce a step (a message travels only when there is one)."""
        if self.world == 1:
            return reason
        device = self._comm_device()
        first = torch.tensor([self.rank if reason is not None else self.world], device=device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        source = int(first.item())
        if source == self.world:
            return None
        message = torch.zeros(_REASON_BYTES, dtype=torch.uint8, device=device)
        if self.rank == source:
            data = reason.encode()[:_REASON_BYTES]
            message[: len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        dist.broadcast(message, src=source)
        return bytes(message.cpu().tolist()).rstrip(b"\0").decode(errors="replace")

    def _no_sync(self, skip_sync: bool):
        """Gradient accumulation: only the last micro-batch of a step reduces gradients across workers."""
        if self.world == 1 or not skip_sync:
            if self.cfg.scale.strategy == "fsdp" and self.world > 1:
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.cfg.scale.strategy == "fsdp":
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _diverged(self, reason: str) -> dict:
        if self.rank == 0:
            log.error("[vit] %s at step %d: stopping; the last checkpoint is kept", reason, self.step + 1)
        return {"status": "diverged", "reason": reason, "step": self.step + 1, "segments": self.segments}

    # -- evaluation

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """Top-1/top-5 over the whole split, each rank scoring its share (with the averaged weights if any)."""
        ks = (1, 5)
        with self._ema_weights():
            self.wrapped.eval()
            counts = torch.zeros(len(ks) + 1, dtype=torch.float64)
            batches, data_error = 0, None
            try:
                for images, targets, _ in self._loader(split, train=False):
                    logits = self._eval_forward(images)
                    counts[:-1] += torch.tensor([topk_hits(logits.float().cpu(), targets, k) for k in ks])
                    counts[-1] += len(images)
                    batches += 1
            except ShardsError as err:
                data_error = _data_error_message(err)
            data_error = self._agree_on_data_error(data_error)
            if data_error is not None:
                raise _DataErrorStop(data_error)
            # FSDP ranks must run the same number of forwards: the ones with fewer batches run empty ones.
            most = torch.tensor([batches], dtype=torch.long, device=self._comm_device())
            if self.world > 1:
                dist.all_reduce(most, op=dist.ReduceOp.MAX)
                for _ in range(int(most.item()) - batches):
                    size = self.cfg.data.image_size
                    self._eval_forward(torch.zeros(1, 3, size, size, dtype=torch.uint8))
                counts = counts.to(self._comm_device())
                dist.all_reduce(counts)
                counts = counts.cpu()
        total = counts[-1].item()
        if total == 0:
            return {}
        return {f"eval/top{k}": counts[i].item() / total for i, k in enumerate(ks)} | {"eval/images": total}

    def _eval_forward(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.wrapped(normalize(images.to(self.device, non_blocking=True)))

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    @contextlib.contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        live = [p.detach().clone() for p in self.model.parameters()]
        with torch.no_grad():
            for p, avg in zip(self.model.parameters(), self.ema):
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.model.parameters(), live):
                    p.copy_(saved)

    # -- checkpoints

    def _checkpoint(self, metrics: dict) -> None:
        import ray.train
        from ray.train import Checkpoint

        from pipelines.training.safe_dcp import save_state

        with tempfile.TemporaryDirectory(prefix="vit-ckpt-") as folder:
            folder = Path(folder)
            state = self._state_dict()
            save_state(state, folder / "state")
            torch.save(_rng_state(), folder / f"rng-{self.rank}.pt")
            weights = self._full_weights()  # a collective under FSDP: every rank takes part
            if self.rank == 0:
                vit.save_state_dict(weights, self.model.config, folder / MODEL_FILE)
                trainer_state = {
                    "step": self.step,
                    "total_steps": self.plan.total_steps,
                    "samples_seen": self.step * self.cfg.batch_size,
                    "batches_per_rank": self.step * self.plan.accum_steps,
                    "world_size": self.world,
                    "segments": self.segments,
                    "eval": self.eval_metrics,
                    "config": redact(self.plan.config),  # the workers need the credentials; storage does not
                }
                (folder / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
                (folder / HISTORY_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.history))
                (folder / STEPS_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.step_values))
            name = f"checkpoint-{self.step:08d}"
            ray.train.report(
                {"step": self.step, **metrics}, checkpoint=Checkpoint.from_directory(folder), checkpoint_dir_name=name
            )
        # Each rank's report returns once its own files are uploaded; after the barrier all are, and
        # the marker says so. Ray registers a checkpoint only when its controller next polls (every
        # 2 s), so a worker dying in between would otherwise resume from an older one.
        if self.world > 1:
            dist.barrier()
        if self.rank == 0:
            fs, path = fsspec.core.url_to_fs(self.plan.run_dir, **self.cfg.storage_options)
            fs.pipe_file(posixpath.join(path, name, COMMITTED_FILE), str(self.step).encode())

    @contextlib.contextmanager
    def _latest_checkpoint(self):
        """The folder of the newest complete checkpoint: Ray's registered one, or a newer committed one."""
        import ray.train

        registered = ray.train.get_checkpoint()
        registered_step = _checkpoint_step(registered.path) if registered is not None else -1
        committed = latest_committed_checkpoint(self.plan.run_dir, self.cfg.storage_options)
        if committed is not None and _checkpoint_step(committed) > registered_step:
            fs, path = fsspec.core.url_to_fs(committed, **self.cfg.storage_options)
            if "file" in fs.protocol:
                yield Path(path)
                return
            with tempfile.TemporaryDirectory(prefix="vit-restore-") as folder:
                fs.get(path.rstrip("/") + "/", folder, recursive=True)
                yield Path(folder)
            return
        if registered is None:
            yield None
            return
        with registered.as_directory() as folder:
            yield Path(folder)

    def _state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        if self.ema is not None:
            names = [n for n, _ in self.model.named_parameters()]
            state["ema"] = dict(zip(names, self.ema))
        return state

    def _restore(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from pipelines.training.safe_dcp import load_state

        trainer_state = json.loads((folder / STATE_FILE).read_text())
        state = self._state_dict()
        load_state(state, folder / "state")
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if self.ema is not None:
            with torch.no_grad():
                for avg, saved in zip(self.ema, state["ema"].values()):
                    avg.copy_(saved)
        self.step = trainer_state["step"]
        self.segments = trainer_state["segments"]
        self.eval_metrics = trainer_state.get("eval", {})
        history = folder / HISTORY_FILE
        if history.exists():
            self.history = [json.loads(line) for line in history.read_text().splitlines() if line]
        steps = folder / STEPS_FILE
        if steps.exists():
            self.step_values = [json.loads(line) for line in steps.read_text().splitlines() if line]
        rng = folder / f"rng-{self.rank}.pt"
        if rng.exists() and trainer_state.get("world_size") == self.world:
            _set_rng_state(torch.load(rng, weights_only=True))

    def _full_weights(self) -> dict[str, torch.Tensor]:
        """The whole model on rank 0's CPU (the averaged weights when Polyak averaging is on)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        with self._ema_weights():
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.model, options=options)


class _Window:
    """Health figures accumulated between two log lines."""

    def __init__(self):
        self.started = time.perf_counter()
        self.data_seconds = 0.0
        self.images = self.bad = self.steps = 0
        self.loss = 0.0
        self.last_reason = ""

    @contextlib.contextmanager
    def paused(self):
        """Evaluation and checkpoints are not training time: keep them out of the rates."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - started

    def flush(self, loop: _Loop) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        per_worker = self.images / seconds
        figures = {
            "train/loss": self.loss / max(1, self.steps),
            "train/images_per_s": per_worker * loop.world,
            "train/images_per_s_per_worker": per_worker,
            "train/data_wait": self.data_seconds / seconds,
        }
        if self.bad:
            figures["train/bad_samples"] = self.bad
        peak = _peak_flops(loop.device) if loop.bf16 else None
        if peak:
            figures["train/mfu"] = 3 * loop.flops_per_image * per_worker / peak
        self.__init__()
        return figures


def _format_record(record: dict) -> str:
    parts = [f"step {record['step']}", f"epoch {record['epoch']:.2f}"]
    for key, value in record.items():
        if key in ("step", "epoch"):
            continue
        short = key.split("/", 1)[-1]
        parts.append(f"{short} {value:.4g}" if isinstance(value, float) else f"{short} {value}")
    return "  ".join(parts)


def _data_error_message(err: ShardsError) -> str:
    """The reader's own sentence: a DataLoader worker's error arrives as its whole traceback, the sentence last."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    return last.split("Error: ", 1)[1] if last.startswith(("pipelines.", "ShardsError", "ShardReadError")) else last


def _local(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's value (FSDP's global gradient norm is replicated on every rank)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------------------- models


def build_model(cfg: TrainConfig, num_classes: int, multi_label: bool) -> VisionTransformer:
    """The model of ``cfg``: fresh, or from ``init_from`` with a new zero head and resampled E_pos."""
    sigmoid = cfg.loss == "sigmoid" or (cfg.loss == "auto" and multi_label)
    overrides: dict[str, Any] = {"img_size": cfg.data.image_size, "num_classes": num_classes}
    overrides["head_bias_init"] = -10.0 if sigmoid else 0.0  # big_vision's start for sigmoid pretraining
    overrides.update(cfg.model_args)
    if cfg.init_from is None:
        return vit.create_model(cfg.model, **{**_representation(cfg, cfg.model), **overrides})
    path = local_weights(resolve_weights(cfg.init_from, cfg.storage_options), cfg.storage_options)
    if cfg.model is None:
        # The variant of the weights: ours carry their config, released ones (.npz, timm, Hugging Face) show it in
        # their tensors. No representation layer: the paper fine-tunes without it (model_args may ask for one).
        try:
            model = vit.load_model(path, **{"representation_size": None, **overrides})
        except vit.UnknownVariantError as err:
            raise _unknown_variant(cfg, err) from None
    else:
        model = vit.create_model(cfg.model, **{**_representation(cfg, cfg.model), **overrides})
        vit.load_checkpoint(model, path)
    model.reset_head()  # the paper replaces the whole head by a zero-initialised one
    return model


def init_model_config(cfg: TrainConfig) -> vit.ViTConfig:
    """The config of the weights ``init_from`` holds (with ``model_args``), as ``build_model`` reads them when
    ``model`` is null; a ``ConfigError`` naming the field when they do not say their variant. For the driver,
    to refuse such weights before any worker starts (it reads the weights once more)."""
    path = local_weights(resolve_weights(cfg.init_from, cfg.storage_options), cfg.storage_options)
    try:
        return vit.infer_model_config(path, **cfg.model_args)
    except vit.UnknownVariantError as err:
        raise _unknown_variant(cfg, err) from None


def _unknown_variant(cfg: TrainConfig, err: vit.UnknownVariantError) -> ConfigError:
    return ConfigError(
        f"model: the {err.format} weights {cfg.init_from} do not say their model's variant: their width {err.width} "
        f"is that of no named size and their layout does not give the number of attention heads. Set "
        f"`{cfg.recipe}.model` (`model` for `vit {cfg.recipe}`) to their variant, with `model_args` for the sizes it "
        f"does not share with them, or give the head count: `model_args: {{num_heads: N}}`"
    )


def _representation(cfg: TrainConfig, variant: str) -> dict:
    if not cfg.representation_layer:
        return {}
    return {"representation_size": vit.model_config(variant).width}


def _checkpoint_step(path: str) -> int:
    return int(posixpath.basename(path.rstrip("/")).removeprefix("checkpoint-"))


def latest_committed_checkpoint(run_dir: str, storage_options: dict | None = None) -> str | None:
    """The newest checkpoint of a run whose every part reached storage, as a path or URL."""
    fs, path = fsspec.core.url_to_fs(run_dir, **(storage_options or {}))
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return None
    for name in sorted((n for n in names if n.startswith("checkpoint-")), reverse=True):
        if fs.exists(posixpath.join(path, name, COMMITTED_FILE)):
            return posixpath.join(run_dir, name)
    return None


def resolve_weights(location: str, storage_options: dict | None = None) -> str:
    """A weights file from a file, a checkpoint folder (its model.safetensors) or a run (its latest checkpoint)."""
    fs, path = fsspec.core.url_to_fs(location, **(storage_options or {}))
    if fs.isfile(path):
        return location
    if fs.isfile(posixpath.join(path, MODEL_FILE)):
        return posixpath.join(location, MODEL_FILE)
    checkpoint = latest_committed_checkpoint(location, storage_options)
    if checkpoint is None:
        raise FileNotFoundError(f"{location}: no weights file, checkpoint folder or run with committed checkpoints")
    return posixpath.join(checkpoint, MODEL_FILE)


def local_weights(location: str, storage_options: dict | None = None) -> str:
    """A local path of ``location``, downloading remote files into a temporary folder."""
    fs, path = fsspec.core.url_to_fs(location, **(storage_options or {}))
    if "file" in fs.protocol:
        return path
    target = Path(tempfile.mkdtemp(prefix="vit-weights-")) / posixpath.basename(path)
    fs.get(path, str(target))
    return str(target)
