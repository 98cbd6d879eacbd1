"""§3.2 Attention: scaled dot-product attention and multi-head attention.

Axis letters, used the same way in every einsum of the library:
b batch, q query positions, k key/value positions, h heads, d per-head size (d_k or d_v),
m model size (d_model).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from transformer.config import TransformerConfig
from transformer.dropout import Dropout


def scaled_dot_product_attention(
    q: Float[Array, "b q h d"],
    k: Float[Array, "b k h d"],
    v: Float[Array, "b k h d"],
    mask: Bool[Array, "b #h q k"] | None = None,
    weights_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> Float[Array, "b q h d"]:
    """§3.2.1: Attention(Q, K, V) = softmax(Q·Kᵀ / √d_k)·V, for all h heads at once.

    Scores and softmax are computed in float32 whatever the compute dtype; masked scores are set to
    the most negative float so that they get (numerically) zero weight.
    `weights_dropout`, if given, is applied to the attention weights (a departure, off by default).
    """
    d_k = q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d_k)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if weights_dropout is not None:
        weights = weights_dropout(weights)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def fused_dot_product_attention(
    q: Float[Array, "b q h d"],
    k: Float[Array, "b k h d"],
    v: Float[Array, "b k h d"],
    mask: Bool[Array, "b #h q k"] | None = None,
) -> Float[Array, "b q h d"]:
    """The same §3.2.1 formula through `jax.nn.dot_product_attention`, which XLA fuses and which runs
    cuDNN's flash attention on GPUs for bf16/fp16 inputs. Same layout and mask convention."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0 / math.sqrt(q.shape[-1]))


def _projection_init(in_axis, out_axis):
    # The paper does not say how weights are initialised; Glorot-uniform over the full
    # d_model x (h·d_k) matrix is what its reference code (tensor2tensor) used.
    return jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis)


class MultiHeadAttention(nnx.Module):
    """§3.2.2: MultiHead(Q, K, V) = Concat(head_1, …, head_h)·W^O,
    head_i = Attention(Q·W_i^Q, K·W_i^K, V·W_i^V).

    The h per-head matrices W_i^Q ∈ R^{d_model×d_k} are stored together as one [d_model, h, d_k]
    array (likewise W^K, W^V, and W^O as [h, d_v, d_model]), so that "Concat(…)·W^O" is one einsum
    over (h, d). The paper's projections have no bias, and neither do these.

    One module serves encoder self-attention, masked decoder self-attention and encoder-decoder
    attention; the pieces (`project_query`, `project_key_value`, `attend`) are public so that
    incremental decoding can cache keys and values and reuse them.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        d_model, h, d_k, d_v = config.d_model, config.h, config.d_k, config.d_v
        qkv_init = _projection_init(in_axis=0, out_axis=(1, 2))
        self.w_q = nnx.Param(qkv_init(rngs.params(), (d_model, h, d_k), jnp.float32))
        self.w_k = nnx.Param(qkv_init(rngs.params(), (d_model, h, d_k), jnp.float32))
        self.w_v = nnx.Param(qkv_init(rngs.params(), (d_model, h, d_v), jnp.float32))
        self.w_o = nnx.Param(_projection_init(in_axis=(0, 1), out_axis=2)(rngs.params(), (h, d_v, d_model), jnp.float32))
        self.weights_dropout = Dropout(config.attention_dropout_rate)

    def project_query(self, x: Float[Array, "b q m"]) -> Float[Array, "b q h d"]:
        """Q·W_i^Q for every head i."""
        dtype = self.config.compute_dtype
        return jnp.einsum("bqm,mhd->bqhd", x.astype(dtype), self.w_q[...].astype(dtype))

    def project_key_value(self, x: Float[Array, "b k m"]) -> tuple[Float[Array, "b k h d"], Float[Array, "b k h d"]]:
        """K·W_i^K and V·W_i^V for every head i."""
        dtype = self.config.compute_dtype
        x = x.astype(dtype)
        k = jnp.einsum("bkm,mhd->bkhd", x, self.w_k[...].astype(dtype))
        v = jnp.einsum("bkm,mhd->bkhd", x, self.w_v[...].astype(dtype))
        return k, v

    def attend(
        self,
        q: Float[Array, "b q h d"],
        k: Float[Array, "b k h d"],
        v: Float[Array, "b k h d"],
        mask: Bool[Array, "b #h q k"] | None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> Float[Array, "b q m"]:
        """Attention of every head, then Concat(head_1, …, head_h)·W^O."""
        if self.config.attention_impl == "fused":
            heads = fused_dot_product_attention(q, k, v, mask)
        else:
            dropout = None
            if self.config.attention_dropout_rate > 0 and not deterministic:
                dropout = lambda w: self.weights_dropout(w, deterministic=False, rngs=rngs)  # noqa: E731
            heads = scaled_dot_product_attention(q, k, v, mask, weights_dropout=dropout)
        dtype = self.config.compute_dtype
        return jnp.einsum("bqhd,hdm->bqm", heads, self.w_o[...].astype(dtype))

    def __call__(
        self,
        x_q: Float[Array, "b q m"],
        x_kv: Float[Array, "b k m"],
        mask: Bool[Array, "b #h q k"] | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> Float[Array, "b q m"]:
        """Self-attention when x_kv is x_q; encoder-decoder attention when x_kv is the encoder output."""
        q = self.project_query(x_q)
        k, v = self.project_key_value(x_kv)
        return self.attend(q, k, v, mask, deterministic=deterministic, rngs=rngs)
