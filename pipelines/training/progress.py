"""Training progress on the driver's terminal: rank 0's log lines and a bar of steps, loss, images/s and ETA.

Ray's own log forwarding (``log_to_driver``) would show them too, but mixed with every actor's chatter (the
train controller's worker-group messages, the placement-group cleaner's warnings and tracebacks). Instead, rank 0
sends what the user should see through a Ray queue, and the driver prints it:

    channel = ProgressChannel.open()                  # driver, before fit()
    ... train_loop_config={"progress": channel.queue} # rank 0: RankZeroProgress(queue) ... .step(...), logs
    channel.follow(total_steps, log)                  # driver: a thread showing the bar until close()

Lines go through ``log`` (the pipeline indents them); the bar is drawn on stderr, only on a terminal: in a
Ray Job's log or a CI log the lines alone tell the progress.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

STEP_SECONDS = 0.5  # rank 0 sends a bar update at most this often: a queue put is a round trip to an actor


class RankZeroProgress(logging.Handler):
    """Rank 0's side: its ``pipelines`` log records and throttled step updates, into the driver's queue. A queue
    that is gone (the driver ended) turns it off; training never waits on it or fails over it."""

    def __init__(self, queue: Any):
        super().__init__(logging.INFO)
        self.queue = queue
        self.last_step_sent = 0.0
        self.logger = logging.getLogger("pipelines")

    def __enter__(self) -> RankZeroProgress:
        self.saved_level = self.logger.level
        if self.queue is not None:
            self.logger.addHandler(self)
            self.logger.setLevel(min(self.logger.getEffectiveLevel(), logging.INFO))
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved_level)

    def step(self, step: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last_step_sent >= STEP_SECONDS:
            self.last_step_sent = now
            self._send(("step", step, loss))

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.ERROR:  # errors end the run: the driver reports them from its outcome
            self._send(("log", record.levelno, record.getMessage().removeprefix("[vit] ")))

    def _send(self, item: tuple) -> None:
        if self.queue is None:
            return
        try:
            self.queue.put_nowait(item)
        except Exception:  # the driver is gone: nobody is watching
            self.queue = None


class ProgressChannel:
    """The driver's side: a Ray queue for rank 0, and a thread that shows what arrives."""

    def __init__(self, queue: Any):
        self.queue = queue
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    @classmethod
    def open(cls) -> ProgressChannel:
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # No CPU: it must never wait for the workers' CPUs. On the driver's node: a queue placed on a worker node
        # dies with that node, and rank 0's lines after a restart would go nowhere.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        return cls(Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here}))

    def follow(self, total_steps: int, batch_size: int, log: Callable[[str], None], *, desc: str) -> None:
        args = (total_steps, batch_size, log, desc)
        self.thread = threading.Thread(target=self._show, args=args, name="vit-progress", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Show what is left, then end the bar and the queue."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.queue.shutdown(force=True)

    def _show(self, total_steps: int, batch_size: int, log: Callable[[str], None], desc: str) -> None:
        from queue import Empty

        from tqdm.auto import tqdm

        terminal = sys.stderr.isatty()
        last: tuple[int, float] | None = None  # (step, time) of the previous update: images/s between updates
        with tqdm(total=total_steps, unit="step", desc=desc, disable=not terminal, leave=False) as bar:
            while True:
                try:
                    item = self.queue.get(timeout=0.5)
                except Empty:
                    if self.stopping.is_set():
                        return
                    continue
                except Exception:  # the queue is gone
                    return
                if item[0] == "step":
                    _, step, loss = item
                    now = time.monotonic()
                    rate = "" if last is None else f", {(step - last[0]) * batch_size / (now - last[1]):,.0f} img/s"
                    last = (step, now)
                    bar.update(step - bar.n)
                    bar.set_postfix_str(f"loss {loss:.4g}{rate}", refresh=True)
                else:
                    _, level, text = item
                    line = f"warning: {text}" if level >= logging.WARNING else text
                    with tqdm.external_write_mode(file=sys.stderr):
                        log(line)
