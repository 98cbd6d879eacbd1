"""Logical axis names of the parameters, declared where each module creates them, and of the
activations at a few key points (`constrain`).

Every parameter carries `logical_axes` metadata: one name per array axis (None: an axis that is never
split). The modules say what an axis *is*; `transformer/parallel/rules.py` says, in one table, which
mesh axis (data, fsdp, tensor) splits it. The metadata follows the parameter into the optimizer
state (Adam's moments have the same tree), so both are sharded alike. On one device, or under pmap,
it is never read.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import jax
from flax import nnx

BATCH = "batch"  # rows of a batch (activations only)
VOCAB = "vocab"  # rows of the embedding table / columns of the pre-softmax projection
EMBED = "embed"  # d_model
HEADS = "heads"  # h, the attention heads
KV = "kv"  # d_k or d_v, the size of one head
MLP = "mlp"  # d_ff, the feed-forward network's hidden units
POSITION = None  # rows of a learned position table: never split
CLASSES = None  # a classifier's outputs: few, never split


def annotate(variable: nnx.Variable, *axes: str | None) -> None:
    """Declare the logical axis names of a parameter made by a Flax layer (nnx.Linear, LayerNorm)."""
    if len(axes) != variable[...].ndim:
        raise ValueError(f"{len(axes)} axis names {axes} for a parameter of shape {variable[...].shape}")
    variable.set_metadata(logical_axes=tuple(axes))


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The names declared for `variable`, or None where none were."""
    return variable.get_metadata().get("logical_axes")


# The rule that turns logical axis names into a sharding, while a mesh step is being traced.
_ACTIVATION_RULES: list[Callable[[tuple, tuple], jax.sharding.Sharding]] = []


@contextlib.contextmanager
def activation_sharding(rule: Callable[[tuple, tuple], jax.sharding.Sharding]) -> Iterator[None]:
    """While tracing under this, `constrain` pins activations to `rule(logical_axes, shape)`. Set once,
    by the mesh step (`training/step.py`); elsewhere (one device, pmap, decoding) `constrain` is a no-op."""
    _ACTIVATION_RULES.append(rule)
    try:
        yield
    finally:
        _ACTIVATION_RULES.pop()


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    """Pin the layout of an activation by its logical axes (one per array axis). Without it XLA may
    lay activations out like the parameters they meet (under fsdp: d_model split, every row on every
    device) instead of splitting the batch."""
    if not _ACTIVATION_RULES:
        return x
    return jax.lax.with_sharding_constraint(x, _ACTIVATION_RULES[-1](axes, x.shape))


def activation_layout(shape: tuple[int, ...], *axes: str | None) -> jax.sharding.NamedSharding | None:
    """The sharding `constrain` would pin an activation of this shape and these logical axes to (its
    `.mesh` and `.spec`), or None outside a mesh step: for code that splits its work by hand
    (`jax.shard_map` around the Pallas attention kernel, `nn/pallas_attention.py`)."""
    if not _ACTIVATION_RULES:
        return None
    return _ACTIVATION_RULES[-1](axes, tuple(shape))

