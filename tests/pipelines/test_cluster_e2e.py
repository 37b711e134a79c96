"""The whole pipeline the way a team runs it: a head and two worker nodes started with `ray start` (token
authentication on), the workdir on S3 (moto's server), tracking on a real `mlflow server` whose artifacts are on S3
too, the pipeline sent with `vit submit` from this machine; and the same setup through faults (a worker node killed
during sharding and during pretraining, the tracking server restarted during training, the job's driver killed and
the same `vit submit` run again), with nothing lost and nothing counted twice.

The nodes run the venv's Ray with a PATH that has no venv on it (a virtualenv that was never activated): the job's
entrypoint must find the interpreter of the cluster's Ray by itself. The cluster has credentials of its own (the
environment its nodes started with); the submitting side has none and `vit submit` sends none.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
VIT = str(Path(sys.executable).parent / "vit")
BUCKET = "vit-cluster"
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# The demo config at toy size, long enough to kill a node in the middle of pretraining.
TOY = [
    "pretrain_data.synth.images=400",
    "pretrain_data.shard_samples=25",
    "pretrain.steps=300",  # ~15 s here: time to kill a node in the middle
    "pretrain.batch_size=32",
    "pretrain.optim.warmup_steps=4",
    "pretrain.checkpoint_every=100",
    "pretrain.log_every=50",
    "pretrain.data.loader_workers=0",
    "pretrain.scale.placement_strategy=STRICT_SPREAD",  # one training worker on each worker node
    "finetune.steps=200",
    "finetune.batch_size=32",
    "finetune.optim.warmup_steps=2",
    "finetune.checkpoint_every=50",
    "finetune.log_every=50",
    "finetune.data.loader_workers=0",
    "finetune.scale.placement_strategy=STRICT_SPREAD",
    "evaluate.shots=[1,5]",
]


@dataclass
class Setup:
    nodes: object  # tests/conftest.py RayNodes: the head and the worker nodes
    workers: list  # the worker nodes' `ray start` processes
    address: str  # the dashboard: where `vit submit` sends jobs
    mlflow: object  # tests/conftest.py MlflowServer
    submit_env: dict  # this machine's environment: MLflow's URI, the S3 endpoint, the cluster's token; no credentials
    s3: object  # an s3fs filesystem on the moto server

    def vit(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            [VIT, *args], cwd=REPO, env=self.submit_env, capture_output=True, text=True, timeout=timeout
        )

    def submit(self, name: str, *extra: str, follow: bool = True) -> subprocess.CompletedProcess | str:
        """`vit submit` of the local config at toy size into ``s3://vit-cluster/<name>``."""
        settings = [*TOY, f"workdir=s3://{BUCKET}/{name}", f"tracking.experiment={name}"]
        settings += [f"register.model_name={name}", *extra]
        args = ["submit", "local", *settings, "--address", self.address]
        if follow:
            return self.vit(*args, "--follow")
        done = self.vit(*args, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return re.search(r"submitted (\S+) to ", done.stdout)[1]

    def worker_node_ids(self) -> set[str]:
        nodes = self.nodes.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return {n["node_id"] for n in nodes if n["state"] == "ALIVE" and not n["is_head_node"]}


@pytest.fixture(scope="module")
def cluster(s3_endpoint, servers, tmp_path_factory) -> Iterator[Setup]:
    import s3fs

    s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    if not s3.exists(BUCKET):
        s3.mkdir(BUCKET)
    token = secrets.token_hex(32)
    # The nodes' own environment: the venv's Ray run by path from a shell where the venv is not on the PATH, the
    # cluster's token, and its own S3 credentials (from the session's moto fixture).
    node_env = {**os.environ, "PATH": "/usr/bin:/bin", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    node_env["VIT_MLFLOW_FLUSH_SECONDS"] = "0.5"  # rank 0's steps reach MLflow while the short pretraining runs
    server_env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    mlflow = servers.MlflowServer(
        tmp_path_factory.mktemp("e2e-mlflow"), artifacts=f"s3://{BUCKET}/mlartifacts", env=server_env
    ).wait_ready()
    nodes = servers.RayNodes(node_env)
    setup = None
    try:
        address = nodes.start_head(num_cpus=0)  # the head schedules no work, as on a GPU fleet
        workers = [nodes.add_worker(num_cpus=2) for _ in range(2)]
        submit_env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
        submit_env.update(MLFLOW_TRACKING_URI=mlflow.uri, RAY_AUTH_TOKEN=token)
        setup = Setup(nodes, workers, address, mlflow, submit_env, s3)
        yield setup
    finally:
        left = nodes.shutdown()
        (setup.mlflow if setup else mlflow).stop()  # the server as it is now: a test may have restarted it
    assert not left, f"processes of the test cluster still running: {left}"


def _wait_for(what: str, found, timeout: float = 300, poll: float = 0.2, context=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"no {what} after {timeout:.0f} s: {context()}")


def test_the_pipeline_runs_across_the_nodes_through_faults_and_its_champion_predicts_here(cluster, tmp_path):
    """One submitted pipeline, and meanwhile: a worker node killed while it shards; the worker node that does not
    hold rank 0 killed during pretraining, and the tracking server restarted while the resumed pretraining logs to
    it (a replacement node joins each time, as an autoscaler would provide); the job's driver killed during
    fine-tuning. Then
    the same `vit submit` again: it resumes where the first stopped and finishes. Nothing is lost or counted twice,
    and what the job registered loads and predicts here."""
    import mlflow

    name, s3, nodes = "e2e", cluster.s3, cluster.nodes
    started = time.monotonic()
    job_id = cluster.submit(name, follow=False)
    workdir = f"{BUCKET}/{name}"
    worker_nodes = cluster.worker_node_ids()  # every worker node the job ever had

    def committed(run: str, step: int) -> bool:
        s3.invalidate_cache()
        return bool(s3.glob(f"{workdir}/runs/{run}-*/checkpoint-{step:08d}/COMMITTED"))

    def job_logs() -> str:
        return nodes.api(f"/api/jobs/{job_id}/logs")["logs"]

    def replace(victim) -> None:
        nodes.kill(victim)
        cluster.workers.remove(victim)
        cluster.workers.append(nodes.add_worker(num_cpus=2))
        worker_nodes.update(cluster.worker_node_ids())

    # 1. A worker node dies while its sharding tasks run: Ray Data retries them on the other nodes.
    def tars() -> list[str]:
        s3.invalidate_cache()
        return [p for p in s3.find(f"{workdir}/shards/synth") if p.endswith(".tar")]

    _wait_for("pretraining shards being written", tars)
    replace(cluster.workers[0])

    # 2. The worker node that does not hold rank 0 dies after a checkpoint, once rank 0 has sent MLflow some steps
    # after it: the run resumes from the checkpoint, and re-trains those steps without logging them again.
    client = mlflow.MlflowClient(cluster.mlflow.uri)

    def logged_through(step: str) -> int:
        runs = client.search_runs(
            [client.get_experiment_by_name(name).experiment_id], filter_string=f"tags.`vit.step` = '{step}'"
        )
        history = client.get_metric_history(runs[0].info.run_id, "train/loss") if runs else []
        return max((m.step for m in history), default=0)

    def logged_after_a_checkpoint() -> tuple[int, int] | None:
        logged = logged_through("pretrain")
        checkpoint = max((step for step in (100, 200) if committed("pretrain", step)), default=0)
        # soon after the checkpoint, so that the kill comes well before the pretraining's end on a fast machine
        return (checkpoint, logged) if 0 < checkpoint < logged < checkpoint + 50 else None

    seen = _wait_for(
        "pretraining steps in MLflow after a checkpoint", logged_after_a_checkpoint, context=lambda: job_logs()[-4000:]
    )
    print("killing a node at (checkpoint, step in MLflow)", seen, flush=True)
    rank0 = re.search(r"rank 0 on node (\w+)", job_logs())[1]
    replace(next(w for w in cluster.workers if not nodes.node_id(w).startswith(rank0)))

    # 3. The tracking server restarts (same store, same port) while the resumed pretraining logs to it.
    resumed = lambda: re.search(r"resuming at step \d+: 300 steps", job_logs())  # noqa: E731
    _wait_for("resumed pretraining", resumed, timeout=120, context=lambda: job_logs()[-3000:])
    cluster.mlflow = cluster.mlflow.restarted()  # the training goes on meanwhile

    # 4. The job's driver is killed during fine-tuning; the job fails. The same `vit submit` again finishes it.
    _wait_for("first fine-tuning checkpoint", lambda: committed("finetune", 50))
    os.kill(int(nodes.api(f"/api/jobs/{job_id}")["driver_info"]["pid"]), 9)
    _wait_for("the first job to end", lambda: nodes.api(f"/api/jobs/{job_id}")["status"] == "FAILED", timeout=60)
    first_logs = job_logs()
    again = cluster.submit(name)
    output = again.stdout + again.stderr
    assert again.returncode == 0 and "SUCCEEDED" in output, output[-5000:]
    print(f"pipeline through the faults: {time.monotonic() - started:.0f} s")

    # The first job: on the interpreter of the cluster's Ray although `python` on the nodes' PATH is another one;
    # its progress in its log, step by step; the pretraining resumed after the node died.
    assert f"vit: python is {sys.executable}" in first_logs
    for step in range(50, 301, 50):
        assert re.search(rf"step {step}\s+epoch", first_logs), first_logs[-5000:]
    assert re.search(r"resuming at step [12]00: 300 steps", first_logs), first_logs[-5000:]
    # The second: the steps done are skipped, the fine-tuning resumes from its checkpoint.
    for step in ("corpus", "shard", "pretrain"):
        assert re.search(rf"\] {step}: done earlier with these settings", output), output[-5000:]
    assert re.search(r"\] finetune: resuming the attempt that stopped", output)
    assert re.search(r"resuming at step (50|100|150): 200 steps", output), output[-5000:]

    # Sharding and training ran on the worker nodes, on more than one (the head has no CPUs to give).
    query = "limit=10000&detail=1&filter_keys=job_id&filter_predicates=%3D&filter_values="
    query += nodes.api(f"/api/jobs/{job_id}")["job_id"]
    tasks = nodes.api(f"/api/v0/tasks?{query}")["data"]["result"]["result"]
    actors = nodes.api(f"/api/v0/actors?{query}")["data"]["result"]["result"]
    sharding = {t["node_id"] for t in tasks if t["type"] == "NORMAL_TASK" and "Map" in t["name"]}
    training = {a["node_id"] for a in actors if a["class_name"] == "RayTrainWorker"}
    assert len(sharding) >= 2 and sharding <= worker_nodes, (sharding, worker_nodes)
    assert len(training) >= 2 and training <= worker_nodes, (training, worker_nodes)

    # Nothing lost, nothing twice: the shards balance and verify, every sample once.
    summary = json.loads(s3.cat_file(f"{workdir}/shards/synth/summary.json"))["summary"]
    assert summary["read"] == summary["written"] + summary["rejected"] == 400, summary
    import pyarrow.parquet as pq

    with s3.open(f"{workdir}/shards/synth/manifest.parquet") as f:
        assert sum(row["samples"] for row in pq.read_table(f).to_pylist()) == summary["written"]
    state = json.loads(s3.cat_file(f"{workdir}/pipeline/shard.json"))
    for key in ("shards_pretrain", "shards_finetune"):
        verified = subprocess.run([VIT, "shard", "verify", state["outputs"][key]], capture_output=True, text=True)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    # Every training step in MLflow exactly once, across the node kill, the server restart and the driver kill.
    experiment = client.get_experiment_by_name(name).experiment_id
    for step, total in (("pretrain", 300), ("finetune", 200)):
        runs = client.search_runs([experiment], filter_string=f"tags.`vit.step` = '{step}'")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info for r in runs]
        for key in ("train/loss", "train/lr", "train/grad_norm"):
            steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, key))
            assert steps == list(range(1, total + 1)), (step, key, steps)
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1 and client.get_model_version_by_alias(name, "champion").version == "1"

    # The champion the job registered loads here from the server (its artifacts on S3, proxied) and predicts.
    from PIL import Image
    from sklearn.datasets import load_digits

    digit = load_digits()
    Image.fromarray((digit.images[0] * 255 / 16).astype("uint8")).convert("RGB").save(tmp_path / "digit.png")
    predicted = cluster.vit("predict", f"models:/{name}@champion", str(tmp_path / "digit.png"))
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    assert "digit.png" in predicted.stdout
    assert s3.ls(f"{BUCKET}/mlartifacts")  # the server put the artifacts on S3
