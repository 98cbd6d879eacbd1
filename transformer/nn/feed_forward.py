"""§3.3 Position-wise feed-forward networks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from transformer.config import TransformerConfig
from transformer.nn.partitioning import BATCH, EMBED, MLP, annotate, constrain


class PositionwiseFeedForward(nnx.Module):
    """§3.3: FFN(x) = max(0, x·W1 + b1)·W2 + b2, the same at every position.

    W1 ∈ R^{d_model×d_ff}, W2 ∈ R^{d_ff×d_model}; inner size d_ff (2048 for base).
    The multiplies run in the compute dtype; their products come out in float32 and the biases are
    added there (so that a bias's gradient, a sum over every position of the batch, is a float32
    sum), then the result is rounded to the compute dtype.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.dtype = config.compute_dtype
        linear = dict(dtype=self.dtype, preferred_element_type=jnp.float32, rngs=rngs)
        self.linear_1 = nnx.Linear(config.d_model, config.d_ff, **linear)  # W1, b1
        self.linear_2 = nnx.Linear(config.d_ff, config.d_model, **linear)  # W2, b2
        annotate(self.linear_1.kernel, EMBED, MLP)
        annotate(self.linear_1.bias, MLP)
        annotate(self.linear_2.kernel, MLP, EMBED)
        annotate(self.linear_2.bias, EMBED)

    def __call__(self, x: Float[Array, "b l m"]) -> Float[Array, "b l m"]:
        hidden = constrain(jax.nn.relu(self.linear_1(x)).astype(self.dtype), BATCH, None, MLP)
        return self.linear_2(hidden).astype(self.dtype)
