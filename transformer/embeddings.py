"""§3.4 Embeddings and softmax, §3.5 positional encoding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from transformer.config import TransformerConfig
from transformer.dropout import Dropout


def sinusoidal_positional_encoding(positions: Int[Array, "*batch l"], d_model: int) -> Float[Array, "*batch l m"]:
    """§3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    Interleaved exactly as written: even feature 2i holds the sine and odd feature 2i+1 the cosine of
    the same frequency. `positions` are explicit so that packed rows can restart at 0 per example.
    """
    two_i = jnp.arange(0, d_model, 2, dtype=jnp.float32)  # 2i = 0, 2, 4, …
    denominators = jnp.power(10000.0, two_i / d_model).reshape((1,) * positions.ndim + (-1,))
    angles = positions[..., None].astype(jnp.float32) / denominators  # [..., l, d_model/2]
    # (sin, cos) pairs side by side, then flattened: features sin_0, cos_0, sin_1, cos_1, …
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, d_model)


@jax.custom_vjp
def _tied_logits(x: Float[Array, "b l m"], table: Float[Array, "v m"]) -> Float[Array, "b l v"]:
    return jnp.einsum("blm,vm->blv", x, table)


def _tied_logits_fwd(x, table):
    return _tied_logits(x, table), (x, table)


def _tied_logits_bwd(residuals, g):
    # The same gradients autodiff gives; written out so that the matrix gradient is computed as
    # (xᵀ·g)ᵀ, transposing the small [b·l, d_model] operand: left to itself XLA:CPU transposes the
    # [b·l, vocab] gradient instead, a copy that cost about a tenth of a small model's step.
    x, table = residuals
    dx = jnp.einsum("blv,vm->blm", g, table)
    x_t = x.reshape(-1, x.shape[-1]).T  # [m, b·l]
    d_table = (x_t @ g.reshape(-1, g.shape[-1])).T  # [v, m]
    return dx, d_table.astype(table.dtype)


_tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


class TokenEmbedding(nnx.Module):
    """§3.4: learned embeddings, multiplied by √d_model, whose matrix can also serve as the
    pre-softmax linear transformation (`logits`)."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        # Not stated in the paper: N(0, d_model^-1/2) so that the √d_model-scaled embeddings have
        # unit variance, as in the paper's reference code.
        init = jax.nn.initializers.normal(stddev=config.d_model**-0.5)
        self.embedding = nnx.Param(init(rngs.params(), (config.vocab_size, config.d_model), jnp.float32))

    def __call__(self, tokens: Int[Array, "b l"]) -> Float[Array, "b l m"]:
        """E[tokens]·√d_model."""
        table = self.embedding[...].astype(self.config.compute_dtype)
        return jnp.take(table, tokens, axis=0) * math.sqrt(self.config.d_model)

    def logits(self, x: Float[Array, "b l m"]) -> Float[Array, "b l v"]:
        """The pre-softmax linear transformation with the same matrix: x·Eᵀ."""
        dtype = self.config.compute_dtype
        return _tied_logits(x.astype(dtype), self.embedding[...].astype(dtype))


class PreSoftmaxProjection(nnx.Module):
    """§3.4: the linear transformation before the softmax: the shared embedding matrix, transposed
    (share_embeddings=True, the paper's choice), or a matrix of its own.

    The shared matrix is passed at call time rather than held here, so that it stays in the
    parameter tree where the embeddings are.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.linear = None if config.share_embeddings else nnx.Linear(
            config.d_model, config.vocab_size, use_bias=False, dtype=config.compute_dtype, rngs=rngs
        )

    def __call__(self, x: Float[Array, "b l m"], token_embedding: TokenEmbedding) -> Float[Array, "b l v"]:
        if self.linear is None:
            return token_embedding.logits(x)
        return self.linear(x)


class InputEmbedding(nnx.Module):
    """§3.4–3.5 and §5.4: Dropout(E[tokens]·√d_model + PE(positions)).

    PE is the sinusoid of §3.5, or, as the option the paper compared in Table 3 (E), a learned
    position table of `max_len` rows.
    """

    def __init__(self, config: TransformerConfig, token_embedding: TokenEmbedding, *, rngs: nnx.Rngs):
        self.config = config
        self.token_embedding = token_embedding
        if config.positional_encoding == "learned":
            init = jax.nn.initializers.normal(stddev=config.d_model**-0.5)
            self.position_embedding = nnx.Param(init(rngs.params(), (config.max_len, config.d_model), jnp.float32))
        self.dropout = Dropout(config.dropout_rate)

    def __call__(
        self,
        tokens: Int[Array, "b l"],
        positions: Int[Array, "b l"] | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "b l m"]:
        # Without explicit positions every row uses 0 … l-1: one [1, l, d_model] table for the batch.
        if positions is None:
            positions = jnp.arange(tokens.shape[1])[None, :]
        if self.config.positional_encoding == "learned":
            pe = jnp.take(self.position_embedding[...], positions, axis=0)
        else:
            pe = sinusoidal_positional_encoding(positions, self.config.d_model)
        x = self.token_embedding(tokens) + pe.astype(self.config.compute_dtype)
        return self.dropout(x, deterministic=deterministic, rngs=rngs)
