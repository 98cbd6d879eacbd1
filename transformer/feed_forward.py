"""§3.3 Position-wise feed-forward networks."""

from __future__ import annotations

import jax
from flax import nnx
from jaxtyping import Array, Float

from transformer.config import TransformerConfig


class PositionwiseFeedForward(nnx.Module):
    """§3.3: FFN(x) = max(0, x·W1 + b1)·W2 + b2, the same at every position.

    W1 ∈ R^{d_model×d_ff}, W2 ∈ R^{d_ff×d_model}; inner size d_ff (2048 for base).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        dtype = config.compute_dtype
        self.linear_1 = nnx.Linear(config.d_model, config.d_ff, dtype=dtype, rngs=rngs)  # W1, b1
        self.linear_2 = nnx.Linear(config.d_ff, config.d_model, dtype=dtype, rngs=rngs)  # W2, b2

    def __call__(self, x: Float[Array, "b l m"]) -> Float[Array, "b l m"]:
        return self.linear_2(jax.nn.relu(self.linear_1(x)))
