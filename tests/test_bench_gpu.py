"""``bench/gpu.py`` without a GPU: its CPU smoke run goes through every way and prints the table and the ratios; a
plain run says that there is no GPU and exits 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_cpu_smoke_run_measures_every_way(tmp_path):
    done = _bench("--cpu-smoke", "--workdir", str(tmp_path), "--json", str(tmp_path / "out.json"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    assert [(r["strategy"], r["compiled"]) for r in results] == [
        ("ddp", False),
        ("ddp", True),
        ("fsdp", False),
        ("fsdp", True),
    ]
    for r in results:
        assert "error" not in r, r
        assert r["compiled_blocks"] == (4 if r["compiled"] else 0)  # Mu/8 has 4 blocks
        assert r["images_per_s"] > 0 and math.isfinite(r["loss"])
        assert r["peak_bytes"] is None and r["mfu"] is None  # no CUDA: no memory or MFU figures
    # the same seed, data and steps: every way trains the same model to about the same loss (bf16 apart)
    assert max(r["loss"] for r in results) - min(r["loss"] for r in results) < 0.02
    out = done.stdout
    assert "strategy  mode" in out and "fsdp / ddp, compiled" in out and "compiled / eager, ddp" in out


def test_without_a_gpu_it_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = _bench("--workdir", str(tmp_path), timeout=60)
    assert done.returncode == 2
    assert "sees none here" in done.stderr and "--cpu-smoke" in done.stderr
