"""Fixtures shared by every test package."""

from __future__ import annotations

import contextlib
import os
import re

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

    def __init__(self, root, port: int | None = None, *, artifacts: str | None = None, env: dict | None = None):
        """A server keeping its runs in ``root/mlflow.db`` and its artifacts in ``artifacts`` (default
        ``root/artifacts``; an ``s3://`` URL works with the S3 settings in ``env``). The same ``root`` and ``port``
        again is the same server restarted."""
        import subprocess
        import sys
        from pathlib import Path

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts, self.env = artifacts, env
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        mlflow = Path(sys.executable).parent / "mlflow"
        self.log = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
            + ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
            + ["--artifacts-destination", artifacts or str(self.root / "artifacts")],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # MLflow 3's server also starts eight GenAI job consumers (~2 GB); a tracking server needs none.
            env={**(env or os.environ), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
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

    def restarted(self) -> MlflowServer:
        """This server stopped, and started again on the same port with the same store."""
        self.stop()
        return MlflowServer(self.root, self.port, artifacts=self.artifacts, env=self.env).wait_ready()

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
def servers():
    """The classes that start real services for a test of its own (test modules cannot import this conftest):
    ``servers.MlflowServer``, ``servers.RayNodes``."""
    import types

    return types.SimpleNamespace(MlflowServer=MlflowServer, RayNodes=RayNodes)


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


class RayNodes:
    """Ray nodes started the way an operator starts them (``ray start --block``), on free ports of 127.0.0.1, each
    node in a session of its own (so that killing one is a node dying: its raylet and every worker on it) and with
    a temp dir of its own, as on separate machines (nodes sharing one would share the unpacked working dirs of
    jobs, and one node's clean-up would delete them under another's processes). The temp dirs are short: Ray's
    unix socket paths must stay under 107 characters.

    ``env`` is the environment the nodes start with: what ``ray start`` would see on a real machine."""

    AGENT_PORTS = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    CURRENT_CLUSTER = "/tmp/ray/ray_current_cluster"  # what a bare ray.init() attaches to: left as it was

    def __init__(self, env: dict[str, str]):
        import tempfile
        from pathlib import Path

        self.env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env["RAY_USAGE_STATS_ENABLED"] = "0"
        self.temp_dir = tempfile.mkdtemp(prefix="vn", dir="/tmp")
        marker = Path(self.CURRENT_CLUSTER)
        self.marker_before = marker.read_bytes() if marker.exists() else None
        self.nodes: list = []  # Popen of each live node's `ray start --block`
        self.node_dirs: dict[int, str] = {}  # the temp dir of each node ever started, by its Popen's pid
        self.gcs_port = self.dashboard_url = None

    def start_head(self, num_cpus: int, *, timeout: float = 180) -> str:
        """The head, with the dashboard on 127.0.0.1; returns the dashboard's URL once its Jobs API answers."""
        self.gcs_port, dashboard = free_port(), free_port()
        self._start(
            ["--head", "--port", str(self.gcs_port), "--include-dashboard=true", "--dashboard-host", "127.0.0.1"]
            + ["--dashboard-port", str(dashboard), "--ray-client-server-port", str(free_port())]
            + ["--disable-usage-stats"],
            num_cpus,
        )
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self._wait(lambda: isinstance(self.api("/api/jobs/"), list), timeout, "the head's Jobs API")
        return self.dashboard_url

    def add_worker(self, num_cpus: int, *, timeout: float = 120, attempts: int = 2):
        """A worker node joining the head; returns its process once the cluster counts it alive. On a busy machine
        a raylet can miss its start-up deadline ("The current node timed out during startup"): one more try."""
        alive = self.alive_nodes()
        for attempt in range(attempts):
            node = self._start(["--address", f"127.0.0.1:{self.gcs_port}"], num_cpus)
            try:
                self._wait(lambda: self.alive_nodes() > alive, timeout, "the new worker node")
                return node
            except RuntimeError:
                if node.poll() is None or attempt == attempts - 1:
                    raise
                self.nodes.remove(node)  # it exited: start another

    def alive_nodes(self) -> int:
        nodes = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return sum(1 for n in nodes if n["state"] == "ALIVE")

    def api(self, path: str) -> dict | list:
        """A GET of the dashboard's HTTP API, with the cluster's token when it has one."""
        import json
        import urllib.request

        request = urllib.request.Request(self.dashboard_url + path)
        token = self.env.get("RAY_AUTH_TOKEN")
        local = os.path.expanduser(self.env.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token")
        if not token and os.path.exists(local):  # where `ray start --head` keeps the token it made
            with open(local) as f:
                token = f.read().strip()
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def kill(self, node) -> None:
        """SIGKILL every process of ``node`` at once, as when its machine is lost."""
        import signal

        import psutil

        members = self._members(node.pid)
        for p in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        node.wait(timeout=30)
        psutil.wait_procs(members, timeout=30)
        self.nodes.remove(node)

    def shutdown(self) -> list[str]:
        """End every node (SIGTERM, then SIGKILL after 3 s: a graceful stop takes ~35 s here); returns the command
        lines of processes that outlived it (there should be none)."""
        import shutil
        import signal
        import time
        from pathlib import Path

        import psutil

        members = [p for node in self.nodes for p in self._members(node.pid)] + self._in_temp_dir()
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            for p in members:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(sig)
            _, members = psutil.wait_procs(members, timeout=wait)
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.wait(timeout=10)
        time.sleep(0.5)
        left = [" ".join(p.cmdline()) for p in self._in_temp_dir() if _alive(p)]
        marker = Path(self.CURRENT_CLUSTER)
        if self.marker_before is None:
            marker.unlink(missing_ok=True)
        elif marker.exists() and marker.read_bytes() != self.marker_before:
            marker.write_bytes(self.marker_before)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left

    def _start(self, args: list[str], num_cpus: int):
        import subprocess
        import sys
        from pathlib import Path

        ray = Path(sys.executable).parent / "ray"
        command = [str(ray), "start", "--block", "--num-cpus", str(num_cpus), "--node-ip-address", "127.0.0.1"]
        command += args + [arg for name in self.AGENT_PORTS for arg in (f"--{name}", str(free_port()))]
        node_dir = f"{self.temp_dir}/{len(self.node_dirs)}"
        command += ["--temp-dir", node_dir]
        log = open(f"{node_dir}.log", "wb")  # noqa: SIM115 - open for the node's lifetime
        node = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.temp_dir, start_new_session=True
        )
        self.nodes.append(node)
        self.node_dirs[node.pid] = node_dir
        return node

    def node_id(self, node) -> str:
        """Ray's id of ``node``, as its raylet logged it when it started."""
        from pathlib import Path

        log = Path(self.node_dirs[node.pid]) / "session_latest" / "logs" / "raylet.out"
        return re.search(r"Setting node ID node_id=(\w+)", log.read_text())[1]

    def _wait(self, ready, timeout: float, what: str) -> None:
        import time
        from pathlib import Path

        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except Exception as err:  # not up yet
                last = err
            else:
                last = None
            if time.monotonic() > deadline or any(node.poll() is not None for node in self.nodes):
                logs = "".join(p.read_text()[-1500:] for p in sorted(Path(self.temp_dir).glob("*.log")))
                raise RuntimeError(f"{what} not up after {timeout:.0f} s ({last}): {logs}")
            time.sleep(0.5)

    @staticmethod
    def _members(session: int) -> list:
        import psutil

        def in_session(p) -> bool:
            try:
                return os.getsid(p.pid) == session
            except OSError:
                return False

        return [p for p in psutil.process_iter() if in_session(p)]

    def _in_temp_dir(self) -> list:
        import psutil

        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.pid != os.getpid() and any(self.temp_dir in arg for arg in p.cmdline()):
                    found.append(p)
        return found


def _alive(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
