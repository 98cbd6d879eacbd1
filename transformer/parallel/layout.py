"""Where a run's state and batches live: one object per parallel mode, so that the training loop is
written once. `PmapLayout`: one device (plain jit) or pmap over this process's devices, every one
with a full copy of the state. `MeshLayout`: `jit` over a mesh of every device of every process,
the state sharded as `parallel/rules.py` declares."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from transformer.parallel import rules
from transformer.parallel.devices import pmap_placer, replicate_on_devices


class PmapLayout:
    mode = "pmap"

    def __init__(self, devices=None):
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.n_devices = len(self.devices)
        # Rows of a global batch: every device of every process gets the same share.
        self.batch_multiple = self.n_devices * jax.process_count()

    def process_rows(self, global_rows: int) -> slice:
        """This process's share of a global batch's rows (its devices split it further)."""
        share = global_rows // jax.process_count()
        return slice(jax.process_index() * share, (jax.process_index() + 1) * share)

    def to_devices(self, state: Any) -> Any:
        """The state as the step takes it: one copy per device under pmap."""
        return replicate_on_devices(state, self.devices) if self.n_devices > 1 else state

    def one_copy(self, tree: Any) -> Any:
        """One copy of a result the step gives per device (the copies are equal). Read from this
        process's first device: indexing would be a computation over every process's devices, which
        all processes would have to run in step."""
        if self.n_devices == 1:
            return tree

        def first(x):
            if isinstance(x, jax.Array):
                return x.addressable_shards[0].data.reshape(x.shape[1:])
            return x[0]

        return jax.tree.map(first, tree)

    def placer(self):
        return pmap_placer(self.devices)

    def host_copy(self, tree: Any) -> Any:
        return jax.device_get(tree)


class MeshLayout:
    mode = "mesh"

    def __init__(self, mesh, state_like: Any):
        self.mesh = mesh
        self.devices = list(mesh.devices.flat)
        self.n_devices = len(self.devices)
        self.state_shardings = rules.state_shardings(state_like, mesh)
        self.batch_sharding = rules.batch_sharding(mesh)
        self.replicated = rules.replicated(mesh)
        # Rows of a global batch: the batch axes split them evenly (and so do the processes).
        self.batch_multiple = math.lcm(math.prod(mesh.shape[a] for a in rules.RULES[rules.BATCH]), jax.process_count())

    def process_rows(self, global_rows: int) -> slice:
        """The rows of a global batch that this process's devices hold (the others are never built here)."""
        indices = self.batch_sharding.addressable_devices_indices_map((global_rows,)).values()
        starts, stops = zip(*(index[0].indices(global_rows)[:2] for index in indices))
        return slice(min(starts), max(stops))

    def to_devices(self, state: Any) -> Any:
        """Host arrays -> sharded global arrays; arrays already placed (a restored state) stay."""
        leaves = jax.tree.leaves(state)
        if leaves and all(isinstance(x, jax.Array) and x.sharding.device_set == set(self.devices) for x in leaves):
            return jax.device_put(state, self.state_shardings)
        return rules.place(state, self.state_shardings)

    def one_copy(self, tree: Any) -> Any:
        return tree  # global arrays: already one logical copy

    def placer(self):
        return rules.batch_placer(self.mesh)

    def host_copy(self, tree: Any) -> Any:
        """NumPy copies on every process (for decoding, which runs on one device per process)."""
        leaves = jax.tree.leaves(tree)
        if all(getattr(x, "is_fully_addressable", True) for x in leaves):
            return jax.device_get(tree)
        whole = jax.jit(lambda t: t, out_shardings=self.replicated)(tree)
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), whole)
