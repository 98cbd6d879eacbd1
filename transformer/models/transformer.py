"""The three model families built from the same layers.

- `Transformer`: the paper's encoder-decoder (§3, Figure 1), for translation.
- `TransformerLM`: a decoder-only language model (causal self-attention, no cross-attention).
- `TransformerClassifier`: an encoder, mean-pooled over real tokens, then class logits.
- `TransformerMLM`: an encoder with token logits at every position (or at the positions `at` names),
  for masked-language-model pre-training (BERT-style; its `embed` and `encoder` load into a
  `TransformerClassifier`).

Every model returns logits; losses live in `transformer.training.loss`.

Padding: pad ids (`config.pad_id`) may stand anywhere in a row, before, between or after its real
tokens. Every call hides pad keys from every query and, unless positions are given, gives each real
token its index among its row's real tokens as its position; so a row's outputs at its real
positions are those of the same row with its pads removed (the outputs at pads mean nothing). That
key mask is a dense `[b, 1, 1, k]` array, which attention_impl "auto" and "pallas" send to XLA's
attention (`nn.attention.resolve_attention_impl`). A caller whose rows are all right-padded (real
tokens first) passes `right_padded=True`: padding then goes to attention as per-row key lengths and
positions are 0 … l-1, the form the cuDNN and Pallas kernels take. Packed rows (`segments` given)
are right-padded by construction and are always treated so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from transformer.config import TransformerConfig
from transformer.nn.embeddings import InputEmbedding, PreSoftmaxProjection, TokenEmbedding
from transformer.nn.layers import Decoder, Encoder, LayerCache, cache_slots
from transformer.nn.partitioning import CLASSES, EMBED, annotate
from transformer.nn.masks import (
    ancestry_causal_mask, attention_masks, causal_mask, cross_attention_mask, real_positions, self_attention_mask,
)


def check_tokens(name: str, tokens, config: TransformerConfig, batch: int | None = None) -> None:
    """Raise ValueError (at trace time) unless `tokens` is an integer [batch, length] array that fits."""
    shape, dtype = getattr(tokens, "shape", None), getattr(tokens, "dtype", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D integer array [batch, length]; got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer token ids (int32); got dtype {dtype}")
    if batch is not None and shape[0] != batch:
        raise ValueError(f"{name} has batch size {shape[0]} but the source has {batch}: pass one target per source")
    if shape[1] > config.max_len:
        raise ValueError(f"{name} has length {shape[1]} > max_len={config.max_len}: raise max_len or shorten the input")


def _default_positions(tokens: Int[Array, "b l"], pad_id: int, right_padded: bool) -> Int[Array, "b l"] | None:
    """Positions for a call that gives none: for right-padded rows None (`InputEmbedding` then uses
    0 … l-1, one table for the batch), else each token's index among its row's real tokens."""
    return None if right_padded else real_positions(tokens, pad_id)


def _self_attention_inputs(
    tokens: Int[Array, "b l"], pad_id: int, positions: Int[Array, "b l"] | None, segments: Int[Array, "b l"] | None,
    right_padded: bool, causal: bool = False,
):
    """The self-attention mask and the positions of one stack's input rows (packed rows, which pass
    `segments`, are right-padded by construction)."""
    right_padded = right_padded or segments is not None
    mask = self_attention_mask(tokens, pad_id, causal=causal, segments=segments, right_padded=right_padded)
    return mask, (_default_positions(tokens, pad_id, right_padded) if positions is None else positions)


def _cached_self_mask(tokens: Int[Array, "bk t"], cache: list[LayerCache], index: jax.Array | int,
                      ancestors: Int[Array, "b k slots"] | None) -> tuple[Bool[Array, "b 1 q keys"], int]:
    """The self-attention mask of t new tokens at cache slots index … index+t-1, and the number of
    beams k (the tokens' rows per cache row): causal over the slots for k = 1; for k > 1 (t = 1),
    each beam reads slot j as beam ancestors[b, r, j] wrote it (default: its own;
    `masks.ancestry_causal_mask`). Dense masks: a cached step's causality is offset by `index`,
    which is_causal cannot say (attention_impl="auto" sends dense masks to XLA; one query per row
    is memory-bound anyway)."""
    sources = cache[0]["k"].shape[0]
    beams = tokens.shape[0] // sources
    slots = cache_slots(cache, beams)
    if beams == 1:
        return causal_mask(tokens.shape[1], slots, offset=index), beams
    if ancestors is None:
        ancestors = jnp.broadcast_to(jnp.arange(beams)[None, :, None], (sources, beams, slots))
    return ancestry_causal_mask(ancestors, index), beams


class Transformer(nnx.Module):
    """§3: the encoder-decoder Transformer.

    `model(src_tokens, tgt_in_tokens)` -> float32 logits [batch, tgt_len, vocab_size], where
    tgt_in_tokens are the targets shifted right (begin token first). Pads may stand anywhere in
    source and target rows; each row's logits at its real target positions are those of the row
    with its pads removed. `right_padded=True` promises that every row is right-padded (real tokens
    first, then pad_id): the same logits at real positions, with padding as per-row key lengths for
    the attention kernels (module docstring). Packed rows pass `*_segments` (example ids, 0 =
    padding at the end of the row) and `*_positions` (restarting at 0 per example).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        # §3.4: "we share the same weight matrix between the two embedding layers and the
        # pre-softmax linear transformation".
        src_tokens = TokenEmbedding(config, rngs=rngs)
        tgt_tokens = src_tokens if config.share_embeddings else TokenEmbedding(config, rngs=rngs)
        self.src_embed = InputEmbedding(config, src_tokens, rngs=rngs)
        self.tgt_embed = InputEmbedding(config, tgt_tokens, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, cross_attention=True, rngs=rngs)
        self.output_projection = PreSoftmaxProjection(config, rngs=rngs)

    def encode(
        self,
        src_tokens: Int[Array, "b s"],
        src_positions: Int[Array, "b s"] | None = None,
        src_segments: Int[Array, "b s"] | None = None,
        *,
        right_padded: bool = False,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "b s m"]:
        """The encoder's output ("memory") for the source tokens, padded anywhere (or right-padded,
        as `right_padded` promises)."""
        check_tokens("src_tokens", src_tokens, self.config)
        mask, src_positions = _self_attention_inputs(src_tokens, self.config.pad_id, src_positions, src_segments,
                                                     right_padded)
        x = self.src_embed(src_tokens, src_positions, deterministic=deterministic, rngs=rngs)
        return self.encoder(x, mask, deterministic=deterministic, rngs=rngs)

    def logits(self, x: Float[Array, "b t m"]) -> Float[Array, "b t v"]:
        """§3.4: the pre-softmax linear transformation (the shared embedding matrix, transposed)."""
        return self.output_projection(x, self.tgt_embed.token_embedding)

    def __call__(
        self,
        src_tokens: Int[Array, "b s"],
        tgt_in_tokens: Int[Array, "b t"],
        *,
        src_positions: Int[Array, "b s"] | None = None,
        tgt_positions: Int[Array, "b t"] | None = None,
        src_segments: Int[Array, "b s"] | None = None,
        tgt_segments: Int[Array, "b t"] | None = None,
        right_padded: bool = False,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "b t v"]:
        if (src_segments is None) != (tgt_segments is None):
            raise ValueError("pass both src_segments and tgt_segments (packed rows) or neither")
        run = dict(right_padded=right_padded, deterministic=deterministic, rngs=rngs)
        memory = self.encode(src_tokens, src_positions, src_segments, **run)  # checks src_tokens
        check_tokens("tgt_in_tokens", tgt_in_tokens, self.config, batch=src_tokens.shape[0])
        return self.decode(memory, src_tokens, tgt_in_tokens, tgt_positions=tgt_positions,
                           src_segments=src_segments, tgt_segments=tgt_segments, **run)

    def decode(
        self,
        memory: Float[Array, "b s m"],
        src_tokens: Int[Array, "b s"],
        tgt_in_tokens: Int[Array, "b t"],
        *,
        tgt_positions: Int[Array, "b t"] | None = None,
        src_segments: Int[Array, "b s"] | None = None,
        tgt_segments: Int[Array, "b t"] | None = None,
        right_padded: bool = False,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "b t v"]:
        """The decoder over the whole target prefix, given the encoder output (no cache); source
        and target padded anywhere (or right-padded, as `right_padded` promises)."""
        run = dict(deterministic=deterministic, rngs=rngs)
        pad_id = self.config.pad_id
        right_padded = right_padded or (src_segments is not None and tgt_segments is not None)
        _, dec_self_mask, cross_mask = attention_masks(
            src_tokens, tgt_in_tokens, pad_id, src_segments, tgt_segments, right_padded=right_padded
        )
        if tgt_positions is None:
            tgt_positions = _default_positions(tgt_in_tokens, pad_id, right_padded)
        y = self.tgt_embed(tgt_in_tokens, tgt_positions, **run)
        y, _ = self.decoder(y, memory, dec_self_mask, cross_mask, **run)
        return self.logits(y)

    def init_cache(self, memory: Float[Array, "b s m"], max_len: int, beams: int = 1) -> list[LayerCache]:
        """Per-layer caches for incremental decoding of up to max_len target positions, for `beams`
        hypotheses per source: self-attention keys/values of b sources · beams, the encoder-decoder
        keys/values once per source (b rows)."""
        return self.decoder.init_cache(memory.shape[0], max_len, memory, self.config.compute_dtype, beams)

    def decode_step(
        self,
        tgt_tokens: Int[Array, "bk t"],
        src_tokens: Int[Array, "b s"],
        cache: list[LayerCache],
        index: jax.Array | int,
        *,
        right_padded: bool = False,
        ancestors: Int[Array, "b k slots"] | None = None,
    ) -> tuple[Float[Array, "bk t v"], list[LayerCache]]:
        """Logits for t new target tokens at positions index … index+t-1, from and into the cache
        (the encoder output is already in the cache as the encoder-decoder keys/values). The target
        may have k rows per source (beam search's hypotheses, those of one source adjacent): they
        share the source's encoder-decoder keys/values, which the cache holds once, and each reads
        the self-attention slots of beam `ancestors[b, r, j]` at slot j (t = 1; default: its own), so
        that beam search need not copy keys/values from parents to children. Source pads
        are hidden wherever they are (as per-row lengths where `right_padded` promises right
        padding)."""
        positions = jnp.broadcast_to(index + jnp.arange(tgt_tokens.shape[1]), tgt_tokens.shape)
        self_mask, _ = _cached_self_mask(tgt_tokens, cache, index, ancestors)
        # Per source: [b] lengths or a [b, 1, 1, s] key mask.
        cross_mask = cross_attention_mask(src_tokens, self.config.pad_id, right_padded=right_padded)
        y = self.tgt_embed(tgt_tokens, positions)
        y, cache = self.decoder(y, None, self_mask, cross_mask, cache=cache, cache_index=index)
        return self.logits(y), cache


class _TokenLogitsModel(nnx.Module):
    """What the two one-stack language models share: the input embedding, one stack of layers
    (`_stack`), and at every position logits over the vocabulary from the pre-softmax linear
    transformation of §3.4, tied to the token embedding (when share_embeddings). `causal`: whether
    a position's self-attention stops at itself."""

    causal: bool

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = InputEmbedding(config, TokenEmbedding(config, rngs=rngs), rngs=rngs)
        self._build_stack(config, rngs)
        self.output_projection = PreSoftmaxProjection(config, rngs=rngs)

    def _build_stack(self, config: TransformerConfig, rngs: nnx.Rngs) -> None:
        raise NotImplementedError

    def _stack(self, x, mask, *, deterministic: bool, rngs):
        raise NotImplementedError

    def logits(self, x: Float[Array, "b l m"]) -> Float[Array, "b l v"]:
        """§3.4: the pre-softmax linear transformation (the token embedding matrix, transposed)."""
        return self.output_projection(x, self.embed.token_embedding)

    def __call__(
        self,
        tokens: Int[Array, "b l"],
        *,
        positions: Int[Array, "b l"] | None = None,
        segments: Int[Array, "b l"] | None = None,
        at: Int[Array, "b k"] | None = None,
        right_padded: bool = False,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "b l v"] | Float[Array, "b k v"]:
        """Logits (float32) at every position (what they predict: the class docstring), or only at
        the positions `at` (indices into each row: a masked LM's loss needs a few, and the
        projection over the vocabulary then runs on those alone). Rows are padded anywhere (or
        right-padded, as `right_padded` promises); packed rows pass `segments` (example ids, 0 =
        padding) and `positions` (restarting at 0 per example), and no example attends to another."""
        check_tokens("tokens", tokens, self.config)
        mask, positions = _self_attention_inputs(tokens, self.config.pad_id, positions, segments, right_padded,
                                                 causal=self.causal)
        x = self.embed(tokens, positions, deterministic=deterministic, rngs=rngs)
        x = self._stack(x, mask, deterministic=deterministic, rngs=rngs)
        if at is not None:
            x = jnp.take_along_axis(x, at[..., None], axis=1)
        return self.logits(x)


class TransformerLM(_TokenLogitsModel):
    """A decoder-only language model from the same layers: causal self-attention, no cross-attention;
    logits[:, i] at a real token predicts the row's next real token. Pads may stand anywhere
    (module docstring); a left pad, which has no real key at or before it, gets meaningless logits
    (finite with the reference formula and XLA: its scores are all the same large negative number)."""

    causal = True

    def _build_stack(self, config: TransformerConfig, rngs: nnx.Rngs) -> None:
        self.decoder = Decoder(config, cross_attention=False, rngs=rngs)

    def _stack(self, x, mask, *, deterministic: bool, rngs):
        return self.decoder(x, None, mask, None, deterministic=deterministic, rngs=rngs)[0]

    def init_cache(self, batch: int, max_len: int) -> list[LayerCache]:
        return self.decoder.init_cache(batch, max_len, None, self.config.compute_dtype)

    def decode_step(
        self, tokens: Int[Array, "bk t"], cache: list[LayerCache], index: jax.Array | int,
        key_valid: Bool[Array, "b slots"] | None = None, positions: Int[Array, "bk t"] | None = None,
        ancestors: Int[Array, "b k slots"] | None = None,
    ) -> tuple[Float[Array, "bk t v"], list[LayerCache]]:
        """Logits for t new tokens written at cache slots index … index+t-1 (t > 1 prefills a prompt in
        one pass). `key_valid` [b, slots] (optional) hides cache slots that hold padding, and
        `positions` (default: the slots) gives the positional-encoding positions, for left-padded
        prompts. The tokens may have k rows per cache row (beam search's hypotheses, those of one
        row adjacent, t = 1), each reading slot j as beam `ancestors[b, r, j]` wrote it
        (`Transformer.decode_step`)."""
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(tokens.shape[1]), tokens.shape)
        mask, beams = _cached_self_mask(tokens, cache, index, ancestors)
        if key_valid is not None:  # slot j's beams are keys j · beams … j · beams + beams - 1
            mask = mask & jnp.repeat(key_valid, beams, axis=1)[:, None, None, :]
        x = self.embed(tokens, positions)
        x, cache = self.decoder(x, None, mask, None, cache=cache, cache_index=index)
        return self.logits(x), cache


class TransformerClassifier(nnx.Module):
    """An encoder-only classifier: the encoder of §3.1, its outputs averaged over the real (non-pad)
    positions, then a linear layer to `num_classes` logits. The average is taken in float32, and the
    logits are float32. Pads may stand anywhere (module docstring), so a row's logits do not depend
    on where or how many pads it has; `right_padded=True` promises right-padded rows."""

    def __init__(self, config: TransformerConfig, num_classes: int, *, rngs: nnx.Rngs):
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.config = config
        self.embed = InputEmbedding(config, TokenEmbedding(config, rngs=rngs), rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.classifier = nnx.Linear(config.d_model, num_classes, dtype=config.compute_dtype,
                                     preferred_element_type=jnp.float32, rngs=rngs)
        annotate(self.classifier.kernel, EMBED, CLASSES)
        annotate(self.classifier.bias, CLASSES)

    def __call__(
        self,
        tokens: Int[Array, "b s"],
        *,
        right_padded: bool = False,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "b c"]:
        check_tokens("tokens", tokens, self.config)
        mask, positions = _self_attention_inputs(tokens, self.config.pad_id, None, None, right_padded)
        x = self.embed(tokens, positions, deterministic=deterministic, rngs=rngs)
        x = self.encoder(x, mask, deterministic=deterministic, rngs=rngs)
        weights = (tokens != self.config.pad_id)[..., None].astype(jnp.float32)
        pooled = (x.astype(jnp.float32) * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)
        return self.classifier(pooled)


class TransformerMLM(_TokenLogitsModel):
    """An encoder-only masked language model, for BERT-style pre-training (Devlin et al., 2019; not
    in the paper): the encoder of §3.1, then logits[:, i] scores what tokens[:, i] stands for (the
    original token where the input holds a mask token), tied as in `TransformerLM`. BERT's extra
    transform head before the projection (a dense layer, GELU and LayerNorm) and its output bias
    are left out.

    `embed` and `encoder` are built and named as in `TransformerClassifier`, so that the parameters
    of an MLM run load into a classifier by matching paths (all but the classifier's `classifier`).
    Pads may stand anywhere (module docstring).
    """

    causal = False

    def _build_stack(self, config: TransformerConfig, rngs: nnx.Rngs) -> None:
        self.encoder = Encoder(config, rngs=rngs)

    def _stack(self, x, mask, *, deterministic: bool, rngs):
        return self.encoder(x, mask, deterministic=deterministic, rngs=rngs)


def count_parameters(model: nnx.Module) -> int:
    """Number of trainable scalars (a shared matrix counts once)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
