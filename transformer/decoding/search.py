"""§6.1 Inference: greedy decoding and beam search (beam 4, length penalty α = 0.6, maximum output
length = input length + 50) for the encoder-decoder, and prompt continuation for the LM; all
through the key/value cache, inside one jit-compiled `lax.while_loop` that stops once every
sequence has finished.

Search is given the begin and end ids (`bos_id`, `eos_id`: the tokenizer's) and takes padding from
`model.config.pad_id`; it knows no tokenizer. Outputs hold the end id, then padding.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback
from jaxtyping import Array, Float, Int

from transformer.nn.layers import LayerCache, cache_slots
from transformer.nn.masks import real_positions

NEG_INF = -1e9  # a finite "impossible" score, so that arithmetic on it never makes NaNs


def _never_generate(log_p: jax.Array, pad_id: int, bos_id: int) -> jax.Array:
    """Padding and the begin token are never outputs (the decoder's input mask would hide them)."""
    vocab = jnp.arange(log_p.shape[-1]).reshape((1,) * (log_p.ndim - 1) + (-1,))
    return jnp.where((vocab == pad_id) | (vocab == bos_id), NEG_INF, log_p)


def check_decode_length(config, src_len: int, max_extra: int, what: str = "src length",
                        extra_name: str = "max_extra") -> None:
    """Raise ValueError (before tracing) unless every decoder position fits in config.max_len.

    Decoding src_len tokens runs the decoder over positions 0 … src_len + max_extra - 1. A learned
    position table has only max_len rows, and a gather past its end gives NaN; sinusoids would
    extrapolate, but the model refuses sequences longer than max_len with either encoding
    (`check_tokens`), so decoding applies the same limit to both."""
    if max_extra < 0:
        raise ValueError(f"{extra_name} must be >= 0, got {max_extra}")
    if src_len + max_extra > config.max_len:
        raise ValueError(
            f"{what} {src_len} + {extra_name} {max_extra} = {src_len + max_extra} decoder positions > "
            f"max_len={config.max_len} of the model ({config.positional_encoding} positions): lower {extra_name} "
            f"to at most {max(config.max_len - src_len, 0)}, shorten the input, or use a model with a larger max_len"
        )


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """Wu et al. (2016), cited by §6.1: lp(Y) = ((5 + |Y|) / 6)^α; beams are ranked by log P(Y) / lp(Y)."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def _output_limits(src: jax.Array, max_extra: int, pad_id: int) -> jax.Array:
    """Per-example maximum output length: input length + max_extra (§6.1)."""
    return (src != pad_id).sum(axis=1) + max_extra


CACHE_BLOCK = 16  # cache slots added per block of decoding steps (`_cache_blocks`)


def _cache_blocks(first: int, max_len: int, block: int | None) -> list[int]:
    """The cache lengths the decode loop runs at: the multiples of `block` above `first`, then
    max_len (one length, max_len, for block None).

    Step j writes cache slot j and attends to slots 0 … j, so a step runs in the first block whose
    length exceeds j, and its self-attention covers that block's slots rather than all max_len: on average about half of them fewer, less the (block - 1) / 2 empty slots of
    the last block. Each length is a loop of its own in the compiled program (static shapes, as XLA
    needs on every backend), so a smaller block attends to fewer empty slots but compiles more
    loops: 16 keeps a 74-slot search (a 24-token source + 50) at 5 loops."""
    if block is None or block >= max_len:
        return [max_len]
    return list(range((first // block + 1) * block, max_len, block)) + [max_len]


def _grow_cache(cache: list[LayerCache], length: int, beams: int) -> list[LayerCache]:
    """The self-attention keys/values ([sources, h, slots · beams, d]) with empty slots appended up
    to `length` slots; the encoder-decoder keys/values, which do not grow, as they are."""
    def grow(name, a):
        return a if name.startswith("cross") else jnp.pad(a, ((0, 0), (0, 0), (0, length * beams - a.shape[2]), (0, 0)))

    return [{name: grow(name, a) for name, a in layer.items()} for layer in cache]


def _blocked_while_loop(cond, body, init, step_of, cache_of, with_cache, lengths: list[int], beams: int = 1):
    """`jax.lax.while_loop(cond, body, init)` for a carry whose cache (`cache_of(carry)`, or None
    without one) covers only the slots that steps write so far: one while_loop per length of
    `lengths` (`_cache_blocks`), each running while `cond` holds and the step about to run
    (`step_of(carry)`: the slot it writes) fits in that length, the cache first grown to it
    (`with_cache(carry, cache)`; `beams` hypotheses per source). Without a cache, one while_loop."""
    if cache_of(init) is None:
        return jax.lax.while_loop(cond, body, init)
    carry = init
    for length in lengths:
        carry = with_cache(carry, _grow_cache(cache_of(carry), length, beams))
        carry = jax.lax.while_loop(lambda c, length=length: (step_of(c) < length) & cond(c), body, carry)
    return carry


def _start_decoder(model, src, cache_len: int, use_cache: bool):
    """What the decode loop carries: the encoder output, and the per-layer KV cache (of cache_len
    slots) if used."""
    memory = model.encode(src, right_padded=True)  # sources are right-padded, as translate_batches makes them
    return memory, (model.init_cache(memory, cache_len) if use_cache else None)


def _next_log_probs(model, src, tokens, i, carried, use_cache: bool, bos_id: int, ancestors=None):
    """log P(next token | tokens[:, :i+1]) for every row, and the updated carry.

    With the cache only the newest token runs through the decoder (its beams reading the slots that
    `ancestors` names, if given: `Transformer.decode_step`); without it the decoder runs over the
    whole prefix buffer again (later slots hold padding, which the causal mask ignores).
    """
    memory, cache = carried
    if use_cache:
        logits, cache = model.decode_step(jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1), src, cache, i,
                                          right_padded=True, ancestors=ancestors)
        logits = logits[:, 0]
    else:
        logits = model.decode(memory, src, tokens[:, :-1], right_padded=True)  # the prefix, then padding
        logits = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    return _never_generate(log_p, model.config.pad_id, bos_id), (memory, cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_extra", "use_cache", "bos_id", "eos_id", "cache_block"))
def _greedy(graphdef, params, src, max_extra: int, use_cache: bool, bos_id: int, eos_id: int, cache_block):
    model = nnx.merge(graphdef, params)
    pad_id = model.config.pad_id
    batch, max_len = src.shape[0], src.shape[1] + max_extra
    limits = _output_limits(src, max_extra, pad_id)
    tokens = jnp.full((batch, max_len + 1), pad_id, jnp.int32).at[:, 0].set(bos_id)
    cache_lengths = _cache_blocks(0, max_len, cache_block)

    def cond(carry):
        i, _, _, finished, _ = carry
        return (i < max_len) & ~finished.all()

    def body(carry):
        i, tokens, carried, finished, log_prob = carry
        log_p, carried = _next_log_probs(model, src, tokens, i, carried, use_cache, bos_id)
        next_token = jnp.where(i + 1 >= limits, eos_id, log_p.argmax(-1))
        log_prob = log_prob + jnp.where(finished, 0.0, jnp.take_along_axis(log_p, next_token[:, None], 1)[:, 0])
        next_token = jnp.where(finished, pad_id, next_token)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, next_token[:, None], i + 1, axis=1)
        return i + 1, tokens, carried, finished | (next_token == eos_id), log_prob

    init = (jnp.zeros((), jnp.int32), tokens, _start_decoder(model, src, cache_lengths[0], use_cache),
            jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.float32))
    _, tokens, _, _, log_prob = _blocked_while_loop(
        cond, body, init, step_of=lambda c: c[0], cache_of=lambda c: c[2][1],
        with_cache=lambda c, cache: (*c[:2], (c[2][0], cache), *c[3:]), lengths=cache_lengths)
    return tokens[:, 1:], log_prob


def greedy_decode(
    model, src: Int[Array, "b s"], max_extra: int = 50, use_cache: bool = True, *, bos_id: int, eos_id: int,
    cache_block: int | None = CACHE_BLOCK,
) -> tuple[Int[Array, "b l"], Float[Array, "b"]]:
    """The most likely next token at every step. Returns tokens [b, s + max_extra] (eos_id, then
    padding, after the end) and each sequence's log-probability. use_cache=False recomputes the
    decoder over the prefix at every step (the baseline the cache is measured against).
    With the cache, the loop runs in blocks of `cache_block` steps whose self-attention covers the
    cache slots filled by the end of the block, not all s + max_extra (`_cache_blocks`; None: one
    loop over the whole cache); the outputs are the same.
    s + max_extra must not exceed model.config.max_len (ValueError otherwise: `check_decode_length`)."""
    src = jnp.asarray(src, jnp.int32)
    check_decode_length(model.config, src.shape[-1], max_extra)
    _check_cache_block(cache_block)
    graphdef, params = nnx.split(model)
    return _greedy(graphdef, params, src, max_extra, use_cache, int(bos_id), int(eos_id), cache_block)


def _check_cache_block(cache_block) -> None:
    if cache_block is not None and (not isinstance(cache_block, int) or cache_block < 1):
        raise ValueError(f"cache_block must be a positive integer or None (one block), got {cache_block!r}")


def _gather_beams(x: jax.Array, parents: jax.Array) -> jax.Array:
    """x [b, k, …] -> [b, n, …]: for each source, the beams that parents [b, n] name."""
    return jnp.take_along_axis(x, parents.reshape(*parents.shape, *([1] * (x.ndim - 2))), axis=1)


@flax.struct.dataclass
class BeamState:
    """The loop state of `beam_search` (b sources, k beams, L = source length + max_extra slots).

    k live hypotheses and, apart from them, the k best finished ones per source, as in
    tensor2tensor, fairseq and Flax's WMT example: a hypothesis that ends leaves the beam to the
    finished set, so k hypotheses stay live until the search stops."""

    i: jax.Array  # []: tokens decoded so far; the next one goes to slot i + 1
    live_seqs: jax.Array  # [b, k, L + 1] int32: the begin token, then each live hypothesis's tokens
    live_log_probs: jax.Array  # [b, k] float32: log P(hypothesis); <= NEG_INF / 2 for none
    finished_seqs: jax.Array  # [b, k, L + 1] int32: ended hypotheses (end token, then padding), best first
    finished_scores: jax.Array  # [b, k] float32: log P / lp(length); NEG_INF for an empty slot
    ancestors: jax.Array  # [b, k, L] int32: the beam whose cached keys/values at slot j are live beam r's
    carried: Any  # (None, the decoder's cache: self-attention keys/values [b, h, C·k, d] for the C <= L
    #              slots of the current block (`_cache_blocks`), each beam's at its own place;
    #              encoder-decoder keys/values once per source [b, h, s, d]); without the cache,
    #              (the encoder output per beam [b·k, s, m], None)


@functools.partial(jax.jit, static_argnames=("graphdef", "beam", "alpha", "max_extra", "use_cache", "bos_id", "eos_id",
                                             "cache_block"))
def _beam_search(graphdef, params, src, beam: int, alpha: float, max_extra: int, use_cache: bool, bos_id: int,
                 eos_id: int, cache_block):
    model = nnx.merge(graphdef, params)
    pad_id = model.config.pad_id
    batch, max_len = src.shape[0], src.shape[1] + max_extra
    vocab = model.config.vocab_size
    limits = _output_limits(src, max_extra, pad_id)  # [b]
    # The best score a live hypothesis of log P = x can still reach is x / lp(its limit): log P only
    # falls as tokens are added, and lp grows with the length (α >= 0).
    best_reachable_lp = length_penalty(limits, alpha)  # [b]

    # The encoder runs once per source. With the cache, the beams of a source share its
    # encoder-decoder keys/values (the decoder stacks their queries: `DecoderLayer`); without it
    # (the baseline the cache is measured against), the decoder takes one memory row per beam.
    memory = model.encode(src, right_padded=True)
    cache_lengths = _cache_blocks(0, max_len, cache_block)
    if use_cache:
        carried, step_src = (None, model.init_cache(memory, cache_lengths[0], beams=beam)), src
    else:
        carried, step_src = (jnp.repeat(memory, beam, axis=0), None), jnp.repeat(src, beam, axis=0)

    seqs = jnp.full((batch, beam, max_len + 1), pad_id, jnp.int32).at[:, :, 0].set(bos_id)
    state = BeamState(
        i=jnp.zeros((), jnp.int32),
        live_seqs=seqs,
        # Only the first beam is live at the start, so the k beams do not all repeat one hypothesis.
        live_log_probs=jnp.full((batch, beam), NEG_INF).at[:, 0].set(0.0),
        finished_seqs=seqs,
        finished_scores=jnp.full((batch, beam), NEG_INF),
        ancestors=jnp.zeros((batch, beam, max_len), jnp.int32),
        carried=carried,
    )

    def cond(state: BeamState):
        return (state.i < max_len) & (state.live_log_probs > NEG_INF / 2).any()

    def body(state: BeamState):
        i = state.i
        # The cache is never reordered: each step writes beam r's keys/values at slot i in beam r's
        # place, and a beam reads each earlier slot in the place of the beam that wrote its prefix's
        # token there (`masks.ancestry_causal_mask`). Only these indices follow the parents; copying
        # every layer's keys/values instead (fairseq's way) took a fifth of a step on the CPU.
        ancestors = jax.lax.dynamic_update_slice_in_dim(
            state.ancestors, jnp.broadcast_to(jnp.arange(beam, dtype=jnp.int32)[None, :, None], (batch, beam, 1)), i,
            axis=2)
        slots = cache_slots(state.carried[1], beam) if use_cache else max_len
        log_p, (memory, cache) = _next_log_probs(model, step_src, state.live_seqs.reshape(batch * beam, -1), i,
                                                 state.carried, use_cache, bos_id, ancestors[:, :, :slots])
        log_p = log_p.reshape(batch, beam, vocab)
        # At its length limit (§6.1: input length + max_extra) a hypothesis can only end.
        at_limit = (i + 1 >= limits)[:, None, None]
        log_p = jnp.where(at_limit & (jnp.arange(vocab) != eos_id)[None, None, :], NEG_INF, log_p)

        # 2k candidates: even if k of them end, k remain to continue.
        candidates = (state.live_log_probs[..., None] + log_p).reshape(batch, beam * vocab)
        cand_log_probs, flat_best = jax.lax.top_k(candidates, 2 * beam)
        parents, tokens = flat_best // vocab, flat_best % vocab  # [b, 2k]
        cand_seqs = jax.lax.dynamic_update_slice_in_dim(_gather_beams(state.live_seqs, parents), tokens[..., None],
                                                        i + 1, axis=2)
        alive = cand_log_probs > NEG_INF / 2
        ended = tokens == eos_id

        # Those that end join the finished set, ranked by log P / lp(length); the set keeps its best k.
        ended_scores = jnp.where(ended & alive, cand_log_probs / length_penalty(i + 1, alpha), NEG_INF)
        finished_scores, best = jax.lax.top_k(jnp.concatenate([state.finished_scores, ended_scores], axis=1), beam)
        finished_seqs = _gather_beams(jnp.concatenate([state.finished_seqs, cand_seqs], axis=1), best)

        # The k most likely that go on are the new live beams.
        live_log_probs, best = jax.lax.top_k(jnp.where(ended, NEG_INF, cand_log_probs), beam)
        live_seqs = _gather_beams(cand_seqs, best)
        # A source is done when no live hypothesis can still enter its finished set (ties cannot
        # change it): its live beams are dropped, so that nothing it has changes from here on.
        done = (live_log_probs[:, 0] / best_reachable_lp <= finished_scores[:, -1])[:, None]
        live_log_probs = jnp.where(done, NEG_INF, live_log_probs)

        # Each new live beam's prefix is its parent's: it reads the slots its parent read.
        ancestors = _gather_beams(ancestors, _gather_beams(parents, best))
        return BeamState(i=i + 1, live_seqs=live_seqs, live_log_probs=live_log_probs, finished_seqs=finished_seqs,
                         finished_scores=finished_scores, ancestors=ancestors, carried=(memory, cache))

    state = _blocked_while_loop(cond, body, state, step_of=lambda s: s.i, cache_of=lambda s: s.carried[1],
                                with_cache=lambda s, cache: s.replace(carried=(s.carried[0], cache)),
                                lengths=cache_lengths, beams=beam)
    return state.finished_seqs[:, :, 1:], state.finished_scores


def beam_search(
    model, src: Int[Array, "b s"], beam_size: int = 4, alpha: float = 0.6, max_extra: int = 50,
    use_cache: bool = True, *, bos_id: int, eos_id: int, cache_block: int | None = CACHE_BLOCK,
) -> tuple[Int[Array, "b k l"], Float[Array, "b k"]]:
    """§6.1 beam search. Returns the beam_size best hypotheses per input, best first ([b, k, l],
    eos_id then padding after each end), and their scores log P(Y) / lp(Y) (NEG_INF where fewer
    than beam_size hypotheses exist).

    k live hypotheses and a separate set of the k best finished ones per input (`BeamState`); an
    input stops once no live hypothesis can beat its k-th finished one under the length penalty
    (and at its length limit), the loop once every input has stopped. The encoder runs once per
    input, and with the cache its beams share the encoder-decoder keys/values, and one
    self-attention cache that is never reordered (`BeamState.ancestors`). With the cache, the loop
    runs in blocks of `cache_block` steps whose self-attention covers the cache slots filled by the
    end of the block, not all s + max_extra (`_cache_blocks`; None: one loop over the whole cache);
    the outputs are the same.
    s + max_extra must not exceed model.config.max_len (ValueError otherwise: `check_decode_length`)."""
    src = jnp.asarray(src, jnp.int32)
    check_decode_length(model.config, src.shape[-1], max_extra)
    _check_cache_block(cache_block)
    graphdef, params = nnx.split(model)
    return _beam_search(graphdef, params, src, beam_size, float(alpha), max_extra, use_cache, int(bos_id), int(eos_id),
                        cache_block)


def translate(model, src, beam_size: int = 4, alpha: float = 0.6, max_extra: int = 50, *, bos_id: int,
              eos_id: int) -> Int[Array, "b l"]:
    """Best output per input: greedy for beam_size 1, beam search otherwise."""
    ids = dict(bos_id=bos_id, eos_id=eos_id)
    if beam_size == 1:
        return greedy_decode(model, src, max_extra, **ids)[0]
    return beam_search(model, src, beam_size, alpha, max_extra, **ids)[0][:, 0]


def nucleus(logits: Float[Array, "b v"], top_p: float | jax.Array) -> Float[Array, "b v"]:
    """Holtzman et al. (2020): the logits with every token outside the nucleus set to NEG_INF. The
    nucleus is the smallest set of most likely tokens whose probability (softmax of `logits`)
    reaches top_p: token by token from the most likely, each is kept while the ones before it sum
    to less than top_p, so the most likely token always is; tokens tied with the last one kept are
    kept too."""
    descending = -jnp.sort(-logits, axis=-1)
    p = jax.nn.softmax(descending, axis=-1)
    # The probability of the more likely tokens (an exclusive sum: no p_j added and taken off again).
    before = jnp.concatenate([jnp.zeros_like(p[..., :1]), jnp.cumsum(p, axis=-1)[..., :-1]], axis=-1)
    cutoff = jnp.min(jnp.where(before < top_p, descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, NEG_INF, logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "use_top_p", "bos_id", "eos_id",
                                             "on_token", "cache_block"))
def _generate(graphdef, params, prompt, key, max_new_tokens: int, temperature, top_k: int, top_p, use_top_p: bool,
              bos_id: int, eos_id: int, on_token, cache_block):
    model = nnx.merge(graphdef, params)
    pad_id = model.config.pad_id
    batch, p = prompt.shape
    max_len = p + max_new_tokens
    # Prompt pads may stand anywhere: their cache slots are hidden from every query, and a real
    # token's position is its index among its row's real tokens. Every row's new tokens go to the
    # same slots p, p+1, … (one cache index for the batch) at its own positions n, n+1, …, where n
    # is its number of real prompt tokens: each row continues as it would alone, unpadded.
    real = prompt != pad_id
    n = real.sum(axis=1, dtype=jnp.int32)
    key_valid = jnp.concatenate([real, jnp.ones((batch, max_new_tokens), bool)], axis=1)
    # New token i goes to slot p + i: the first block holds the prompt and at least one new slot.
    cache_lengths = _cache_blocks(p, max_len, cache_block)
    cache = model.init_cache(batch, cache_lengths[0])
    logits, cache = model.decode_step(prompt, cache, 0, key_valid=key_valid[:, : cache_lengths[0]],
                                      positions=real_positions(prompt, pad_id))
    # The first new token follows each row's last real prompt token, wherever its pads are.
    last = p - 1 - jnp.argmax(real[:, ::-1], axis=1)
    first_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)

    def pick(logits, key):
        logits = _never_generate(logits.astype(jnp.float32), pad_id, bos_id)
        greedy = logits.argmax(-1)
        logits = logits / jnp.maximum(temperature, 1e-6)
        if top_k > 0:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, NEG_INF, logits)
        if use_top_p:  # the nucleus of the distribution left after temperature and top_k
            logits = nucleus(logits, top_p)
        return jnp.where(temperature > 0, jax.random.categorical(key, logits), greedy)

    def cond(carry):
        i, _, _, finished, _ = carry
        return (i < max_new_tokens) & ~finished.all()

    def body(carry):
        i, out, last_logits, finished, cache = carry
        token = jnp.where(finished, pad_id, pick(last_logits, jax.random.fold_in(key, i))).astype(jnp.int32)
        if on_token is not None:  # ordered: the host sees the steps in order, as they run
            io_callback(lambda t: on_token(np.asarray(t)), None, token, ordered=True)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        finished = finished | (token == eos_id)
        logits, cache = model.decode_step(token[:, None], cache, p + i, key_valid=key_valid[:, : cache_slots(cache)],
                                          positions=(n + i)[:, None])
        return i + 1, out, logits[:, 0], finished, cache

    init = (jnp.zeros((), jnp.int32), out, first_logits, jnp.zeros((batch,), bool), cache)
    return _blocked_while_loop(cond, body, init, step_of=lambda c: p + c[0], cache_of=lambda c: c[4],
                               with_cache=lambda c, cache: (*c[:4], cache), lengths=cache_lengths)[1]


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
) -> Int[Array, "b n"]:
    """Continue prompts with a `TransformerLM`, each row as it would be continued alone, unpadded.

    Prompt rows may be padded with lm.config.pad_id anywhere (left, right, between tokens; every
    row needs a real token): pads are never attended to, a row continues after its last real token,
    and its new tokens' positions continue from its number of real prompt tokens. The prompts are
    prefilled in one pass; then, in one jit-compiled loop over the KV cache, each step's tokens are
    chosen greedily (temperature 0, deterministic) or sampled (temperature > 0) from
    softmax(logits / temperature), restricted to the top_k most likely tokens (top_k > 0) and then
    to the nucleus (top_p < 1: the smallest set of most likely tokens whose probability reaches
    top_p, `nucleus`), with keys from `rngs` (`rngs.sample()`; the same seed gives the same tokens;
    None: a fixed key), until eos_id or max_new_tokens. pad_id and bos_id are never generated.

    `on_token`, if given, is called on the host with each step's tokens (int32 NumPy [b]; pad_id
    for rows that have ended) in order, as they are chosen (a static argument: another function
    compiles the loop anew). The loop runs in blocks of `cache_block` steps whose self-attention
    covers the cache slots filled by the end of the block (`_cache_blocks`; None: one loop over all
    p + max_new_tokens slots); the tokens are the same.
    Returns the new tokens [b, max_new_tokens] (eos_id, then pad_id, after each end).
    p + max_new_tokens must not exceed lm.config.max_len; ValueError for that, for temperature < 0,
    top_k < 0 or top_p outside (0, 1], and for a row without real tokens."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: no limit), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: no nucleus), got {top_p}")
    prompt = jnp.asarray(prompt, jnp.int32)
    check_decode_length(lm.config, prompt.shape[-1], max_new_tokens, "prompt length", "max_new_tokens")
    if not isinstance(prompt, jax.core.Tracer) and not (prompt != lm.config.pad_id).any(axis=-1).all():
        raise ValueError(f"every prompt row needs at least one real token (not pad_id={lm.config.pad_id})")
    _check_cache_block(cache_block)
    graphdef, params = nnx.split(lm)
    key = rngs.sample() if rngs is not None else jax.random.key(0)
    top_k = min(top_k, lm.config.vocab_size)  # top_k >= vocab_size keeps every token
    return _generate(graphdef, params, prompt, key, max_new_tokens, jnp.float32(temperature), top_k,
                     jnp.float32(top_p), top_p < 1, int(bos_id), int(eos_id), on_token, cache_block)
