"""Several processes (hosts) in one run: JAX's multi-controller runtime."""

from __future__ import annotations

import os

import jax


def maybe_initialize_distributed(requested: bool) -> None:
    """Multi-host: jax.distributed.initialize when asked, or when a coordinator is configured."""
    if requested or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
