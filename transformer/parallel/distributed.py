"""Several processes (hosts) in one run: JAX's multi-controller runtime.

Every process runs the same program. `jax.distributed.initialize` joins them, from
`--coordinator_address HOST:PORT --num_processes N --process_id I`, or, when those are absent and
`--distributed` is given, from the cluster's own environment where JAX detects one (SLURM, Cloud
TPU, Kubernetes, Open MPI). On CPUs the processes' collectives run over gloo, which JAX ships;
this module sets that up, since JAX's CPU default has none.
"""

from __future__ import annotations

import dataclasses
import os

from transformer.config import ConfigError


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str = ""  # HOST:PORT of process 0's coordinator; empty: one process, or the cluster's
    num_processes: int = 0  # with coordinator_address: how many processes join
    process_id: int = -1  # with coordinator_address: this process's index, 0 … num_processes - 1
    distributed: bool = False  # join the processes the cluster's environment describes (SLURM, TPU, …)

    def __post_init__(self):
        if self.coordinator_address:
            host, sep, port = self.coordinator_address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"coordinator_address must be HOST:PORT, got {self.coordinator_address!r}")
            if self.num_processes < 1:
                raise ConfigError("--coordinator_address needs --num_processes N (N >= 1)")
            if not 0 <= self.process_id < self.num_processes:
                raise ConfigError(f"--process_id must be in 0 … {self.num_processes - 1} (--num_processes "
                                  f"{self.num_processes}), got {self.process_id}")
        elif self.num_processes or self.process_id != -1:
            raise ConfigError("--num_processes and --process_id need --coordinator_address HOST:PORT")

    @property
    def wanted(self) -> bool:
        return bool(self.coordinator_address) or self.distributed or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(config: DistributedConfig) -> None:
    """Join the run's processes (nothing for a one-process run). Call before any other JAX call."""
    if not config.wanted:
        return
    import jax

    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if platforms in ("", "cpu") or platforms.startswith("cpu"):
        # Cross-process collectives on CPU devices; without them a multi-process CPU run cannot sum gradients.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if config.coordinator_address:
        jax.distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    else:
        jax.distributed.initialize()
