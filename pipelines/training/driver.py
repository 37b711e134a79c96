"""Pretraining and fine-tuning on Ray Train, the driver's side: plan the run against the shards, start the worker
group (``pipelines.training.loop``), track it in MLflow, and report what it made.

    cfg = load_train_config("pretrain", None, ["data.shards=s3://bucket/jft", "model=B/16"])
    result = run_training(cfg)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipelines.common.config import ConfigError, to_dict
from pipelines.common.storage import filesystem, read_json
from pipelines.data.stream import open_shards, read_info
from pipelines.tracking.tracking import LiveTarget, Tracker
from pipelines.training.config import TrainConfig, check_warmup
from pipelines.training.loop import (
    HISTORY_FILE,
    STATE_FILE,
    STEP_KEYS,
    STEPS_FILE,
    TrainingPlan,
    train_worker,
    workers_that_fit,
)
from pipelines.training.progress import ProgressChannel
from pipelines.training.weights import MODEL_FILE, init_model_config, latest_committed_checkpoint, local_weights

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the last good checkpoint is kept."""


class TrainingDataError(RuntimeError):
    """A shard could not be read (damaged, truncated, hostile): the same bytes fail again, so it is not retried."""


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


def plan_training(cfg: TrainConfig) -> TrainingPlan:
    """Check ``cfg`` against the shards and work out steps, micro batches, data streams and the label space.

    Resuming the run ``cfg.name`` on another number of workers (``scale.num_workers``) is how a run continues after
    losing a node or gaining one: the streams come from its checkpoint, so the data order and the global batch stay,
    and the micro-batch stays too where it fits (gradient accumulation makes up the rest). A worker count that does
    not divide the streams is refused here, with the counts that would work."""
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

    name = cfg.name or f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = posixpath.join(_absolute(cfg.storage_path), name)
    resumed = _resumed_state(run_dir, cfg.storage_options)
    streams = _streams(cfg, train.urls, resumed, name)
    per_worker = cfg.batch_size // cfg.scale.num_workers  # divisibility: checked by the config itself
    # A resume without micro_batch_size keeps the micro-batch the run had, where it fits: the same memory per worker.
    micro = cfg.micro_batch_size or math.gcd(resumed.get("micro_batch", per_worker), per_worker)
    steps = cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * train.samples / cfg.batch_size)
    if steps < 1:
        raise ConfigError("steps: the run would take no steps")
    check_warmup(cfg.optim.warmup_steps, steps)
    config = to_dict(cfg)
    # Workers run in folders of their own: every local path they are given must be absolute.
    config["data"]["shards"] = _absolute(cfg.data.shards)
    config["storage_path"] = _absolute(cfg.storage_path)
    if cfg.init_from:
        config["init_from"] = _absolute(cfg.init_from)
    return TrainingPlan(
        config=config,
        total_steps=steps,
        micro_batch=micro,
        accum_steps=per_worker // micro,
        streams=streams,
        num_classes=train.num_classes,
        multi_label=train.multi_label,
        train_samples=train.samples,
        eval_split=eval_split,
        name=name,
        run_dir=posixpath.join(config["storage_path"], name),
    )


def _resumed_state(run_dir: str, storage_options: dict) -> dict:
    """The trainer state of the run's latest checkpoint; empty for a new run."""
    checkpoint = latest_committed_checkpoint(run_dir, storage_options)
    if checkpoint is None:
        return {}
    fs, path = filesystem(posixpath.join(checkpoint, STATE_FILE), storage_options)
    try:
        return read_json(fs, path)
    except FileNotFoundError:
        return {}


def _streams(cfg: TrainConfig, shards: tuple[str, ...], resumed: dict, name: str) -> int:
    """The run's logical data streams: its checkpoint's when it resumes, else data.streams or a default that lets a
    run shrink to any divisor of its worker count and that gives each loader worker streams of its own."""
    workers = cfg.scale.num_workers
    recorded = resumed.get("streams")
    if recorded is not None:
        if cfg.data.streams is not None and cfg.data.streams != recorded:
            raise ConfigError(
                f"data.streams: run {name!r} reads its data as {recorded} streams, fixed when it started; "
                f"a resume keeps them (leave data.streams unset, or use a new name for {cfg.data.streams})"
            )
        if recorded % workers:
            raise ConfigError(
                f"scale.num_workers: run {name!r} reads its data as {recorded} streams and cannot resume on "
                f"{workers} workers; it resumes on {workers_that_fit(recorded)} workers"
            )
        if cfg.batch_size % recorded:
            raise ConfigError(
                f"batch_size: {cfg.batch_size} does not take the same share of run {name!r}'s {recorded} streams"
            )
        return recorded
    if cfg.data.streams is not None:  # checked against the workers and the batch by the config itself
        return cfg.data.streams
    # Whole shards per stream where there are enough of them (fewer shards than streams means every stream reads
    # every shard's bytes), and a share of every step in each.
    for per_worker in range(max(2, cfg.data.loader_workers), 0, -1):
        streams = workers * per_worker
        if streams <= len(shards) and cfg.batch_size % streams == 0:
            return streams
    return workers


def run_training(
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> TrainResult:
    """Train on the current Ray cluster (join it with ``pipelines.common.ray.init_ray``); resume the run
    ``cfg.name`` if it exists.

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
        train_worker,
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


def _start_tracked_run(tracker: Tracker, cfg: TrainConfig, plan: TrainingPlan, parent_run_id, tags: dict) -> str:
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
    fs, path = filesystem(posixpath.join(checkpoint, STEPS_FILE), cfg.storage_options)
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


def _absolute(location: str) -> str:
    return location if "://" in location else os.path.abspath(location)


def _storage(cfg: TrainConfig):
    """Ray's storage path and, for fsspec options (an S3 endpoint), a pyarrow filesystem wrapping s3fs."""
    if "://" not in cfg.storage_path:
        return os.path.abspath(cfg.storage_path), None
    if not cfg.storage_options:
        return cfg.storage_path, None  # pyarrow resolves s3:// itself (AWS_* variables)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(cfg.storage_path, cfg.storage_options)
    return path, PyFileSystem(FSSpecHandler(fs))
