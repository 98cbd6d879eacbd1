"""§3.4 Embeddings and softmax, §3.5 positional encoding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from transformer.config import TransformerConfig
from transformer.nn.dropout import Dropout
from transformer.nn.partitioning import BATCH, EMBED, POSITION, VOCAB, annotate, constrain


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
    # The multiply runs in x's dtype (the compute dtype), the logits come out in float32.
    return jnp.einsum("blm,vm->blv", x, table.astype(x.dtype), preferred_element_type=jnp.float32)


def _tied_logits_fwd(x, table):
    return _tied_logits(x, table), (x, table)


def _tied_logits_bwd(residuals, g):
    # The gradients autodiff gives, written out for two reasons. (1) The matrix gradient is computed
    # as (xᵀ·g)ᵀ, transposing the small [b·l, d_model] operand: left to itself XLA:CPU transposes the
    # [b·l, vocab] gradient instead, a copy that cost about a tenth of a small model's step.
    # (2) Precision: the float32 logit gradient enters the multiplies in the compute dtype (as any
    # activation gradient does) and both products accumulate and come out in float32, so the
    # table's gradient, a sum over every token of the batch, is never rounded to bfloat16.
    x, table = residuals
    dtype = x.dtype
    g = g.astype(dtype)
    dx = jnp.einsum("blv,vm->blm", g, table.astype(dtype), preferred_element_type=jnp.float32)
    x_t = x.reshape(-1, x.shape[-1]).T  # [m, b·l]
    d_table = jnp.matmul(x_t, g.reshape(-1, g.shape[-1]), preferred_element_type=jnp.float32).T  # [v, m]
    return dx.astype(dtype), d_table.astype(table.dtype)


_tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


class TokenEmbedding(nnx.Module):
    """§3.4: learned embeddings, multiplied by √d_model, whose matrix can also serve as the
    pre-softmax linear transformation (`logits`)."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        # Not stated in the paper: N(0, d_model^-1/2) so that the √d_model-scaled embeddings have
        # unit variance, as in the paper's reference code.
        init = jax.nn.initializers.normal(stddev=config.d_model**-0.5)
        self.embedding = nnx.Param(init(rngs.params(), (config.vocab_size, config.d_model), jnp.float32),
                                   logical_axes=(VOCAB, EMBED))

    def __call__(self, tokens: Int[Array, "b l"], dtype=None) -> Float[Array, "b l m"]:
        """E[tokens]·√d_model, in `dtype` (default: the compute dtype).

        The rows are gathered from the float32 table and scaled in float32, then cast: the gradient
        of a gather is a scatter-add over every occurrence of a token, and in bfloat16 a token seen
        thousands of times in a batch would lose most of its gradient to rounding.
        """
        dtype = self.config.compute_dtype if dtype is None else dtype
        rows = jnp.take(self.embedding[...], tokens, axis=0)
        return (rows * math.sqrt(self.config.d_model)).astype(dtype)

    def logits(self, x: Float[Array, "b l m"]) -> Float[Array, "b l v"]:
        """The pre-softmax linear transformation with the same matrix: x·Eᵀ, multiplied in the
        compute dtype, returned in float32 (the loss and the beam scores use these values)."""
        return _tied_logits(x.astype(self.config.compute_dtype), self.embedding[...])


class PreSoftmaxProjection(nnx.Module):
    """§3.4: the linear transformation before the softmax: the shared embedding matrix, transposed
    (share_embeddings=True, the paper's choice), or a matrix of its own. Either way the logits are
    float32 (the multiply runs in the compute dtype).

    The shared matrix is passed at call time rather than held here, so that it stays in the
    parameter tree where the embeddings are.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.linear = None if config.share_embeddings else nnx.Linear(
            config.d_model, config.vocab_size, use_bias=False, dtype=config.compute_dtype,
            preferred_element_type=jnp.float32, rngs=rngs,
        )
        if self.linear is not None:
            annotate(self.linear.kernel, EMBED, VOCAB)

    def __call__(self, x: Float[Array, "b l m"], token_embedding: TokenEmbedding) -> Float[Array, "b l v"]:
        logits = token_embedding.logits(x) if self.linear is None else self.linear(x)
        return constrain(logits, BATCH, None, VOCAB)


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
            self.position_embedding = nnx.Param(init(rngs.params(), (config.max_len, config.d_model), jnp.float32),
                                                logical_axes=(POSITION, EMBED))
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
        # The sum is formed in float32 and rounded to the compute dtype once.
        x = (self.token_embedding(tokens, jnp.float32) + pe).astype(self.config.compute_dtype)
        return constrain(self.dropout(x, deterministic=deterministic, rngs=rngs), BATCH, None, None)
