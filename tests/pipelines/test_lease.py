"""One pipeline per workdir: the lease refuses a live holder, takes over a dead one, and can be broken."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.orchestration.config import PipelineConfig
from pipelines.orchestration.lease import LEASE_FILE, LeaseLostError, WorkdirBusyError, WorkdirLease
from pipelines.orchestration.workflow import run_pipeline

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pipelines.orchestration.lease import WorkdirLease
    with WorkdirLease(sys.argv[1], ttl=float(sys.argv[2])):
        print("held", flush=True)
        time.sleep(300)
    """
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path/work``: a `vit run` in another terminal."""
    workdir = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir), "60"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield workdir, proc
    proc.kill()
    proc.wait()


def test_a_live_holder_is_refused_and_named_then_its_death_frees_the_workdir(holder):
    workdir, proc = holder
    with pytest.raises(WorkdirBusyError, match=rf"in use by .*\(pid {proc.pid}\).*--break-lock"):
        WorkdirLease(str(workdir), log=lambda _: None).acquire()
    proc.send_signal(signal.SIGKILL)  # killed: no release, the file stays behind
    proc.wait()
    assert (workdir / LEASE_FILE).exists()
    said = []
    with WorkdirLease(str(workdir), log=said.append) as lease:
        assert json.loads((workdir / LEASE_FILE).read_text())["token"] == lease.mine.token
    assert any(f"process {proc.pid} no longer exists" in line for line in said)
    assert not (workdir / LEASE_FILE).exists()  # given back at the end


def _foreign_lease(workdir, *, heartbeat_age: float) -> dict:
    now = time.time()
    lease = {"token": "x" * 32, "owner": "bob", "host": "elsewhere", "pid": 1, "acquired": now - 3600}
    lease["heartbeat"] = now - heartbeat_age
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / LEASE_FILE).write_text(json.dumps(lease))
    return lease


def test_a_lease_from_another_machine_expires_without_heartbeat_or_is_broken_on_purpose(tmp_path):
    workdir = tmp_path / "work"
    _foreign_lease(workdir, heartbeat_age=5)
    with pytest.raises(WorkdirBusyError, match="bob@elsewhere"):
        WorkdirLease(str(workdir), ttl=60, log=lambda _: None).acquire()
    said = []
    with WorkdirLease(str(workdir), ttl=60, break_lock=True, log=said.append):
        pass
    assert any("breaking the lock of bob@elsewhere" in line for line in said)
    _foreign_lease(workdir, heartbeat_age=61)
    said.clear()
    with WorkdirLease(str(workdir), ttl=60, log=said.append):
        pass
    assert any("no heartbeat for 61 s" in line for line in said)


def test_the_heartbeat_keeps_a_lease_alive_and_a_broken_holder_stops_before_its_next_step(tmp_path):
    workdir = tmp_path / "work"
    first = WorkdirLease(str(workdir), ttl=5, log=lambda _: None)
    first.acquire()
    try:
        beat0 = json.loads((workdir / LEASE_FILE).read_text())["heartbeat"]
        time.sleep(3)
        assert json.loads((workdir / LEASE_FILE).read_text())["heartbeat"] > beat0
        first.check()  # still ours
        # ttl has passed since the lease was taken, but the heartbeat says its holder lives
        with pytest.raises(WorkdirBusyError):
            WorkdirLease(str(workdir), ttl=5, log=lambda _: None).acquire()
        second = WorkdirLease(str(workdir), ttl=5, break_lock=True, log=lambda _: None)
        second.acquire()
        deadline = time.time() + 10
        while first.lost is None and time.time() < deadline:
            time.sleep(0.2)
        with pytest.raises(LeaseLostError, match="taken by"):
            first.check()
    finally:
        first.release()
    assert json.loads((workdir / LEASE_FILE).read_text())["token"] == second.mine.token  # not removed by `first`
    second.release()
    assert not (workdir / LEASE_FILE).exists()


def test_the_lease_works_on_s3(s3_bucket, s3_storage_options):
    import s3fs

    workdir = f"{s3_bucket}/pipelines/one"
    with WorkdirLease(workdir, s3_storage_options, log=lambda _: None) as lease:
        fs = s3fs.S3FileSystem(**s3_storage_options)
        assert json.loads(fs.cat_file(f"{workdir}/{LEASE_FILE}"))["token"] == lease.mine.token
        # a run elsewhere (another host, so its pid cannot be checked) is refused while the heartbeat lives
        other = WorkdirLease(workdir, s3_storage_options, log=lambda _: None)
        other.mine.host = "another-host"
        with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}"):
            other.acquire()
    assert not fs.exists(f"{workdir}/{LEASE_FILE}")


def test_a_pipeline_on_a_busy_workdir_stops_before_any_step(holder):
    workdir, proc = holder
    cfg = PipelineConfig(workdir=str(workdir))
    with pytest.raises(WorkdirBusyError, match=f"pid {proc.pid}"):
        run_pipeline(cfg, log=lambda _: None)
    assert sorted(p.name for p in workdir.iterdir()) == [LEASE_FILE]  # no step started, no state written


def test_a_second_vit_run_on_a_busy_workdir_exits_at_once_naming_the_holder(holder):
    workdir, proc = holder
    vit = str(Path(sys.executable).parent / "vit")
    started = time.monotonic()
    result = subprocess.run([vit, "run", f"workdir={workdir}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"(pid {proc.pid})" in result.stderr and "--break-lock" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 60
    assert sorted(p.name for p in workdir.iterdir()) == [LEASE_FILE]
