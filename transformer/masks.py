"""Boolean attention masks: True means "query position q may attend to key position k".

Every helper returns `[batch, 1, q_len, k_len]` (the 1 broadcasts over the h heads) so that masks
combine with `&` and are applied once, inside attention, as
`jnp.where(mask, scores, jnp.finfo(scores.dtype).min)`.
"""

from __future__ import annotations

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


def segment_mask(q_segments: Int[Array, "b q"], k_segments: Int[Array, "b k"]) -> Bool[Array, "b 1 q k"]:
    """Packed rows: a query attends only to keys of its own example (segment id 0 is padding)."""
    same = q_segments[:, :, None] == k_segments[:, None, :]
    return (same & (k_segments != 0)[:, None, :])[:, None]


def attention_masks(
    src_tokens: Int[Array, "b s"],
    tgt_tokens: Int[Array, "b t"],
    pad_id: int,
    src_segments: Int[Array, "b s"] | None = None,
    tgt_segments: Int[Array, "b t"] | None = None,
) -> tuple[Bool[Array, "b 1 s s"], Bool[Array, "b 1 t t"], Bool[Array, "b 1 t s"]]:
    """The three masks of the encoder-decoder: encoder self, decoder self (causal), cross."""
    enc_self = padding_mask(src_tokens, src_tokens, pad_id)
    dec_self = padding_mask(tgt_tokens, tgt_tokens, pad_id) & causal_mask(tgt_tokens.shape[1])
    cross = padding_mask(tgt_tokens, src_tokens, pad_id)
    if src_segments is not None and tgt_segments is not None:
        enc_self = enc_self & segment_mask(src_segments, src_segments)
        dec_self = dec_self & segment_mask(tgt_segments, tgt_segments)
        cross = cross & segment_mask(tgt_segments, src_segments)
    return enc_self, dec_self, cross
