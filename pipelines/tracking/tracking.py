"""MLflow at the edge: a run per training or evaluation, live metrics from rank 0, lineage and artifacts.

    tracker = Tracker.open(cfg.tracking)            # None when tracking is off
    run_id = tracker.start_run(key=run_dir, name="pretrain Mu/8 on synth", tags={...})
    ... workers log through LiveMetrics(target) ...
    tracker.sync_metrics(run_id, history)           # re-send whatever the server missed

The tracking server is not allowed to stop training. Rank 0 hands its metrics to a background thread
(``LiveMetrics``) that batches them to the server; while the server is down or slow it keeps them,
warns once per outage and retries. At the end the driver compares the run's metric history in MLflow
with the history the checkpoints hold and sends what is missing, retrying for ``retry_seconds``. A run
is found again by its ``vit.key`` tag, so a resumed training continues the same MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipelines.common.redaction import redact
from pipelines.data.shards.format import dataset_fingerprint  # noqa: F401  (re-exported for the training driver)

log = logging.getLogger(__name__)
T = TypeVar("T")

KEY_TAG = "vit.key"  # what a run is found again by: a training's run folder, an evaluation's fingerprint
NOT_PARAMS = ("storage_options",)  # where data lives and how to reach it, not how a model was trained
_BATCH = 1000  # MLflow takes at most 1000 metrics per log_batch
_STEP_KEY = "train/loss"  # logged at every training step: the run's last step is its last point


class TrackingError(RuntimeError):
    """The tracking server cannot be reached (or refused a request) when it is needed."""


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "": MLFLOW_TRACKING_URI, else a sqlite store ./mlflow.db in the current directory
    experiment: str = "vit"
    system_metrics: bool = True  # CPU/GPU/memory of the rank-0 training worker, every 10 s
    retry_seconds: float = 120.0  # how long the end of a run keeps retrying an unreachable server


def tracking_uri(cfg: TrackingConfig) -> str:
    """The configured URI; a local default is made absolute, because Ray workers run in other folders."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{os.path.abspath('mlflow.db')}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{os.path.abspath(uri.removeprefix('sqlite:///'))}"
    return uri


def local_artifact_location(sqlite_uri: str) -> str:
    """``sqlite:////home/alice/proj/mlflow.db`` -> ``file:///home/alice/proj/mlartifacts``.

    Built by ``Path.as_uri``: a hand-joined ``file://`` + ``//home/...`` is read by MLflow as host ``home`` and
    path ``/alice/proj/...``, which lands the artifacts outside the project (at the filesystem root)."""
    database = Path(sqlite_uri.removeprefix("sqlite:///"))
    return (database.resolve().parent / "mlartifacts").as_uri()


def flatten(config: dict) -> dict[str, str]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}``, without storage options and secrets."""
    return _flatten(redact(config, drop=True), "")


def _flatten(config: dict, prefix: str) -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in config.items():
        if key in NOT_PARAMS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict, type(None), bool)) else str(value)
    return flat


def metrics_of(record: dict) -> dict[str, float]:
    """The MLflow metrics of a history record (its ``step`` is the x axis, ``epoch`` a metric of its own)."""
    out = {}
    for key, value in record.items():
        if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        out["train/epoch" if key == "epoch" else key] = float(value)
    return out


class Tracker:
    """The driver's side: runs, params, metrics reconciliation, lineage and artifacts, all retried."""

    def __init__(self, cfg: TrackingConfig):
        # MLflow's own default retries an unreachable server for about 4 minutes per request; our callers
        # retry for `retry_seconds` themselves, and the first contact should fail fast and clearly.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        # Each step already says where its run is; MLflow's "View run ... at" lines on every run's end would
        # double the pipeline's log on a server.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        from mlflow import MlflowClient

        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        self.client = MlflowClient(self.uri)
        try:
            self.experiment_id = self._experiment(cfg.experiment)
        except Exception as err:  # connection refused, timeouts, a non-MLflow server: all mean "not usable"
            raise TrackingError(
                f"tracking.uri: MLflow at {self.uri} cannot be used ({_short(err)}); start the server, "
                "point tracking.uri or MLFLOW_TRACKING_URI elsewhere, or set tracking.enabled=false"
            ) from None

    @classmethod
    def open(cls, cfg: TrackingConfig) -> Tracker | None:
        return cls(cfg) if cfg.enabled else None

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.artifact_location.startswith("file:////"):  # made by an older version: see local_artifact_location
                log.warning(
                    "experiment %r of %s keeps its artifacts at %s, which MLflow reads as a path under the "
                    "filesystem root; pick a new experiment name (tracking.experiment) to keep them beside the store",
                    name, self.uri, found.artifact_location,
                )  # fmt: skip
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # a local store keeps its artifacts beside the database
            location = local_artifact_location(self.uri)
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:
            found = self.client.get_experiment_by_name(name)  # another process created it meanwhile
            if found is None:
                raise
            return found.experiment_id

    # -- runs

    def start_run(
        self,
        *,
        key: str,
        name: str,
        parent_id: str | None = None,
        tags: dict[str, str] | None = None,
        description: str = "",
    ) -> str:
        """The run tagged ``key`` (restarted if it had stopped), else a new one; returns its id."""
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if description:
            tags["mlflow.note.content"] = description
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        existing = self.find_run(key)
        if existing is not None:
            run_id = existing.info.run_id
            self.retry(lambda: self.client.update_run(run_id, status="RUNNING"))
            for tag, value in tags.items():
                self.retry(lambda t=tag, v=value: self.client.set_tag(run_id, t, v))
            return run_id
        run = self.retry(lambda: self.client.create_run(self.experiment_id, run_name=name, tags={KEY_TAG: key, **tags}))
        return run.info.run_id

    def find_run(self, key: str):
        escaped = key.replace("'", "\\'")
        runs = self.retry(
            lambda: self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{escaped}'", max_results=1
            )
        )
        return runs[0] if runs else None

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.retry(lambda: self.client.set_terminated(run_id, status=status))

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self.retry(lambda: self.client.log_batch(run_id, tags=batch))

    def log_params(self, run_id: str, config: dict) -> None:
        """The resolved config, one param per dotted field; values already logged are left alone."""
        from mlflow.entities import Param

        logged = self.retry(lambda: self.client.get_run(run_id)).data.params
        params = [Param(k, v[:6000]) for k, v in flatten(config).items() if k not in logged]
        for i in range(0, len(params), 100):
            self.retry(lambda chunk=params[i : i + 100]: self.client.log_batch(run_id, params=chunk))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.retry(lambda: self.client.log_batch(run_id, metrics=batch))

    def sync_metrics(self, run_id: str, records: Iterable[dict]) -> int:
        """Send every (key, step) of ``records`` that the run does not have yet; returns how many were missing.
        Idempotent: run it again after an outage and it sends nothing twice."""
        from mlflow.entities import Metric

        wanted: dict[str, dict[int, float]] = {}
        for record in records:
            for key, value in metrics_of(record).items():
                wanted.setdefault(key, {})[int(record["step"])] = value
        missing = []
        now = int(time.time() * 1000)
        for key, values in wanted.items():
            have = {m.step for m in self.retry(lambda k=key: self.client.get_metric_history(run_id, k))}
            missing += [Metric(key, v, now, step) for step, v in sorted(values.items()) if step not in have]
        for i in range(0, len(missing), _BATCH):
            self.retry(lambda chunk=missing[i : i + _BATCH]: self.client.log_batch(run_id, metrics=chunk))
        return len(missing)

    def last_logged_step(self, run_id: str, key: str = _STEP_KEY) -> int:
        history = self.retry(lambda: self.client.get_metric_history(run_id, key))
        return max((m.step for m in history), default=-1)

    # -- lineage and artifacts

    def log_dataset(self, run_id: str, url: str, *, context: str, digest: str, name: str) -> None:
        """``url`` as the run's input (MLflow's dataset lineage), identified by the shards' fingerprint."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        source_url = url if "://" in url else Path(url).resolve().as_uri()
        scheme = source_url.split("://", 1)[0]
        # MLflow's own names for the source kinds ("local" for files); the source as its artifact sources write it.
        dataset = Dataset(
            name=name,
            digest=digest[:36],
            source_type={"file": "local"}.get(scheme, scheme),
            source=json.dumps({"uri": source_url}),
        )
        entry = DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])
        self.retry(lambda: self.client.log_inputs(run_id, datasets=[entry]))

    def log_dict(self, run_id: str, data: dict, artifact_file: str) -> None:
        self.retry(lambda: self.client.log_dict(run_id, data, artifact_file))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.retry(lambda: self.client.log_text(run_id, text, artifact_file))

    def log_file(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.retry(lambda: self.client.log_artifact(run_id, path, artifact_path))

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        self.retry(lambda: self.client.log_figure(run_id, figure, artifact_file))

    def run_url(self, run_id: str) -> str | None:
        if not self.uri.startswith("http"):
            return None
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    # -- retries

    def retry(self, fn: Callable[[], T]) -> T:
        """``fn()``, retried with exponential backoff (1 s doubling to 15 s) for up to ``retry_seconds`` while the
        server is unreachable or failing; one warning when it starts failing, one when it answers again."""
        import tenacity

        warned = False

        def warn(state: tenacity.RetryCallState) -> None:
            nonlocal warned
            if not warned:
                err = state.outcome.exception()
                log.warning("MLflow at %s failed (%s); retrying for up to %.0f s", self.uri, _short(err),
                            self.cfg.retry_seconds)  # fmt: skip
                warned = True

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_transient),
            wait=tenacity.wait_exponential(multiplier=1, min=1, max=15),
            stop=tenacity.stop_before_delay(self.cfg.retry_seconds),
            before_sleep=warn,
            reraise=True,
        )
        try:
            result = retrying(fn)
        except Exception as err:
            raise TrackingError(f"MLflow at {self.uri}: {_short(err)}") from err
        if warned:
            log.warning("MLflow at %s answers again", self.uri)
        return result


def _transient(err: Exception) -> bool:
    """Connection trouble and server errors are worth retrying; a request MLflow rejects is not."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(err, RestException):
        return err.get_http_status_code() >= 500
    if isinstance(err, MlflowException):
        text = str(err)
        return any(s in text for s in ("API request", "Max retries", "Connection", "timed out", "503", "502"))
    return isinstance(err, OSError)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) < 300 else text[:300] + "..."


# ------------------------------------------------------------------------------------------------------ worker side


@dataclass(frozen=True)
class LiveTarget:
    """What rank 0 needs to log live: plain values, so it travels in the training plan."""

    uri: str
    run_id: str
    system_metrics: bool = True
    skip_through_step: int = -1  # a resumed run: steps up to here are in MLflow already


class LiveMetrics:
    """Rank 0's metrics to MLflow from a background thread, so a slow or absent server never stalls a step.

    Values wait in memory while the server is unreachable (one warning per outage) and go out once it
    answers; whatever is still waiting at ``close`` is handed back for the driver to send.

    Every step goes to MLflow once, also across a restarted worker group: before its first send, this rank asks
    the server for the last step the run holds and drops its own values up to it. Those are the steps between
    the checkpoint the group resumed from and the moment the previous rank 0 stopped, which it had already sent
    (the driver's ``skip_through_step`` is read once, before Ray Train starts any group)."""

    def __init__(self, target: LiveTarget, *, flush_seconds: float | None = None):
        # One request must fail fast here: this thread retries on its own schedule and never blocks training.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
        from mlflow import MlflowClient

        self.target = target
        self.client = MlflowClient(target.uri)
        # How often values go out: VIT_MLFLOW_FLUSH_SECONDS where the workers run (default 5 s, a request per 5 s)
        self.flush_seconds = flush_seconds or float(os.environ.get("VIT_MLFLOW_FLUSH_SECONDS") or 5.0)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: list = []  # mlflow Metric entities not yet accepted by the server
        self.outage_since: float | None = None
        self.logged_through: int | None = None  # the run's last step on the server, asked before the first send
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._run, name="vit-mlflow", daemon=True)
        self.thread.start()
        self.monitor = None
        if target.system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self.monitor = SystemMetricsMonitor(target.run_id, sampling_interval=10, tracking_uri=target.uri)
                self.monitor.start()
            except Exception as err:  # psutil missing, or no server yet: the training does not depend on it
                log.warning("[vit] no system metrics: %s", _short(err))
                self.monitor = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step > self.target.skip_through_step and metrics:
            self.inbox.put((step, int(time.time() * 1000), metrics))

    def close(self, timeout: float = 30.0) -> list[dict]:
        """Send what is left (for up to ``timeout`` s); returns the records the server did not take."""
        if self.monitor is not None:
            with contextlib.suppress(Exception):  # its last sample is not worth failing the run over
                self.monitor.finish()
        self.closing.set()
        self.thread.join(timeout)
        self._drain()
        unsent: dict[int, dict] = {}
        for m in self.pending:
            unsent.setdefault(m.step, {"step": m.step})[m.key] = m.value
        if unsent:
            log.warning(
                "[vit] MLflow at %s took no metrics for %d steps: the driver sends them at the end",
                self.target.uri,
                len(unsent),
            )
        return list(unsent.values())

    def _drain(self) -> None:
        from mlflow.entities import Metric

        while True:
            try:
                step, stamp, metrics = self.inbox.get_nowait()
            except queue.Empty:
                return
            self.pending += [Metric(k, float(v), stamp, step) for k, v in metrics.items()]

    def _drop_already_logged(self) -> None:
        if self.logged_through is None:
            history = self.client.get_metric_history(self.target.run_id, _STEP_KEY)
            self.logged_through = max((m.step for m in history), default=-1)
            if self.logged_through > self.target.skip_through_step:
                log.info("[vit] MLflow holds steps through %d already: sending from the next", self.logged_through)
        self.pending = [m for m in self.pending if m.step > self.logged_through]

    def _run(self) -> None:
        wait = self.flush_seconds
        while True:
            closing = self.closing.wait(wait)
            self._drain()
            while self.pending:
                try:
                    self._drop_already_logged()
                    chunk = self.pending[:_BATCH]
                    if chunk:
                        self.client.log_batch(self.target.run_id, metrics=chunk)
                except Exception as err:
                    if self.outage_since is None:
                        self.outage_since = time.monotonic()
                        log.warning(
                            "[vit] MLflow at %s unreachable (%s): keeping metrics in memory and retrying; "
                            "training goes on",
                            self.target.uri,
                            _short(err),
                        )
                    break
                del self.pending[: len(chunk)]
                if self.outage_since is not None:
                    log.warning(
                        "[vit] MLflow answers again after %.0f s; buffered metrics sent",
                        time.monotonic() - self.outage_since,
                    )
                    self.outage_since = None
            if closing:
                return
            wait = self.flush_seconds if self.outage_since is None else min(wait * 2, 30.0)


# ------------------------------------------------------------------------------------------------------ helpers


def training_curves(history: list[dict], title: str = ""):
    """A figure of loss, learning rate, held-out accuracy and throughput over the steps of ``history``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    from matplotlib.figure import Figure

    panels = [
        ("train/loss", "training loss"),
        ("train/lr", "learning rate"),
        ("eval/top1", "held-out top-1"),
        ("train/images_per_s", "images/s"),
    ]
    figure = Figure(figsize=(10, 6.5), layout="constrained")
    for i, (key, label) in enumerate(panels):
        ax = figure.add_subplot(2, 2, i + 1)
        points = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    return figure
