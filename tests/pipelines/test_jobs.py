"""`vit submit` and `vit jobs`: the pipeline as a Ray Job, against a real local cluster started with `ray start --head`.

The cluster is started once for the module (~10-20 s on 2 cores) in a session of its own, with its own ports and a
temp dir of its own, so it neither sees nor disturbs other Ray instances on the machine (never `ray stop`: that ends
every Ray instance of the user). Quick jobs use ``entrypoint`` so they test the submission, not the pipeline: the
pipeline itself goes to a multi-node cluster in test_cluster_e2e.py.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipelines.cli import jobs as jobs_cli
from pipelines.orchestration import jobs, package
from pipelines.orchestration.jobs import JobsError

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> tuple[int, str]:
    """Run ``vit submit`` (when the first word is ``submit``) or ``vit jobs ...``; return (exit code, all output)."""
    command = jobs_cli.submit if args[0] == "submit" else jobs_cli.jobs
    result = CliRunner().invoke(command, list(args[1:] if args[0] == "submit" else args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _assert_user_error(code: int, output: str, *fragments: str) -> None:
    assert code == 2, output
    assert output.startswith("error: "), output
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in output, output


# --------------------------------------------------------------------------------------------------------------------
# without a cluster


def test_the_entrypoint_reads_the_config_from_the_environment_and_quotes_overrides():
    overrides = ["train.steps=3", "name=two words", "x=$(touch /tmp/pwned)"]
    command = package.pipeline_entrypoint("configs/big.yaml", overrides)
    assert command.startswith(f"sh {package.CLUSTER_PYTHON} -m pipelines.cli run env:VIT_PIPELINE_YAML ")
    assert shlex.split(command)[6:] == overrides  # the shell gives the command exactly the words we meant
    assert package.pipeline_entrypoint(None, ["a=1"]) == f"sh {package.CLUSTER_PYTHON} -m pipelines.cli run a=1"


def _run_under_a_raylet(command: str, env: dict, worker_python: str) -> subprocess.CompletedProcess:
    """``command`` in a shell started by a stand-in for a raylet (the system Python, with the raylet's argument
    naming the interpreter of Ray's workers), the way a Ray Job's supervisor starts its entrypoint."""
    raylet = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1], shell=True))"
    argv = ["/usr/bin/python3", "-c", raylet, command, f"--python_worker_command={worker_python} -u default_worker.py"]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_the_entrypoint_runs_the_python_of_the_clusters_ray_not_the_first_on_the_path():
    bare = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}  # a venv that was never activated
    probe = "import pipelines, ray, sys; print(sys.executable, ray.__version__)"
    command = f"sh {package.CLUSTER_PYTHON} -c {shlex.quote(probe)}"
    done = _run_under_a_raylet(command, bare, sys.executable)
    assert done.returncode == 0, done.stderr
    import ray

    assert done.stdout.split() == [sys.executable, ray.__version__]
    assert f"vit: python is {sys.executable}" in done.stderr  # the job's log says which interpreter ran it

    # VIT_PYTHON, where `ray start` ran, wins; without it and without a raylet above, python3 on the PATH.
    done = _run_under_a_raylet(command, {**bare, "VIT_PYTHON": "/nonexistent/python"}, sys.executable)
    assert done.returncode != 0 and "/nonexistent/python" in done.stderr
    done = subprocess.run(
        ["sh", package.CLUSTER_PYTHON, "-c", "import sys; print(sys.executable)"],
        cwd=REPO,
        env=bare,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == shutil.which("python3", path=bare["PATH"])


def test_the_runtime_env_ships_the_config_text_and_endpoints_but_no_credentials(tmp_path, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text("train:\n  steps: 3  # tiny\n")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# extras for the job\nrequests>=2\n\ntqdm  # progress bars\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-do-not-ship")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-do-not-ship")

    runtime_env = package.pipeline_runtime_env(
        str(config), working_dir=str(tmp_path), requirements=str(requirements), env={"VIT_EXTRA": "1"}
    )
    assert runtime_env["working_dir"] == str(tmp_path.resolve())
    assert {".git", ".venv", "__pycache__", "*.db", "/runs", "/mlruns"} <= set(runtime_env["excludes"])
    assert runtime_env["env_vars"] == {
        "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
        "AWS_ENDPOINT_URL": "http://minio.internal:9000",
        "VIT_PIPELINE_YAML": config.read_text(),
        "VIT_EXTRA": "1",
    }
    assert "do-not-ship" not in repr(runtime_env)
    assert runtime_env["pip"] == ["requests>=2", "tqdm"]
    assert "VIT_PIPELINE_YAML" not in package.pipeline_runtime_env(None, working_dir=str(tmp_path)).get("env_vars", {})


def test_a_tracking_url_with_a_password_is_refused_not_shipped(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@mlflow.internal:5000")
    with pytest.raises(JobsError) as refused:
        package.pipeline_runtime_env(None, working_dir=str(tmp_path))
    message = str(refused.value)
    assert "MLFLOW_TRACKING_URI" in message and "s3cret" not in message and "MLFLOW_TRACKING_PASSWORD" in message
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    with pytest.raises(JobsError, match="VIT_DB"):
        package.pipeline_runtime_env(None, working_dir=str(tmp_path), env={"VIT_DB": "postgresql://u:pw@db/x"})


def test_a_config_with_credentials_ships_without_them_and_says_how_the_cluster_gets_its_own(tmp_path, monkeypatch):
    secret = "wJalrXUtnFEMI-do-not-ship"
    config = tmp_path / "with-keys.yaml"
    config.write_text(
        f"workdir: s3://bucket/vit\nstorage_options: {{key: AKIA-do-not-ship, secret: {secret},"
        " client_kwargs: {endpoint_url: 'http://minio:9000'}}\n"
        f"pretrain_data: {{source: s3://bucket/corpus, storage_options: {{token: {secret}}}}}\n"
        "tracking: {uri: 'http://mlflow.internal:5000'}\n"
    )
    runtime_env = package.pipeline_runtime_env(str(config), working_dir=str(tmp_path))
    shipped = yaml.safe_load(runtime_env["env_vars"]["VIT_PIPELINE_YAML"])
    assert "do-not-ship" not in repr(runtime_env)
    assert shipped["storage_options"] == {"client_kwargs": {"endpoint_url": "http://minio:9000"}}
    assert shipped["pretrain_data"] == {"source": "s3://bucket/corpus", "storage_options": {}}
    lines: list[str] = []
    unreachable = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(JobsError, match="cannot reach"):  # the warning comes before the cluster is contacted
        jobs.submit_pipeline(str(config), address=unreachable, working_dir=str(tmp_path), log=lines.append)
    (warning,) = [line for line in lines if line.startswith("warning:")]
    assert "storage_options.key" in warning and "pretrain_data.storage_options.token" in warning
    assert "instance profile" in warning and "do-not-ship" not in warning
    # Overrides go into the entrypoint and --env into the job's environment: credentials there are refused.
    for kwargs in ({"overrides": [f"storage_options.secret={secret}"]}, {"env": {"AWS_SECRET_ACCESS_KEY": secret}}):
        with pytest.raises(JobsError, match="a credential.*instance profile") as err:
            jobs.submit_pipeline(str(config), address=unreachable, working_dir=str(tmp_path), **kwargs)
        assert secret not in str(err.value)


def test_a_pipeline_whose_results_nobody_could_reach_is_refused_before_submitting(tmp_path, monkeypatch):
    """Without a tracking server the job would track into a sqlite file in Ray's temporary working dir copy, and the
    printed `vit predict models:/...@champion` would find nothing from here."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    unreachable = f"http://127.0.0.1:{_free_port()}"
    shared = f"workdir={tmp_path / 'work'}"

    def submit(*overrides: str, env: dict | None = None) -> None:
        jobs.submit_pipeline(None, overrides, address=unreachable, working_dir=str(tmp_path), env=env)

    with pytest.raises(JobsError, match=r"tracking.uri: the default store \(./mlflow.db\) lands in Ray's temporary"):
        submit(shared)
    with pytest.raises(JobsError, match="tracking.uri: the store sqlite:///mlflow.db lands"):
        submit(shared, "tracking.uri=sqlite:///mlflow.db")
    with pytest.raises(JobsError, match="workdir 'runs/demo': a relative path lands"):
        submit("tracking.uri=http://mlflow.internal:5000")
    with pytest.raises(JobsError, match=r"pretrain.scale.num_workers: must be at least 1"):  # as `vit run` says it
        submit(shared, "pretrain.scale.num_workers=0")
    for ok in (
        [shared, "tracking.uri=http://mlflow.internal:5000"],
        [shared, "tracking.enabled=false"],
        [shared, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],  # absolute: reachable on a one-machine cluster
    ):
        with pytest.raises(JobsError, match="cannot reach a Ray dashboard"):  # past the checks, to the cluster
            submit(*ok)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")  # forwarded to the job
    with pytest.raises(JobsError, match="cannot reach a Ray dashboard"):
        submit(shared)


def test_bad_inputs_fail_before_anything_is_sent(tmp_path):
    unreachable = f"http://127.0.0.1:{_free_port()}"  # never contacted: each problem is found first
    (tmp_path / "list.yaml").write_text("- not\n- a mapping\n")
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    cases = [
        ({"config_path": str(tmp_path / "missing.yaml")}, "no such file"),
        ({"config_path": str(tmp_path / "list.yaml")}, "expected a mapping"),
        ({"config_path": str(tmp_path / "broken.yaml")}, "not valid YAML"),
        ({"config_path": None, "overrides": ["steps"]}, "not of the form key.sub=value"),
        ({"config_path": None, "working_dir": str(tmp_path / "nowhere")}, "no such directory"),
        ({"config_path": None, "env": {"BAD NAME": "1"}}, "not a valid environment variable name"),
        ({"config_path": None, "requirements": str(tmp_path / "none.txt")}, "no such file"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("working_dir", str(tmp_path))
        with pytest.raises(JobsError, match=re.escape(message)):
            jobs.submit_pipeline(address=unreachable, **kwargs)


def test_a_working_dir_over_rays_upload_limit_is_refused_with_its_largest_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(package, "MAX_PACKAGE_BYTES", 10_000)
    (tmp_path / "code.py").write_text("print('hi')\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "pack").write_bytes(b"x" * 50_000)  # excluded: does not count
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ckpt.bin").write_bytes(b"x" * 50_000)  # excluded: does not count
    assert package.package_size(str(tmp_path)) == (1, len("print('hi')\n"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "images.bin").write_bytes(b"x" * 20_000)
    with pytest.raises(JobsError, match=r"over Ray's limit.*largest: data 0\.0 MiB.*\.rayignore"):
        package.package_size(str(tmp_path))


def test_the_upload_estimate_follows_ignore_files_in_every_folder_as_rays_walk_does(tmp_path, monkeypatch):
    def write(relative: str, size: int = 10) -> None:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)

    write("code.py")
    write("logs/run.log")
    (tmp_path / ".gitignore").write_text("*.log\n/build\n")
    write("build/out.bin")  # anchored in the top .gitignore
    write("pkg/build/keep.bin")  # "/build" matches only at the top
    write("pkg/module.py")
    (tmp_path / "pkg" / ".rayignore").write_text("cache/\nsecret*.txt\n")
    write("pkg/cache/blob.bin", 1000)
    write("pkg/secret-notes.txt")
    write("pkg/__pycache__/m.pyc")  # one of Ray's own default excludes
    write("other/secret-notes.txt")  # the .rayignore of pkg/ does not reach here
    counted = {
        "code.py",
        ".gitignore",
        "pkg/build/keep.bin",
        "pkg/module.py",
        "pkg/.rayignore",
        "other/secret-notes.txt",
    }
    size = sum((tmp_path / p).stat().st_size for p in counted)
    assert package.package_size(str(tmp_path)) == (len(counted), size)
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")  # Ray's switch: .gitignore no longer applies
    assert package.package_size(str(tmp_path)) == (len(counted) + 1, size + 10)  # logs/run.log (/build: ours too)


def test_the_default_address_is_the_environments_dashboard_url_or_the_local_one(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs.default_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a GCS address for ray.init, not a Jobs API
    assert jobs.default_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "https://ray.example.org/")
    assert jobs.default_address() == "https://ray.example.org"


def test_an_unreachable_address_is_a_clear_error():
    address = f"http://127.0.0.1:{_free_port()}"
    code, output = _cli("list", "--address", address)
    _assert_user_error(code, output, address, "8265", "ray[default]")
    code, output = _cli("submit", "--address", "ftp://somewhere", "--working-dir", str(REPO), "a=1")
    _assert_user_error(code, output, "expected an http(s):// URL")


# --------------------------------------------------------------------------------------------------------------------
# against a real cluster


@dataclass(frozen=True)
class RayHead:
    address: str  # the dashboard: the Jobs API
    gcs_port: int  # a live port that is not a dashboard


@pytest.fixture(scope="module")
def ray_head(servers) -> Iterator[RayHead]:
    """A real head node with the dashboard, on free ports, in its own session; stopped (and checked) afterwards."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in a custom entrypoint: this venv's
    nodes = servers.RayNodes(env)
    try:
        yield RayHead(address=nodes.start_head(num_cpus=4), gcs_port=nodes.gcs_port)
    finally:
        left = nodes.shutdown()
    assert not left, f"processes of the test cluster still running: {left}"


def _wait_until_running(address: str, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (status := jobs.job_status(address, job_id).status) == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status == "RUNNING", status


@pytest.mark.distributed
def test_a_quick_job_runs_the_uploaded_code_and_its_logs_and_status_come_back(ray_head):
    marker = uuid.uuid4().hex[:8]
    code = (
        f"import sys, pipelines, vit; print('hello from', vit.__name__, '{marker}', pipelines.__file__, sys.executable)"
    )
    job_id = jobs.submit_pipeline(
        None, [], address=ray_head.address, working_dir=str(REPO), entrypoint=f'python -c "{code}"'
    )
    assert job_id.startswith("vit-run-")
    info = jobs.wait_for_job(ray_head.address, job_id, timeout=120, poll_s=0.5)
    assert info.status == "SUCCEEDED", info.message
    assert info.terminal and info.succeeded and info.exit_code == 0
    assert info.start_time is not None and info.end_time is not None and info.end_time >= info.start_time
    assert info.metadata["submitted_with"] == "vit submit" and info.metadata["config"] == "(built-in default)"

    logs = jobs.job_logs(ray_head.address, job_id)
    line = next(line for line in logs.splitlines() if line.startswith(f"hello from vit {marker}"))
    _, _, _, _, module_file, python = line.split()
    assert not module_file.startswith(str(REPO))  # the job imported the uploaded copy, not this checkout
    assert python.startswith(str(VENV_BIN))  # and ran with this venv's python

    assert job_id in [job.job_id for job in jobs.list_jobs(ray_head.address)]
    code_, output = _cli("list", "--address", ray_head.address)
    assert code_ == 0 and job_id in output and "SUCCEEDED" in output
    code_, output = _cli("status", job_id, "--address", ray_head.address)
    assert code_ == 0 and re.search(r"status\s+SUCCEEDED", output), output
    code_, output = _cli("logs", job_id, "--address", ray_head.address)
    assert code_ == 0 and f"hello from vit {marker}" in output


@pytest.mark.distributed
def test_the_working_dir_the_config_text_and_the_endpoints_reach_the_job(ray_head, tmp_path, monkeypatch):
    (tmp_path / "data.txt").write_text("shipped with the job\n")
    config = tmp_path / "tiny.yaml"
    config.write_text("train:\n  steps: 3\nname: from-the-config\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/mlflow")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-do-not-ship")  # set after the cluster started: only a leak
    script = (
        "import os; print(open('data.txt').read().strip()); print(os.environ['VIT_PIPELINE_YAML']);"
        " names = ('MLFLOW_TRACKING_URI', 'VIT_EXTRA', 'AWS_SECRET_ACCESS_KEY');"
        " [print(k, os.environ.get(k, 'absent')) for k in names]"
    )
    code, output = _cli(
        "submit",
        str(config),
        "train.steps=4",
        "--address",
        ray_head.address,
        "--working-dir",
        str(tmp_path),
        "--env",
        "VIT_EXTRA=42",
        "--entrypoint",
        f'python -c "{script}"',
        "--follow",
    )
    assert code == 0, output
    assert re.search(r"submitted (vit-run-\S+) to " + re.escape(ray_head.address), output)
    assert "vit jobs logs vit-run-" in output and "--follow" in output  # how to watch it
    assert "shipped with the job" in output
    assert config.read_text() in output
    assert "MLFLOW_TRACKING_URI http://127.0.0.1:9/mlflow" in output and "VIT_EXTRA 42" in output
    assert "secret-do-not-ship" not in output
    assert "SUCCEEDED" in output


@pytest.mark.distributed
def test_a_failing_job_reports_failed_and_submit_follow_exits_nonzero(ray_head, tmp_path):
    job_id = f"vit-test-fail-{uuid.uuid4().hex[:6]}"
    code, output = _cli(
        "submit",
        "--address",
        ray_head.address,
        "--working-dir",
        str(tmp_path),
        "--job-id",
        job_id,
        "--entrypoint",
        "python -c 'import sys; print(\"boom\"); sys.exit(3)'",
        "--follow",
    )
    assert code == 1, output
    assert "boom" in output and f"job {job_id} FAILED" in output
    info = jobs.job_status(ray_head.address, job_id)
    assert info.status == "FAILED" and info.exit_code == 3
    code, output = _cli("status", job_id, "--address", ray_head.address)
    assert code == 0 and "FAILED" in output and re.search(r"exit code\s+3", output), output


@pytest.mark.distributed
def test_stop_stops_a_sleeping_job(ray_head, tmp_path):
    job_id = jobs.submit_pipeline(None, address=ray_head.address, working_dir=str(tmp_path), entrypoint="sleep 300")
    _wait_until_running(ray_head.address, job_id)
    code, output = _cli("stop", job_id, "--address", ray_head.address)
    assert code == 0 and f"job {job_id} STOPPED" in output, output
    assert jobs.job_status(ray_head.address, job_id).status == "STOPPED"
    assert jobs.stop_job(ray_head.address, job_id) is False  # nothing left to stop


@pytest.mark.distributed
def test_an_unknown_job_id_and_a_port_that_is_no_dashboard_are_clear_errors(ray_head):
    for command in (["status"], ["logs"], ["logs", "--follow"], ["stop"]):
        code, output = _cli(command[0], "no-such-job", *command[1:], "--address", ray_head.address)
        _assert_user_error(code, output, "no job 'no-such-job'", ray_head.address)
    with pytest.raises(JobsError, match="no job 'no-such-job'"):
        jobs.job_status(ray_head.address, "no-such-job")

    wrong = f"http://127.0.0.1:{ray_head.gcs_port}"  # alive, but Ray's GCS (gRPC), not the dashboard
    code, output = _cli("list", "--address", wrong)
    _assert_user_error(code, output, wrong, "8265")
