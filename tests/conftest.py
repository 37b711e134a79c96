"""Fixtures shared by every test package."""

from __future__ import annotations

import os

import pytest


def _start_local_ray() -> None:
    """More logical CPUs than cores: Ray Data's operators and Ray Train's workers each reserve CPUs,
    and on a 2-core machine a strict budget deadlocks them (see STACK-NOTES)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=max(4, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (starting one costs ~5 s on 2 cores)."""
    import ray

    _start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_two_nodes():
    """A real two-node Ray cluster (head: 4 CPUs, worker: 2 CPUs) in place of the shared local instance,
    which is started again afterwards. Yields the cluster and its worker node (to kill)."""
    import ray
    from ray.cluster_utils import Cluster

    had_local = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_local:
            _start_local_ray()


@pytest.fixture(scope="session")
def unused_port():
    """A function returning a port nothing listens on (for a server a test starts, or one that must not answer)."""
    return free_port


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` (sqlite backend, artifacts proxied to a local folder) on 127.0.0.1, in its
    own process group: it forks workers, and ending only the parent would leave them serving."""

    def __init__(self, root, port: int | None = None):
        import subprocess
        import sys
        from pathlib import Path

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        mlflow = Path(sys.executable).parent / "mlflow"
        self.log = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
            + ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
            + ["--artifacts-destination", str(self.root / "artifacts")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # MLflow 3's server also starts eight GenAI job consumers (~2 GB); a tracking server needs none.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )

    def wait_ready(self, timeout: float = 120.0) -> MlflowServer:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.read().strip() == b"OK":
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server on {self.uri} not ready after {timeout:.0f} s")

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except ProcessLookupError:
            pass
        except Exception:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One tracking server for the session (starting one takes 10-30 s here). Yields its ``MlflowServer``;
    tests keep apart by using experiments and registered model names of their own."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).wait_ready()
    yield server
    server.stop()


@pytest.fixture
def mlflow_uri(mlflow_server, monkeypatch) -> str:
    """The session server's URI, also set as ``MLFLOW_TRACKING_URI`` for the test (and its subprocesses)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return mlflow_server.uri


@pytest.fixture(scope="session", autouse=True)
def local_tracking_store(tmp_path_factory):
    """Runs that track by default (every training) go to a sqlite store of the session's own, never to a
    ./mlflow.db in the checkout: the local single-node default, exercised by every training test."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow-local') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri
