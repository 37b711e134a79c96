"""The tracking server going away must not cost a training run anything: rank 0 buffers and retries, the
driver reconciles at the end. The outage is real: a TCP relay in front of the session's `mlflow server`
that can refuse and cut connections."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from pipelines.tracking.tracking import LiveMetrics, LiveTarget, Tracker, TrackingConfig, flatten, tracking_uri


class Relay:
    """127.0.0.1:port -> the MLflow server; ``down()`` cuts every open connection and refuses new ones."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.is_up = True
        self.refused = 0
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if not self.is_up:
                    self.refused += 1
                    client.close()
                    continue
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
                self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        with self.lock:
            self.is_up = False
            for s in self.open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self.open.clear()

    def up(self) -> None:
        with self.lock:
            self.is_up = True

    def close(self) -> None:
        self.listener.close()
        self.down()


@pytest.fixture
def relay(mlflow_server):
    relay = Relay(mlflow_server.port)
    yield relay
    relay.close()


def losses(uri: str, run_id: str) -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "train/loss"))


def test_live_metrics_buffer_through_an_outage_and_hand_back_what_never_got_through(
    relay, mlflow_server, monkeypatch, caplog
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # LiveMetrics sets these for its process
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    tracker = Tracker(TrackingConfig(uri=mlflow_server.uri, experiment="outage-unit"))
    run_id = tracker.start_run(key="unit", name="unit")
    relay.down()
    live = LiveMetrics(LiveTarget(uri=relay.uri, run_id=run_id, system_metrics=False), flush_seconds=0.2)
    caplog.set_level(logging.WARNING, logger="pipelines.tracking.tracking")
    for step in range(1, 6):
        live.log(step, {"train/loss": 1.0 / step})
    deadline = time.monotonic() + 30
    while relay.refused == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert relay.refused > 0 and losses(mlflow_server.uri, run_id) == []
    assert any("unreachable" in r.getMessage() and "training goes on" in r.getMessage() for r in caplog.records)

    relay.up()  # the buffered values go out on a later attempt, with a note that the server is back
    deadline = time.monotonic() + 60
    while losses(mlflow_server.uri, run_id) != [1, 2, 3, 4, 5] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert losses(mlflow_server.uri, run_id) == [1, 2, 3, 4, 5]
    assert any("answers again" in r.getMessage() for r in caplog.records)

    relay.down()  # down at the end: nothing is dropped, it is handed back for the driver to send
    for step in range(6, 9):
        live.log(step, {"train/loss": 1.0 / step, "train/lr": 0.1})
    unsent = live.close(timeout=5)
    assert sorted(r["step"] for r in unsent) == [6, 7, 8] and all(r["train/lr"] == 0.1 for r in unsent)
    assert any("took no metrics for 3 steps" in r.getMessage() for r in caplog.records)
    assert tracker.sync_metrics(run_id, unsent) == 6  # 3 steps x 2 keys, sent by the driver
    assert tracker.sync_metrics(run_id, unsent) == 0  # and never twice
    assert losses(mlflow_server.uri, run_id) == list(range(1, 9))


def test_a_restarted_rank_0_does_not_log_again_the_steps_its_predecessor_sent(mlflow_server, monkeypatch):
    """A worker group restarted by Ray Train resumes at its last checkpoint, behind what the previous rank 0 had
    already sent; the skip point the driver read before training is older still. The new rank 0 asks the server."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = Tracker(TrackingConfig(uri=mlflow_server.uri, experiment="restart-unit"))
    run_id = tracker.start_run(key="restart-unit", name="unit")
    target = LiveTarget(uri=mlflow_server.uri, run_id=run_id, system_metrics=False)  # skip point read: none yet
    first = LiveMetrics(target, flush_seconds=0.1)
    for step in range(1, 14):  # trained to 13; checkpoint at 10
        first.log(step, {"train/loss": 1.0 / step, "train/lr": 0.1})
    assert first.close(timeout=10) == []
    second = LiveMetrics(target, flush_seconds=0.1)
    for step in range(11, 21):  # resumed at 10: steps 11-13 again, then on
        second.log(step, {"train/loss": 2.0 / step, "train/lr": 0.2})
    assert second.close(timeout=10) == []
    from mlflow import MlflowClient

    history = MlflowClient(mlflow_server.uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 21))  # every step once
    assert {m.step: m.value for m in history}[12] == 1.0 / 12  # as first sent
    assert losses(mlflow_server.uri, run_id) == list(range(1, 21))


def test_training_finishes_through_a_tracking_outage_and_loses_no_step(relay, mlflow_server, synth_shards, tmp_path):
    """The relay goes down at pretraining's first checkpoint and comes back only after its last: the run
    finishes, and MLflow ends up with every step's loss exactly once and the run FINISHED."""
    from mlflow import MlflowClient

    from pipelines.training.config import load_train_config
    from pipelines.training.driver import run_training

    steps = 40
    cfg = load_train_config(
        "pretrain",
        None,
        [
            "model=Mu/8", "data.image_size=32", "data.loader_workers=0", "batch_size=16", f"steps={steps}",
            "optim.warmup_steps=2", "log_every=10", "checkpoint_every=10", f"data.shards={synth_shards}",
            f"storage_path={tmp_path}", "name=outage", f"tracking.uri={relay.uri}", "tracking.experiment=outage",
            "tracking.system_metrics=false",
        ],
    )  # fmt: skip

    def cut_while_training() -> None:
        run_dir = Path(tmp_path) / "outage"
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoint-00000010" / "COMMITTED").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        relay.down()
        while not (run_dir / f"checkpoint-{steps:08d}" / "COMMITTED").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(3)  # the driver's first reconciliation attempts meet the outage too
        relay.up()

    watcher = threading.Thread(target=cut_while_training, daemon=True)
    watcher.start()
    messages: list[str] = []
    result = run_training(cfg, log=messages.append)
    watcher.join(timeout=60)
    assert result.steps == steps and relay.refused > 0
    run = MlflowClient(mlflow_server.uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert losses(mlflow_server.uri, result.mlflow_run_id) == list(range(1, steps + 1))
    assert any("missed" in m for m in messages), messages  # the driver said what it had to re-send


def test_an_unreachable_server_is_a_clear_error_before_any_work(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    from pipelines.tracking.tracking import TrackingError

    with pytest.raises(TrackingError, match=r"tracking.uri: MLflow at http://127.0.0.1:\d+ cannot be used"):
        Tracker(TrackingConfig(uri=f"http://127.0.0.1:{port}"))


def test_params_never_carry_credentials_and_the_local_default_is_absolute(monkeypatch, tmp_path):
    flat = flatten(
        {"optim": {"lr": 0.1}, "storage_options": {"secret": "s3cr3t"}, "data": {"storage_options": {"key": "k"}}}
    )
    assert flat == {"optim.lr": "0.1"}
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking_uri(TrackingConfig(uri="sqlite:///store.db")) == f"sqlite:///{tmp_path}/store.db"


def test_a_local_store_keeps_every_artifact_beside_its_database(monkeypatch, tmp_path):
    """The default sqlite store in a project folder: artifacts under PROJECT/mlartifacts, nowhere else (a
    hand-built ``file://`` + ``//abs/path`` was read as a host and wrote them under the filesystem root)."""
    import mlflow

    project = tmp_path / "home" / "alice" / "proj"
    project.mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project)
    tracker = Tracker(TrackingConfig(experiment="artifacts-here"))
    run_id = tracker.start_run(key="k", name="a run")
    tracker.log_text(run_id, "hello", "notes/hello.txt")
    tracker.log_dict(run_id, {"a": 1}, "a.json")
    artifact_uri = tracker.client.get_run(run_id).info.artifact_uri
    assert artifact_uri.startswith((project / "mlartifacts").as_uri() + "/")
    written = sorted(
        p.relative_to(project) for p in project.rglob("*") if p.is_file() and p.suffix in (".txt", ".json")
    )
    assert written == [
        Path("mlartifacts") / run_id / "artifacts" / "a.json",
        Path("mlartifacts") / run_id / "artifacts" / "notes" / "hello.txt",
    ]
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"{artifact_uri}/notes/hello.txt", dst_path=str(tmp_path))
    assert Path(local).read_text() == "hello"
