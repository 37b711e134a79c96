"""The pipeline: corpus -> shard -> pretrain -> finetune -> evaluate -> register, as one cached workflow.

    cfg = load_pipeline_config("local", ["pretrain.steps=600"])   # pipelines.orchestration.config
    result = run_pipeline(cfg)                    # skips every step already done with these settings
    run_pipeline(cfg, start_from="finetune")      # re-runs finetune and what follows, on purpose
    run_pipeline(cfg, only="evaluate")            # re-runs one step on the cached outputs of the others

Each step has a fingerprint: its own settings plus the identity of what it consumes (a corpus's
listing, the shards' content fingerprint, the checkpoint it starts from), so new data re-runs the steps
it affects: sharding (incrementally for new images), fine-tuning, evaluation and registration;
pretraining only with ``pretrain.rerun_on_new_data``. One run holds the workdir at a time (its lease).
A step whose state file under ``{workdir}/pipeline/`` records that fingerprint as done is skipped; a step
that failed (or whose process died) runs again under the same names, so training resumes from its last checkpoint and
sharding from its last finished shard. The same code runs locally (a local Ray, a sqlite MLflow store,
local folders) and on a cluster (``vit submit``; the workdir and the store then live on shared storage).

In MLflow the pipeline is a parent run, with a child run per step that did work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipelines.common.config import ConfigError, to_dict
from pipelines.common.ray import init_ray
from pipelines.common.storage import filesystem, write_atomically
from pipelines.evaluation.evaluate import EvaluateConfig, EvaluationSettings, run_evaluation
from pipelines.orchestration.config import DatasetConfig, PipelineConfig
from pipelines.orchestration.lease import WorkdirLease
from pipelines.tracking.tracking import Tracker
from pipelines.training.driver import run_training

STEPS = ("corpus", "shard", "pretrain", "finetune", "evaluate", "register")
Step = Literal["corpus", "shard", "pretrain", "finetune", "evaluate", "register"]


# Settings that change how a step runs or reports, not what it makes: a change re-runs nothing.
_NOT_IN_FINGERPRINT = (
    "tracking", "name", "storage_path", "storage_options", "loader_workers", "log_every", "rerun_on_new_data",
)  # fmt: skip


class StepFailedError(RuntimeError):
    """A step raised; its state says so, and the next run of the pipeline picks it up again."""


def _failure(err: BaseException) -> str:
    """What went wrong, in a line: the error a Ray task raised rather than Ray's wrapper with the remote traceback,
    and the path of a missing or unreadable file even where the error's text leaves it out (``[Errno 2] No such
    file or directory`` from a subprocess or a storage client)."""
    cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError carries the task's own exception
    if isinstance(cause, BaseException) and type(err).__name__.startswith("RayTaskError"):
        err = cause
    text = f"{type(err).__name__}: {err}"
    filename = getattr(err, "filename", None)
    if isinstance(err, OSError) and filename and str(filename) not in text:
        text += f": {filename}"
    return text


@dataclass
class PipelineResult:
    workdir: str
    outputs: dict[str, dict]  # each step's outputs
    ran: list[str]  # steps that did work in this call (the others were cached or not part of the pipeline)
    cached: list[str]
    seconds: dict[str, float]
    mlflow_run_id: str | None
    tracking_uri: str | None


def run_pipeline(
    cfg: PipelineConfig,
    *,
    start_from: str | None = None,
    only: str | None = None,
    break_lock: bool = False,
    log: Callable[[str], None] = print,
) -> PipelineResult:
    """Run the steps in order; see the module docstring for what is cached and what runs again.

    The run holds the workdir's lease throughout (``pipelines.orchestration.lease``): a second pipeline on the
    same workdir stops at once with a ``WorkdirBusyError`` naming this one. ``break_lock`` takes the lease from a
    holder the operator knows to be gone."""
    for name, value in (("--from", start_from), ("--only", only)):
        if value is not None and value not in STEPS:
            raise ConfigError(f"{name}: no step {value!r} (steps: {', '.join(STEPS)})")
    forced = set(STEPS[STEPS.index(start_from) :]) if start_from else set()
    if only:
        forced = {only}
    runner = _Runner(cfg, forced=forced, only=only, log=log)
    with WorkdirLease(
        runner.workdir, cfg.storage_options, ttl=cfg.lease_seconds, break_lock=break_lock, log=log
    ) as runner.lease:
        return runner.run()


class _Runner:
    def __init__(self, cfg: PipelineConfig, *, forced: set[str], only: str | None, log: Callable[[str], None]):
        self.cfg, self.forced, self.only, self.log = cfg, forced, only, log
        self.workdir = cfg.workdir if "://" in cfg.workdir else str(Path(cfg.workdir).resolve())
        self.fs, self.root = filesystem(self.workdir, cfg.storage_options)
        self.tracker = Tracker.open(cfg.tracking)
        self.outputs: dict[str, dict] = {}
        self.ran: list[str] = []
        self.cached: list[str] = []
        self.seconds: dict[str, float] = {}
        self.parent_id: str | None = None
        self.lease: WorkdirLease | None = None

    def path(self, *parts: str) -> str:
        return posixpath.join(self.workdir, *parts)

    # -- the steps' state

    def _state_file(self, step: str) -> str:
        return posixpath.join(self.root, "pipeline", f"{step}.json")

    def load_state(self, step: str) -> dict:
        try:
            return json.loads(self.fs.cat_file(self._state_file(step)))
        except FileNotFoundError:
            return {}

    def save_state(self, step: str, state: dict) -> None:
        self.fs.makedirs(posixpath.dirname(self._state_file(step)), exist_ok=True)
        self.fs.pipe_file(self._state_file(step), json.dumps(state, indent=1).encode())

    # -- the run

    def run(self) -> PipelineResult:
        cfg = self.cfg
        if self.tracker is not None:
            settings = {k: v for k, v in to_dict(cfg).items() if k != "tracking"}
            key = "pipeline:" + _digest([self.workdir, settings])
            self.parent_id = self.tracker.start_run(
                key=key,
                name=f"pipeline {cfg.name}",
                tags={"vit.step": "pipeline", "vit.workdir": self.workdir},
                description=(
                    f"The `{cfg.name}` pipeline in `{self.workdir}`: "
                    + " -> ".join(s for s in STEPS if self._applies(s))
                    + ". Each step that did work is a child run; a cached step points to its earlier run."
                ),
            )
            self.tracker.log_params(self.parent_id, settings)
        failed = None
        try:
            last = STEPS.index(self.only) if self.only else len(STEPS) - 1
            for number, step in enumerate(STEPS[: last + 1], 1):  # --only: the later steps' turn comes next run
                if not self._applies(step):
                    self.outputs[step] = {}
                    continue
                if self.lease is not None:
                    self.lease.check()
                self._run_step(step, number)
        except BaseException as err:
            failed = err
            raise
        finally:
            if self.tracker is not None and self.parent_id is not None:
                status = "FINISHED" if failed is None else "FAILED"
                try:
                    self.tracker.finish(self.parent_id, status)
                except Exception as err:  # the step's own error is the one to report
                    self.log(f"warning: could not close the pipeline's MLflow run: {err}")
        return PipelineResult(
            workdir=self.workdir,
            outputs=self.outputs,
            ran=self.ran,
            cached=self.cached,
            seconds=self.seconds,
            mlflow_run_id=self.parent_id,
            tracking_uri=self.tracker.uri if self.tracker else None,
        )

    def _applies(self, step: str) -> bool:
        if step == "pretrain":
            return self.cfg.pretrain is not None
        if step == "corpus":
            return any(d.source in ("synth", "digits") for d in self._datasets().values())
        return True

    def _datasets(self) -> dict[str, DatasetConfig]:
        datasets = {"finetune": self.cfg.finetune_data}
        if self.cfg.pretrain is not None:
            datasets = {"pretrain": self.cfg.pretrain_data, **datasets}
        return datasets

    def _why_reshard(self, line: str) -> None:
        """Of the sharding job's lines (those of `vit shard`), the pipeline passes on why it re-shards all."""
        if "full re-shard" in line:
            self.log(f"      {line}")

    def _corpus_of(self, which: str) -> str | None:
        """The corpus a dataset is sharded from: made by the corpus step, or its source (None: given as shards)."""
        data = self.cfg.pretrain_data if which == "pretrain" else self.cfg.finetune_data
        if data.source in ("synth", "digits"):
            return self.outputs.get("corpus", {}).get(f"corpus_{which}")
        return data.source or None

    def _evaluation_images(self) -> list[str]:
        """The fine-tuning corpus's evaluation split as a folder of images (``{corpus}/{evaluate.split}``), which
        the pretraining data is de-duplicated against; none when the fine-tuning data has no such folder."""
        corpus = self._corpus_of("finetune")
        if corpus is None:
            return []
        folder = posixpath.join(corpus.rstrip("/"), self.cfg.evaluate.split)
        fs, path = filesystem(folder, self._data_options("finetune"))
        if not fs.isdir(path):
            self.log(f"      no {self.cfg.evaluate.split}/ folder in {corpus}: not de-duplicated against it")
            return []
        return [folder]

    def _data_options(self, which: str) -> dict:
        """fsspec options for a dataset's corpus and shards: its own, else the workdir's (where they go by default).
        Always passed on explicitly: Ray workers may not share the driver's environment (credentials, endpoints)."""
        data = self.cfg.pretrain_data if which == "pretrain" else self.cfg.finetune_data
        return data.storage_options or self.cfg.storage_options

    def _shards_name(self, which: str) -> str:
        """A dataset's shards are named after its source (MLflow shows the name), unless both share one."""
        names = {w: posixpath.basename(d.source.rstrip("/")) or w for w, d in self._datasets().items()}
        return names[which] if list(names.values()).count(names[which]) == 1 else f"{names[which]}-{which}"

    def _run_step(self, step: str, number: int) -> None:
        inputs = self._inputs(step)
        fingerprint = _digest([step, inputs])
        state = self.load_state(step)
        done = state.get("status") == "done" and state.get("fingerprint") == fingerprint
        label = f"[{number}/{len(STEPS)}] {step}"
        if step not in self.forced and (done and self._outputs_exist(state.get("outputs", {}))):
            self.outputs[step] = state["outputs"]
            self.cached.append(step)
            self.log(f"{label}: done earlier with these settings (fingerprint {fingerprint}); skipped")
            if self.tracker is not None and self.parent_id and state.get("mlflow_run_id"):
                self.tracker.set_tags(self.parent_id, {f"vit.cached.{step}": state["mlflow_run_id"]})
            return
        if self.only and step != self.only:
            raise ConfigError(
                f"--only {self.only}: step {step!r} has no finished output for these settings; run the pipeline "
                f"without --only first"
            )
        # A step that failed (or whose process died) with these settings runs again under the same names,
        # and so resumes; a step re-run on purpose starts afresh.
        forced = step in self.forced
        resume = state.get("fingerprint") == fingerprint and state.get("status") != "done" and not forced
        attempt = state.get("attempt", fingerprint) if resume else _attempt_name(fingerprint, state, forced)
        if resume:
            self.log(f"{label}: resuming the attempt that stopped ({state.get('error') or 'the process ended'})")
        state = {"step": step, "fingerprint": fingerprint, "attempt": attempt, "status": "running", "inputs": inputs}
        state["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.save_state(step, state)
        started = time.perf_counter()
        try:
            outputs = getattr(self, f"_step_{step}")(label, attempt, inputs)
        except BaseException as err:
            self.save_state(step, {**state, "status": "failed", "error": _failure(err)[:2000]})
            if isinstance(err, (ConfigError, KeyboardInterrupt)):
                raise
            raise StepFailedError(f"step {step} failed: {_failure(err)}") from err
        self.seconds[step] = time.perf_counter() - started
        self.outputs[step] = outputs
        self.ran.append(step)
        finished = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.save_state(step, {**state, "status": "done", "finished": finished, "outputs": outputs})

    def _outputs_exist(self, outputs: dict) -> bool:
        """A cached step's folders must still be there (someone may have deleted a run)."""
        for key in ("run_dir", "shards_pretrain", "shards_finetune"):
            location = outputs.get(key)
            if location:
                which = key.removeprefix("shards_")
                options = self.cfg.storage_options if key == "run_dir" else self._data_options(which)
                fs, path = filesystem(location, options)
                if not fs.exists(path):
                    return False
        return True

    def _inputs(self, step: str) -> dict:
        """What a step's fingerprint covers: its settings and the identity of what it consumes."""
        cfg = self.cfg

        def settings(section) -> dict:
            data = to_dict(section)
            for noise in _NOT_IN_FINGERPRINT:
                data.pop(noise, None)
            return data

        shard = self.outputs.get("shard", {})
        if step == "corpus":
            return {k: settings(d) for k, d in self._datasets().items() if d.source in ("synth", "digits")}
        if step == "shard":
            return {
                "datasets": {k: settings(d) for k, d in self._datasets().items()},
                "corpus": self.outputs.get("corpus", {}),
                "content": self._source_listings(),
            }
        if step == "pretrain":
            inputs = {"config": settings(cfg.pretrain), "data": shard.get("fingerprint_pretrain")}
            earlier = self.load_state("pretrain")
            reusable = earlier.get("status") == "done" and earlier.get("inputs", {}).get("config") == inputs["config"]
            if reusable and not cfg.pretrain.rerun_on_new_data and earlier["inputs"]["data"] != inputs["data"]:
                self.log(
                    "pretrain: the pretraining data changed since the last pretraining with these settings; reusing "
                    "it (pretrain.rerun_on_new_data is false: pretraining is the expensive step)"
                )
                inputs["data"] = earlier["inputs"]["data"]
            return inputs
        if step == "finetune":
            start = self.outputs.get("pretrain", {}).get("checkpoint") or cfg.finetune.init_from
            return {"config": settings(cfg.finetune), "data": shard.get("fingerprint_finetune"), "from": start}
        if step == "evaluate":
            return {"config": settings(cfg.evaluate), "model": self.outputs["finetune"].get("checkpoint")}
        return {"config": settings(cfg.register), "model": self.outputs["finetune"].get("checkpoint")}

    def _source_listings(self) -> dict[str, str]:
        """Each given corpus's content as listed (path, size, ETag/version or mtime per object; no bytes read):
        new, changed or deleted images change the shard step's fingerprint, and so the steps that consume the
        shards (pretraining only with ``pretrain.rerun_on_new_data``). Corpora the pipeline makes are fixed by
        their settings."""
        from pipelines.common.storage import list_files, listing_fingerprint

        listings = {}
        for which, data in self._datasets().items():
            if data.source and data.source not in ("synth", "digits"):
                listings[which] = listing_fingerprint(list_files(data.source, self._data_options(which)))
        return listings

    # -- the steps

    def _step_corpus(self, label: str, attempt: str, inputs: dict) -> dict:
        from pipelines.data.corpus import import_digits, synth_corpus

        outputs = {}
        for which, data in self._datasets().items():
            if data.source == "synth":
                s = data.synth
                dst = self.path("corpus", "synth")
                kind = "handwritten glyphs" if s.style == "glyphs" else "drawn shapes"
                self.log(f"{label}: a synthetic JFT-style corpus of {kind}, {s.images} images of {s.classes} classes")
                # every field of the config is an argument of synth_corpus, under the same name
                synth_corpus(
                    dst, **dataclasses.asdict(s), workers=2, storage_options=self.cfg.storage_options, overwrite=True
                )
            elif data.source == "digits":
                dst = self.path("corpus", "digits")
                self.log(f"{label}: the 1,797 real handwritten digits bundled with scikit-learn")
                import_digits(dst, storage_options=self.cfg.storage_options, overwrite=True)
            else:
                continue
            outputs[f"corpus_{which}"] = dst
        self._child_run("corpus", "prepare the corpora", inputs, {}, description="The corpora the pipeline makes.")
        return outputs

    def _step_shard(self, label: str, attempt: str, inputs: dict) -> dict:
        from pipelines.data.shards import shard_corpus
        from pipelines.data.shards.format import dataset_fingerprint

        init_ray()  # by the first step that needs it: a pipeline whose steps are all cached needs none
        outputs: dict[str, Any] = {}
        metrics: dict[str, float] = {}
        for which, data in self._datasets().items():
            made = data.source in ("synth", "digits")
            source = self.outputs["corpus"].get(f"corpus_{which}") if made else data.source
            dst = data.shards or self.path("shards", self._shards_name(which))
            options = self._data_options(which)
            if source:
                self.log(f"{label}: sharding {source} with Ray Data")
                eval_sets = self._evaluation_images() if which == "pretrain" and data.dedup_against_eval else []
                if eval_sets:
                    self.log(f"      without near-duplicates of the evaluation images in {eval_sets[0]}")
                shard_cfg = data.shard_config(src=source, dst=dst, storage_options=options, eval_sets=eval_sets)
                summary = shard_corpus(shard_cfg, log=self._why_reshard)
                metrics.update({f"{which}/read": summary.read, f"{which}/written": summary.written})
                metrics.update({f"{which}/rejected": summary.rejected, f"{which}/shards": summary.shards})
                metrics[f"{which}/generation"] = summary.generation
                how = {"full": "", "confirmed": "; unchanged", "incremental": f"; {summary.new:,} new images"}
                self.log(
                    f"      {summary.written:,} written + {summary.rejected:,} rejected = {summary.read:,} read, "
                    f"in {summary.shards} shards ({', '.join(f'{k} {v:,}' for k, v in summary.splits.items())}); "
                    f"generation {summary.generation}{how.get(summary.mode, '')}"
                )
            outputs[f"shards_{which}"] = dst
            outputs[f"fingerprint_{which}"] = dataset_fingerprint(dst, options)
        self._child_run("shard", "shard the corpora", inputs, metrics, description="Corpora into WebDataset shards.")
        return outputs

    def _training_config(self, which: str, attempt: str):
        """The pipeline's ``pretrain`` or ``finetune`` section, pointed at its shards and at the pipeline's runs."""
        cfg = dataclasses.replace(getattr(self.cfg, which))
        cfg.data = dataclasses.replace(cfg.data, shards=self.outputs["shard"][f"shards_{which}"])
        cfg.data.storage_options = cfg.data.storage_options or self._data_options(which)
        cfg.storage_path, cfg.name, cfg.tracking = self.path("runs"), f"{which}-{attempt}", self.cfg.tracking
        cfg.storage_options = cfg.storage_options or self.cfg.storage_options
        return cfg

    def _step_pretrain(self, label: str, attempt: str, inputs: dict) -> dict:
        cfg = self._training_config("pretrain", attempt)
        self.log(f"{label}: ViT-{cfg.model} on the pretraining shards, {cfg.scale.num_workers} Ray Train workers")
        init_ray()
        with _section("pretrain"):
            result = run_training(cfg, log=self._indent, parent_run_id=self.parent_id)
        top1 = result.metrics.get("eval/top1")
        if top1 is not None:
            self.log(f"      held-out top-1 of pretraining: {top1:.2%}")
        return {
            "run_dir": result.run_dir,
            "checkpoint": result.checkpoint,
            "mlflow_run_id": result.mlflow_run_id,
            "metrics": result.metrics,
        }

    def _step_finetune(self, label: str, attempt: str, inputs: dict) -> dict:
        cfg = self._training_config("finetune", attempt)
        pretrained = self.outputs.get("pretrain", {})
        cfg.init_from = pretrained.get("checkpoint") or cfg.init_from
        tags = {"vit.pretrain_run_id": pretrained["mlflow_run_id"]} if pretrained.get("mlflow_run_id") else {}
        self.log(f"{label}: from {cfg.init_from}: a new zero-initialised head, the paper's SGD recipe")
        init_ray()
        with _section("finetune"):
            result = run_training(cfg, log=self._indent, parent_run_id=self.parent_id, tags=tags)
        return {
            "run_dir": result.run_dir,
            "checkpoint": result.checkpoint,
            "model_path": result.model_path,
            "mlflow_run_id": result.mlflow_run_id,
            "metrics": result.metrics,
            "image_size": cfg.data.image_size,
            "resize_size": cfg.data.resize_size,
        }

    def _step_evaluate(self, label: str, attempt: str, inputs: dict) -> dict:
        tuned, ev = self.outputs["finetune"], self.cfg.evaluate
        shards = self.outputs["shard"]["shards_finetune"]
        self.log(f"{label}: top-1/top-5 on the {ev.split} split, and {'/'.join(map(str, ev.shots))}-shot linear")
        cfg = EvaluateConfig(
            **{f.name: getattr(ev, f.name) for f in dataclasses.fields(EvaluationSettings)},
            model=tuned["checkpoint"],
            shards=shards,
            storage_options=self._data_options("finetune"),
            tracking=self.cfg.tracking,
            # what the pretraining added: its frozen features few-shot, against the architecture at random init
            pretrained=self.outputs.get("pretrain", {}).get("checkpoint", ""),
        )
        cfg.resize_size = self._evaluation_resize()
        tags = {"vit.finetune_run_id": tuned["mlflow_run_id"]} if tuned.get("mlflow_run_id") else {}
        # on a GPU worker when the cluster has one: the driver that runs this step usually has none
        result = run_evaluation(cfg, log=self._indent, parent_run_id=self.parent_id, tags=tags, on_cluster=True)
        outputs = {"metrics": result.metrics, "mlflow_run_id": result.mlflow_run_id}
        if result.top1_correct is not None:  # for the paired comparison with the champion when registering
            per_image = self.path("evaluations", f"{attempt}.npz")
            buffer = io.BytesIO()
            np.savez(buffer, top1_correct=result.top1_correct, labels=result.labels)
            fs, path = filesystem(per_image, self._data_options("finetune"))
            write_atomically(fs, path, buffer.getvalue())
            outputs["per_image"] = per_image
        return outputs

    def _step_register(self, label: str, attempt: str, inputs: dict) -> dict:
        reg, tuned = self.cfg.register, self.outputs["finetune"]
        if self.tracker is None or not tuned.get("mlflow_run_id"):
            self.log(f"{label}: tracking is off; nothing to register")
            return {}
        import mlflow

        from pipelines.data.stream import read_classes, read_info
        from pipelines.registry.model_card import CARD_FILE, card_summary, render_model_card
        from pipelines.registry.registry import log_vit_model, promote, register_model
        from pipelines.training.weights import local_weights

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the step's log line says enough
        run_id = tuned["mlflow_run_id"]
        metrics = self.outputs["evaluate"]["metrics"]
        shards = self.outputs["shard"]["shards_finetune"]
        options = self._data_options("finetune")
        mlflow.set_tracking_uri(self.tracker.uri)
        # The evaluation's figures go onto the run that made the model: the registry compares runs by them.
        self.tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if k != "eval/seconds"})
        if not self.tracker.client.get_run(run_id).outputs.model_outputs:  # a retried step logs it once
            with mlflow.start_run(run_id=run_id):
                log_vit_model(
                    local_weights(tuned["model_path"], options),
                    read_classes(shards, options),
                    image_size=tuned["image_size"],
                    resize_size=tuned.get("resize_size"),
                    multi_label=read_info(shards, options).get("multi_label", False),
                )
        version = register_model(run_id, reg.model_name, metric=reg.metric)
        self.log(f"{label}: {reg.model_name} version {version.version} ({reg.metric} {metrics.get(reg.metric, 0):.4g})")
        weights = local_weights(tuned["model_path"], options)
        inspection = self._log_inspection(version, weights, shards, options)
        # The card goes on the run the version points to, so `vit registry show NAME VERSION` finds it from the
        # version alone; written before promoting, whose decision the description then keeps after the summary.
        card = self._model_card(version, weights, read_classes(shards, options), inspection)
        self.tracker.log_text(version.run_id, render_model_card(card), CARD_FILE)
        earlier = (version.description or "").partition("\n\nPromotion: ")
        described = card_summary(card) + (f"\n\nPromotion: {earlier[2]}" if earlier[1] else "")
        self.tracker.retry(
            lambda: self.tracker.client.update_model_version(reg.model_name, version.version, description=described)
        )
        outputs = {"model_name": reg.model_name, "version": str(version.version), "promoted": False}
        if reg.promote:
            evidence = self._paired_comparison(str(version.version))
            decision = promote(reg.model_name, str(version.version), metric=reg.metric, evidence=evidence)
            outputs["promoted"] = bool(decision.promoted)
            outputs["promotion"] = {"reason": decision.reason, **(decision.evidence or {})}
            self.log(f"      {'champion' if decision.promoted else 'not promoted'}: {decision.reason}")
        self._child_run("register", f"register {reg.model_name} v{version.version}", inputs, {}, tags={
            "vit.model_name": reg.model_name, "vit.model_version": str(version.version),
            "vit.finetune_run_id": run_id,
        })  # fmt: skip
        return outputs

    def _evaluation_resize(self) -> int | None:
        """What the evaluate step resizes to before its central crop: its own setting, else as fine-tuned."""
        return self.cfg.evaluate.resize_size or self.outputs["finetune"].get("resize_size")

    def _log_inspection(self, version, weights: str, shards: str, options: dict) -> list[str]:
        """`vit inspect` of the version on a few of the test images it was evaluated on, logged on its run."""
        from pipelines.evaluation.inspect import EvaluationSet, log_inspection
        from pipelines.registry.model_card import INSPECTION_DIR

        split = self.cfg.evaluate.split
        evaluation = EvaluationSet(shards, split, "the pipeline's evaluate step", self._evaluation_resize())
        uri = f"models:/{self.cfg.register.model_name}/{version.version}"
        logged, images = log_inspection(self.tracker, version.run_id, uri, weights, evaluation, options)
        self.log(f"      inspection of {images} {split} images: {INSPECTION_DIR}/inspection.html")
        return logged

    def _model_card(self, version, weights: str, classes: list[str], inspection: list[str]):
        """The facts of the registered version's card, from the steps' outputs and the config (``model_card``)."""
        from pipelines.registry.model_card import DatasetFacts, ModelCard, RecipeFacts

        shard, tuned, evaluated = self.outputs["shard"], self.outputs["finetune"], self.outputs["evaluate"]
        pretrained = self.outputs.get("pretrain", {})
        variant, parameters = _variant_and_parameters(weights)
        datasets = [
            DatasetFacts(
                role={"pretrain": "pretraining", "finetune": "fine-tuning"}[which],
                source=data.source or data.shards,
                shards=shard[f"shards_{which}"],
                fingerprint=shard.get(f"fingerprint_{which}"),
            )
            for which, data in self._datasets().items()
        ]
        recipes = []
        for which in ("pretrain", "finetune"):
            train = getattr(self.cfg, which)
            if train is None:
                continue
            recipes.append(
                RecipeFacts(
                    stage=which,
                    steps=train.steps,
                    epochs=train.epochs,
                    batch_size=train.batch_size,
                    optimizer=train.optim.name,
                    lr=train.optim.lr,
                    weight_decay=train.optim.weight_decay,
                    schedule=train.optim.schedule,
                    warmup_steps=train.optim.warmup_steps,
                    image_size=train.data.image_size,
                    resize_size=train.data.resize_size,
                )
            )
        correct = None
        if evaluated.get("per_image"):  # the exact count: eval/top1 is a rounded float
            fs, path = filesystem(evaluated["per_image"], self._data_options("finetune"))
            with fs.open(path, "rb") as f:
                correct = int(np.load(io.BytesIO(f.read()), allow_pickle=False)["top1_correct"].sum())
        lineage = {
            "pipeline run": self.parent_id,
            "pretraining run": pretrained.get("mlflow_run_id"),
            "pretraining checkpoint": pretrained.get("checkpoint"),
            "fine-tuning run (this version's run)": tuned.get("mlflow_run_id"),
            "fine-tuning checkpoint": tuned.get("checkpoint"),
            "fine-tuned from": None if pretrained else self.cfg.finetune.init_from,
            "evaluation run": evaluated.get("mlflow_run_id"),
            "per-image evaluation scores": evaluated.get("per_image"),
            "logged model": version.source,
        }
        return ModelCard(
            model_name=self.cfg.register.model_name,
            version=str(version.version),
            variant=variant,
            parameters=parameters,
            image_size=tuned["image_size"],
            resize_size=tuned.get("resize_size"),
            classes=list(classes),
            datasets=datasets,
            recipes=recipes,
            split=self.cfg.evaluate.split,
            metrics={k: v for k, v in evaluated["metrics"].items() if k != "eval/seconds"},
            top1_correct=correct,
            lineage={k: str(v) for k, v in lineage.items() if v},
            inspection=inspection,
        )

    def _paired_comparison(self, challenger_version: str):
        """The champion re-scored on the challenger's evaluation images, paired image by image with the
        challenger's own scores (``pipelines.evaluation.compare``); None when there is nothing to compare on
        evidence (no champion yet, it is this version, a metric other than eval/top1, or no per-image scores)."""
        import tempfile

        from pipelines.evaluation.compare import paired_bootstrap
        from pipelines.evaluation.evaluate import top1_correct
        from pipelines.registry.registry import champion_weights

        reg, evaluated = self.cfg.register, self.outputs["evaluate"]
        if reg.metric != "eval/top1" or not evaluated.get("per_image"):
            return None
        fs, path = filesystem(evaluated["per_image"], self._data_options("finetune"))
        with fs.open(path, "rb") as f:
            scores = np.load(io.BytesIO(f.read()), allow_pickle=False)
            challenger, labels = scores["top1_correct"], scores["labels"]
        with tempfile.TemporaryDirectory(prefix="vit-champion-") as tmp:
            found = champion_weights(reg.model_name, tmp)
            if found is None or found[0] == challenger_version:
                return None
            version, weights, preprocessing = found
            cfg = EvaluateConfig(
                **{f.name: getattr(self.cfg.evaluate, f.name) for f in dataclasses.fields(EvaluationSettings)},
                model=str(weights),
                shards=self.outputs["shard"]["shards_finetune"],
                storage_options=self._data_options("finetune"),
            )
            cfg.image_size, cfg.resize_size = preprocessing.get("image_size"), preprocessing.get("resize_size")
            self.log(f"      re-scoring the {reg.model_name} champion (version {version}) on the same images")
            try:
                champion, champion_labels = top1_correct(cfg)
            except ValueError as err:  # e.g. a head for other classes: it cannot be scored on this set
                self.log(f"      the champion cannot be scored on this set ({err}): compared by metric alone")
                return None
        if not np.array_equal(labels, champion_labels):
            raise RuntimeError("the champion was scored on other images than the challenger: no fair comparison")
        return paired_bootstrap(
            champion, challenger, confidence=reg.confidence, min_improvement=reg.min_improvement,
            resamples=reg.resamples,
        )  # fmt: skip

    # -- helpers

    def _child_run(self, step: str, name: str, inputs: dict, metrics: dict, *, tags=None, description="") -> None:
        if self.tracker is None:
            return
        run_id = self.tracker.start_run(
            key=f"{step}:{_digest([self.workdir, inputs])}",
            name=name,
            parent_id=self.parent_id,
            tags={"vit.step": step, **(tags or {})},
            description=description,
        )
        if metrics:
            self.tracker.log_metrics(run_id, metrics)
        self.tracker.log_dict(run_id, inputs, "inputs.json")
        self.tracker.finish(run_id)

    def _indent(self, message: str) -> None:
        self.log("      " + message)


@contextlib.contextmanager
def _section(name: str):
    """A training's config errors name its field in the pipeline's config (``pretrain.optim.warmup_steps``)."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"{name}.{err}") from None


def _variant_and_parameters(weights: str) -> tuple[str, int]:
    """A checkpoint's named size (``"Mu/8"``) and parameter count, from the safetensors header alone."""
    from safetensors import safe_open

    from vit.variants import size_of_width

    with safe_open(weights, framework="pt") as f:
        config = json.loads((f.metadata() or {}).get("config", "{}"))
        parameters = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118
    width, patch = config.get("width"), config.get("patch_size")
    size = size_of_width(width) if width else None
    variant = f"{size}/{patch}" if size else f"width {width}, depth {config.get('depth')}, patch {patch}"
    if config.get("resnet_layers"):  # a hybrid: its patch size is that of the stem's feature map
        variant = f"hybrid (ResNet stem {tuple(config['resnet_layers'])}) + {variant}"
    return variant, parameters


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _attempt_name(fingerprint: str, previous: dict, forced: bool) -> str:
    """The folder suffix of a step's runs: the fingerprint, plus a time stamp when re-run on purpose."""
    if forced and previous:
        return f"{fingerprint}-{time.strftime('%Y%m%d-%H%M%S')}"
    return fingerprint
