"""The one table that maps the parameters' logical axis names (declared where the modules create
them: `nn/partitioning.py`) to the mesh's axes, and the shardings that follow from it for the
training state, the batch and the metrics.

A parameter axis whose size the mesh axes do not divide stays whole (replicated along them), e.g.
a vocabulary of 37,001 pieces under tensor=8; the heads and d_ff are checked instead
(`mesh.check_model_fits`), since tensor parallelism without them splits nothing.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer.nn.partitioning import BATCH, EMBED, HEADS, KV, MLP, VOCAB, logical_axes

# logical axis -> mesh axes that split it (None: never split)
RULES: dict[str, tuple[str, ...] | None] = {
    BATCH: ("data", "fsdp"),  # data parallelism; fsdp is data parallelism whose parameters are sharded
    EMBED: ("fsdp",),  # ZeRO-3: each device keeps 1/fsdp of every d_model-sized axis
    VOCAB: ("tensor",),  # Megatron: the embedding table and its transpose split by vocabulary rows
    HEADS: ("tensor",),  # Megatron: each device computes h / tensor heads...
    MLP: ("tensor",),  # ...and d_ff / tensor hidden units of the FFN
    KV: None,  # a head is never split
}


def partition_spec(axes: tuple[str | None, ...] | None, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes on `mesh`, by RULES."""
    if axes is None:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        mesh_axes = tuple(a for a in (RULES.get(name) or ()) if a not in used and mesh.shape[a] > 1)
        if not mesh_axes or size % math.prod(mesh.shape[a] for a in mesh_axes):
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding for every array of `tree` (a train state, parameters, Adam moments): an
    nnx Variable by its declared logical axes, anything else (step, counts, keys) replicated."""

    def sharding(x):
        if _is_variable(x):
            return NamedSharding(mesh, partition_spec(logical_axes(x), tuple(x.shape), mesh))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding, tree, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches: rows split over data × fsdp, every other axis whole."""
    return NamedSharding(mesh, partition_spec((BATCH,), (math.prod(mesh.shape[a] for a in RULES[BATCH]),), mesh))


def activation_rule(mesh: Mesh):
    """For `nn.partitioning.activation_sharding`: logical axes and shape -> NamedSharding on `mesh`."""
    return lambda axes, shape: NamedSharding(mesh, partition_spec(axes, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def place(tree: Any, shardings: Any) -> Any:
    """Host arrays (the same on every process) -> global arrays with `shardings` (a tree prefix);
    each process fills only its own devices' shards."""

    def put(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(lambda sharding, sub: jax.tree.map(lambda x: put(x, sharding), sub), shardings, tree,
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_placer(mesh: Mesh):
    """`place(batch)` for `data.prefetch` in mesh mode: this process's rows of the global batch
    become its shards of one global array per key."""
    sharding = batch_sharding(mesh)

    def place_batch(local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}

    return place_batch


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes of `tree`'s arrays held on each device (shards counted where they live)."""
    held: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held
