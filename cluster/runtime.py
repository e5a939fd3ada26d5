"""Connecting to Ray: attach to a running cluster (``ray job submit``, ``RAY_ADDRESS``) or start a local one.

Without an address Forest always starts a fresh local cluster (``address="local"``) rather than Ray's default of
joining whatever ``ray start`` last recorded on this machine; set ``RAY_ADDRESS=auto`` to join that one.
"""

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
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    log.info("Ray resources: %s", ray.cluster_resources())
