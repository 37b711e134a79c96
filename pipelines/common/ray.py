"""The one way this platform joins or starts Ray: every command and step calls :func:`init_ray`."""

from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None) -> None:
    """Join ``address``, or ``RAY_ADDRESS`` (set inside a Ray Job), else start a Ray of our own: never one that
    happens to run on this machine, which a bare ``ray.init()`` would join. More logical CPUs than cores: a
    job's operators reserve CPUs and must not starve each other.

    The terminal gets what our commands print (their lines and bars, training progress through
    ``pipelines.training.progress``), not Ray's own: the actors' output stays in Ray's log files
    (``log_to_driver=False``), and so does Ray Data's per-dataset plan and progress, which it prints at INFO."""
    import ray
    import ray.data  # configures its loggers when imported: quieted below, after that

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        cpus = max(4, os.cpu_count() or 1)
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
