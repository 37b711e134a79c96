"""``vit schedule``: pipelines on a cron, through Prefect 3 (``pipelines.orchestration.schedule``)."""

from __future__ import annotations

import contextlib
from datetime import datetime
from zoneinfo import ZoneInfo

import click

from pipelines.cli.errors import fail, failing_on

INSTALL_HINT = "`vit schedule` needs Prefect: pip install 'vit-platform[schedule]'"


def _module():
    """The schedule module, or a clear error when the optional extra is missing."""
    try:
        from pipelines.orchestration import schedule
    except ImportError as err:
        if "prefect" in str(err):
            fail(INSTALL_HINT)
        raise
    return schedule


def _run(call):
    """``call()``, its user errors (a bad cron, an unreachable scheduler, a config mistake) as ``error: ...``."""
    from pipelines.common.config import ConfigError
    from pipelines.orchestration.package import JobsError

    schedule = _module()
    with failing_on(schedule.ScheduleError, ConfigError, JobsError):
        return call()


@click.group()
def schedule() -> None:
    """Pipelines on a schedule (Prefect 3): add, list, history, run, pause, resume, remove, serve, render.

    Without PREFECT_API_URL, `vit schedule serve` starts a local scheduler on 127.0.0.1 (its store under
    ~/.local/share/vit/prefect) and fires the schedules; the other commands talk to it. With PREFECT_API_URL, the
    team's Prefect server is used and `serve` only fires."""


@schedule.command("add", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("config")
@click.argument("overrides", nargs=-1)
@click.option("--cron", required=True, help='cron expression, e.g. "0 3 * * 0" (Sundays 03:00)')
@click.option("--timezone", default="UTC", show_default=True, help="IANA time zone the cron is read in")
@click.option("--address", default=None, help="submit each firing to this Ray cluster (dashboard URL)")
@click.option("--replace", is_flag=True, help="update the schedule NAME if it exists")
def add(name: str, config: str, overrides: tuple[str, ...], cron: str, timezone: str, address, replace) -> None:
    """Schedule `vit run CONFIG OVERRIDES...` as NAME. CONFIG: a YAML file or a shipped name (local, jft-b16); it
    is read at each firing, relative paths resolving in this folder."""
    mod = _module()
    info = _run(
        lambda: mod.add_schedule(
            name, config, cron, timezone=timezone, address=address, overrides=overrides, replace=replace
        )
    )
    click.echo(f"schedule {info.name}: {info.cron} ({info.timezone}); next firing {_when(info.next_firing, info)}")


@schedule.command("list")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per schedule")
def list_command(as_json: bool) -> None:
    """The schedules: cron, next and last firing, the last firing's state and its reason or MLflow run."""
    import dataclasses
    import json

    mod = _module()
    infos = _run(mod.list_schedules)
    if as_json:
        for info in infos:
            click.echo(json.dumps(dataclasses.asdict(info)))
        return
    if not infos:
        click.echo("no schedules (vit schedule add NAME CONFIG --cron EXPR)")
        return
    for info in infos:
        state = "paused" if info.paused else "active"
        click.echo(
            f"{info.name}  [{state}]  {info.cron} ({info.timezone})  `vit run {info.config or ''}"
            f"{' ' + ' '.join(info.overrides) if info.overrides else ''}`"
            + (f" on {info.address}" if info.address else "")
        )
        click.echo(f"  next firing  {_when(info.next_firing, info)}")
        last = f"{_when(info.last_firing, info)}  {info.last_state}" if info.last_firing else "never"
        click.echo(f"  last firing  {last}" + (f": {info.last_message}" if info.last_message else ""))


@schedule.command("run")
@click.argument("name")
@click.option("--wait/--no-wait", default=False, help="wait for the firing to end and exit non-zero if it failed")
@click.option("--timeout", type=float, default=None, help="with --wait: seconds to wait at most")
def run_command(name: str, wait: bool, timeout) -> None:
    """Fire NAME now (a worker, `vit schedule serve`, runs it)."""
    mod = _module()
    run_id, state, message = _run(lambda: mod.fire(name, wait=wait, timeout=timeout))
    click.echo(f"flow run {run_id}: {state}" + (f": {message}" if message else ""))
    if wait and state not in ("Completed", "Cancelled"):
        raise SystemExit(1)


@schedule.command("history")
@click.argument("name")
@click.option("--limit", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per firing")
def history_command(name: str, limit: int, as_json: bool) -> None:
    """NAME's last firings, newest first: state, and the reason or outcome (skipped ones included)."""
    import dataclasses
    import json

    mod = _module()
    firings = _run(lambda: mod.history(name, limit))
    for firing in firings:
        if as_json:
            click.echo(json.dumps(dataclasses.asdict(firing)))
        else:
            when = (firing.started or firing.expected or "")[:19].replace("T", " ")
            click.echo(f"{when}  {firing.state:<10}  {firing.id}  {firing.message or ''}".rstrip())
    if not firings and not as_json:
        click.echo(f"{name} has not fired yet")


@schedule.command("pause")
@click.argument("name")
def pause(name: str) -> None:
    """Stop firing NAME (its firings already due are cancelled) until `vit schedule resume NAME`."""
    mod = _module()
    cancelled = _run(lambda: mod.pause(name))
    click.echo(f"schedule {name} paused" + (f"; {cancelled} due firing(s) cancelled" if cancelled else ""))


@schedule.command("resume")
@click.argument("name")
def resume(name: str) -> None:
    """Fire NAME again on its cron."""
    mod = _module()
    _run(lambda: mod.resume(name))
    click.echo(f"schedule {name} resumed")


@schedule.command("remove")
@click.argument("name")
@click.option("--force", is_flag=True, help="remove even while a firing runs (that firing then fails at its end)")
def remove(name: str, force: bool) -> None:
    """Delete NAME and its future firings (the history of past ones stays in Prefect)."""
    mod = _module()
    _run(lambda: mod.remove(name, force=force))
    click.echo(f"schedule {name} removed")


@schedule.command("serve")
def serve() -> None:
    """Fire the schedules until interrupted (Ctrl-C): a Prefect worker, and the local scheduler when
    PREFECT_API_URL is not set. Run it where the pipelines should run: a laptop, or a Ray cluster's head node."""
    mod = _module()
    try:
        _run(mod.serve)
    except KeyboardInterrupt:
        click.echo("stopped")


@schedule.command("render")
@click.argument("name")
@click.option("--target", type=click.Choice(["kuberay"]), default="kuberay", show_default=True)
@click.option("--image", default="vit-platform:latest", show_default=True, help="the platform's container image")
@click.option("--gpu-nodes", type=int, default=8, show_default=True, help="worker pods of 8 GPUs")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="write here instead of stdout")
def render(name: str, target: str, image: str, gpu_nodes: int, output) -> None:
    """NAME as a Kubernetes manifest: a KubeRay RayCronJob (concurrencyPolicy: Forbid) and its config's ConfigMap."""
    mod = _module()
    text = _run(lambda: mod.render_kuberay(name, image=image, gpu_nodes=gpu_nodes))
    if output:
        with open(output, "w") as f:
            f.write(text)
        click.echo(f"wrote {output}")
    else:
        click.echo(text, nl=False)


def _when(iso: str | None, info) -> str:
    """An ISO time in the schedule's own time zone."""
    if not iso:
        return "none" if not info.paused else "none (paused)"
    moment = datetime.fromisoformat(iso)
    with contextlib.suppress(KeyError, ValueError):  # an unknown zone: shown in UTC
        moment = moment.astimezone(ZoneInfo(info.timezone or "UTC"))
    return moment.strftime("%Y-%m-%d %H:%M %Z")
