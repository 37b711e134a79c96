"""Running the pipeline on a Ray cluster as a Ray Job, and watching and managing jobs: ``vit submit``, ``vit jobs``.

    vit submit configs/big.yaml train.steps=10000 --address http://head:8265 --follow
    vit jobs list | vit jobs status ID | vit jobs logs ID --follow | vit jobs stop ID

A job is the ``vit run`` command executed by the cluster in a copy of the local working directory (the code as it is
here, uncommitted edits included). The config travels as text in the ``VIT_PIPELINE_YAML`` environment variable and
the job reads it with ``vit run env:VIT_PIPELINE_YAML``, so it never depends on a path that exists only on this
machine. The Jobs API is the dashboard's HTTP server on the head node (port 8265 by default), which needs
``ray[default]`` on the cluster.

Ray itself is imported inside the functions: ``vit --help`` and the other commands stay fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_ADDRESS",
    "EXCLUDES",
    "FORWARDED_ENV",
    "JobInfo",
    "JobsError",
    "default_address",
    "default_job_id",
    "job_logs",
    "job_status",
    "jobs",
    "list_jobs",
    "package_size",
    "pipeline_entrypoint",
    "pipeline_runtime_env",
    "stop_job",
    "submit",
    "submit_pipeline",
    "wait_for_job",
]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONFIG_ENV = "VIT_PIPELINE_YAML"
# Where to send results, not credentials: the cluster gets its secrets from its own environment (instance roles,
# a secrets manager), never from the job's runtime_env, which anyone who can open the dashboard can read.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
# Left out of the upload (gitwildmatch patterns, relative to the working dir; Ray also honours .gitignore and
# .rayignore). A leading "/" anchors to the top, so a package that happens to be called ``build`` still travels.
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".ipynb_checkpoints",
    "*.egg-info",
    "*.db",
    "/runs",
    "/mlruns",
    "/mlartifacts",
    "/ray_results",
    "/outputs",
    "/build",
    "/dist",
]
# Ray keeps an uploaded package in the GCS and refuses one of 512 MiB or more (its gRPC message limit).
MAX_PACKAGE_BYTES = 512 * 1024**2
# Linux refuses a single environment string longer than 128 KiB (MAX_ARG_STRLEN) when the job's process starts.
MAX_CONFIG_BYTES = 100 * 1024
_OWN_CREDENTIALS = (
    "give the cluster credentials of its own: an instance profile or IAM role on its nodes (ray_cluster.yaml), "
    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment of `ray start` on every node, or a Kubernetes "
    "Secret (infra/kuberay)"
)
_DASHBOARD_HINT = (
    "the Jobs API is served by the Ray dashboard on the head node (http://HOST:8265 by default); the cluster needs "
    "ray[default] and a head started with the dashboard (ray start --head --dashboard-host 0.0.0.0)"
)

T = TypeVar("T")


class JobsError(RuntimeError):
    """A problem the user can fix (address, job id, config, working dir): the CLI prints it without a traceback."""


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


def _normalize_address(address: str) -> str:
    """An http(s) dashboard URL (or a ``ray://`` client address, which Ray maps to its dashboard).

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

    address = _normalize_address(address)
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
# what a submission sends


def default_job_id() -> str:
    """``vit-run-20261122-101500-3f2a``: sorts by time, readable in ``vit jobs list``, unique in practice."""
    import secrets

    return f"vit-run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def pipeline_entrypoint(config_path: str | None, overrides: Sequence[str] = ()) -> str:
    """The shell command the cluster runs: ``python -m pipelines.cli run env:VIT_PIPELINE_YAML <overrides>``.

    ``python -m`` rather than the ``vit`` script: the module comes from the uploaded working dir (the job's cwd), so
    the job runs the code as it is here even where the cluster installed another version. Overrides are shell-quoted:
    the entrypoint is run by a shell.
    """
    words = ["python", "-m", "pipelines.cli", "run"]
    if config_path is not None:
        words.append(f"env:{CONFIG_ENV}")
    words += list(overrides)
    return " ".join(shlex.quote(word) for word in words)


def _config_text(config_path: str) -> str:
    """The YAML text of a local file (or of a local environment variable, ``env:NAME``), checked to be a mapping."""
    from pipelines.common.config import ConfigError, parse_mapping

    if config_path.startswith("env:"):
        name = config_path[4:]
        if name not in os.environ:
            raise JobsError(f"config {config_path}: the environment variable {name} is not set")
        text = os.environ[name]
    else:
        from pipelines.orchestration.workflow import find_config

        path = find_config(config_path)
        if path is None:
            raise JobsError(f"config {config_path}: no such file (nor a config shipped with the package)")
        text = path.read_text()
    try:
        parse_mapping(text, f"config {config_path}")
    except ConfigError as err:
        raise JobsError(str(err)) from None
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise JobsError(f"config {config_path}: {len(text.encode())} bytes, more than an environment variable can hold")
    return text


def _check_overrides(overrides: Sequence[str]) -> None:
    """Fail here, not minutes later on the cluster, when an override is not ``key=value``."""
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise JobsError(f"override {item!r} is not of the form key.sub=value")


def _requirements(path: str) -> list[str]:
    """The requirement lines of a pip requirements file (blank lines and comments dropped)."""
    file = Path(path)
    if not file.is_file():
        raise JobsError(f"requirements {path}: no such file")
    lines = [line.split(" #", 1)[0].strip() for line in file.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _check_env(env: Mapping[str, str]) -> None:
    from pipelines.common.redaction import is_secret_field

    for key, value in env.items():
        if not key or not key.replace("_", "A").isalnum() or key[0].isdigit():
            raise JobsError(f"--env {key}=...: not a valid environment variable name")
        if not isinstance(value, str):
            raise JobsError(f"--env {key}: the value must be a string")
        if is_secret_field(key):
            raise JobsError(
                f"--env {key}: a credential; a job's environment is readable by anyone who can open the dashboard. "
                + _OWN_CREDENTIALS
            )


def _check_overrides_carry_no_secrets(overrides: Sequence[str]) -> None:
    """An override is part of the job's entrypoint, which the dashboard shows to anyone."""
    from pipelines.common.config import apply_overrides
    from pipelines.common.redaction import secret_fields

    found = secret_fields(apply_overrides({}, overrides))
    if found:
        raise JobsError(
            f"override {found[0]}: a credential; it would be stored in the job's entrypoint, readable by anyone "
            "who can open the dashboard. " + _OWN_CREDENTIALS[0].upper() + _OWN_CREDENTIALS[1:]
        )


def _without_secrets(text: str) -> tuple[str, list[str]]:
    """The config text the cluster gets, and the dotted names of the credentials left out of it: the job falls back
    to the cluster's own (a config's comments and layout are kept when there is nothing to leave out)."""
    import yaml

    from pipelines.common.config import parse_mapping
    from pipelines.common.redaction import redact, secret_fields

    loaded = parse_mapping(text, "config text")
    found = secret_fields(loaded)
    if not found:
        return text, []
    return yaml.safe_dump(redact(loaded, drop=True), sort_keys=False), found


def _check_results_reachable(config_text: str | None, overrides: Sequence[str], env_vars: Mapping[str, str]) -> None:
    """Refuse a pipeline whose results would land in the job's temporary copy of the working dir on the cluster,
    where nobody can open them afterwards: a relative workdir, or a local MLflow store by default."""
    from pipelines.common.config import ConfigError, load_config
    from pipelines.orchestration.workflow import LOCAL_CONFIG, PipelineConfig

    try:
        if config_text is None:
            cfg = load_config(PipelineConfig, LOCAL_CONFIG, overrides)
        else:
            cfg = load_config(PipelineConfig, overrides=overrides, text=config_text)
    except ConfigError as err:
        raise JobsError(str(err)) from None
    gone = "lands in Ray's temporary copy of the working dir on the cluster, which nobody can open once the job ends"
    if "://" not in cfg.workdir and not cfg.workdir.startswith("/"):
        raise JobsError(
            f"workdir {cfg.workdir!r}: a relative path {gone}; set workdir to shared storage (s3://bucket/prefix) or "
            "an absolute path every node can reach"
        )
    if not cfg.tracking.enabled:
        return
    uri = cfg.tracking.uri or env_vars.get("MLFLOW_TRACKING_URI", "")
    if not uri or (uri.startswith("sqlite:///") and not uri.startswith("sqlite:////")):
        where = f"the store {uri}" if uri else "the default store (./mlflow.db)"
        raise JobsError(
            f"tracking.uri: {where} {gone}, and the registered model with it; set tracking.uri (or "
            "MLFLOW_TRACKING_URI here) to a tracking server you and the cluster can reach (http://HOST:5000), or "
            "tracking.enabled=false"
        )


def pipeline_runtime_env(
    config_path: str | None,
    *,
    working_dir: str = ".",
    requirements: str | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The job's ``runtime_env``: the working dir to upload (minus ``EXCLUDES``), the config text and the
    non-secret settings that say where results go (``FORWARDED_ENV``, when set here), ``env``, and ``pip``."""
    root = Path(working_dir).expanduser()
    if not root.is_dir():
        raise JobsError(f"working dir {working_dir}: no such directory")
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    if config_path is not None:
        env_vars[CONFIG_ENV], _ = _without_secrets(_config_text(config_path))
    if env:
        _check_env(env)
        env_vars.update(env)
    runtime_env: dict[str, Any] = {"working_dir": str(root.resolve()), "excludes": list(EXCLUDES)}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    if requirements is not None:
        packages = _requirements(requirements)
        if packages:
            runtime_env["pip"] = packages
    return runtime_env


# What Ray itself leaves out of every upload (its default excludes); ours (EXCLUDES) come on top.
_RAY_DEFAULT_EXCLUDES = (".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ipynb_checkpoints")


def package_size(working_dir: str, excludes: Sequence[str] = EXCLUDES) -> tuple[int, int]:
    """(files, bytes before compression) that Ray would upload from ``working_dir``: the same rules as Ray's walk
    (its default excludes, ``excludes``, and every .gitignore / .rayignore on the way, gitwildmatch patterns relative
    to their folder), so the check matches the upload. Raises ``JobsError`` when the total reaches Ray's limit,
    naming the largest entries to exclude."""
    import pathspec

    def spec(lines: Sequence[str]) -> pathspec.PathSpec:
        return pathspec.PathSpec.from_lines("gitwildmatch", lines)

    root = Path(working_dir).absolute()
    ignore_files = (".gitignore", ".rayignore")
    if os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") == "1":
        ignore_files = (".rayignore",)
    # The rules in force in each folder: (the folder their patterns are relative to, the patterns).
    rules: dict[Path, list[tuple[Path, pathspec.PathSpec]]] = {
        root: [(root, spec([*_RAY_DEFAULT_EXCLUDES, *excludes]))]
    }
    sizes: dict[str, int] = {}
    files = 0
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        specs = rules.pop(here) + [
            (here, spec((here / n).read_text().splitlines())) for n in ignore_files if n in names
        ]
        dirs[:] = [d for d in dirs if not _ignored(here / d, specs, is_dir=True)]
        rules.update({here / d: specs for d in dirs})
        for name in names:
            path = here / name
            if path.is_file() and not _ignored(path, specs, is_dir=False):
                files += 1
                entry = path.relative_to(root).parts[0]
                sizes[entry] = sizes.get(entry, 0) + path.stat().st_size
    total = sum(sizes.values())
    if total >= MAX_PACKAGE_BYTES:
        largest = sorted(sizes.items(), key=lambda item: -item[1])[:5]
        listing = ", ".join(f"{name} {_mib(size)}" for name, size in largest)
        raise JobsError(
            f"working dir {working_dir}: {files} files, {_mib(total)} to upload, over Ray's limit of "
            f"{_mib(MAX_PACKAGE_BYTES)}; largest: {listing}. Keep data and outputs out of it (put them in storage and "
            "pass their URLs in the config) or list them in a .rayignore file"
        )
    return files, total


def _ignored(path: Path, specs: Sequence[tuple[Path, Any]], *, is_dir: bool) -> bool:
    suffix = "/" if is_dir else ""
    return any(patterns.match_file(path.relative_to(base).as_posix() + suffix) for base, patterns in specs)


def _mib(size: float) -> str:
    return f"{size / 1024**2:.1f} MiB"


class _DropDefaultExcludeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "ignored by default when packaging" not in record.getMessage()


@contextlib.contextmanager
def _quiet_upload_logs() -> Iterator[None]:
    """Ray logs each upload step at INFO and warns on every submission that .git/.venv are no longer uploaded (which
    is what we want); the submit command reports the upload in one line of its own instead."""
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


# --------------------------------------------------------------------------------------------------------------------
# the Python API


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
    _check_overrides(overrides)
    runtime_env = pipeline_runtime_env(config_path, working_dir=working_dir, requirements=requirements, env=env)
    config_text = runtime_env.get("env_vars", {}).get(CONFIG_ENV)
    _normalize_address(address)  # its form now; whether a cluster answers there, after the checks that need none
    _check_overrides_carry_no_secrets(overrides)
    if entrypoint is None:
        _check_results_reachable(config_text, overrides, runtime_env.get("env_vars", {}))
    if config_path is not None:
        _, left_out = _without_secrets(_config_text(config_path))
        if left_out:
            say(
                f"warning: the config carries credentials ({', '.join(left_out)}); they are not sent (a job's "
                f"environment is readable by anyone who can open the dashboard). The job uses the cluster's own: "
                + _OWN_CREDENTIALS
            )
    client = _client(address)  # before the walk below: a wrong address is the likelier mistake, and quick to report
    files, size = package_size(runtime_env["working_dir"])
    say(f"working dir  {runtime_env['working_dir']} ({files} files, {_mib(size)} before compression)")
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


# --------------------------------------------------------------------------------------------------------------------
# the commands


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _user_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """A ``JobsError`` becomes ``error: ...`` and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except JobsError as err:
            _fail(str(err))

    return wrapper


def _address_option(fn: Callable[..., None]) -> Callable[..., None]:
    return click.option(
        "--address",
        default=default_address,
        metavar="URL",
        show_default="$RAY_ADDRESS if an http(s) URL, else " + DEFAULT_ADDRESS,
        help="The cluster's Ray dashboard (the Jobs API).",
    )(fn)


def _split_config(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [OVERRIDES]...``: the first word is the config unless it is an override (``key=value`` and no file
    of that name), so ``vit submit train.steps=10`` runs the built-in default config."""
    if not args:
        return None, []
    first = args[0]
    if "=" in first and not first.startswith("env:") and not Path(first).is_file():
        return None, list(args)
    return first, list(args[1:])


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobsError(f"--env {item!r} is not of the form KEY=VALUE")
        env[key] = value
    return env


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _summary(message: str) -> str:
    """One line for a job's message. A failed job's message is Ray's sentence plus the last 20,000 characters of its
    logs: keep the sentence and the last line of output, usually the error."""
    head, sep, logs = message.partition(", last available logs")
    if not sep:
        return _first_line(message)
    lines = [line.strip() for line in logs.splitlines()[1:] if line.strip()]
    return _first_line(head) + (f"; last output: {_first_line(lines[-1], 160)}" if lines else "")


def _address_suffix(address: str) -> str:
    return "" if address == default_address() else f" --address {shlex.quote(address)}"


def _follow_to_end(address: str, job_id: str) -> None:
    """Stream the logs, then exit 0 when the job succeeded and 1 otherwise (Ctrl-C: stop following, exit 130)."""
    try:
        job_logs(address, job_id, follow=True)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; the job keeps running (vit jobs stop {job_id} stops it)", err=True)
        sys.exit(130)
    _report_end(wait_for_job(address, job_id, timeout=60, poll_s=0.5))  # the stream ends as the job does


def _report_end(info: JobInfo) -> None:
    click.echo(f"job {info.job_id} {info.status}: {_summary(info.message)}", err=not info.succeeded)
    sys.exit(0 if info.succeeded else 1)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("args", nargs=-1, metavar="[CONFIG] [OVERRIDES]...")
@_address_option
@click.option("--working-dir", default=".", show_default=True, metavar="DIR", help="Uploaded; the job runs in a copy.")
@click.option("--requirements", metavar="FILE", help="A pip requirements file installed for the job.")
@click.option("--env", "env_items", multiple=True, metavar="KEY=VALUE", help="An environment variable (repeatable).")
@click.option("--job-id", metavar="ID", help="The submission id [vit-run-<time>-<hex>].")
@click.option("--entrypoint", metavar="COMMAND", help="Run this shell command instead of the pipeline.")
@click.option("--wait/--no-wait", default=False, help="Wait for the job to end; exit 0 if it succeeded, else 1.")
@click.option("--follow", is_flag=True, help="Stream the job's logs until it ends; exit 0 if it succeeded, else 1.")
@_user_errors
def submit(
    args: tuple[str, ...],
    address: str,
    working_dir: str,
    requirements: str | None,
    env_items: tuple[str, ...],
    job_id: str | None,
    entrypoint: str | None,
    wait: bool,
    follow: bool,
) -> None:
    """Run the pipeline on a Ray cluster as a Ray Job: `vit run [CONFIG] [OVERRIDES]...` in a copy of the working dir.

    CONFIG (a YAML file, read here) travels in the job's environment; OVERRIDES are dotted settings such as
    ``train.steps=1000``. The job's environment also gets MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL and
    AWS_ENDPOINT_URL when they are set here, never credentials: the cluster must have its own.
    """
    config_path, overrides = _split_config(args)
    submission_id = submit_pipeline(
        config_path,
        overrides,
        address=address,
        working_dir=working_dir,
        requirements=requirements,
        env=_parse_env(env_items),
        job_id=job_id,
        entrypoint=entrypoint,
        log=lambda line: click.echo(line, err=True),
    )
    suffix = _address_suffix(address)
    click.echo(f"submitted {submission_id} to {_normalize_address(address)}")
    click.echo(f"  status   vit jobs status {submission_id}{suffix}")
    click.echo(f"  logs     vit jobs logs {submission_id} --follow{suffix}")
    click.echo(f"  stop     vit jobs stop {submission_id}{suffix}")
    if follow:
        _follow_to_end(address, submission_id)
    elif wait:
        _report_end(wait_for_job(address, submission_id))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def jobs() -> None:
    """Watch and manage the Ray Jobs of a cluster: list, status, logs, stop."""


@jobs.command("list")
@_address_option
@_user_errors
def list_command(address: str) -> None:
    """Every job the cluster remembers, oldest first."""
    infos = list_jobs(address)
    if not infos:
        click.echo(f"no jobs on {_normalize_address(address)}")
        return
    width = max(len(info.job_id) for info in infos)
    click.echo(f"{'ID':<{width}}  {'STATUS':<9}  {'STARTED':<19}  {'TIME':>7}  WHAT")
    for info in infos:
        what = info.metadata.get("config") or info.entrypoint
        click.echo(
            f"{info.job_id:<{width}}  {info.status:<9}  {_when(info.start_time):<19}  "
            f"{_duration(info.duration_s):>7}  {_first_line(what, 80)}"
        )


@jobs.command("status")
@click.argument("job_id", metavar="ID")
@_address_option
@_user_errors
def status_command(job_id: str, address: str) -> None:
    """Status, message, times and entrypoint of one job."""
    info = job_status(address, job_id)
    rows = [
        ("id", info.job_id),
        ("status", info.status),
        ("message", _summary(info.message)),
        ("started", _when(info.start_time)),
        ("ended", _when(info.end_time)),
        ("duration", _duration(info.duration_s)),
        ("entrypoint", info.entrypoint),
    ]
    if info.exit_code is not None:
        rows.append(("exit code", str(info.exit_code)))
    rows += [(key.replace("_", " "), value) for key, value in sorted(info.metadata.items()) if value]
    for key, value in rows:
        click.echo(f"{key:<12} {value}")
    if info.status == "FAILED":
        click.echo(f"{'':<12} (vit jobs logs {job_id}{_address_suffix(address)} shows the whole output)")


@jobs.command("logs")
@click.argument("job_id", metavar="ID")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends; exit 0 if it succeeded.")
@_address_option
@_user_errors
def logs_command(job_id: str, follow: bool, address: str) -> None:
    """The job's output (driver stdout and stderr)."""
    if follow:
        _follow_to_end(address, job_id)
    else:
        _write_stdout(job_logs(address, job_id))


@jobs.command("stop")
@click.argument("job_id", metavar="ID")
@click.option("--wait-s", default=30.0, show_default=True, help="How long to wait for the job to end.")
@_address_option
@_user_errors
def stop_command(job_id: str, wait_s: float, address: str) -> None:
    """Stop a running job (SIGTERM, then SIGKILL)."""
    if stop_job(address, job_id, wait_s=wait_s):
        info = job_status(address, job_id)
        click.echo(f"job {job_id} {info.status}")
    else:
        info = job_status(address, job_id)
        click.echo(f"job {job_id} was not running ({info.status})")
