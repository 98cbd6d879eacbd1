"""Attention masks: what each query position may attend to.

Two forms, one convention (True / inside means "query position q may attend to key position k"):

- Boolean arrays `[batch, 1, q_len, k_len]` (the 1 broadcasts over the h heads), which combine with
  `&` and are applied once, inside attention, as `jnp.where(mask, scores, jnp.finfo(scores.dtype).min)`.
- `AttentionMask`, a description built by the pure helpers below: per-row key lengths for padding,
  a causal flag, and a dense boolean array only where nothing shorter says it (the segment ids of
  packed rows, the offset causal mask of a KV-cache decoding step, the pad keys of rows that may
  be padded anywhere). The reference attention turns it into one boolean array
  (`AttentionMask.to_dense`); cuDNN's flash attention takes the lengths and the causal flag as they
  are, so that no `[b, h, q, k]` array is built for them; the Pallas kernel takes the causal flag
  and segment ids (packed rows' own, kept beside the dense part).

Padding is said one of two ways. In general a key is real iff its token is not pad_id, wherever
the pads are (left, right or between real tokens): a dense `[b, 1, 1, k]` part, which
attention_impl "auto" and "pallas" send to XLA (`attention.resolve_attention_impl`). Where the caller
promises right-padded rows (`right_padded=True`: every row's real tokens come first, as
transformer/data makes them), a row's key padding is "key k >= its number of real tokens": per-row
lengths, which cuDNN's and the Pallas kernel take. The helpers below default to right-padded rows;
the models pass the choice explicitly.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


def padding_mask(
    q_tokens: Int[Array, "b q"], k_tokens: Int[Array, "b k"], pad_id: int = 0
) -> Bool[Array, "b 1 q k"]:
    """Keys that are padding are hidden from every query (queries themselves are not masked:
    their outputs are ignored by the loss)."""
    del q_tokens  # only the key side matters; taken for a symmetric call site
    return (k_tokens != pad_id)[:, None, None, :]


def causal_mask(q_len: int, k_len: int | None = None, offset: int | jnp.ndarray = 0) -> Bool[Array, "1 1 q k"]:
    """§3.2.3: the decoder's self-attention may not look at later positions.

    Query i (at absolute position offset + i) may attend to keys 0 … offset + i.
    """
    k_len = q_len if k_len is None else k_len
    q_pos = jnp.arange(q_len)[:, None] + offset
    k_pos = jnp.arange(k_len)[None, :]
    return (k_pos <= q_pos)[None, None]


def ancestry_causal_mask(ancestors: Int[Array, "b k l"], offset: int | jnp.ndarray) -> Bool[Array, "b 1 k lk"]:
    """§3.2.3 for k hypotheses of a source that share one self-attention cache of l slots, each slot
    holding all k hypotheses' keys (key j · k + s: slot j of hypothesis s), as beam search keeps it
    instead of copying each new hypothesis's keys from its parent: hypothesis r's query at position
    `offset` may attend to slot j <= offset of hypothesis ancestors[b, r, j], the one whose keys at
    j are those of r's own prefix."""
    k, slots = ancestors.shape[1], ancestors.shape[2]
    own = ancestors[..., None] == jnp.arange(k)[None, None, None, :]  # [b, k (query), l, k (key)]
    visible = own & (jnp.arange(slots) <= offset)[None, None, :, None]
    return visible.reshape(ancestors.shape[0], 1, k, slots * k)


def segment_mask(q_segments: Int[Array, "b q"], k_segments: Int[Array, "b k"]) -> Bool[Array, "b 1 q k"]:
    """Packed rows: a query attends only to keys of its own example (segment id 0 is padding)."""
    same = q_segments[:, :, None] == k_segments[:, None, :]
    return (same & (k_segments != 0)[:, None, :])[:, None]


def lengths_mask(kv_lengths: Int[Array, "b"], k_len: int) -> Bool[Array, "b 1 1 k"]:
    """Right padding as a mask: key k is real iff k < the row's length."""
    return (jnp.arange(k_len)[None, :] < kv_lengths[:, None])[:, None, None, :]


def real_lengths(tokens: Int[Array, "b l"], pad_id: int) -> Int[Array, "b"]:
    """The number of real (non-pad) tokens of each right-padded row, as int32 (what
    `jax.nn.dot_product_attention` takes as sequence lengths)."""
    return (tokens != pad_id).sum(axis=1, dtype=jnp.int32)


def real_positions(tokens: Int[Array, "b l"], pad_id: int) -> Int[Array, "b l"]:
    """Each token's index among its row's real (non-pad) tokens, as int32; pads get 0. Right-padded
    rows get 0 … l-1 at their real tokens, so a row's real tokens get the same positions wherever
    its pads are."""
    real = tokens != pad_id
    return jnp.where(real, jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1, 0)


@flax.struct.dataclass
class AttentionMask:
    """A description of which keys each query may attend to; all parts are combined with "and".

    dense: a boolean `[b, 1 or h, q, k]` array (True = may attend), or None.
    kv_lengths: `[b]` int32; key k of row b is padding iff k >= kv_lengths[b]; None = no padding.
    causal: query i may attend to keys 0 … i only (§3.2.3; queries and keys start at position 0).
    q_segments, kv_segments: for packed rows, the segment ids that `dense` was built from
    (`segment_mask(q_segments, kv_segments)`, 0 = padding), kept for the Pallas kernel, which takes
    segment ids rather than a mask (`nn/pallas_attention.py`); None where `dense` is anything else.
    """

    dense: Bool[Array, "b #h q k"] | None = None
    kv_lengths: Int[Array, "b"] | None = None
    causal: bool = flax.struct.field(pytree_node=False, default=False)
    q_segments: Int[Array, "b q"] | None = None
    kv_segments: Int[Array, "b k"] | None = None

    @property
    def dense_is_segments(self) -> bool:
        """Whether the dense part (if any) is exactly the segment mask of `q_segments`/`kv_segments`."""
        return self.dense is None or (self.q_segments is not None and self.kv_segments is not None)

    def to_dense(self, q_len: int, k_len: int) -> Bool[Array, "#b 1 q k"] | None:
        """The same description as one boolean array (None when nothing is masked)."""
        mask = self.dense
        for part in (
            None if self.kv_lengths is None else lengths_mask(self.kv_lengths, k_len),
            causal_mask(q_len, k_len) if self.causal else None,
        ):
            if part is not None:
                mask = part if mask is None else mask & part
        return mask

    def __and__(self, other: "AttentionMask") -> "AttentionMask":
        lengths = [x for x in (self.kv_lengths, other.kv_lengths) if x is not None]
        dense = [x for x in (self.dense, other.dense) if x is not None]
        # Segment ids survive only where the combined dense part is still one segment mask.
        segmented = [m for m in (self, other) if m.dense is not None]
        keep = segmented[0] if len(segmented) == 1 and segmented[0].dense_is_segments else None
        return AttentionMask(
            dense=None if not dense else dense[0] if len(dense) == 1 else dense[0] & dense[1],
            kv_lengths=None if not lengths else lengths[0] if len(lengths) == 1 else jnp.minimum(*lengths),
            causal=self.causal or other.causal,
            q_segments=None if keep is None else keep.q_segments,
            kv_segments=None if keep is None else keep.kv_segments,
        )


def as_attention_mask(mask: AttentionMask | jax.Array | None) -> AttentionMask:
    """A boolean array (or None, attend everywhere) as the dense part of an `AttentionMask`."""
    return mask if isinstance(mask, AttentionMask) else AttentionMask(dense=mask)


def self_attention_mask(
    tokens: Int[Array, "b l"],
    pad_id: int,
    *,
    causal: bool = False,
    segments: Int[Array, "b l"] | None = None,
    right_padded: bool = True,
) -> AttentionMask:
    """Self-attention: §3.2.3 causality as a flag; padding as lengths for right-padded rows, else as
    a dense key mask (pad keys hidden wherever they are); for packed rows (`segments`, whatever
    `right_padded` says) the segment ids as a dense mask (and as they are, for the Pallas kernel)
    beside the lengths."""
    if segments is None and not right_padded:
        return AttentionMask(dense=padding_mask(tokens, tokens, pad_id), causal=causal)
    dense = None if segments is None else segment_mask(segments, segments)
    return AttentionMask(dense=dense, kv_lengths=real_lengths(tokens, pad_id), causal=causal,
                         q_segments=segments, kv_segments=segments)


def cross_attention_mask(
    k_tokens: Int[Array, "b k"],
    pad_id: int,
    q_segments: Int[Array, "b q"] | None = None,
    k_segments: Int[Array, "b k"] | None = None,
    *,
    right_padded: bool = True,
) -> AttentionMask:
    """Encoder-decoder attention: every target position may see every real source position (and,
    for packed rows, only those of its own example). Padding as in `self_attention_mask`."""
    packed = q_segments is not None and k_segments is not None
    if not packed and not right_padded:
        return AttentionMask(dense=padding_mask(k_tokens, k_tokens, pad_id))
    dense = segment_mask(q_segments, k_segments) if packed else None
    return AttentionMask(dense=dense, kv_lengths=real_lengths(k_tokens, pad_id),
                         q_segments=q_segments if packed else None, kv_segments=k_segments if packed else None)


def attention_masks(
    src_tokens: Int[Array, "b s"],
    tgt_tokens: Int[Array, "b t"],
    pad_id: int,
    src_segments: Int[Array, "b s"] | None = None,
    tgt_segments: Int[Array, "b t"] | None = None,
    *,
    right_padded: bool = True,
) -> tuple[AttentionMask, AttentionMask, AttentionMask]:
    """The three masks of the encoder-decoder: encoder self, decoder self (causal), cross."""
    packed = src_segments is not None and tgt_segments is not None
    pads = dict(right_padded=right_padded)
    enc_self = self_attention_mask(src_tokens, pad_id, segments=src_segments if packed else None, **pads)
    dec_self = self_attention_mask(tgt_tokens, pad_id, causal=True, segments=tgt_segments if packed else None,
                                   **pads)
    cross = cross_attention_mask(src_tokens, pad_id, tgt_segments if packed else None,
                                 src_segments if packed else None, **pads)
    return enc_self, dec_self, cross
