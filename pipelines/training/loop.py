"""The loop every Ray Train worker runs: one loop for both recipes, both strategies (DDP, FSDP2) and both device
kinds (CPU with gloo, GPU with nccl).

The whole training state is checkpointed through ``ray.train.report``: model and optimizer with
``torch.distributed.checkpoint`` (each rank writes its own shard, Ray gathers them into one folder; read back by
``pipelines.training.safe_dcp``), each rank's RNG, and the step, from which the learning rate and the data position
follow. A restarted worker group or a re-run with the same ``name`` continues from the latest checkpoint and reads
exactly the batches an uninterrupted run would have read.

Elastic: the data is read as ``streams`` logical streams (``pipelines.data.stream``), fixed when the run starts and
kept in every checkpoint, and each step takes the same samples from them whatever the number of ranks. A run resumed
on another number of workers (any that divides ``streams``) keeps the global batch: each rank serves streams / world
of them, its micro-batch stays, and gradient accumulation takes up the difference (``_split_step``), so every sample
of an epoch is still trained on once and the learning-rate schedule, a function of the step, goes on unchanged.
The RNG states are per rank and restored only on the same world size (dropout then draws differently).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import posixpath
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import vit
from pipelines.common.config import from_dict
from pipelines.common.redaction import redact
from pipelines.common.storage import filesystem
from pipelines.data.stream import ShardsError, ShardSet, StreamSpec, make_loader, open_shards
from pipelines.tracking.tracking import LiveMetrics, LiveTarget, metrics_of
from pipelines.training.config import CONFIGS, TrainConfig
from pipelines.training.parallel import spread_model
from pipelines.training.progress import RankZeroProgress
from pipelines.training.weights import (
    COMMITTED_FILE,
    MODEL_FILE,
    checkpoint_step,
    latest_committed_checkpoint,
)
from vit.data import build_transform, normalize
from vit.evaluate import topk_hits
from vit.train import NonFiniteError, build_optimizer, lr_at, train_step

# Ray Train sends its workers' log records (INFO and up) to the driver; print() would be shown twice.
log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
HISTORY_FILE = "metrics.jsonl"  # a record per logged step: loss (window mean), health figures, evaluation
STEPS_FILE = "steps.jsonl"  # every step's own [step, loss, lr, gradient norm]: what MLflow is reconciled with
STEP_KEYS = ("train/loss", "train/lr", "train/grad_norm")
KEYS_FOLDER = "keys"  # data.record_keys: every step's sample keys, a file per rank and checkpoint interval
_REASON_BYTES = 2048  # the longest data-error message sent from one rank to the others

# Dense bf16 peak FLOP/s of accelerators we know, for MFU (model FLOPs utilisation).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


class _DataErrorStop(Exception):
    """Raised on every rank at once, after they agreed that one of them met a data error."""


@dataclass
class _Fed:
    """What a step's micro-batches brought: images, undecodable samples, and this rank's data error if any."""

    images: int = 0
    bad: int = 0
    data_error: str | None = None
    keys: list[str] = field(default_factory=list)  # with data.record_keys: every sample read, used or rejected


@dataclass(frozen=True)
class TrainingPlan:
    """What the driver works out once and every worker needs."""

    config: dict
    total_steps: int
    micro_batch: int  # on scale.num_workers workers; a worker of another world size works out its own (_split_step)
    accum_steps: int
    streams: int  # logical data streams, fixed for the run (a resume takes them from its checkpoint)
    num_classes: int
    multi_label: bool
    train_samples: int
    eval_split: str | None
    name: str  # the run's folder under storage_path
    run_dir: str  # storage_path/name: a path or a URL
    tracking: dict | None = None  # a LiveTarget's fields: where rank 0 logs its metrics
    progress: Any = None  # a Ray queue: rank 0's log lines and steps, shown by the driver (pipelines.training.progress)


def train_worker(plan_dict: dict) -> dict:
    """The loop every Ray Train worker runs (Ray has set up the process group)."""
    import ray.train
    import ray.train.torch

    plan = TrainingPlan(**plan_dict)
    cfg = from_dict(CONFIGS[plan.config["recipe"]], plan.config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    loop = _Loop(cfg, plan, rank=rank, world=world, device=device)
    return loop.run()


class _Loop:
    def __init__(self, cfg: TrainConfig, plan: TrainingPlan, *, rank: int, world: int, device: torch.device):
        self.cfg, self.plan, self.rank, self.world, self.device = cfg, plan, rank, world, device
        torch.manual_seed(cfg.seed)  # every rank draws the same initial weights
        self.parallel = spread_model(cfg, plan.num_classes, plan.multi_label, rank=rank, world=world, device=device)
        self.model, self.wrapped, self.bf16 = self.parallel.model, self.parallel.wrapped, self.parallel.bf16
        self.flops_per_image = self.model.flops_per_image()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.ema = [p.detach().clone() for p in self.model.parameters()] if cfg.ema_decay else None
        self.step = 0
        self.streams = plan.streams
        self.micro, self.accum = _split_step(cfg, plan, self.streams, world)
        self.recorded: list[dict] = []  # data.record_keys: {step, rank, keys} not yet written
        self.history: list[dict] = []
        self.step_values: list[list[float]] = []  # [step, *STEP_KEYS] per step; ~40 bytes each in the checkpoint
        self.segments: list[list[int]] = []
        self.eval_metrics: dict[str, float] = {}
        self.progress = RankZeroProgress(plan.progress if rank == 0 else None)

    # -- setup

    def _loader(self, split: str, *, train: bool, start_batch: int = 0):
        cfg = self.cfg
        shards: ShardSet = open_shards(cfg.data.shards, split, cfg.data.storage_options)
        recipe = cfg.recipe if train else "eval"
        spec = StreamSpec(
            shards=shards,
            transform=build_transform(
                recipe,
                cfg.data.image_size,
                cfg.data.resize_size,
                flip=cfg.data.flip,
                crop_area_min=cfg.data.crop_area_min,
            ),
            batch_size=self.micro if train else (cfg.eval_batch_size or self.micro),
            seed=cfg.seed,
            rank=self.rank,
            world_size=self.world,
            # evaluation is one pass in any order: a stream per reader, as many as there are
            streams=self.streams if train else None,
            step_samples=cfg.batch_size if train else None,
            shuffle_block=cfg.data.shuffle_block if train else 1,
            repeat=train,
            start_batch=start_batch,
            recycle_batches=True,  # each batch is normalised into a new tensor before the next is asked for
            with_keys=train and cfg.data.record_keys,
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
            import ray

            how = f"resuming at step {first_step}" if first_step else "starting"
            where = f"{self.world} workers, rank 0 on node {ray.get_runtime_context().get_node_id()[:12]}"
            log.info("[vit] %s: %d steps (%s)", how, self.plan.total_steps, where)

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
        per_rank, loader_workers = self.streams // self.world, self.cfg.data.loader_workers
        if self.rank == 0 and loader_workers > 1 and per_rank % loader_workers:
            log.warning(
                "[vit] %d data streams per worker do not split over %d loader workers: each reads the bytes of the "
                "streams it shares and decodes only its own samples (data.streams: a multiple of %d avoids it)",
                per_rank,
                loader_workers,
                self.world * loader_workers,
            )
        batches = iter(self._loader(self.cfg.data.train_split, train=True, start_batch=self.step * self.accum))
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
        """One optimizer step over ``accum_steps`` micro-batches; None when the loss or gradients are not finite."""
        fed = _Fed()
        try:
            metrics = train_step(
                self.wrapped,
                self.optimizer,
                lr=lr,
                grad_clip_norm=self.cfg.optim.grad_clip_norm,
                micro_batches=self._micro_batches(batches, window, fed),
                accum_steps=self.accum,
                no_sync=self.parallel.no_sync,
                autocast=self.parallel.autocast,
                before_update=lambda: self._stop_on_data_error(fed.data_error),
            )
        except NonFiniteError as err:  # every rank sees the same global gradient norm, so all stop here
            window.last_reason = f"non-finite {err.what}"
            return None
        if self.ema is not None:
            with torch.no_grad():
                for avg, p in zip(self.ema, self.model.parameters()):
                    avg.lerp_(p.detach(), 1.0 - self.cfg.ema_decay)
        window.images += fed.images
        window.bad += fed.bad
        window.loss += metrics["train/loss"]
        window.steps += 1
        if self.cfg.data.record_keys:
            self.recorded.append({"step": self.step + 1, "rank": self.rank, "keys": fed.keys})
        return metrics

    def _micro_batches(self, batches: Iterator, window: _Window, fed: _Fed) -> Iterator[tuple[torch.Tensor, ...]]:
        """A step's micro-batches on the device. After a data error this rank goes on with empty ones: it must
        still take part in the step's collectives, and learns nothing; the ranks agree on the error afterwards."""
        for _ in range(self.accum):
            started = time.perf_counter()
            if fed.data_error is None:
                try:
                    images, targets, n_bad, *keys = next(batches)
                    if keys:
                        fed.keys.extend(keys[0])
                except ShardsError as err:  # this rank's shard is damaged; the others learn it before the update
                    fed.data_error = _data_error_message(err)
            if fed.data_error is not None:
                size = self.cfg.data.image_size
                images, targets, n_bad = torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0), 0
            window.data_seconds += time.perf_counter() - started
            fed.images += len(images)
            fed.bad += n_bad
            yield normalize(images.to(self.device, non_blocking=True)), targets.to(self.device, non_blocking=True)

    def _stop_on_data_error(self, reason: str | None) -> None:
        reason = self._agree_on_data_error(reason)
        if reason is not None:
            raise _DataErrorStop(reason)

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
        with self.parallel.autocast():
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
                    "batches_per_rank": self.step * self.accum,
                    "world_size": self.world,
                    "streams": self.streams,
                    "micro_batch": self.micro,
                    "accum_steps": self.accum,
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
        fs, path = filesystem(self.plan.run_dir, self.cfg.storage_options)
        if self.rank == 0:
            fs.pipe_file(posixpath.join(path, name, COMMITTED_FILE), str(self.step).encode())
        if self.recorded:
            # Written with the checkpoint they lead to: steps a restart trains again are never recorded twice.
            first, last = self.recorded[0]["step"], self.recorded[-1]["step"]
            folder = posixpath.join(path, KEYS_FOLDER)
            fs.makedirs(folder, exist_ok=True)
            lines = "".join(json.dumps(r) + "\n" for r in self.recorded)
            fs.pipe_file(posixpath.join(folder, f"rank{self.rank}-steps{first:08d}-{last:08d}.jsonl"), lines.encode())
            self.recorded = []

    @contextlib.contextmanager
    def _latest_checkpoint(self):
        """The folder of the newest complete checkpoint: Ray's registered one, or a newer committed one."""
        import ray.train

        registered = ray.train.get_checkpoint()
        registered_step = checkpoint_step(registered.path) if registered is not None else -1
        committed = latest_committed_checkpoint(self.plan.run_dir, self.cfg.storage_options)
        if committed is not None and checkpoint_step(committed) > registered_step:
            fs, path = filesystem(committed, self.cfg.storage_options)
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
        streams = trainer_state.get("streams")
        if streams is not None and streams != self.streams:  # the driver passes them on; Ray's elastic group may not
            self.streams = streams
            self.micro, self.accum = _split_step(self.cfg, self.plan, streams, self.world)
        if self.rank == 0 and trainer_state.get("world_size", self.world) != self.world:
            log.info(
                "[vit] resuming a run of %d workers on %d: %d data streams, %d per worker, micro-batches of %d x %d "
                "accumulation steps per step of %d",
                trainer_state["world_size"],
                self.world,
                self.streams,
                self.streams // self.world,
                self.micro,
                self.accum,
                self.cfg.batch_size,
            )
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
        with self._ema_weights():
            return self.parallel.full_weights()


def _split_step(cfg: TrainConfig, plan: TrainingPlan, streams: int, world: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) of one of ``world`` ranks for a global batch of ``cfg.batch_size``.

    The driver checked the world it planned for (``plan_training``); this is the worker's own view, the world Ray
    actually started. The micro-batch stays the planned one where it fits, so a rank that now serves more streams
    accumulates more micro-batches instead of holding more images at once."""
    if streams % world:
        raise ValueError(
            f"{world} workers cannot share the run's {streams} data streams evenly: resume it on "
            f"{workers_that_fit(streams)} workers"
        )
    per_worker = cfg.batch_size // world
    micro = cfg.micro_batch_size or math.gcd(plan.micro_batch, per_worker)
    if per_worker % micro:
        raise ValueError(f"micro_batch_size: {micro} does not divide the {per_worker} images per worker and step")
    return micro, per_worker // micro


def workers_that_fit(streams: int) -> str:
    """The worker counts a run of ``streams`` streams resumes on, in words: "1, 2 or 4"."""
    counts = [str(n) for n in range(1, streams + 1) if streams % n == 0]
    return counts[0] if len(counts) == 1 else f"{', '.join(counts[:-1])} or {counts[-1]}"


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
