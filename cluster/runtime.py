"""Connecting to Ray: attach to a running cluster (``ray job submit``, ``RAY_ADDRESS``) or start a local one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """``ray.init`` once: ``address`` or ``RAY_ADDRESS`` attaches; without either a local cluster starts."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    log.info("Ray resources: %s", ray.cluster_resources())
