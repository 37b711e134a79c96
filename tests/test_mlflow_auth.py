"""MLflow's login and Host check as infra/mlflow/mlflow.yaml ships them, against a real ``mlflow server``: the
manifest's own shell command (its --app-name and --allowed-hosts) and env (each Secret's key stood in for by a test
value, the auth config file written as its Secret would mount it), on 127.0.0.1 with a sqlite store."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "vit"


def mlflow_container() -> dict:
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "infra/mlflow/mlflow.yaml").read_text()) if d}
    return docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def manifest_env(container: dict, secret_values: dict[tuple[str, str], str], files: dict[str, Path]) -> dict[str, str]:
    """The container's env as Kubernetes would set it, with ``secret_values[(secret, key)]`` for each secretKeyRef
    (an unknown one fails the test: a new Secret in the manifest needs a stand-in here) and files moved to ``files``."""
    env = {}
    for entry in container["env"]:
        if "value" in entry:
            value = entry["value"]
            env[entry["name"]] = str(files.get(value, value))
        elif "secretKeyRef" in entry["valueFrom"]:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secret_values[(ref["name"], ref["key"])]
        else:
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
            env[entry["name"]] = NAMESPACE
    return env


def manifest_argv(container: dict, env: dict[str, str], tmp: Path) -> list[str]:
    """What the manifest's /bin/sh command passes to ``mlflow`` (a stand-in first on PATH writes it down)."""
    fake = tmp / "fake-bin" / "mlflow"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf \'%s\\0\' "$@" > "$ARGV_OUT"\n')
    fake.chmod(0o755)
    out = tmp / "argv"
    run_env = {**env, "PATH": f"{fake.parent}:/usr/bin:/bin", "ARGV_OUT": str(out)}
    subprocess.run(container["command"] + container["args"], env=run_env, check=True, timeout=30)
    return out.read_text().split("\0")[:-1]


def replace_option(argv: list[str], name: str, value: str) -> list[str]:
    i = argv.index(name)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def request(url: str, *, host: str | None = None, auth: tuple[str, str] | None = None) -> int:
    headers = {}
    if host is not None:
        headers["Host"] = host
    if auth is not None:
        headers["Authorization"] = "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:  # not listening (yet)
        return 0


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, unused_port):
    """The manifest's server: returns (uri, admin username, admin password)."""
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    container = mlflow_container()
    admin, password = "admin", secrets.token_urlsafe(18)
    # basic_auth.ini as the mlflow-auth Secret holds it (the manifest's header), its users database in sqlite
    ini = tmp / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp / 'auth.db'}\n")
    env = manifest_env(
        container,
        {
            ("mlflow-db", "uri"): f"sqlite:///{tmp / 'mlflow.db'}",
            ("mlflow-admin", "username"): admin,
            ("mlflow-admin", "password"): password,
            ("mlflow-auth", "flask-secret-key"): secrets.token_hex(16),
        },
        files={"/etc/mlflow-auth/basic_auth.ini": ini},
    )
    argv = manifest_argv(container, env, tmp)
    port = unused_port()
    for name, value in (("--host", "127.0.0.1"), ("--port", str(port)), ("--workers", "1"),
                        ("--artifacts-destination", str(tmp / "artifacts"))):  # fmt: skip
        argv = replace_option(argv, name, value)
    assert argv[:1] == ["server"] and "--app-name" in argv and "--allowed-hosts" in argv
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed below
    server_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_"))}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), *argv],
        env={**server_env, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # it forks workers: end the whole group
        cwd=tmp,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while request(f"{uri}/health") != 200:
            assert process.poll() is None, (tmp / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server not ready"
            time.sleep(0.5)
        yield uri, admin, password
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


@pytest.mark.slow
def test_the_shipped_mlflow_server_wants_a_login_and_its_own_names(auth_server, monkeypatch, tmp_path):
    uri, admin, password = auth_server
    api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    # no login: 401 on the API; the readiness probe's /health needs none
    assert request(api) == 401
    assert request(f"{uri}/health", host="mlflow.vit.svc.cluster.local:5000") == 200
    assert request(api, auth=(admin, password + "x")) == 401
    # the Host check (--allowed-hosts as shipped): the Service's names pass, any other name is refused
    for host in ("mlflow:5000", "mlflow.vit.svc:5000", "mlflow.vit.svc.cluster.local:5000", "mlflow.vit"):
        assert request(api, host=host, auth=(admin, password)) == 200, host
    for host in ("evil.example.com", "mlflow.other.svc.cluster.local:5000", "10.0.0.7:5000"):
        assert request(api, host=host, auth=(admin, password)) == 403, host

    # MLflow's client with the admin's login from the environment, as clients in the cluster get theirs
    from mlflow import MlflowClient
    from mlflow.server import get_app_client

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("infra-auth")
    run = client.create_run(experiment)
    client.log_param(run.info.run_id, "model", "Ti/16")
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    (tmp_path / "note.txt").write_text("through the artifact proxy, logged in")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)
    got = client.get_run(run.info.run_id)
    assert got.data.params == {"model": "Ti/16"} and got.data.metrics == {"loss": 0.5}
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]

    # the pipeline's own user, made by the admin as the manifest's header says, logs runs the same way
    pipeline_password = secrets.token_urlsafe(18)
    get_app_client("basic-auth", tracking_uri=uri).create_user("vit-pipeline", pipeline_password)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "vit-pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", pipeline_password)
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("infra-auth-pipeline"))
    client.log_metric(run.info.run_id, "accuracy", 0.9)
    assert client.get_run(run.info.run_id).data.metrics == {"accuracy": 0.9}
