"""§3.1 Encoder and decoder stacks: the layers and their residual connections."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from transformer.nn.attention import MultiHeadAttention, heads_major
from transformer.config import TransformerConfig
from transformer.nn.dropout import Dropout
from transformer.nn.feed_forward import PositionwiseFeedForward
from transformer.nn.masks import AttentionMask
from transformer.nn.partitioning import BATCH, EMBED, annotate, constrain

# A mask as `MultiHeadAttention.attend` takes it: a description (padding lengths, causal flag, dense
# part) or a boolean [b, 1, q, k] array, True = may attend.
Mask = AttentionMask | Bool[Array, "b #h q k"]

# Incremental decoding state of one decoder layer: self-attention keys/values written so far
# ("k": [sources, h, slots · beams, d_k], "v": [sources, h, slots · beams, d_v]; slot j of beam s at
# j · beams + s, so that a step writes one block and attention reads them as they lie) and, for
# encoder-decoder layers, the keys/values of the encoder output computed once per source
# ("cross_k", "cross_v": [sources, h, src_len, d_k or d_v]). beams = 1, or beam search's k
# hypotheses per source (rows of the decoder's input: sources · beams, those of one source
# adjacent), which share their source's encoder-decoder keys/values and whose self-attention reads
# all k hypotheses' slots through a mask (`masks.ancestry_causal_mask`). Heads-major, the layout in
# which attention reads them without copying (`attention.cached_attention`).
LayerCache = dict[str, jax.Array]


def cache_slots(cache: list[LayerCache], beams: int = 1) -> int:
    """The number of target positions the self-attention cache holds for each of `beams` beams."""
    return cache[0]["k"].shape[2] // beams


class ResidualSublayer(nnx.Module):
    """§3.1 + §5.4: LayerNorm(x + Dropout(Sublayer(x))) — the paper's post-LN residual.

    With norm_position="pre" it computes x + Dropout(Sublayer(LayerNorm(x))) instead: a departure
    from the paper (Xiong et al., 2020) that trains without warm-up sensitivity; the stack then
    ends with one more LayerNorm.

    Precision: flax's LayerNorm computes the mean and variance in float32 whatever its dtype and
    normalises in float32, then rounds to the compute dtype; its scale and bias gradients are float32
    sums (rounded once to the compute dtype, as for every parameter used in it). The residual sum
    itself is in the compute dtype.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.pre_norm = config.norm_position == "pre"
        self.norm = layer_norm(config, rngs)
        self.dropout = Dropout(config.dropout_rate)

    def __call__(
        self,
        x: Float[Array, "b l m"],
        sublayer: Callable[[jax.Array], jax.Array],
        *,
        deterministic: bool,
        rngs: nnx.Rngs | None,
    ) -> Float[Array, "b l m"]:
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)), deterministic=deterministic, rngs=rngs)
        return self.norm(x + self.dropout(sublayer(x), deterministic=deterministic, rngs=rngs))


class EncoderLayer(nnx.Module):
    """§3.1: multi-head self-attention, then the position-wise FFN, each in a residual sub-layer."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.self_attention = MultiHeadAttention(config, rngs=rngs)
        self.self_attention_residual = ResidualSublayer(config, rngs=rngs)
        self.feed_forward = PositionwiseFeedForward(config, rngs=rngs)
        self.feed_forward_residual = ResidualSublayer(config, rngs=rngs)

    def __call__(
        self,
        x: Float[Array, "b s m"],
        mask: Mask,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> Float[Array, "b s m"]:
        run = dict(deterministic=deterministic, rngs=rngs)
        x = self.self_attention_residual(x, lambda y: self.self_attention(y, y, mask, **run), **run)
        return self.feed_forward_residual(x, self.feed_forward, **run)


class DecoderLayer(nnx.Module):
    """§3.1: masked multi-head self-attention, then encoder-decoder attention (queries from the
    decoder, keys and values from the encoder output), then the FFN; each in a residual sub-layer.

    With cross_attention=False the middle sub-layer is left out: the layer of a decoder-only LM.
    """

    def __init__(self, config: TransformerConfig, *, cross_attention: bool = True, rngs: nnx.Rngs):
        self.self_attention = MultiHeadAttention(config, rngs=rngs)
        self.self_attention_residual = ResidualSublayer(config, rngs=rngs)
        if cross_attention:
            self.cross_attention = MultiHeadAttention(config, rngs=rngs)
            self.cross_attention_residual = ResidualSublayer(config, rngs=rngs)
        else:
            self.cross_attention = None
        self.feed_forward = PositionwiseFeedForward(config, rngs=rngs)
        self.feed_forward_residual = ResidualSublayer(config, rngs=rngs)

    def __call__(
        self,
        x: Float[Array, "b t m"],
        memory: Float[Array, "b s m"] | None,
        self_mask: Mask,
        cross_mask: Mask | None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        cache: LayerCache | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[Float[Array, "b t m"], LayerCache | None]:
        """Without `cache`: the full (training) pass over t positions.

        With `cache`: the t new positions start at `cache_index`; their keys/values are written into
        the cache, and the encoder-decoder keys/values are read from the cache instead of `memory`.
        The rows of x are the cache's sources · beams (the beams of one source adjacent): the beams'
        queries of a source are stacked ([sources, beams·t]) and attend to all its cached slots of
        all its beams (key order: slot, then beam), which `self_mask` [#sources, 1, beams·t,
        slots·beams] narrows to each beam's own prefix; and to the source's encoder-decoder
        keys/values (`cross_mask` is per source).
        Returns the output and the updated cache (None without one).
        """
        run = dict(deterministic=deterministic, rngs=rngs)
        new_cache = None if cache is None else dict(cache)

        def self_attention(y):
            q = self.self_attention.project_query(y)
            k, v = self.self_attention.project_key_value(y)
            if new_cache is None:
                return self.self_attention.attend(q, k, v, self_mask, **run)
            sources, t = cache["k"].shape[0], q.shape[1]
            beams = q.shape[0] // sources
            for name, new in (("k", k), ("v", v)):  # at slots cache_index … cache_index + t - 1
                new = new.reshape(sources, beams, t, *new.shape[2:]).transpose(0, 3, 2, 1, 4)  # [b, h, t, beams, d]
                new_cache[name] = jax.lax.dynamic_update_slice(
                    cache[name], new.reshape(*new.shape[:2], t * beams, -1).astype(cache[name].dtype),
                    (0, 0, cache_index * beams, 0))
            stacked = q.reshape(sources, beams * t, *q.shape[2:])
            out = self.self_attention.attend_cached(stacked, new_cache["k"], new_cache["v"], self_mask)
            return out.reshape(q.shape[0], t, out.shape[-1])

        def cross_attention(y):
            q = self.cross_attention.project_query(y)
            if cache is None:
                k, v = self.cross_attention.project_key_value(memory)
                return self.cross_attention.attend(q, k, v, cross_mask, **run)
            k, v = cache["cross_k"], cache["cross_v"]
            # Beam search keeps one copy of each source's keys/values for its `beams` hypotheses
            # (rows of one source adjacent): their queries are stacked on the query axis and attend
            # to that source together, as one row [b, beams·t] (cross_mask is per source, [b, 1, 1, s]).
            beams = q.shape[0] // k.shape[0]
            stacked = q.reshape(k.shape[0], beams * q.shape[1], *q.shape[2:])
            out = self.cross_attention.attend_cached(stacked, k, v, cross_mask)
            return out.reshape(q.shape[0], q.shape[1], out.shape[-1])

        x = self.self_attention_residual(x, self_attention, **run)
        if self.cross_attention is not None:
            x = self.cross_attention_residual(x, cross_attention, **run)
        return self.feed_forward_residual(x, self.feed_forward, **run), new_cache

    def init_cache(self, batch: int, max_len: int, memory: Float[Array, "b s m"] | None, dtype,
                   beams: int = 1) -> LayerCache:
        """An empty self-attention cache of max_len positions for `beams` hypotheses of each of
        `batch` sources, and the encoder-decoder keys/values (both heads-major: `LayerCache`)."""
        config = self.self_attention.config
        d_k, d_v = config.head_sizes
        cache = {"k": jnp.zeros((batch, config.h, max_len * beams, d_k), dtype),
                 "v": jnp.zeros((batch, config.h, max_len * beams, d_v), dtype)}
        if self.cross_attention is not None:
            cache["cross_k"], cache["cross_v"] = map(heads_major, self.cross_attention.project_key_value(memory))
        return cache


class Encoder(nnx.Module):
    """§3.1: a stack of N identical encoder layers."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(config, rngs=rngs) for _ in range(config.N)])
        self.final_norm = _final_norm(config, rngs)
        self.remat = config.remat

    def __call__(
        self, x: Float[Array, "b s m"], mask: Mask, *, deterministic: bool = True, rngs=None
    ) -> Float[Array, "b s m"]:
        call = _rematerialised(_encoder_layer, self.remat)
        for layer in self.layers:
            x = constrain(call(layer, x, mask, deterministic, rngs), BATCH, None, None)
        return x if self.final_norm is None else self.final_norm(x)


class Decoder(nnx.Module):
    """§3.1: a stack of N identical decoder layers (with or without encoder-decoder attention)."""

    def __init__(self, config: TransformerConfig, *, cross_attention: bool = True, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [DecoderLayer(config, cross_attention=cross_attention, rngs=rngs) for _ in range(config.N)]
        )
        self.final_norm = _final_norm(config, rngs)
        self.remat = config.remat

    def __call__(
        self,
        x: Float[Array, "b t m"],
        memory: Float[Array, "b s m"] | None,
        self_mask: Mask,
        cross_mask: Mask | None,
        *,
        deterministic: bool = True,
        rngs=None,
        cache: list[LayerCache] | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[Float[Array, "b t m"], list[LayerCache] | None]:
        if cache is None:  # training and scoring: whole sequences, rematerialised if asked
            call = _rematerialised(_decoder_layer, self.remat)
            for layer in self.layers:
                x = constrain(call(layer, x, memory, self_mask, cross_mask, deterministic, rngs), BATCH, None, None)
            return (x if self.final_norm is None else self.final_norm(x)), None
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, memory, self_mask, cross_mask, deterministic=deterministic, rngs=rngs,
                                   cache=cache[i], cache_index=cache_index)
            new_cache.append(layer_cache)
        return (x if self.final_norm is None else self.final_norm(x)), new_cache

    def init_cache(self, batch: int, max_len: int, memory=None, dtype=jnp.float32, beams: int = 1) -> list[LayerCache]:
        return [layer.init_cache(batch, max_len, memory, dtype, beams) for layer in self.layers]


def _final_norm(config: TransformerConfig, rngs: nnx.Rngs) -> nnx.LayerNorm | None:
    # Pre-LN leaves the last residual sum un-normalised; post-LN's last sub-layer already normalised it.
    if config.norm_position != "pre":
        return None
    return layer_norm(config, rngs)


def layer_norm(config: TransformerConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    norm = nnx.LayerNorm(config.d_model, epsilon=config.layer_norm_epsilon, dtype=config.compute_dtype, rngs=rngs)
    annotate(norm.scale, EMBED)
    annotate(norm.bias, EMBED)
    return norm


def _encoder_layer(layer: EncoderLayer, x, mask, deterministic: bool, rngs):
    return layer(x, mask, deterministic=deterministic, rngs=rngs)


def _decoder_layer(layer: DecoderLayer, x, memory, self_mask, cross_mask, deterministic: bool, rngs):
    return layer(x, memory, self_mask, cross_mask, deterministic=deterministic, rngs=rngs)[0]


def _rematerialised(call: Callable, policy: str) -> Callable:
    """`call(layer, …)` as it is ("none"), or under nnx.remat (jax.checkpoint): the backward pass
    recomputes the layer's activations instead of keeping them; "dots" keeps the matrix products."""
    if policy == "none":
        return call
    deterministic_at = call.__code__.co_varnames.index("deterministic")  # a Python bool: static
    saved = jax.checkpoint_policies.dots_saveable if policy == "dots" else None
    return nnx.remat(call, static_argnums=(deterministic_at,), policy=saved)
