"""§3.2.1 scaled dot-product attention through JAX's TPU flash-attention kernel ("splash attention",
`jax.experimental.pallas.ops.tpu.splash_attention`, written in Pallas): attention_impl="pallas".

It computes the same formula as `attention.scaled_dot_product_attention`,

    Attention(Q, K, V) = softmax(Q·Kᵀ / √d_k)·V,

block by block with an online softmax (scores, running maximum and sum in float32), so the
`[batch, heads, q, k]` scores are never written to memory (HBM), in the forward pass or the
backward pass (the kernel has its own custom VJP).

How the library's mask (`nn/masks.py: AttentionMask`) reaches the kernel, which takes a static
mask (full or causal, the same for every row) and per-row segment ids (query i may attend to key j
only if their ids are equal):
- causality (§3.2.3): the kernel's `CausalMask`;
- padding: keys at or beyond a row's length get the id -1, which no query has;
- packed rows: the segment ids themselves (`AttentionMask.q_segments` / `kv_segments`), keys of
  segment 0 (padding) again -1.
A dense mask of any other kind (the KV-cache decoding step's offset causality) has no such form:
`attention.resolve_attention_impl` sends it to XLA instead.

Departures, each said again where it happens:
- 1/√d_k is applied to Q before the kernel (it computes Q·Kᵀ unscaled): in bfloat16 the scaled
  Q is rounded once more (exactly for d_k a power of 4, e.g. 64 or 16, where 1/√d_k is a power of 2).
- Lengths are padded to a multiple of 128 (the kernel's blocks) and the head sizes d_k, d_v to
  one common multiple of 128 (the TPU's 128 lanes; some JAX releases take no smaller head, jax#30861),
  with zeros: zero columns change neither Q·Kᵀ nor the first d_v columns of the output, and padded
  keys are masked by their id. The output is sliced back.
- A query that may attend to no key (a padding position of a packed row, a row that is all
  padding) gets the kernel's finite answer, the mean of the values of the key blocks it visits,
  where the reference formula gives the mean over all keys; the loss ignores both.
- The weights·V product is float32 inside the kernel, where the reference casts the weights to the
  compute dtype first (the same in float32).

On a TPU the kernel is compiled by Mosaic; on any other backend it runs in Pallas interpret mode
(`interpret=True`: the same kernel, every block a small XLA computation) — slow, but it is how the
tests prove this code on a CPU. In a mesh step (`partitioning.activation_layout`) the kernel runs
under `jax.shard_map`, split over rows (data, fsdp) and heads (tensor): XLA's partitioner cannot
split a Mosaic custom call itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

from transformer.nn.masks import AttentionMask
from transformer.nn.partitioning import BATCH, HEADS, activation_layout

try:  # a JAX without the TPU Pallas ops (or with another API) leaves "pallas" unavailable, not broken
    from jax.experimental.pallas.ops.tpu import splash_attention as _splash

    _splash.BlockSizes, _splash.SegmentIds, _splash.CausalMask, _splash.FullMask  # noqa: B018
    _splash.MultiHeadMask, _splash.make_splash_mha  # noqa: B018
    _UNAVAILABLE: str | None = None
except Exception as err:  # ImportError, AttributeError, or an error raised while the module loads
    _splash = None
    _UNAVAILABLE = (f"this JAX ({jax.__version__}) has no usable jax.experimental.pallas.ops.tpu.splash_attention "
                    f"({type(err).__name__}: {err})")

LANES = 128  # the kernel's block sizes must be multiples of the TPU's 128 lanes
MAX_BLOCK = 512  # the largest block tried; long rows get 512 x 512 blocks (fewer grid steps)
_NO_QUERY = -1  # the segment id of keys that no query may attend to (padding)
_NO_KEY = -2  # the segment id of the block padding's queries (sliced off)


def unavailable_reason() -> str | None:
    """None when this JAX has the splash-attention kernel; else why not, in words."""
    return _UNAVAILABLE


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _block(length: int, max_block: int) -> int:
    """The largest multiple of 128, at most max_block, that divides `length` (a multiple of 128)."""
    return next(b for b in range(max(LANES, max_block // LANES * LANES), 0, -LANES) if length % b == 0)


def _segment_ids(mask: AttentionMask, b: int, q_len: int, k_len: int) -> tuple[Int[Array, "b q"], Int[Array, "b k"]]:
    """The per-row ids of queries and keys: query i may attend to key j iff ids equal (and the
    static mask allows it). Reproduces the library's padding and segment masks (module docstring)."""
    k_pos = jnp.arange(k_len)[None, :]
    real_key = jnp.ones((b, k_len), bool) if mask.kv_lengths is None else k_pos < mask.kv_lengths[:, None]
    if mask.q_segments is not None:
        q_ids = jnp.broadcast_to(mask.q_segments, (b, q_len)).astype(jnp.int32)
        kv_segments = jnp.broadcast_to(mask.kv_segments, (b, k_len)).astype(jnp.int32)
        kv_ids = jnp.where(real_key & (kv_segments != 0), kv_segments, _NO_QUERY)
    else:
        q_ids = jnp.ones((b, q_len), jnp.int32)
        kv_ids = jnp.where(real_key, 1, _NO_QUERY).astype(jnp.int32)
    return q_ids, kv_ids


def _kernel(heads: int, q_len: int, k_len: int, causal: bool, max_block: int, interpret: bool):
    """The splash kernel for [heads, q_len, d] x [heads, k_len, d] (lengths multiples of 128)."""
    block_q, block_kv = _block(q_len, max_block), _block(k_len, max_block)
    blocks = _splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv,
    )
    static = _splash.CausalMask((q_len, k_len)) if causal else _splash.FullMask((q_len, k_len))
    return _splash.make_splash_mha(_splash.MultiHeadMask([static] * heads), block_sizes=blocks,
                                   head_shards=1, q_seq_shards=1, interpret=interpret)


def pallas_attention(
    q: Float[Array, "b q h dk"],
    k: Float[Array, "b k h dk"],
    v: Float[Array, "b k h dv"],
    mask: AttentionMask,
    *,
    interpret: bool,
    max_block: int = MAX_BLOCK,
) -> Float[Array, "b q h dv"]:
    """§3.2.1 softmax(Q·Kᵀ / √d_k)·V for all rows and heads by the splash-attention kernel.

    `mask` must have no dense part other than packed rows' segment ids
    (`mask.dense_is_segments`); `interpret` runs the kernel in Pallas interpret mode (any backend).
    `max_block` caps the kernel's block sizes (tests pass 128 to keep interpret mode quick).
    """
    if _splash is None:
        raise NotImplementedError(_UNAVAILABLE)
    if not mask.dense_is_segments:
        raise ValueError("pallas_attention takes padding, causality and segment ids; this mask has another dense "
                         "part (the KV-cache decoding step's): use implementation 'xla'")
    b, q_len, _, d_k = q.shape
    k_len, d_v = k.shape[1], v.shape[-1]
    q_ids, kv_ids = _segment_ids(mask, b, q_len, k_len)

    # §3.2.1's 1/√d_k, applied to Q here because the kernel computes Q·Kᵀ unscaled (a departure in
    # bfloat16: the scaled Q is rounded once more).
    q = (q.astype(jnp.float32) * (1.0 / math.sqrt(d_k))).astype(q.dtype)

    # Pad lengths to the kernel's 128 and head sizes to one multiple of 128, with zeros; padded keys
    # get an id no query has, padded queries one no key has (their rows are sliced off below).
    q_pad, k_pad = _round_up(q_len, LANES) - q_len, _round_up(k_len, LANES) - k_len
    d = _round_up(max(d_k, d_v), LANES)
    q = jnp.pad(q, ((0, 0), (0, q_pad), (0, 0), (0, d - d_k)))
    k = jnp.pad(k, ((0, 0), (0, k_pad), (0, 0), (0, d - d_k)))
    v = jnp.pad(v, ((0, 0), (0, k_pad), (0, 0), (0, d - d_v)))
    q_ids = jnp.pad(q_ids, ((0, 0), (0, q_pad)), constant_values=_NO_KEY)
    kv_ids = jnp.pad(kv_ids, ((0, 0), (0, k_pad)), constant_values=_NO_QUERY)

    def attend(q, k, v, q_ids, kv_ids):
        # The kernel takes one row's [heads, length, d]: vmap over the rows of this (shard of the) batch.
        kernel = _kernel(q.shape[2], q.shape[1], k.shape[1], mask.causal, max_block, interpret)
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [b, l, h, d] -> [b, h, l, d]
        one_row = lambda q, k, v, qi, ki: kernel(q, k, v, segment_ids=_splash.SegmentIds(q=qi, kv=ki))  # noqa: E731
        out = jax.vmap(one_row)(heads_first(q), heads_first(k), heads_first(v), q_ids, kv_ids)
        return heads_first(out)

    layout = activation_layout(q.shape, BATCH, None, HEADS, None)
    if layout is not None:
        # A mesh step: split the kernel's work by hand over rows and heads, as `constrain` lays them
        # out; XLA's automatic partitioner cannot split the Mosaic custom call on a TPU.
        rows, _, heads, _ = layout.spec
        qkv_spec, ids_spec = PartitionSpec(rows, None, heads, None), PartitionSpec(rows, None)
        attend = jax.shard_map(attend, mesh=layout.mesh, in_specs=(qkv_spec,) * 3 + (ids_spec,) * 2,
                               out_specs=qkv_spec, check_vma=False)
    out = attend(q, k, v, q_ids, kv_ids)
    return out[:, :q_len, :, :d_v]
