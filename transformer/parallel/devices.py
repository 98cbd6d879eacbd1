"""pmap's layout: arrays whose leading axis is the device axis, one slice per device."""

from __future__ import annotations

import numpy as np


def shard_for_devices(batch: dict[str, np.ndarray], n_devices: int) -> dict[str, np.ndarray]:
    """[rows, …] -> [n_devices, rows / n_devices, …] for pmap."""
    def split(x):
        if x.shape[0] % n_devices:
            raise ValueError(f"a batch of {x.shape[0]} rows cannot be split across {n_devices} devices")
        return x.reshape(n_devices, x.shape[0] // n_devices, *x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def put_on_devices(tree, devices):
    """Place arrays whose leading axis is the device axis, one slice per device (pmap's layout)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(np.asarray(devices), ("devices",)), PartitionSpec("devices"))
    return jax.device_put(tree, sharding)


def replicate_on_devices(tree, devices):
    """One identical copy of every array per device, for pmap."""
    import jax

    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))), tree)
    return put_on_devices(stacked, devices)


def pmap_placer(devices):
    """`place(batch)` for `data.prefetch`: one device gets the batch as it is; several get
    [n_devices, rows / n_devices, …] for pmap."""
    import jax

    def place(batch):
        if len(devices) == 1:
            return jax.device_put(batch, devices[0])
        return put_on_devices(shard_for_devices(batch, len(devices)), devices)

    return place
