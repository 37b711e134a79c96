"""The benchmarks' shared harness: a worker's result comes back, a failure or a hang is reported, not waited on."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import harness  # noqa: E402


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "worker.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(Path(harness.__file__).parent)!r})\nimport harness\n{body}")
    return path


def test_a_workers_result_comes_back_with_what_the_parent_measured(tmp_path):
    body = "import time\nprint('noise')\nblob = b'x' * (64 << 20)\ntime.sleep(1.5)\nharness.emit({'answer': 42})\n"
    worker = _script(tmp_path, body)
    result = harness.run_worker([worker], log=tmp_path / "log" / "w.log", sample_memory=True, timeout=60)
    assert result["answer"] == 42
    assert result["job_seconds"] > 0 and result["job_other_cores"] >= 0
    assert "noise" in (tmp_path / "log" / "w.log").read_text()
    assert result["driver_peak_rss_mb"] > 64  # the buffer, held for 1.5 s of 100 ms samples
    assert result["processes"] >= 1


def test_a_failing_worker_raises_with_the_end_of_its_log(tmp_path):
    worker = _script(tmp_path, "print('the reason')\nraise SystemExit(3)\n")
    with pytest.raises(harness.WorkerFailed, match="exit code 3") as failed:
        harness.run_worker([worker], log=tmp_path / "w.log", timeout=60)
    assert "the reason" in str(failed.value)
    result = harness.run_worker([worker], log=tmp_path / "w.log", timeout=60, raise_on_error=False)
    assert result["error"] == "exit code 3"


def test_a_hanging_worker_and_its_children_are_ended_at_the_timeout(tmp_path):
    marker = tmp_path / "child-alive"
    child = tmp_path / "child.py"
    child.write_text(f"import pathlib, time\ntime.sleep(3)\npathlib.Path({str(marker)!r}).touch()\n")
    body = f"import subprocess, time\nsubprocess.Popen([sys.executable, {str(child)!r}])\ntime.sleep(60)\n"
    started = time.perf_counter()
    result = harness.run_worker([_script(tmp_path, body)], log=tmp_path / "w.log", timeout=1, raise_on_error=False)
    assert result["error"] == "timed out after 1 s"
    assert time.perf_counter() - started < 30
    time.sleep(4)
    assert not marker.exists()  # the grandchild went with its process group


def test_median_spread_and_table(capsys):
    assert harness.median([3.0, None, 1.0, 2.0]) == 2.0
    assert harness.median([None]) is None
    assert harness.spread([0.5, None, 0.75]) == "50%-75%"
    assert harness.spread([0.5]) == ""
    harness.print_table(["name", "value"], [["a", "1"], ["longer", "22"]])
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["name    value", "a           1", "longer     22"]
