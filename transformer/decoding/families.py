"""Each model family as `search` sees it — a start (the encoder, or the prompt's prefill) and a step
(tokens -> logits through the key/value cache) — and the public searches built on them:
`greedy_decode`, `beam_search` and `translate` for the encoder-decoder `Transformer`, `generate`
(greedy, sampled, or beam search) for the decoder-only `TransformerLM`. The encoder-only families
(`TransformerMLM`, `TransformerClassifier`) predict in one pass and have nothing to search.

Search is given the begin and end ids (`bos_id`, `eos_id`: the tokenizer's) and takes padding from
`model.config.pad_id`; it knows no tokenizer. Outputs hold the end id, then padding.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from transformer.decoding.search import (
    CACHE_BLOCK, COMPACT_ROWS, NEG_INF, Context, SearchRules, beam, check_decode_length, nucleus, sample,
    share_prefix,
)
from transformer.nn.layers import cache_slots
from transformer.nn.masks import real_positions


# --- The encoder-decoder: a source in, its translation out -------------------------------------


def _translation_start(model, src: Int[Array, "b s"], bos_id: int, use_cache: bool):
    """Encode each source once, then the begin token at slot 0. Sources are right-padded, as
    translate_batches makes them. Without the cache (the baseline the cache is measured against)
    the context keeps the encoder output and the tokens each beam wrote at each slot, and every
    step runs the decoder over the whole prefix again."""
    def start(slots: int, beams: int):
        memory = model.encode(src, right_padded=True)
        begin = jnp.full((src.shape[0], 1), bos_id, jnp.int32)
        if use_cache:
            logits, cache = model.decode_step(begin, src, model.init_cache(memory, slots), 0, right_padded=True)
            return logits[:, 0], Context(cache=share_prefix(cache, beams), inputs=src)
        written = jnp.full((src.shape[0], beams, slots), model.config.pad_id, jnp.int32).at[:, :, 0].set(bos_id)
        logits = model.decode(memory, src, written[:, 0], right_padded=True)[:, 0]
        # The encoder output and the source once per beam ([b, k, …]: sources still on axis 0).
        per_beam = [jnp.broadcast_to(a[:, None], (a.shape[0], beams, *a.shape[1:])) for a in (memory, src)]
        return logits, Context(cache=None, inputs=(*per_beam, written))

    return start


def _translation_step(model, use_cache: bool):
    def cached(context: Context, tokens, slot, ancestors):
        b, k = tokens.shape
        logits, cache = model.decode_step(tokens.reshape(b * k, 1), context.inputs, context.cache, slot,
                                          right_padded=True, ancestors=ancestors)
        return logits.reshape(b, k, -1), context.replace(cache=cache)

    def uncached(context: Context, tokens, slot, ancestors):
        memory, src, written = context.inputs
        b, k = tokens.shape
        written = jax.lax.dynamic_update_slice_in_dim(written, tokens[..., None], slot, axis=2)
        # Beam r's prefix holds at slot j the token that beam ancestors[r, j] wrote there; later
        # slots (padding or stale tokens) are hidden by the causal mask.
        prefix = written if ancestors is None else jnp.take_along_axis(written, ancestors, axis=1)
        logits = model.decode(memory.reshape(b * k, *memory.shape[2:]), src.reshape(b * k, -1),
                              prefix.reshape(b * k, -1), right_padded=True)
        logits = jax.lax.dynamic_index_in_dim(logits, slot, axis=1, keepdims=False)
        return logits.reshape(b, k, -1), context.replace(inputs=(memory, src, written))

    return cached if use_cache else uncached


@functools.partial(jax.jit, static_argnames=("graphdef", "rules", "use_cache", "beam_size", "alpha"))
def _translate_jit(graphdef, params, src, rules: SearchRules, use_cache: bool, beam_size: int | None, alpha: float):
    # beam_size None: greedy (`search.sample`); an integer: beam search of that width.
    model = nnx.merge(graphdef, params)
    # §6.1: a source's output has at most its length + max_extra tokens, the last the end token.
    limits = (src != rules.pad_id).sum(axis=1) + (rules.max_new - src.shape[1])
    start, step = _translation_start(model, src, rules.bos_id, use_cache), _translation_step(model, use_cache)
    if beam_size is None:
        return sample(start, step, limits, rules)
    return beam(start, step, limits, rules, beam_size, alpha)


def _run_translation(model, src, max_extra, use_cache, bos_id, eos_id, cache_block, compact_rows, beam_size, alpha):
    src = jnp.asarray(src, jnp.int32)
    check_decode_length(model.config, src.shape[-1], max_extra)
    rules = SearchRules(max_new=src.shape[1] + max_extra, offset=1, bos_id=int(bos_id), eos_id=int(eos_id),
                        pad_id=model.config.pad_id, end_at_limit=True,
                        cache_block=cache_block if use_cache else None, compact_rows=compact_rows)
    if not use_cache:  # the option is checked all the same
        SearchRules.check_options(cache_block, compact_rows)
    graphdef, params = nnx.split(model)
    return _translate_jit(graphdef, params, src, rules, use_cache, beam_size, float(alpha))


def greedy_decode(
    model, src: Int[Array, "b s"], max_extra: int = 50, use_cache: bool = True, *, bos_id: int, eos_id: int,
    cache_block: int | None = CACHE_BLOCK, compact_rows: int | None = COMPACT_ROWS,
) -> tuple[Int[Array, "b l"], Float[Array, "b"]]:
    """The most likely next token at every step (`search.sample`). Returns tokens [b, s + max_extra]
    (eos_id, then padding, after the end; at most a source's length + max_extra of them, §6.1) and
    each sequence's log-probability. use_cache=False recomputes the decoder over the prefix at
    every step (the baseline the cache is measured against). With the cache, the loop runs in
    blocks of `cache_block` steps whose self-attention covers the cache slots filled by the end of
    the block, not all s + max_extra (`search._cache_blocks`; None: one loop over the whole cache).
    With compact_rows, each block after the first runs on only the sources still decoding where they
    fit in half the batch or less (`search._compacted`: ⌈b/2⌉, ⌈b/4⌉, … rows, none below
    compact_rows; the default None never compacts, see `search.COMPACT_ROWS`). The outputs are the
    same either way.
    s + max_extra must not exceed model.config.max_len (ValueError otherwise: `check_decode_length`)."""
    return _run_translation(model, src, max_extra, use_cache, bos_id, eos_id, cache_block, compact_rows, None, 0.0)


def beam_search(
    model, src: Int[Array, "b s"], beam_size: int = 4, alpha: float = 0.6, max_extra: int = 50,
    use_cache: bool = True, *, bos_id: int, eos_id: int, cache_block: int | None = CACHE_BLOCK,
    compact_rows: int | None = COMPACT_ROWS,
) -> tuple[Int[Array, "b k l"], Float[Array, "b k"]]:
    """§6.1 beam search (`search.beam`). Returns the beam_size best hypotheses per input, best first
    ([b, k, l], eos_id then padding after each end), and their scores log P(Y) / lp(Y) (NEG_INF
    where fewer than beam_size hypotheses exist).

    k live hypotheses and a separate set of the k best finished ones per input; an input stops once
    no live hypothesis can beat its k-th finished one under the length penalty (and at its length
    limit), the loop once every input has stopped. The encoder runs once per input, and with the
    cache its beams share the encoder-decoder keys/values, and one self-attention cache that is
    never reordered (`search.BeamState.ancestors`). Blocks of the cache and compaction as in
    `greedy_decode`; the outputs are the same.
    s + max_extra must not exceed model.config.max_len (ValueError otherwise: `check_decode_length`)."""
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be an integer >= 1, got {beam_size!r}")
    return _run_translation(model, src, max_extra, use_cache, bos_id, eos_id, cache_block, compact_rows, beam_size,
                            alpha)


def translate(model, src, beam_size: int = 4, alpha: float = 0.6, max_extra: int = 50, *, bos_id: int,
              eos_id: int, compact_rows: int | None = COMPACT_ROWS) -> Int[Array, "b l"]:
    """Best output per input: greedy for beam_size 1, beam search otherwise."""
    ids = dict(bos_id=bos_id, eos_id=eos_id, compact_rows=compact_rows)
    if beam_size == 1:
        return greedy_decode(model, src, max_extra, **ids)[0]
    return beam_search(model, src, beam_size, alpha, max_extra, **ids)[0][:, 0]


# --- The decoder-only LM: a prompt in, its continuation out ------------------------------------


def _lm_start(lm, prompt: Int[Array, "b p"], max_new_tokens: int):
    """Prefill the prompts in one pass. Prompt pads may stand anywhere: their cache slots are hidden
    from every query, and a real token's position is its index among its row's real tokens. Every
    row's new tokens go to the same slots p, p+1, … (one cache index for the batch) at its own
    positions n, n+1, …, where n is its number of real prompt tokens: each row continues as it
    would alone, unpadded."""
    pad_id = lm.config.pad_id
    batch, p = prompt.shape
    real = prompt != pad_id
    key_valid = jnp.concatenate([real, jnp.ones((batch, max_new_tokens), bool)], axis=1)  # [b, slots + 1]

    def start(slots: int, beams: int):
        logits, cache = lm.decode_step(prompt, lm.init_cache(batch, slots), 0, key_valid=key_valid[:, :slots],
                                       positions=real_positions(prompt, pad_id))
        # The first new token follows each row's last real prompt token, wherever its pads are.
        last = p - 1 - jnp.argmax(real[:, ::-1], axis=1)
        first = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
        return first, Context(cache=share_prefix(cache, beams), inputs=(key_valid, real.sum(axis=1, dtype=jnp.int32)))

    def step(context: Context, tokens, slot, ancestors):
        key_valid, n = context.inputs
        b, k = tokens.shape
        positions = jnp.repeat(n + (slot - p), k)[:, None]
        logits, cache = lm.decode_step(tokens.reshape(b * k, 1), context.cache, slot,
                                       key_valid=key_valid[:, : cache_slots(context.cache, k)], positions=positions,
                                       ancestors=ancestors)
        return logits.reshape(b, k, -1), context.replace(cache=cache)

    return start, step


def _sampler(temperature, top_k: int, top_p, use_top_p: bool):
    """Sampling from softmax(log_p / temperature), cut to the top_k most likely tokens (top_k > 0),
    then to the nucleus (use_top_p); temperature 0 is greedy."""
    def choose(log_p, keys):
        logits = log_p / jnp.maximum(temperature, 1e-6)
        if top_k > 0:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, NEG_INF, logits)
        if use_top_p:  # the nucleus of the distribution left after temperature and top_k
            logits = nucleus(logits, top_p)
        return jnp.where(temperature > 0, jax.vmap(jax.random.categorical)(keys, logits), log_p.argmax(-1))

    return choose


@functools.partial(jax.jit, static_argnames=("graphdef", "rules", "top_k", "use_top_p", "on_token", "beam_size",
                                             "alpha"))
def _generate(graphdef, params, prompt, key, rules: SearchRules, temperature, top_k: int, top_p, use_top_p: bool,
              on_token, beam_size: int, alpha: float):
    lm = nnx.merge(graphdef, params)
    start, step = _lm_start(lm, prompt, rules.max_new)
    limits = jnp.full((prompt.shape[0],), rules.max_new, jnp.int32)
    if beam_size > 1:
        return beam(start, step, limits, rules, beam_size, alpha)[0][:, 0]
    return sample(start, step, limits, rules, _sampler(temperature, top_k, top_p, use_top_p), key, on_token)[0]


def generate(
    lm,
    prompt: Int[Array, "b p"],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    rngs: nnx.Rngs | None = None,
    *,
    bos_id: int,
    eos_id: int,
    top_p: float = 1.0,
    on_token: Callable[[np.ndarray], Any] | None = None,
    cache_block: int | None = CACHE_BLOCK,
    compact_rows: int | None = COMPACT_ROWS,
    beam_size: int = 1,
    alpha: float = 0.6,
) -> Int[Array, "b n"]:
    """Continue prompts with a `TransformerLM`, each row as it would be continued alone, unpadded,
    through the searches and rules of translation (`search.sample`, `search.beam`).

    Prompt rows may be padded with lm.config.pad_id anywhere (left, right, between tokens; every
    row needs a real token): pads are never attended to, a row continues after its last real token,
    and its new tokens' positions continue from its number of real prompt tokens. The prompts are
    prefilled in one pass; then, in one jit-compiled loop over the KV cache, each step's tokens are
    chosen greedily (temperature 0, deterministic) or sampled (temperature > 0) from
    softmax(logits / temperature), restricted to the top_k most likely tokens (top_k > 0) and then
    to the nucleus (top_p < 1: the smallest set of most likely tokens whose probability reaches
    top_p, `nucleus`), with keys from `rngs` (`rngs.sample()`; the same seed gives the same tokens;
    None: a fixed key) folded with the step and the row's index, until eos_id or max_new_tokens (a
    row cut there has no end token). pad_id and bos_id are never generated. beam_size > 1 searches
    instead (temperature 0 only) and returns each row's best continuation under log P / lp
    (`length_penalty`, alpha).

    `on_token`, if given, is called on the host with each step's tokens (int32 NumPy [b]; pad_id
    for rows that have ended) in order, as they are chosen (a static argument: another function
    compiles the loop anew). Blocks of the cache and compaction as in `greedy_decode`; the tokens
    are the same.
    Returns the new tokens [b, max_new_tokens] (eos_id, then pad_id, after each end).
    p + max_new_tokens must not exceed lm.config.max_len; ValueError for that, for temperature < 0,
    top_k < 0, top_p outside (0, 1], a beam with sampling or streaming, and a row without real
    tokens."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: no limit), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: no nucleus), got {top_p}")
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be an integer >= 1 (1: no beam), got {beam_size!r}")
    if beam_size > 1 and (temperature > 0 or top_k or top_p < 1 or on_token is not None):
        raise ValueError("beam search neither samples nor streams: pass temperature 0, no top_k/top_p and no "
                         "on_token with beam_size > 1")
    prompt = jnp.asarray(prompt, jnp.int32)
    check_decode_length(lm.config, prompt.shape[-1], max_new_tokens, "prompt length", "max_new_tokens")
    if not isinstance(prompt, jax.core.Tracer) and not (prompt != lm.config.pad_id).any(axis=-1).all():
        raise ValueError(f"every prompt row needs at least one real token (not pad_id={lm.config.pad_id})")
    SearchRules.check_options(cache_block, compact_rows)
    if max_new_tokens == 0:
        return jnp.zeros((prompt.shape[0], 0), jnp.int32)
    rules = SearchRules(max_new=max_new_tokens, offset=prompt.shape[1], bos_id=int(bos_id), eos_id=int(eos_id),
                        pad_id=lm.config.pad_id, end_at_limit=False, cache_block=cache_block,
                        compact_rows=compact_rows)
    graphdef, params = nnx.split(lm)
    key = rngs.sample() if rngs is not None else jax.random.key(0)
    top_k = min(top_k, lm.config.vocab_size)  # top_k >= vocab_size keeps every token
    return _generate(graphdef, params, prompt, key, rules, jnp.float32(temperature), top_k, jnp.float32(top_p),
                     top_p < 1, on_token, beam_size, float(alpha))
