"""What every benchmark in bench/ shares: measured work runs in a fresh subprocess (a "worker") that prints one
result line; the parent times it, accounts for the CPU other processes took meanwhile, optionally samples the
memory of the worker's process tree, and prints tables of figures and ratios against a reference measured in the
same run.

    worker side:  emit({"images_per_second": ...})
    parent side:  result = run_worker([__file__, "--worker", ...], timeout=600, log=logs / "job.log")
                  print_table(["method", "images/s"], rows, left=1)
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

RESULT_PREFIX = "@@BENCH_RESULT@@ "
MIB = 2**20
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the benchmarks import this checkout's packages, installed or not
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------- worker side


def emit(result: dict) -> None:
    """The worker's one result, as the last line the parent looks for."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss() -> int:
    """getrusage high-water RSS in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_rss_high_water() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0), so ru_maxrss only covers what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker_env() -> dict[str, str]:
    """Fixed glibc mmap threshold: each allocation >= 128 KiB gets its own mapping, unmapped on free.

    That disables glibc's dynamic threshold, whose caching decisions otherwise move the peak RSS of the same
    step by tens of MB from run to run; with it, RSS follows the live tensors and repeats to < 1 MB.
    An explicit GLIBC_TUNABLES in the environment wins.
    """
    return {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")}


# ---------------------------------------------------------------------------------------------- CPU accounting


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not iowait) since boot, over all cores."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def live_cpu(pid: int, *, include_root: bool) -> dict[tuple[int, float], float]:
    """CPU seconds of each live process under ``pid`` (and of ``pid`` itself with include_root)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)] if include_root else root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    cpu = {}
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = p.cpu_times()
            cpu[(p.pid, p.create_time())] = t.user + t.system
    return cpu


def rusage_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class CpuWindow:
    """Cores busy with other processes than ours over a stretch of wall time, in this process.

    Ours: this process, plus either its reaped children (getrusage) and its live descendants at the end, or with
    ``poll`` the last CPU time seen of every descendant, sampled every 0.25 s (for Ray, whose workers exit without
    this process reaping them). A descendant that exits unseen is missed, so the figure errs high, never low.
    """

    def __init__(self, poll: bool = False):
        self.wall0, self.busy0 = time.perf_counter(), machine_busy_seconds()
        self.self0 = rusage_seconds(resource.RUSAGE_SELF)
        self.reaped0 = rusage_seconds(resource.RUSAGE_CHILDREN)
        self.live0 = live_cpu(os.getpid(), include_root=False)
        self.seen = dict(self.live0)
        self.stop = threading.Event()
        self.poller = None
        if poll:
            self.poller = threading.Thread(target=self._poll, daemon=True)
            self.poller.start()

    def _poll(self) -> None:
        while not self.stop.wait(0.25):
            self.seen.update(live_cpu(os.getpid(), include_root=False))

    def other_cores(self) -> float:
        ours = rusage_seconds(resource.RUSAGE_SELF) - self.self0
        if self.poller is not None:
            self.stop.set()
            self.poller.join()
            self.seen.update(live_cpu(os.getpid(), include_root=False))
            ours += sum(self.seen.values()) - sum(self.live0.values())
        else:
            ours += rusage_seconds(resource.RUSAGE_CHILDREN) - self.reaped0
            ours += sum(live_cpu(os.getpid(), include_root=False).values()) - sum(self.live0.values())
        wall = max(time.perf_counter() - self.wall0, 1e-9)
        return max(0.0, (machine_busy_seconds() - self.busy0 - ours) / wall)


# ---------------------------------------------------------------------------------------------- memory


def _rollup(pid: int) -> dict[str, int]:
    """The kernel's memory totals of one process, in bytes (``/proc/PID/smaps_rollup``: one read, where
    psutil's full smaps walk costs milliseconds per process)."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[name] = int(value.split()[0]) << 10
    return fields


def tree_memory(pid: int) -> dict[str, int]:
    """Memory of ``pid`` and its descendants (Ray's processes), as PSS, which counts a shared page once
    in a sum rather than once per process that maps it:

    * ``all``: PSS of every process; ``processes``: how many;
    * ``worker``: the largest private memory (anonymous + file-backed PSS: heap, stacks, libraries) of
      one process other than ``pid``: what grows if a task holds the corpus;
    * ``store``: the shared-memory pages of all processes, which are Ray's object store (capped by
      ``--object-store-mb``, spilling to disk beyond).
    """
    import psutil

    try:
        procs = [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return {"all": 0, "worker": 0, "store": 0, "processes": 0}
    total = worker = store = count = 0
    for p in procs:
        with contextlib.suppress(OSError):
            rollup = _rollup(p)
            total, count = total + rollup["Pss"], count + 1
            store += rollup.get("Pss_Shmem", 0)
            if p != pid:
                worker = max(worker, rollup.get("Pss_Anon", 0) + rollup.get("Pss_File", 0))
    return {"all": total, "worker": worker, "store": store, "processes": count}


# ---------------------------------------------------------------------------------------------- parent side


class WorkerFailed(RuntimeError):
    pass


def run_worker(
    argv: Sequence[str],
    *,
    log: Path,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    sample_memory: bool = False,
    raise_on_error: bool = True,
) -> dict:
    """Run ``python *argv`` as a worker; its emitted result, plus what the parent measured:

    * ``job_seconds``; ``job_other_cores``: cores busy with processes not of this job meanwhile (every
      process of the job is sampled every 0.25 s: Ray's daemons are not all reaped by the job's processes);
    * with ``sample_memory``: peaks of :func:`tree_memory` every second and of the worker's RSS every 100 ms
      (``peak_pss_mb``, ``worker_peak_private_mb``, ``store_peak_mb``, ``processes``, ``driver_peak_rss_mb``).

    Output goes to ``log`` (a file, not a pipe: processes left behind cannot block the read); the worker runs in
    its own session, so a timeout ends it and everything it started. A failure raises :class:`WorkerFailed` with
    the log's tail, or with ``raise_on_error=False`` returns ``{"error": ...}`` after printing the tail."""
    import psutil

    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, *map(str, argv)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        busy0, reaped0 = machine_busy_seconds(), rusage_seconds(resource.RUSAGE_CHILDREN)
        seen: dict[tuple[int, float], float] = {}
        peaks = {"all": 0, "worker": 0, "store": 0, "processes": 0, "driver": 0}
        stop = threading.Event()

        def sample() -> None:
            tick = 0
            while not stop.wait(0.1 if sample_memory else 0.25):
                tick += 1
                if not sample_memory or tick % 3 == 0:
                    seen.update(live_cpu(proc.pid, include_root=True))
                if sample_memory:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        peaks["driver"] = max(peaks["driver"], psutil.Process(proc.pid).memory_info().rss)
                    if tick % 10 == 0:
                        for name, value in tree_memory(proc.pid).items():
                            peaks[name] = max(peaks[name], value)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            proc.wait(timeout=timeout)
            error = None if proc.returncode == 0 else f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            error = f"timed out after {timeout:.0f} s"
        stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    ours = max(sum(seen.values()), rusage_seconds(resource.RUSAGE_CHILDREN) - reaped0)
    text = log.read_text(errors="replace").splitlines()
    lines = [line for line in text if line.startswith(RESULT_PREFIX)]
    result = json.loads(lines[-1][len(RESULT_PREFIX) :]) if lines else {}
    if not error and not lines:
        error = "no result printed"
    if error:
        tail = "\n".join("    " + line for line in text[-30:])
        message = f"worker {' '.join(map(str, argv[1:3]))} failed ({error}); the end of {log}:\n{tail}"
        if raise_on_error:
            raise WorkerFailed(message)
        print(message, flush=True)
        result["error"] = error
    result["job_other_cores"] = max(0.0, (machine_busy_seconds() - busy0 - ours) / wall)
    result["job_seconds"] = wall
    if sample_memory:
        result |= {
            "peak_pss_mb": peaks["all"] / MIB,
            "driver_peak_rss_mb": peaks["driver"] / MIB,
            "worker_peak_private_mb": peaks["worker"] / MIB,
            "store_peak_mb": peaks["store"] / MIB,
            "processes": peaks["processes"],
        }
    return result


# ---------------------------------------------------------------------------------------------- reporting


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def median(values: Sequence[float | None]) -> float | None:
    """The median of the values measured (``None``: a run that failed), or ``None`` if there are none."""
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def spread(values: Sequence[float | None], fmt: str = ".0%") -> str:
    """``min-max`` of the values measured, or "" for fewer than two."""
    kept = [v for v in values if v is not None]
    return f"{min(kept):{fmt}}-{max(kept):{fmt}}" if len(kept) >= 2 else ""


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> None:
    """Columns as wide as their widest cell; the first ``left`` columns left-aligned (names), the rest right."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
