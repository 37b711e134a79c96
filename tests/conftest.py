"""Fixtures shared by every test package."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (starting one costs ~5 s on 2 cores).

    More logical CPUs than cores: Ray Data's operators and Ray Train's workers each reserve CPUs,
    and on a 2-core machine a strict budget deadlocks them (see STACK-NOTES)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=max(4, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
