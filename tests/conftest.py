"""Fixtures shared by every test package."""

from __future__ import annotations

import os

import pytest


def _start_local_ray() -> None:
    """More logical CPUs than cores: Ray Data's operators and Ray Train's workers each reserve CPUs,
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


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (starting one costs ~5 s on 2 cores)."""
    import ray

    _start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_two_nodes():
    """A real two-node Ray cluster (head: 4 CPUs, worker: 2 CPUs) in place of the shared local instance,
    which is started again afterwards. Yields the cluster and its worker node (to kill)."""
    import ray
    from ray.cluster_utils import Cluster

    had_local = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_local:
            _start_local_ray()
