"""One pipeline per workdir: a lease file that names its holder and proves, by a heartbeat, that it still lives.

A second `vit run` (or a schedule's firing while someone runs the pipeline by hand) on a busy workdir stops at once
and names the holder, instead of both writing the same shards, runs and step states. The lease is a small JSON file
in the workdir, so it works wherever the workdir lives (a local folder, ``s3://``) with no lock service:

* taking it: read the file; a live holder's lease is refused; otherwise write ours, wait a moment, and read it back:
  of two runs that raced, the last writer wins and the other sees a foreign token and refuses. (The window this
  leaves, a racer whose read and write straddle the other's whole write-and-settle, is a fraction of a second;
  object stores give no compare-and-swap through fsspec.)
* holding it: a thread rewrites the heartbeat every ``ttl / 4`` seconds. A holder whose heartbeat is older than
  ``ttl`` is dead (killed, its machine gone), and so is one on this machine whose process no longer exists: their
  leases are taken over, and the log says so.
* ``break_lock``: the operator who knows the holder is gone takes the lease at once. The old holder, if it did live,
  finds a foreign token at its next heartbeat and stops before its next step.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

import fsspec

from pipelines.common.storage import filesystem, join, write_atomically

LEASE_FILE = ".vit-lease.json"
SETTLE_SECONDS = 0.5  # between writing the lease and reading it back: what a racing writer has to show up


class WorkdirBusyError(RuntimeError):
    """Another live pipeline holds the workdir's lease."""


class LeaseLostError(RuntimeError):
    """Someone took this run's lease (``--break-lock``): it stops before its next step."""


@dataclass
class Holder:
    token: str
    owner: str
    host: str
    pid: int
    acquired: float  # epoch seconds
    heartbeat: float

    def describe(self, now: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.acquired))
        return (
            f"{self.owner}@{self.host} (pid {self.pid}), since {since}, last heartbeat {now - self.heartbeat:.0f} s ago"
        )


class WorkdirLease:
    """``with WorkdirLease(workdir): ...`` holds the workdir for the block; see the module docstring."""

    def __init__(
        self,
        workdir: str,
        storage_options: dict | None = None,
        *,
        ttl: float = 120.0,
        break_lock: bool = False,
        log: Callable[[str], None] = print,
    ):
        if not ttl > 0:
            raise ValueError(f"ttl: must be positive, got {ttl}")
        self.workdir, self.ttl, self.break_lock, self.log = workdir, ttl, break_lock, log
        self.fs: fsspec.AbstractFileSystem
        self.fs, root = filesystem(workdir, storage_options)
        self.path = join(root, LEASE_FILE)
        now = time.time()
        self.mine = Holder(uuid.uuid4().hex, _user(), socket.gethostname(), os.getpid(), now, now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # why the lease is no longer ours, once it is not

    # -- taking and giving back

    def acquire(self) -> None:
        current = self._read()
        now = time.time()
        if current is not None and current.token != self.mine.token:
            dead = self._dead(current, now)
            if self.break_lock:
                self.log(f"lease: breaking the lock of {current.describe(now)} (--break-lock)")
            elif dead:
                self.log(f"lease: taking over the workdir from {current.describe(now)}: {dead}")
            else:
                raise WorkdirBusyError(
                    f"workdir {self.workdir} is in use by {current.describe(now)}; wait for that run to end, or if "
                    f"you know it is gone, run again with --break-lock (a lease without a heartbeat for {self.ttl:.0f}"
                    " s expires by itself)"
                )
        self._write()
        time.sleep(SETTLE_SECONDS)
        settled = self._read()
        if settled is None or settled.token != self.mine.token:
            holder = settled.describe(time.time()) if settled else "a run that has already ended"
            raise WorkdirBusyError(f"workdir {self.workdir}: another run took it at the same moment: {holder}")
        self._thread = threading.Thread(target=self._beat, name="vit-lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(FileNotFoundError, OSError):
            current = self._read()
            if current is not None and current.token == self.mine.token:  # never remove a lease someone took over
                self.fs.rm(self.path)

    def check(self) -> None:
        """Between steps: stop if the lease was taken from us."""
        if self.lost:
            raise LeaseLostError(f"workdir {self.workdir}: {self.lost}; this run stops here")

    def __enter__(self) -> WorkdirLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- the heartbeat

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                current = self._read()
                if current is None or current.token != self.mine.token:
                    taker = current.describe(time.time()) if current else "someone who has since released it"
                    self.lost = f"the lease was taken by {taker}"
                    self.log(f"lease: {self.lost}")
                    return
                self.mine.heartbeat = time.time()
                self._write()
            except Exception as err:  # a storage hiccup: the next beat tries again; the lease lasts ttl
                self.log(f"lease: heartbeat failed ({type(err).__name__}: {err}); retrying")

    def _dead(self, holder: Holder, now: float) -> str | None:
        """Why ``holder`` no longer runs, or None if it may."""
        if now - holder.heartbeat > self.ttl:
            return f"no heartbeat for {now - holder.heartbeat:.0f} s (more than {self.ttl:.0f} s)"
        if holder.host == self.mine.host and not _process_exists(holder.pid):
            return f"process {holder.pid} no longer exists on this machine"
        return None

    # -- the file

    def _read(self) -> Holder | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                data = json.load(f)
            return Holder(**{k: data[k] for k in Holder.__dataclass_fields__})
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as err:  # half a file or a foreign one: nobody's lease
            self.log(f"lease: {self.path} is unreadable ({type(err).__name__}); treating the workdir as free")
            return None

    def _write(self) -> None:
        write_atomically(self.fs, self.path, json.dumps(asdict(self.mine), indent=1).encode())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return f"uid {os.getuid()}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
