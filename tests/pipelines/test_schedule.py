"""`vit schedule` against a real Prefect server on 127.0.0.1 and a real worker (`vit schedule serve`), as a user
runs it: every command through the `vit` console script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

pytest.importorskip("prefect", reason="the [schedule] extra")  # installed by `make test` (the test extra)

VIT = str(Path(sys.executable).parent / "vit")


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory, unused_port):
    """A Prefect server of our own (its store in a temporary PREFECT_HOME) and the environment that points at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = unused_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(home / "server.log", "wb")  # noqa: SIM115  (for the server's lifetime)
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, (home / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    yield env
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)
    log.close()


@pytest.fixture(scope="module")
def worker(prefect_env, tmp_path_factory):
    """`vit schedule serve`: the process that fires the schedules (here: a worker on the team's server)."""
    log_path = tmp_path_factory.mktemp("worker") / "serve.log"
    with open(log_path, "wb") as log:
        serve = subprocess.Popen(
            [VIT, "schedule", "serve"], env=prefect_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        yield log_path
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=60)


def vit(env: dict, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([VIT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def schedules(env: dict) -> dict[str, dict]:
    result = vit(env, "schedule", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {s["name"]: s for s in map(json.loads, result.stdout.splitlines())}


def firings(env: dict, name: str) -> dict[str, dict]:
    result = vit(env, "schedule", "history", name, "--json", "--limit", "50")
    assert result.returncode == 0, result.stderr
    return {f["id"]: f for f in map(json.loads, result.stdout.splitlines())}


def test_add_list_pause_resume_remove_and_the_mistakes_refused(prefect_env, tmp_path):
    result = vit(prefect_env, "schedule", "add", "weekly", "local", "workdir=/tmp/x", "--cron", "0 3 * * 0",
                 "--timezone", "Europe/Berlin", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "schedule weekly: 0 3 * * 0 (Europe/Berlin)" in result.stdout
    listed = schedules(prefect_env)["weekly"]
    assert listed["cron"] == "0 3 * * 0" and listed["timezone"] == "Europe/Berlin" and not listed["paused"]
    assert listed["config"] == "local" and listed["overrides"] == ["workdir=/tmp/x"]
    assert listed["directory"] == str(tmp_path) and listed["last_firing"] is None
    upcoming = datetime.fromisoformat(listed["next_firing"]).astimezone(ZoneInfo("Europe/Berlin"))
    assert (upcoming.weekday(), upcoming.hour, upcoming.minute) == (6, 3, 0)  # Sunday 03:00, Berlin time

    text = vit(prefect_env, "schedule", "list").stdout
    assert "weekly  [active]  0 3 * * 0 (Europe/Berlin)" in text and "last firing  never" in text

    assert vit(prefect_env, "schedule", "pause", "weekly").returncode == 0
    assert schedules(prefect_env)["weekly"]["paused"] and schedules(prefect_env)["weekly"]["next_firing"] is None
    assert vit(prefect_env, "schedule", "resume", "weekly").returncode == 0
    assert not schedules(prefect_env)["weekly"]["paused"]

    mistakes = [
        (["weekly", "local", "--cron", "0 3 * * 0"], "schedule 'weekly' exists"),
        (["other", "local", "--cron", "61 * * * *"], "--cron '61 * * * *': not a cron expression"),
        (
            ["other", "local", "--cron", "0 3 * * *", "--timezone", "Mars/Base"],
            "--timezone 'Mars/Base': not an IANA time zone",
        ),
        (["other", "nope.yaml", "--cron", "0 3 * * *"], "config 'nope.yaml': no such file"),
        (["other", "local", "pretrain=null", "--cron", "0 3 * * *"], "finetune.init_from: with no pretrain step"),
        (
            ["other", "local", "storage_options.secret=x", "--cron", "0 3 * * *"],
            "override storage_options.secret: a credential; it would be stored in the scheduler",
        ),
    ]
    for args, message in mistakes:
        result = vit(prefect_env, "schedule", "add", *args)
        assert result.returncode == 2 and f"error: {message}" in result.stderr, (args, result.stderr)
    assert set(schedules(prefect_env)) == {"weekly"}

    assert vit(prefect_env, "schedule", "remove", "weekly").returncode == 0
    result = vit(prefect_env, "schedule", "remove", "weekly")
    assert result.returncode == 2 and "no schedule 'weekly'" in result.stderr
    assert schedules(prefect_env) == {}


def test_without_a_scheduler_the_commands_say_how_to_start_one(prefect_env, tmp_path, unused_port):
    env = {k: v for k, v in prefect_env.items() if k != "PREFECT_API_URL"}
    env |= {"VIT_SCHEDULE_PORT": str(unused_port()), "XDG_DATA_HOME": str(tmp_path)}
    result = vit(env, "schedule", "list")
    assert result.returncode == 2 and "start `vit schedule serve`" in result.stderr and "127.0.0.1" in result.stderr


def test_render_writes_the_same_schedule_as_a_raycronjob_without_credentials(prefect_env, tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text("workdir: s3://bucket/vit\nstorage_options:\n  key: AKIA\n  secret: s3cr3t\n")
    result = vit(prefect_env, "schedule", "add", "nightly", str(config), "finetune.steps=1000", "--cron", "30 2 * * *")
    assert result.returncode == 0, result.stderr
    vit(prefect_env, "schedule", "pause", "nightly")
    out = tmp_path / "cron.yaml"
    result = vit(prefect_env, "schedule", "render", "nightly", "--target", "kuberay", "-o", str(out))
    assert result.returncode == 0, result.stderr
    config_map, cron_job = list(yaml.safe_load_all(out.read_text()))
    assert cron_job["kind"] == "RayCronJob" and cron_job["spec"]["schedule"] == "30 2 * * *"
    assert cron_job["spec"]["timeZone"] == "UTC" and cron_job["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron_job["spec"]["suspend"] is True  # paused here, suspended there
    entrypoint = cron_job["spec"]["jobTemplate"]["entrypoint"]
    assert entrypoint == "python -m pipelines.cli run /etc/vit/pipeline.yaml finetune.steps=1000"
    assert "pipeline.yaml: |" in out.read_text()  # the config as a block, readable as the file it came from
    # Secure as infra/kuberay: token authentication on every Ray container, credentials only from Secrets.
    cluster = cron_job["spec"]["jobTemplate"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "vit-ray-token"}
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for container in (c for pod in pods for c in pod["template"]["spec"]["containers"]):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "vit-ray-token"
        assert {s["secretRef"]["name"] for s in container["envFrom"]} == {"vit-s3", "mlflow-client"}
    assert "not pinned by digest" in out.read_text()  # the default image is a tag
    shipped = yaml.safe_load(config_map["data"]["pipeline.yaml"])
    assert shipped["workdir"] == "s3://bucket/vit" and "s3cr3t" not in out.read_text() and "AKIA" not in out.read_text()
    vit(prefect_env, "schedule", "remove", "nightly")


def test_a_firing_runs_the_pipeline_then_costs_seconds_when_nothing_changed_and_skips_a_busy_workdir(
    prefect_env, worker, tiny_finetune, tmp_path
):
    from pipelines.orchestration.lease import WorkdirLease

    workdir = tmp_path / "work"
    overrides = [*tiny_finetune, "workdir=work", "tracking.enabled=false"]
    result = vit(prefect_env, "schedule", "add", "tiny", "local", *overrides, "--cron", "0 0 1 1 *", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    # two firings at once: one runs the pipeline, the other is skipped with Prefect's reason (which one is up to
    # the order the worker takes them in)
    fired = [vit(prefect_env, "schedule", "run", "tiny") for _ in range(2)]
    assert all(r.returncode == 0 for r in fired), [r.stderr for r in fired]
    ids = [r.stdout.split()[2].rstrip(":") for r in fired]
    deadline = time.monotonic() + 600
    final = ("Completed", "Cancelled", "Failed", "Crashed")
    while not all((ended := firings(prefect_env, "tiny")).get(i, {}).get("state") in final for i in ids):
        assert time.monotonic() < deadline, worker.read_text()[-3000:]
        time.sleep(2)
    outcomes = sorted((ended[i]["state"], ended[i]["message"] or "") for i in ids)
    assert [state for state, _ in outcomes] == ["Cancelled", "Completed"], (outcomes, worker.read_text()[-3000:])
    assert "Deployment concurrency limit reached" in outcomes[0][1]
    assert outcomes[1][1].startswith("ran corpus, shard, finetune, evaluate, register in ")
    # `workdir=work` resolved in the folder where the schedule was added, not the worker's
    assert json.loads((workdir / "pipeline" / "register.json").read_text())["status"] == "done"

    started = time.monotonic()
    again = vit(prefect_env, "schedule", "run", "tiny", "--wait", "--timeout", "300")
    assert again.returncode == 0 and "Completed: ran nothing (every step cached)" in again.stdout, again.stdout
    assert time.monotonic() - started < 120

    with WorkdirLease(str(workdir), log=lambda _: None):  # someone runs the pipeline by hand meanwhile
        busy = vit(prefect_env, "schedule", "run", "tiny", "--wait", "--timeout", "300")
    assert busy.returncode == 0 and "Cancelled: skipped: workdir" in busy.stdout and f"pid {os.getpid()}" in busy.stdout
    listed = schedules(prefect_env)["tiny"]
    assert listed["last_state"] == "Cancelled" and "in use by" in listed["last_message"]
    vit(prefect_env, "schedule", "remove", "tiny")


def test_a_firing_for_a_cluster_submits_there_and_fails_with_the_reason_when_it_does_not_answer(
    prefect_env, worker, unused_port, tmp_path
):
    address = f"http://127.0.0.1:{unused_port()}"
    overrides = ["workdir=/tmp/vit-never", "tracking.uri=http://127.0.0.1:5000"]
    result = vit(prefect_env, "schedule", "add", "remote", "local", *overrides, "--cron", "0 0 1 1 *",
                 "--address", address, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert schedules(prefect_env)["remote"]["address"] == address
    fired = vit(prefect_env, "schedule", "run", "remote", "--wait", "--timeout", "300")
    assert fired.returncode == 1 and ": Failed" in fired.stdout, fired.stdout + fired.stderr
    assert address.removeprefix("http://") in worker.read_text()  # the worker's log: where it tried to submit
    vit(prefect_env, "schedule", "remove", "remote")


def test_serve_without_a_team_server_starts_a_local_one_on_loopback_with_its_store_in_the_data_folder(
    prefect_env, unused_port, tmp_path
):
    env = {k: v for k, v in prefect_env.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env |= {"VIT_SCHEDULE_PORT": str(unused_port()), "XDG_DATA_HOME": str(tmp_path / "data")}
    serve = subprocess.Popen([VIT, "schedule", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while (listed := vit(env, "schedule", "list")).returncode != 0:
            assert serve.poll() is None and time.monotonic() < deadline, listed.stderr
            time.sleep(1)
        assert "no schedules" in listed.stdout
        assert (tmp_path / "data" / "vit" / "prefect" / "prefect.db").exists()
        assert vit(env, "schedule", "add", "local-one", "local", "--cron", "0 3 * * *").returncode == 0
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        out, _ = serve.communicate(timeout=60)
    assert f"starting the local scheduler on http://127.0.0.1:{env['VIT_SCHEDULE_PORT']}/api" in out
