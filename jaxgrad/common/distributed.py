"""Multi-host plumbing: starting ``jax.distributed`` and the barriers between processes.

On one process (the usual case) :func:`barrier` does nothing; with several, every process must
reach the barrier of the same name before any of them continues (process 0 writes a file, the
others read it after the barrier).
"""

from __future__ import annotations

import logging

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def initialize_distributed(enabled: bool) -> None:
    """``jax.distributed.initialize()`` once, before any computation, when ``enabled``."""
    if enabled and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def describe_devices() -> None:
    """Log the JAX version, this process and the devices it sees."""
    log.info("JAX %s: process %d of %d, %d local / %d global devices: %s", jax.__version__,
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count(), jax.devices())


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier ``name`` (nothing on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
