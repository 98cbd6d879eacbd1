"""§3.2 Attention: scaled dot-product attention and multi-head attention.

Axis letters, used the same way in every einsum of the library:
b batch, q query positions, k key/value positions, h heads, d per-head size (d_k or d_v),
m model size (d_model). Shape annotations say dk and dv where the two head sizes may differ.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from transformer.config import ConfigError, TransformerConfig
from transformer.nn import pallas_attention as pallas
from transformer.nn.dropout import Dropout
from transformer.nn.masks import AttentionMask, as_attention_mask
from transformer.nn.partitioning import BATCH, EMBED, HEADS, KV, constrain

_HEADS_LAYOUT = (BATCH, None, HEADS, None)  # [b, l, h, d]: rows and heads split (mesh mode only)


def attention_weights(
    q: Float[Array, "b q h dk"],
    k: Float[Array, "b k h dk"],
    mask: Bool[Array, "b #h q k"] | None = None,
) -> Float[Array, "b h q k"]:
    """§3.2.1: the weights softmax(Q·Kᵀ / √d_k) of every head, in float32 (each row sums to 1).

    Masked scores are set to the most negative float, so that their weights are exactly zero (a row
    with at least one key it may attend to)."""
    d_k = q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d_k)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    return jax.nn.softmax(scores, axis=-1)


def scaled_dot_product_attention(
    q: Float[Array, "b q h dk"],
    k: Float[Array, "b k h dk"],
    v: Float[Array, "b k h dv"],
    mask: Bool[Array, "b #h q k"] | None = None,
    weights_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> Float[Array, "b q h dv"]:
    """§3.2.1: Attention(Q, K, V) = softmax(Q·Kᵀ / √d_k)·V, for all h heads at once.

    Scores and softmax are computed in float32 whatever the compute dtype (`attention_weights`).
    `weights_dropout`, if given, is applied to the attention weights (a departure, off by default).
    """
    weights = attention_weights(q, k, mask).astype(v.dtype)
    if weights_dropout is not None:
        weights = weights_dropout(weights)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def heads_major(x: Float[Array, "b l h d"]) -> Float[Array, "b h l d"]:
    """Keys or values in the layout of the decoding cache (`cached_attention`)."""
    return x.transpose(0, 2, 1, 3)


def cached_attention(
    q: Float[Array, "b q h dk"],
    k: Float[Array, "b h k dk"],
    v: Float[Array, "b h k dv"],
    mask: Bool[Array, "#b #h q k"] | None = None,
) -> Float[Array, "b q h dv"]:
    """§3.2.1, the formula of `scaled_dot_product_attention` (scores and softmax in float32), for
    keys and values stored heads-major, [b, h, k, d], as the decoding cache holds them.

    Why that layout: with (b, h) leading both operands, each of the two matrix products reads the
    keys and values where they lie; from [b, k, h, d] XLA first copies all of them into that order,
    at every decoding step, which on a CPU took about five times as long as the attention itself
    (128 rows, 74 slots, h 4, d 64: 5.2 ms against 0.9 ms). Only the few new queries are transposed."""
    d_k = q.shape[-1]
    scores = jnp.einsum("bqhd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d_k)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bqhd", weights, v)


IMPLEMENTATIONS = ("reference", "xla", "cudnn", "pallas")

# cuDNN's flash attention (jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention): fp16/bf16
# inputs, a head size that is a multiple of 8 and at most 128 (256 from Hopper on; 128 is the size
# every architecture takes).
_CUDNN_DTYPES = ("bfloat16", "float16")
_CUDNN_MAX_HEAD_SIZE = 128


def resolve_attention_impl(
    config: TransformerConfig, backend: str | None = None, *, dense_mask: bool = False, segment_ids: bool = False
) -> str:
    """The implementation that computes attention: "reference", "xla", "cudnn" or "pallas".

    `dense_mask=True` says that the mask has a dense part: the segment masks of packed rows (then
    also `segment_ids=True`: the segment ids come with it) or the KV-cache decoding step's offset
    causality (`segment_ids=False`).

    `config.attention_impl` as it is, except:
    - "auto": on a TPU, the Pallas splash-attention kernel (`nn/pallas_attention.py`) where this JAX
      has it and the mask is padding, causality and segment ids (not the decoding step's), else XLA;
      elsewhere cuDNN's flash attention where it serves the backend (default `jax.default_backend()`),
      the compute dtype (bf16/fp16), the head size (`config.kernel_head_size`, max(d_k, d_v))
      and the mask (padding and causality only),
      else XLA; and the reference formula when attention dropout is on, which only it implements.
    - "pallas": compiled by Mosaic on a TPU and run in Pallas interpret mode on any other backend
      (slow: it is how the CPU tests prove the kernel); the KV-cache decoding step's mask, which the
      kernel cannot take, goes to XLA (one query per row: there are no scores to save). A JAX
      without the kernel raises ConfigError.
    - "cudnn" on a backend other than "gpu" raises ConfigError.
    """
    backend = jax.default_backend() if backend is None else backend
    impl = config.attention_impl
    if impl == "cudnn" and backend != "gpu":
        raise ConfigError(
            f"attention_impl='cudnn' needs a GPU but JAX runs on {backend!r}: use attention_impl='auto' or 'xla'"
        )
    if impl == "pallas" and pallas.unavailable_reason() is not None:
        raise ConfigError(f"attention_impl='pallas' cannot run: {pallas.unavailable_reason()}; install a JAX that "
                          "has it (pip install -U jax) or use attention_impl='auto' or 'xla'")
    pallas_serves = pallas.unavailable_reason() is None and (not dense_mask or segment_ids)
    if impl == "pallas":
        return "pallas" if pallas_serves else "xla"
    if impl != "auto":
        return impl
    if config.attention_dropout_rate > 0:
        return "reference"
    if backend == "tpu":
        return "pallas" if pallas_serves else "xla"
    cudnn_serves = (
        backend == "gpu"
        and config.dtype in _CUDNN_DTYPES
        and config.kernel_head_size % 8 == 0
        and config.kernel_head_size <= _CUDNN_MAX_HEAD_SIZE
        and not dense_mask
    )
    return "cudnn" if cudnn_serves else "xla"


def dot_product_attention(
    q: Float[Array, "b q h dk"],
    k: Float[Array, "b k h dk"],
    v: Float[Array, "b k h dv"],
    mask: AttentionMask,
    implementation: str,
) -> Float[Array, "b q h dv"]:
    """The same §3.2.1 formula through `jax.nn.dot_product_attention(implementation=…)` ("xla" or
    "cudnn"): scores and softmax in float32, same layout.

    The mask goes in the form the kernels take: padding as per-row key lengths
    (`key_value_seq_lengths`), causality as `is_causal`, and only its dense part (packed rows' segments,
    the decoding step's offset causality) as a boolean `mask`; cuDNN applies that one as an additive
    bias. Query lengths are not passed: §3.2.1 masks keys only, and with them the kernels would zero
    the outputs at padded queries, which the loss ignores anyway.

    The kernels take one head size for Q, K and V; where d_k ≠ d_v (Table 3 (B)) the shorter side is
    zero-padded to max(d_k, d_v): zero columns of Q and K add nothing to Q·Kᵀ, zero columns of V give
    output columns that are cut off again, and the scale stays 1/√d_k.
    """
    d_k, d_v = q.shape[-1], v.shape[-1]
    if d_k != d_v:
        size = max(d_k, d_v)
        pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, size - x.shape[-1])))  # noqa: E731
        q, k, v = pad(q), pad(k), pad(v)
    lengths, dense = mask.kv_lengths, mask.dense
    if implementation == "cudnn":
        if lengths is not None:
            # A row that is all padding (a filler row of the last batch) would give cuDNN zero keys
            # to normalise over; its outputs are ignored, so let it see key 0 rather than risk NaNs.
            lengths = jnp.maximum(lengths, 1)
        if dense is not None:
            # cuDNN turns the mask into a bias, which must span the batch, query and key axes.
            dense = jnp.broadcast_to(dense, (q.shape[0], dense.shape[1], q.shape[1], k.shape[1]))
    out = jax.nn.dot_product_attention(
        q, k, v, mask=dense, scale=1.0 / math.sqrt(d_k), is_causal=mask.causal,
        key_value_seq_lengths=lengths, implementation=implementation,
    )
    return out[..., :d_v]


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

    d_k and d_v are `config.head_sizes`: d_model / h as in the paper's models, or set apart from it
    (Table 3 rows (A), (B)).

    With `record_weights` set (by `record_attention_weights`, for a whole model at once), every call
    also keeps its attention weights [b, h, q, k] (float32, before any attention dropout) as the
    `nnx.Intermediate` attribute `attention_weights` (the newest call's); off, nothing of it is
    computed.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.record_weights = False
        d_model, h = config.d_model, config.h
        d_k, d_v = config.head_sizes
        qkv_init = _projection_init(in_axis=0, out_axis=(1, 2))
        qkv_axes = (EMBED, HEADS, KV)
        self.w_q = nnx.Param(qkv_init(rngs.params(), (d_model, h, d_k), jnp.float32), logical_axes=qkv_axes)
        self.w_k = nnx.Param(qkv_init(rngs.params(), (d_model, h, d_k), jnp.float32), logical_axes=qkv_axes)
        self.w_v = nnx.Param(qkv_init(rngs.params(), (d_model, h, d_v), jnp.float32), logical_axes=qkv_axes)
        self.w_o = nnx.Param(_projection_init(in_axis=(0, 1), out_axis=2)(rngs.params(), (h, d_v, d_model), jnp.float32),
                             logical_axes=(HEADS, KV, EMBED))
        self.weights_dropout = Dropout(config.attention_dropout_rate)
        resolve_attention_impl(config)  # a request the device cannot serve fails here, when the model is built

    def project_query(self, x: Float[Array, "b q m"]) -> Float[Array, "b q h dk"]:
        """Q·W_i^Q for every head i."""
        dtype = self.config.compute_dtype
        return constrain(jnp.einsum("bqm,mhd->bqhd", x.astype(dtype), self.w_q[...].astype(dtype)), *_HEADS_LAYOUT)

    def project_key_value(self, x: Float[Array, "b k m"]) -> tuple[Float[Array, "b k h dk"], Float[Array, "b k h dv"]]:
        """K·W_i^K and V·W_i^V for every head i."""
        dtype = self.config.compute_dtype
        x = x.astype(dtype)
        k = jnp.einsum("bkm,mhd->bkhd", x, self.w_k[...].astype(dtype))
        v = jnp.einsum("bkm,mhd->bkhd", x, self.w_v[...].astype(dtype))
        return constrain(k, *_HEADS_LAYOUT), constrain(v, *_HEADS_LAYOUT)

    def attend(
        self,
        q: Float[Array, "b q h dk"],
        k: Float[Array, "b k h dk"],
        v: Float[Array, "b k h dv"],
        mask: AttentionMask | Bool[Array, "b #h q k"] | None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> Float[Array, "b q m"]:
        """Attention of every head, then Concat(head_1, …, head_h)·W^O.

        `mask` is an `AttentionMask` (transformer/masks.py) or a boolean array (True = may attend).
        """
        mask = as_attention_mask(mask)
        impl = resolve_attention_impl(self.config, dense_mask=mask.dense is not None,
                                      segment_ids=mask.dense is not None and mask.dense_is_segments)
        if impl == "pallas":
            heads = pallas.pallas_attention(q, k, v, mask, interpret=jax.default_backend() != "tpu")
        elif impl == "reference":
            dropout = None
            if self.config.attention_dropout_rate > 0 and not deterministic:
                dropout = lambda w: self.weights_dropout(w, deterministic=False, rngs=rngs)  # noqa: E731
            heads = scaled_dot_product_attention(q, k, v, mask.to_dense(q.shape[1], k.shape[1]), weights_dropout=dropout)
        else:
            heads = dot_product_attention(q, k, v, mask, impl)
        if self.record_weights:
            # Computed apart from `heads` (the formula once more), so that the output is the same
            # computation whether or not the weights are recorded, whatever the implementation.
            weights = attention_weights(q, k, mask.to_dense(q.shape[1], k.shape[1]))
            self.attention_weights = nnx.Intermediate(weights)  # the newest call's
        return self.combine_heads(heads)

    def attend_cached(
        self,
        q: Float[Array, "b q h dk"],
        k: Float[Array, "b h k dk"],
        v: Float[Array, "b h k dv"],
        mask: AttentionMask | Bool[Array, "b #h q k"] | None,
    ) -> Float[Array, "b q m"]:
        """`attend` over keys and values held heads-major by the decoding cache (`cached_attention`),
        whatever `config.attention_impl` says: decoding steps take the formula itself (their offset
        causal mask is dense, which the kernels would send to XLA's formula anyway). Deterministic:
        decoding has no attention dropout."""
        mask = as_attention_mask(mask).to_dense(q.shape[1], k.shape[2])
        heads = cached_attention(q, k, v, mask)
        if self.record_weights:
            self.attention_weights = nnx.Intermediate(attention_weights(q, k.transpose(0, 2, 1, 3), mask))
        return self.combine_heads(heads)

    def combine_heads(self, heads: Float[Array, "b q h dv"]) -> Float[Array, "b q m"]:
        """Concat(head_1, …, head_h)·W^O."""
        dtype = self.config.compute_dtype
        return jnp.einsum("bqhd,hdm->bqm", heads, self.w_o[...].astype(dtype))

    def __call__(
        self,
        x_q: Float[Array, "b q m"],
        x_kv: Float[Array, "b k m"],
        mask: AttentionMask | Bool[Array, "b #h q k"] | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> Float[Array, "b q m"]:
        """Self-attention when x_kv is x_q; encoder-decoder attention when x_kv is the encoder output."""
        q = self.project_query(x_q)
        k, v = self.project_key_value(x_kv)
        return self.attend(q, k, v, mask, deterministic=deterministic, rngs=rngs)


def record_attention_weights(model: nnx.Module, record: bool = True) -> None:
    """Switch recording of attention weights on (or off) for every `MultiHeadAttention` in `model`;
    `transformer.models.attention_maps.attention_maps` uses it for one forward pass."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, MultiHeadAttention):
            node.record_weights = record
