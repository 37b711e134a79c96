"""Pipelines on a schedule, through Prefect 3: `vit schedule add|list|run|pause|resume|remove|serve|render`.

Cron parsing, persistence, missed and overlapping firings, run history and a UI are the scheduler's job, so a
schedule is a Prefect deployment of one flow, :func:`pipeline_flow`, tagged ``vit-schedule``, in a process work
pool whose worker (``vit schedule serve``) fires it. A firing runs the pipeline in the worker's process, or submits
it to the Ray cluster at its ``address`` and follows the job to its end; its outcome is the flow run's state.

* One firing per schedule at a time: the deployment's concurrency limit is 1 and a new firing that finds one
  running is cancelled by Prefect ("Deployment concurrency limit reached"); a firing that finds the workdir held
  by a run started elsewhere (`vit run` by hand) ends Cancelled with the holder in its message. Both show in the
  run history as skipped firings, not failures.
* The config is read when the schedule fires, from the path given to ``add`` (or a shipped name such as
  ``local``): edits apply to the next firing, and its credentials never enter Prefect's database. It is checked at
  ``add`` time, so a mistake fails there, with the same words as `vit run`.
* Without ``PREFECT_API_URL`` the scheduler is a local Prefect server on 127.0.0.1 whose store lives under the
  user's data folder (``$XDG_DATA_HOME/vit/prefect``), started by ``vit schedule serve``; with it, the team's server.

Kubernetes users get the same schedule as a RayCronJob from :func:`render_kuberay` (``concurrencyPolicy: Forbid``).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

TAG = "vit-schedule"
POOL = "vit-schedules"
FLOW_NAME = "vit-pipeline"
DEFAULT_PORT = 4200


class ScheduleError(RuntimeError):
    """A schedule that cannot be made or found, or a scheduler that cannot be reached."""


def data_dir() -> Path:
    """The user's data folder for this platform (XDG): where the local scheduler keeps its store."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vit"


def local_api_url() -> str:
    return f"http://127.0.0.1:{int(os.environ.get('VIT_SCHEDULE_PORT', DEFAULT_PORT))}/api"


def prepare_environment() -> str:
    """Point Prefect at the team's server (``PREFECT_API_URL``) or our local one; call before importing prefect.

    Never a temporary server: without this, a Prefect client that finds no API URL silently starts one on the
    same database, and a schedule added there would be fired by nobody."""
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "1")
    if not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_API_URL"] = local_api_url()
        os.environ.setdefault("PREFECT_HOME", str(data_dir() / "prefect"))
    return os.environ["PREFECT_API_URL"]


prepare_environment()

from prefect import flow, get_run_logger  # noqa: E402  (after the environment above)
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.actions import WorkPoolCreate  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    DeploymentFilter,
    DeploymentFilterTags,
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import (  # noqa: E402
    ConcurrencyLimitConfig,
    ConcurrencyLimitStrategy,
    StateType,
)
from prefect.client.schemas.sorting import FlowRunSort  # noqa: E402
from prefect.exceptions import ObjectNotFound  # noqa: E402
from prefect.schedules import Cron  # noqa: E402
from prefect.states import Cancelled, Completed  # noqa: E402
from prefect.types.entrypoint import EntrypointType  # noqa: E402

# ------------------------------------------------------------------------------------------- the firing


@flow(name=FLOW_NAME, log_prints=False, validate_parameters=True)
def pipeline_flow(
    config: str | None = None,
    overrides: list[str] | None = None,
    address: str | None = None,
    directory: str | None = None,
):
    """One firing: the pipeline in this process, or as a Ray Job at ``address`` followed to its end. It runs in
    ``directory``, where the schedule was added, so relative paths (``workdir: runs/demo``, the ``./mlflow.db``
    store) mean what they meant to `vit run` there, not the worker's temporary folder."""
    logger = get_run_logger()
    overrides = list(overrides or [])
    if directory:
        if not Path(directory).is_dir():
            raise ScheduleError(f"the schedule's folder {directory} is gone: add the schedule again from another")
        os.chdir(directory)
    if address:
        return _fire_on_cluster(config, overrides, address, logger.info)
    return _fire_here(config, overrides, logger.info)


def _fire_here(config: str | None, overrides: list[str], say: Callable[[str], None]):
    from pipelines.orchestration.config import load_pipeline_config
    from pipelines.orchestration.lease import WorkdirBusyError
    from pipelines.orchestration.workflow import run_pipeline

    cfg = load_pipeline_config(config, overrides)
    started = time.perf_counter()
    try:
        result = run_pipeline(cfg, log=say)
    except WorkdirBusyError as err:
        return Cancelled(message=f"skipped: {err}")
    seconds = time.perf_counter() - started
    ran = ", ".join(result.ran) or "nothing (every step cached)"
    run = f"; MLflow run {result.mlflow_run_id}" if result.mlflow_run_id else ""
    return Completed(message=f"ran {ran} in {seconds:.1f} s{run}")


def _fire_on_cluster(config: str | None, overrides: list[str], address: str, say: Callable[[str], None]):
    from pipelines.orchestration.config import find_config
    from pipelines.orchestration.jobs import job_logs, submit_pipeline, wait_for_job

    path = None
    if config is not None:
        found = find_config(config)
        if found is None:
            raise ScheduleError(f"config {config!r}: no such file and no shipped config of that name")
        path = str(found)
    job_id = submit_pipeline(path, overrides, address=address, log=say)
    say(f"submitted Ray Job {job_id} to {address}")
    info = wait_for_job(address, job_id)
    say(job_logs(address, job_id)[-20_000:])
    if info.status != "SUCCEEDED":
        raise ScheduleError(f"Ray Job {job_id} ended {info.status}: {info.message or ''}".strip())
    return Completed(message=f"Ray Job {job_id} succeeded on {address}")


# ------------------------------------------------------------------------------------------- managing schedules


@dataclass
class ScheduleInfo:
    name: str
    cron: str
    timezone: str
    paused: bool
    config: str | None
    overrides: list[str]
    address: str | None
    directory: str | None  # where it was added: relative paths of its config resolve there
    next_firing: str | None  # ISO time of the next scheduled firing
    last_firing: str | None
    last_state: str | None  # e.g. "Completed", "Cancelled", "Failed"
    last_message: str | None  # its reason, or the pipeline's MLflow run


def add_schedule(
    name: str,
    config: str | None,
    cron: str,
    *,
    timezone: str = "UTC",
    address: str | None = None,
    overrides: Sequence[str] = (),
    replace: bool = False,
) -> ScheduleInfo:
    """Create (or with ``replace``, update) the schedule ``name``; checks everything a firing would need first."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from pipelines.common.config import apply_overrides
    from pipelines.common.redaction import secret_fields
    from pipelines.orchestration.config import find_config, load_pipeline_config

    if not name or "/" in name:
        raise ScheduleError(f"schedule name {name!r}: give a name without '/'")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"--timezone {timezone!r}: not an IANA time zone (e.g. UTC, Europe/Berlin)") from None
    try:
        schedule = Cron(cron, timezone=timezone)
    except ValueError as err:
        raise ScheduleError(f"--cron {cron!r}: not a cron expression ({_first_line(err)})") from None
    stored = None
    if config is not None:
        found = find_config(config)
        if found is None:
            raise ScheduleError(f"config {config!r}: no such file and no shipped config of that name")
        # a shipped config by name (it moves with the package); a file by absolute path (the worker's cwd differs)
        stored = config if not Path(config).is_file() else str(Path(config).resolve())
    found = secret_fields(apply_overrides({}, overrides))
    if found:
        raise ScheduleError(
            f"override {found[0]}: a credential; it would be stored in the scheduler's database, readable by anyone "
            "who can open Prefect. Give it to the process that fires (the environment of `vit schedule serve`: "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, an instance profile) or keep it in the config file"
        )
    load_pipeline_config(stored, list(overrides))  # the mistakes `vit run` would refuse, refused now
    with _client() as client:
        _ensure_pool(client)
        if not replace and _find(client, name) is not None:
            raise ScheduleError(f"schedule {name!r} exists; `vit schedule remove {name}` first, or add --replace")
    deployment = pipeline_flow.to_deployment(
        name,
        schedules=[schedule],
        parameters={"config": stored, "overrides": list(overrides), "address": address, "directory": os.getcwd()},
        work_pool_name=POOL,
        entrypoint_type=EntrypointType.MODULE_PATH,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        tags=[TAG],
        paused=False,
        description=f"`vit run {stored or ''} {' '.join(overrides)}`".replace("  ", " ")
        + (f" submitted to {address}" if address else " in the worker's process"),
    )
    deployment.apply()
    return get_schedule(name)


def list_schedules() -> list[ScheduleInfo]:
    with _client() as client:
        deployments = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[TAG])))
        return sorted((_info(client, d) for d in deployments), key=lambda s: s.name)


def get_schedule(name: str) -> ScheduleInfo:
    with _client() as client:
        return _info(client, _require(client, name))


def fire(name: str, *, wait: bool = False, timeout: float | None = None) -> tuple[str, str, str | None]:
    """Fire ``name`` now: ``(flow run id, state, its message)``, the state it ended in with ``wait``."""
    from prefect.deployments import run_deployment

    with _client() as client:
        _require(client, name)
    run = run_deployment(f"{FLOW_NAME}/{name}", timeout=0, as_subflow=False)
    deadline = None if timeout is None else time.monotonic() + timeout
    with _client() as client:
        while wait and not (run.state and run.state.is_final()):
            if deadline is not None and time.monotonic() > deadline:
                raise ScheduleError(f"flow run {run.id} of {name!r} did not end within {timeout:.0f} s")
            time.sleep(1)
            run = client.read_flow_run(run.id)
    state = run.state
    return str(run.id), state.name if state else "Scheduled", state.message if state else None


@dataclass
class Firing:
    id: str
    state: str
    message: str | None
    expected: str | None  # ISO times
    started: str | None
    ended: str | None


def history(name: str, limit: int = 10) -> list[Firing]:
    """The last ``limit`` firings of ``name`` (running or ended), newest first, skipped ones included, each with
    its reason."""
    every = [state for state in StateType if state != StateType.SCHEDULED]  # those are the next firings
    with _client() as client:
        runs = _runs(client, _require(client, name).id, every, FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit)

    def iso(moment) -> str | None:
        return moment.isoformat() if moment else None

    return [
        Firing(
            id=str(run.id),
            state=run.state.name if run.state else "unknown",
            message=run.state.message if run.state else None,
            expected=iso(run.expected_start_time),
            started=iso(run.start_time),
            ended=iso(run.end_time),
        )
        for run in runs
    ]


def pause(name: str) -> int:
    """Pause ``name`` and cancel its firings already due (Prefect keeps those, and one could still run)."""
    with _client() as client:
        deployment = _require(client, name)
        client.pause_deployment(deployment.id)
        due = _runs(client, deployment.id, [StateType.SCHEDULED], FlowRunSort.EXPECTED_START_TIME_ASC, limit=100)
        for run in due:
            client.set_flow_run_state(run.id, Cancelled(message="schedule paused"), force=True)
        return len(due)


def resume(name: str) -> None:
    with _client() as client:
        client.resume_deployment(_require(client, name).id)


def remove(name: str, *, force: bool = False) -> None:
    """Delete ``name``; refused while a firing runs (deleting it then fails the firing at its end) unless ``force``."""
    with _client() as client:
        deployment = _require(client, name)
        running = _runs(client, deployment.id, [StateType.RUNNING, StateType.PENDING], FlowRunSort.START_TIME_DESC)
        if running and not force:
            raise ScheduleError(f"schedule {name!r} is firing now (flow run {running[0].id}); wait, or --force")
        client.delete_deployment(deployment.id)


# ------------------------------------------------------------------------------------------- serving


def serve(*, log: Callable[[str], None] = print, stop_after: float | None = None) -> None:
    """Fire the schedules until interrupted: a Prefect worker on the pool (and, without ``PREFECT_API_URL`` set
    by the user, the local Prefect server on 127.0.0.1 first). ``stop_after``: seconds, for tests."""
    processes: list[subprocess.Popen] = []
    url = os.environ["PREFECT_API_URL"]
    # SIGTERM (systemd, kill, a container stopping) ends us through the finally below, which stops the worker
    # and the server we started: they run in sessions of their own, so nothing else would.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if url == local_api_url() and not _healthy(url):
            home = Path(os.environ["PREFECT_HOME"])
            home.mkdir(parents=True, exist_ok=True)
            port = url.rsplit(":", 1)[1].split("/")[0]
            log(f"starting the local scheduler on {url} (store: {home})")
            server_log = open(home / "server.log", "ab")  # noqa: SIM115  (open for the server's lifetime)
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
                    stdout=server_log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            _wait_healthy(url, processes[0], timeout=120)
        elif not _healthy(url):
            raise ScheduleError(f"no Prefect server answers at {url} (PREFECT_API_URL)")
        with _client() as client:
            _ensure_pool(client)
        log(f"firing the schedules of pool {POOL!r} from {url}; Ctrl-C to stop")
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"],
            start_new_session=True,
        )
        processes.append(worker)
        deadline = None if stop_after is None else time.monotonic() + stop_after
        while worker.poll() is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.5)
        if worker.returncode not in (None, 0):
            raise ScheduleError(f"the Prefect worker exited with code {worker.returncode}")
    finally:
        for process in reversed(processes):  # the worker first: it may still report a run's end to the server
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # Ctrl-C: how each expects to be stopped
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:  # Prefect's worker can sit on SIGINT; a firing it ran
                    process.kill()  # is marked crashed by the server, and the schedule goes on


# ------------------------------------------------------------------------------------------- Kubernetes


def render_kuberay(name: str, *, image: str = "vit-platform:latest", gpu_nodes: int = 8) -> str:
    """The schedule ``name`` as a KubeRay RayCronJob plus the ConfigMap of its config (credentials left out:
    on Kubernetes they come from the ``vit-s3`` Secret)."""
    import yaml

    from pipelines.orchestration.config import find_config
    from pipelines.orchestration.package import config_without_secrets

    info = get_schedule(name)
    config_text = ""
    if info.config is not None:
        found = find_config(info.config)
        if found is None:
            raise ScheduleError(f"schedule {name!r}: its config {info.config!r} is gone")
        config_text, _ = config_without_secrets(found.read_text())
    slug = "vit-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    config_file = ["/etc/vit/pipeline.yaml"] if info.config else []
    entrypoint = " ".join(["python -m pipelines.cli run", *config_file, *map(shlex.quote, info.overrides)])
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{slug}-config"},
        "data": {"pipeline.yaml": config_text},
    }
    # As infra/kuberay: Ray's token authentication on every container (its Jobs API runs code for whoever reaches
    # it), and credentials only from Secrets: S3, and the pipeline's MLflow login.
    secrets = {
        "env": [
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "vit-ray-token", "key": "auth_token"}}},
        ],
        "envFrom": [{"secretRef": {"name": "vit-s3"}}, {"secretRef": {"name": "mlflow-client"}}],
    }
    container = {
        "image": image,
        **secrets,
        "volumeMounts": [{"name": "pipeline-config", "mountPath": "/etc/vit"}],
    }
    cron_job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCronJob",
        "metadata": {"name": slug},
        "spec": {
            "schedule": info.cron,
            "timeZone": info.timezone,
            "concurrencyPolicy": "Forbid",  # as `vit schedule`: one firing at a time
            "suspend": info.paused,
            "jobTemplate": {
                "entrypoint": entrypoint,
                "submissionMode": "K8sJobMode",
                "shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": 3600,
                "rayClusterSpec": {
                    "rayVersion": "2.60.0",
                    "authOptions": {"mode": "token", "secretName": "vit-ray-token"},
                    "headGroupSpec": {
                        "rayStartParams": {},
                        "template": {
                            "spec": {
                                "containers": [{"name": "ray-head", **container}],
                                "volumes": [{"name": "pipeline-config", "configMap": {"name": f"{slug}-config"}}],
                            }
                        },
                    },
                    "workerGroupSpecs": [
                        {
                            "groupName": "gpu",
                            "replicas": gpu_nodes,
                            "minReplicas": 0,
                            "maxReplicas": gpu_nodes,
                            "rayStartParams": {},
                            "template": {
                                "spec": {
                                    "containers": [
                                        {
                                            "name": "ray-worker",
                                            "image": image,
                                            "resources": {"limits": {"nvidia.com/gpu": "8"}},
                                            **secrets,
                                        }
                                    ]
                                }
                            },
                        }
                    ],
                },
            },
        },
    }
    header = (
        f"# `vit schedule render {name} --target kuberay`: the schedule {info.cron!r} ({info.timezone}) as a KubeRay\n"
        "# RayCronJob (KubeRay >= 1.6, RayCronJob feature gate on). kubectl apply -n vit -f this file.\n"
        "# Secrets it reads (infra/kuberay/rayjob-pipeline.yaml says how to make them): vit-ray-token, vit-s3,\n"
        "# mlflow-client.\n"
    )
    if "@sha256:" not in image:
        header += f"# The image {image} is not pinned by digest: pass --image REGISTRY/vit-platform:TAG@sha256:...\n"
    return header + yaml.dump_all([config_map, cron_job], Dumper=_literal_dumper(), sort_keys=False)


# ------------------------------------------------------------------------------------------- helpers


def _literal_dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        """Multi-line strings as ``|`` blocks: the ConfigMap's config reads as the file it came from."""

    def text(dumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return Dumper


def _client():
    url = os.environ["PREFECT_API_URL"]
    if not _healthy(url):
        hint = "start `vit schedule serve`" if url == local_api_url() else "check PREFECT_API_URL"
        raise ScheduleError(f"no scheduler answers at {url}: {hint}")
    return get_client(sync_client=True)


def _healthy(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(url):
            return
        if process.poll() is not None:
            raise ScheduleError(f"the local Prefect server exited with code {process.returncode}; see its server.log")
        time.sleep(0.5)
    raise ScheduleError(f"the local Prefect server did not answer at {url} within {timeout:.0f} s")


def _ensure_pool(client) -> None:
    try:
        client.read_work_pool(POOL)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))


def _find(client, name: str):
    try:
        return client.read_deployment_by_name(f"{FLOW_NAME}/{name}")
    except ObjectNotFound:
        return None


def _require(client, name: str):
    deployment = _find(client, name)
    if deployment is None or TAG not in (deployment.tags or []):
        raise ScheduleError(f"no schedule {name!r} (`vit schedule list` shows them)")
    return deployment


def _runs(client, deployment_id, states: list[StateType], sort: FlowRunSort, limit: int = 1) -> list:
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states)),
        ),
        sort=sort,
        limit=limit,
    )


def _info(client, deployment) -> ScheduleInfo:
    cron = timezone = ""
    for entry in deployment.schedules or []:
        cron, timezone = getattr(entry.schedule, "cron", ""), getattr(entry.schedule, "timezone", "") or "UTC"
    upcoming = _runs(client, deployment.id, [StateType.SCHEDULED], FlowRunSort.EXPECTED_START_TIME_ASC)
    ended = [StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED, StateType.RUNNING]
    last = _runs(client, deployment.id, ended, FlowRunSort.EXPECTED_START_TIME_DESC)
    parameters = deployment.parameters or {}
    return ScheduleInfo(
        name=deployment.name,
        cron=cron,
        timezone=timezone,
        paused=bool(deployment.paused),
        config=parameters.get("config"),
        overrides=list(parameters.get("overrides") or []),
        address=parameters.get("address"),
        directory=parameters.get("directory"),
        next_firing=None if deployment.paused else _next_firing(upcoming, cron, timezone),
        last_firing=(last[0].start_time or last[0].expected_start_time).isoformat() if last else None,
        last_state=last[0].state.name if last and last[0].state else None,
        last_message=last[0].state.message if last and last[0].state else None,
    )


def _next_firing(upcoming: list, cron: str, timezone: str) -> str | None:
    """The first scheduled firing; before Prefect's scheduler has made it (it runs every few seconds after an
    ``add``), the next time the cron names."""
    if upcoming:
        return upcoming[0].expected_start_time.isoformat()
    if not cron:
        return None
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from cronsim import CronSim  # Prefect's own cron library

    return next(CronSim(cron, datetime.now(ZoneInfo(timezone or "UTC")))).isoformat()


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
