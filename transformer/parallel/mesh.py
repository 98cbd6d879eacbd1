"""`jit` over a device mesh: the parallel mode of a run and the mesh it runs on.

Two ways to run the one pure train step on several devices:
- "pmap": `jax.pmap` over this host's devices; every device holds every parameter and the whole
  optimizer state (`parallel/devices.py` places the batches).
- "mesh": `jax.jit` over a `jax.sharding.Mesh` of every device of every process, with named axes
    data   — the batch is split across it;
    fsdp   — the batch is split across it too, and so are the parameters and the optimizer state
             (ZeRO-3 style; XLA gathers each layer's parameters where they are used);
    tensor — attention heads and the feed-forward hidden units are split across it (Megatron
             style), and the vocabulary for the embedding.
  Which parameter axis each mesh axis splits is one table: `parallel/rules.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

from transformer.config import ConfigError, TransformerConfig

PARALLEL_MODES = ("pmap", "mesh")
MESH_AXES = ("data", "fsdp", "tensor")


def parse_mesh(spec: str) -> dict[str, int]:
    """'data=4,fsdp=2' -> {'data': 4, 'fsdp': 2, 'tensor': 1}; one size may be -1 (what is left)."""
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, size = part.strip().partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ConfigError(f"mesh={spec!r}: each part is NAME=SIZE with NAME one of {', '.join(MESH_AXES)}, "
                              "e.g. --mesh data=4,fsdp=2,tensor=1")
        if name in sizes:
            raise ConfigError(f"mesh={spec!r} names {name} twice")
        try:
            sizes[name] = int(size)
        except ValueError:
            raise ConfigError(f"mesh={spec!r}: the size of {name} must be an integer, got {size.strip()!r}") from None
        if sizes[name] < 1 and sizes[name] != -1:
            raise ConfigError(f"mesh={spec!r}: the size of {name} must be >= 1, or -1 for what is left")
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"mesh={spec!r}: at most one size may be -1")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How a run uses several devices; it may change between a run and its resumption."""

    parallel: Literal["pmap", "mesh"] = "pmap"
    # The mesh's axis sizes (mode "mesh"): data, fsdp, tensor; axes left out have size 1, and one
    # size may be -1 to take the devices that are left.
    mesh: str = "data=-1"

    def __post_init__(self):
        if self.parallel not in PARALLEL_MODES:
            raise ConfigError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
        parse_mesh(self.mesh)

    def axis_sizes(self, n_devices: int) -> dict[str, int]:
        """The mesh's sizes for `n_devices` devices (-1 resolved); ConfigError unless they multiply to it."""
        sizes = parse_mesh(self.mesh)
        known = math.prod(s for s in sizes.values() if s != -1)
        for name, size in sizes.items():
            if size == -1:
                if n_devices % known:
                    raise ConfigError(f"--mesh {self.mesh}: the other axes take {known} devices, which does not "
                                      f"divide the {n_devices} devices here")
                sizes[name] = n_devices // known
        if math.prod(sizes.values()) != n_devices:
            given = ",".join(f"{k}={v}" for k, v in sizes.items())
            raise ConfigError(f"--mesh {given} needs {math.prod(sizes.values())} devices but there are {n_devices}: "
                              "give sizes whose product is the device count, or -1 for one of them")
        return sizes


def make_mesh(config: ParallelConfig, devices=None):
    """The `jax.sharding.Mesh` (axes data, fsdp, tensor) over `devices` (default: every device of
    every process), laid out by JAX for the machine's topology."""
    import jax

    devices = list(jax.devices() if devices is None else devices)
    sizes = config.axis_sizes(len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):  # a topology it cannot tile: plain order
        grid = np.asarray(devices).reshape(shape)
    return jax.sharding.Mesh(grid, MESH_AXES)


def check_model_fits(model_config: TransformerConfig, mesh) -> None:
    """Tensor parallelism splits heads and feed-forward units: both must divide evenly."""
    tensor = mesh.shape["tensor"]
    for name in ("h", "d_ff"):
        value = getattr(model_config, name)
        if value % tensor:
            raise ConfigError(f"--mesh tensor={tensor} does not divide {name}={value}: use a tensor size that "
                              f"divides both h={model_config.h} and d_ff={model_config.d_ff}")
