"""Running the pipeline on a Ray cluster as a Ray Job, and watching and managing jobs, through Ray's public
``JobSubmissionClient``: the Python API behind ``vit submit`` and ``vit jobs`` (``pipelines.cli.jobs``).

    job_id = submit_pipeline("my-pipeline.yaml", ["finetune.steps=10000"], address="http://head:8265")
    job_logs("http://head:8265", job_id, follow=True)
    list_jobs(address) | job_status(address, job_id) | wait_for_job(address, job_id) | stop_job(address, job_id)

A job is the ``vit run`` command executed by the cluster in a copy of the local working directory (the code as it is
here, uncommitted edits included). The config travels as text in the ``VIT_PIPELINE_YAML`` environment variable and
the job reads it with ``vit run env:VIT_PIPELINE_YAML``, so it never depends on a path that exists only on this
machine; ``pipelines.orchestration.package`` builds and checks what a job takes along. The Jobs API is the
dashboard's HTTP server on the head node (port 8265 by default), which needs ``ray[default]`` on the cluster.

Ray itself is imported inside the functions: ``vit --help`` and the other commands stay fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipelines.orchestration.package import (
    CONFIG_ENV,
    JobsError,
    check_overrides,
    check_overrides_carry_no_secrets,
    check_results_reachable,
    config_credentials_warning,
    package_size,
    pipeline_entrypoint,
    pipeline_runtime_env,
)

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

__all__ = [
    "DEFAULT_ADDRESS",
    "JobInfo",
    "JobsError",
    "default_address",
    "default_job_id",
    "job_logs",
    "job_status",
    "list_jobs",
    "normalize_address",
    "stop_job",
    "submit_pipeline",
    "wait_for_job",
]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
_DASHBOARD_HINT = (
    "the Jobs API is served by the Ray dashboard on the head node (http://HOST:8265 by default); the cluster needs "
    "ray[default] and a head started with the dashboard (ray start --head --dashboard-host 0.0.0.0)"
)

T = TypeVar("T")


@dataclass(frozen=True)
class JobInfo:
    """What the cluster knows about one job, with times in seconds since the epoch (Ray reports milliseconds)."""

    job_id: str  # the submission id; for a driver that connected without submitting, Ray's job id
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    message: str
    entrypoint: str
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        """True once the job can no longer change (it succeeded, failed or was stopped)."""
        return self.status in ("SUCCEEDED", "FAILED", "STOPPED")

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to end, or to now while it runs."""
        if self.start_time is None:
            return None
        return (self.end_time or time.time()) - self.start_time

    @classmethod
    def from_details(cls, details: Any) -> JobInfo:
        """From Ray's ``JobDetails`` (a pydantic model whose fields moved between versions: read them defensively)."""

        def seconds(ms: int | None) -> float | None:
            return ms / 1000.0 if ms else None

        status = getattr(details, "status", "UNKNOWN")
        return cls(
            job_id=getattr(details, "submission_id", None) or getattr(details, "job_id", None) or "?",
            status=str(getattr(status, "value", status)),
            message=getattr(details, "message", None) or "",
            entrypoint=getattr(details, "entrypoint", None) or "",
            start_time=seconds(getattr(details, "start_time", None)),
            end_time=seconds(getattr(details, "end_time", None)),
            exit_code=getattr(details, "driver_exit_code", None),
            metadata=dict(getattr(details, "metadata", None) or {}),
        )


# --------------------------------------------------------------------------------------------------------------------
# addresses and the client


def default_address() -> str:
    """``$RAY_API_SERVER_ADDRESS`` or ``$RAY_ADDRESS`` when it is a dashboard URL, else the local head's dashboard.

    ``RAY_ADDRESS`` often holds a GCS address (``host:6379``) for ``ray.init``; that is no Jobs API, so it is only
    taken when it is an http(s) URL.
    """
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "").strip()
        if value.lower().startswith(("http://", "https://")):
            return value.rstrip("/")
    return DEFAULT_ADDRESS


def normalize_address(address: str) -> str:
    """``address`` as the client is given it: an http(s) dashboard URL (or a ``ray://`` client address, which Ray
    maps to its dashboard); ``JobsError`` for anything else.

    A bare ``host:port`` is read as ``http://host:port``: Ray would take it for a GCS address and spend 40 s timing
    out when it is the dashboard's port, the usual case.
    """
    address = (address or "").strip().rstrip("/")
    if not address:
        raise JobsError(f"no cluster address: pass --address URL (a Ray dashboard, e.g. {DEFAULT_ADDRESS})")
    if "://" not in address:
        address = f"http://{address}"
    scheme = address.split("://", 1)[0].lower()
    if scheme not in ("http", "https", "ray"):
        raise JobsError(f"address {address!r}: expected an http(s):// URL of the Ray dashboard; {_DASHBOARD_HINT}")
    return address


def _probe(address: str, timeout: float = 10.0) -> None:
    """Check that ``address`` is a Ray dashboard before Ray's client tries it.

    Ray's client sends its requests without a timeout (a port that accepts but never answers would hang it) and
    words its errors for Ray developers; this check fails within ``timeout`` and says what to do.
    """
    import http.client
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{address}/api/version", timeout=timeout) as response:
            body = response.read(65536)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return  # a dashboard that wants the cluster's token: the client sends it
        raise JobsError(
            f"{address} answered HTTP {err.code} to /api/version: it is not a Ray dashboard; {_DASHBOARD_HINT}"
        ) from None
    except http.client.HTTPException:  # e.g. Ray's GCS port: it answers, in gRPC
        raise JobsError(f"{address} does not answer in HTTP: it is not a Ray dashboard; {_DASHBOARD_HINT}") from None
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise JobsError(f"cannot reach a Ray dashboard at {address} ({reason}); {_DASHBOARD_HINT}") from None
    try:
        json.loads(body)["ray_version"]
    except (ValueError, KeyError, TypeError):
        raise JobsError(
            f"{address} answered /api/version without a Ray version: it is not a Ray dashboard; {_DASHBOARD_HINT}"
        ) from None


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    """Ray's client lets ``RAY_ADDRESS`` / ``RAY_API_SERVER_ADDRESS`` override the address it is given; here the
    address the user passed (or its documented default) wins."""
    saved = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _local_token() -> str | None:
    """The token this machine holds for Ray clusters: ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names, or
    ``~/.ray/auth_token`` (where ``ray start`` keeps a new cluster's)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _client(address: str) -> JobSubmissionClient:
    """A connected ``JobSubmissionClient``; every failure to get one is a ``JobsError`` naming the address.

    New clusters run with token authentication, but Ray's client sends the token only when ``RAY_AUTH_MODE`` is
    ``token`` in the user's own environment (``ray start`` sets it for the cluster, not for the shell). So a cluster
    that asks for a token gets the local one, in the header the dashboard reads (the client's public ``headers``)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = normalize_address(address)
    if not address.startswith("ray://"):
        _probe(address)
    headers: dict[str, str] | None = None
    for attempt in range(2):
        try:
            with _without_address_env():
                return JobSubmissionClient(address, headers=headers)
        except AuthenticationError:
            token = _local_token()
            if attempt == 0 and token:
                headers = {"Authorization": f"Bearer {token}"}
                continue
            raise JobsError(
                f"the cluster at {address} requires its authentication token: put it in ~/.ray/auth_token "
                "(or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)"
            ) from None
        except Exception as err:  # requests, aiohttp and Ray raise many kinds; all mean "not usable"
            raise JobsError(f"cannot use the Jobs API at {address}: {err}; {_DASHBOARD_HINT}") from None
    raise AssertionError("unreachable")


def _request(address: str, job_id: str | None, call: Callable[[], T]) -> T:
    """Run one Jobs API call, turning Ray's ``RuntimeError("Request failed with status code 404: ...")`` into a
    ``JobsError`` that names the job and the cluster."""
    try:
        return call()
    except JobsError:
        raise
    except Exception as err:
        text = str(err)
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise JobsError(f"no job {job_id!r} on the cluster at {address} (vit jobs list shows its jobs)") from None
        raise JobsError(f"the Jobs API at {address} failed: {text}") from None


def _run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, also from code that already runs an event loop (a notebook): then on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


# --------------------------------------------------------------------------------------------------------------------
# submitting


def default_job_id() -> str:
    """``vit-run-20261122-101500-3f2a``: sorts by time, readable in ``vit jobs list``, unique in practice."""
    import secrets

    return f"vit-run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class _DropDefaultExcludeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "ignored by default when packaging" not in record.getMessage()


@contextlib.contextmanager
def _quiet_upload_logs() -> Iterator[None]:
    """Ray logs each upload step at INFO and warns on every submission that .git/.venv are no longer uploaded (which
    is what we want); submit_pipeline reports the upload in one line of its own instead."""
    names = ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    notice = _DropDefaultExcludeNotice()
    working_dir_logger = logging.getLogger("ray._private.runtime_env.working_dir")
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    working_dir_logger.addFilter(notice)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        working_dir_logger.removeFilter(notice)


def _submitter() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def submit_pipeline(
    config_path: str | None,
    overrides: Sequence[str] = (),
    *,
    address: str,
    working_dir: str = ".",
    requirements: str | None = None,
    env: Mapping[str, str] | None = None,
    job_id: str | None = None,
    entrypoint: str | None = None,
    log: Callable[[str], None] | None = None,
) -> str:
    """Submit ``vit run`` (or ``entrypoint``) as a Ray Job to the cluster whose dashboard is at ``address``; returns
    the submission id at once (the job runs on; ``wait_for_job`` or ``job_logs(..., follow=True)`` follow it).

    ``config_path`` is read here and sent as text (``None``: the pipeline's built-in default config); relative paths
    inside it resolve on the cluster, in the uploaded ``working_dir``. ``requirements`` names a pip requirements file
    installed for the job (it needs a package index the cluster can reach). ``log`` receives progress lines.
    """
    say = log or (lambda _line: None)
    overrides = list(overrides)
    check_overrides(overrides)
    runtime_env = pipeline_runtime_env(config_path, working_dir=working_dir, requirements=requirements, env=env)
    config_text = runtime_env.get("env_vars", {}).get(CONFIG_ENV)
    normalize_address(address)  # its form now; whether a cluster answers there, after the checks that need none
    check_overrides_carry_no_secrets(overrides)
    if entrypoint is None:
        check_results_reachable(config_text, overrides, runtime_env.get("env_vars", {}))
    warning = config_credentials_warning(config_path) if config_path is not None else None
    if warning:
        say(warning)
    client = _client(address)  # before the walk below: a wrong address is the likelier mistake, and quick to report
    files, size = package_size(runtime_env["working_dir"])
    say(f"working dir  {runtime_env['working_dir']} ({files} files, {size / 1024**2:.1f} MiB before compression)")
    if not (Path(runtime_env["working_dir"]) / "pipelines" / "cli" / "__init__.py").is_file() and entrypoint is None:
        say("note: the working dir has no pipelines/cli/; the job uses the pipelines package installed on the cluster")
    forwarded = [name for name in runtime_env.get("env_vars", {}) if name != CONFIG_ENV]
    if forwarded:
        say(f"environment  {', '.join(sorted(forwarded))}")  # names only: values can hold hostnames, users
    command = entrypoint or pipeline_entrypoint(config_path, overrides)
    submission_id = job_id or default_job_id()
    metadata = {
        "submitted_by": _submitter(),
        "submitted_with": "vit submit",
        "config": "(built-in default)" if config_path is None else config_path,
        "overrides": " ".join(overrides)[:1000],
    }
    with _quiet_upload_logs():
        return _request(
            address,
            None,
            lambda: client.submit_job(
                entrypoint=command, submission_id=submission_id, runtime_env=runtime_env, metadata=metadata
            ),
        )


# --------------------------------------------------------------------------------------------------------------------
# following and managing


def list_jobs(address: str) -> list[JobInfo]:
    """Every job the cluster remembers (submitted jobs and drivers that connected directly), oldest first."""
    client = _client(address)
    details = _request(address, None, client.list_jobs)
    return sorted((JobInfo.from_details(d) for d in details), key=lambda job: job.start_time or 0.0)


def job_status(address: str, job_id: str) -> JobInfo:
    """Status, message, start and end times, entrypoint and metadata of one job."""
    client = _client(address)
    return JobInfo.from_details(_request(address, job_id, lambda: client.get_job_info(job_id)))


def wait_for_job(address: str, job_id: str, *, timeout: float | None = None, poll_s: float = 1.0) -> JobInfo:
    """Poll until the job has ended; ``JobsError`` when ``timeout`` seconds pass first (the job keeps running)."""
    client = _client(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = JobInfo.from_details(_request(address, job_id, lambda: client.get_job_info(job_id)))
        if info.terminal:
            return info
        if deadline is not None and time.monotonic() >= deadline:
            raise JobsError(f"job {job_id} still {info.status} after {timeout:.0f} s")
        time.sleep(poll_s)


def job_logs(address: str, job_id: str, follow: bool = False, *, echo: Callable[[str], None] | None = None) -> str:
    """The job's output so far; with ``follow``, also streamed to ``echo`` (default: stdout) as it comes, until the
    job ends. Returns the text either way."""
    client = _client(address)
    _request(address, job_id, lambda: client.get_job_info(job_id))  # an unknown id: a clear error, not a 404 later
    if not follow:
        return _request(address, job_id, lambda: client.get_job_logs(job_id))
    write = echo or _write_stdout
    chunks: list[str] = []

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            chunks.append(chunk)
            write(chunk)

    with _quiet_tail_logs():
        _request(address, job_id, lambda: _run_coroutine(tail()))
    return "".join(chunks)


@contextlib.contextmanager
def _quiet_tail_logs() -> Iterator[None]:
    """Ray logs the normal end of the log stream at INFO ("WebSocket closed ... 1000"), and its aiohttp call warns
    about a deprecated argument; neither is the user's business."""
    import warnings

    logger = logging.getLogger("ray.dashboard.modules.job.sdk")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, message="ssl=None")
            yield
    finally:
        logger.setLevel(level)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def stop_job(address: str, job_id: str, *, wait_s: float = 0.0) -> bool:
    """Ask the cluster to stop the job (SIGTERM, then SIGKILL after Ray's grace period). True when it was still
    running; with ``wait_s``, also waits up to that long for it to end."""
    client = _client(address)
    stopped = bool(_request(address, job_id, lambda: client.stop_job(job_id)))
    if stopped and wait_s > 0:
        wait_for_job(address, job_id, timeout=wait_s, poll_s=0.5)
    return stopped
