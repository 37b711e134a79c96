"""The Ray Job commands: ``vit submit`` runs the pipeline on a cluster, ``vit jobs list|status|logs|stop`` watch and
manage the cluster's jobs.

    vit submit my-pipeline.yaml finetune.steps=10000 --address http://head:8265 --follow
    vit jobs list | vit jobs status ID | vit jobs logs ID --follow | vit jobs stop ID

They wrap ``pipelines.orchestration.jobs``, which imports Ray only inside its functions: ``vit --help`` stays fast.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from pipelines.cli.errors import failing_on
from pipelines.orchestration.jobs import (
    DEFAULT_ADDRESS,
    JobInfo,
    JobsError,
    default_address,
    job_logs,
    job_status,
    list_jobs,
    normalize_address,
    stop_job,
    submit_pipeline,
    wait_for_job,
)


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
    of that name), so ``vit submit finetune.steps=10`` runs the built-in default config."""
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


@click.command("submit", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("args", nargs=-1, metavar="[CONFIG] [OVERRIDES]...")
@_address_option
@click.option("--working-dir", default=".", show_default=True, metavar="DIR", help="Uploaded; the job runs in a copy.")
@click.option("--requirements", metavar="FILE", help="A pip requirements file installed for the job.")
@click.option("--env", "env_items", multiple=True, metavar="KEY=VALUE", help="An environment variable (repeatable).")
@click.option("--job-id", metavar="ID", help="The submission id [vit-run-<time>-<hex>].")
@click.option("--entrypoint", metavar="COMMAND", help="Run this shell command instead of the pipeline.")
@click.option("--wait/--no-wait", default=False, help="Wait for the job to end; exit 0 if it succeeded, else 1.")
@click.option("--follow", is_flag=True, help="Stream the job's logs until it ends; exit 0 if it succeeded, else 1.")
@failing_on(JobsError)
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
    ``finetune.steps=1000``. The job's environment also gets MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL and
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
    click.echo(f"submitted {submission_id} to {normalize_address(address)}")
    click.echo(f"  status   vit jobs status {submission_id}{suffix}")
    click.echo(f"  logs     vit jobs logs {submission_id} --follow{suffix}")
    click.echo(f"  stop     vit jobs stop {submission_id}{suffix}")
    if follow:
        _follow_to_end(address, submission_id)
    elif wait:
        _report_end(wait_for_job(address, submission_id))


@click.group("jobs", context_settings={"help_option_names": ["-h", "--help"]})
def jobs() -> None:
    """Watch and manage the Ray Jobs of a cluster: list, status, logs, stop."""


@jobs.command("list")
@_address_option
@failing_on(JobsError)
def list_command(address: str) -> None:
    """Every job the cluster remembers, oldest first."""
    infos = list_jobs(address)
    if not infos:
        click.echo(f"no jobs on {normalize_address(address)}")
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
@failing_on(JobsError)
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
@failing_on(JobsError)
def logs_command(job_id: str, follow: bool, address: str) -> None:
    """The job's output (driver stdout and stderr)."""
    if follow:
        _follow_to_end(address, job_id)
    else:
        sys.stdout.write(job_logs(address, job_id))  # as the job wrote it: click.echo strips ANSI codes when piped
        sys.stdout.flush()


@jobs.command("stop")
@click.argument("job_id", metavar="ID")
@click.option("--wait-s", default=30.0, show_default=True, help="How long to wait for the job to end.")
@_address_option
@failing_on(JobsError)
def stop_command(job_id: str, wait_s: float, address: str) -> None:
    """Stop a running job (SIGTERM, then SIGKILL)."""
    if stop_job(address, job_id, wait_s=wait_s):
        info = job_status(address, job_id)
        click.echo(f"job {job_id} {info.status}")
    else:
        info = job_status(address, job_id)
        click.echo(f"job {job_id} was not running ({info.status})")
