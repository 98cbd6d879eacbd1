"""§6.1 Inference for every model family: greedy decoding and sampling (`sample`) and beam search
(`beam`: beam 4, length penalty α = 0.6), written once against a family's `Start` and `Step`
(tokens -> logits through the key/value cache: `decoding.families`), each inside one jit-compiled
loop that stops once every row has ended.

A search knows token ids, not text: it is given the begin, end and padding ids (`SearchRules`).
Outputs hold the end token, then padding. Two things keep the work per step small: the cache grows
by blocks (`_cache_blocks`), so that a step attends to the slots filled so far rather than to all of
them; and, where `SearchRules.compact_rows` asks for it, at each later block's start the rows
still decoding are gathered into a smaller batch where they fit in one (`_compacted`), so that
ended rows stop costing work.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jaxtyping import Array, Float, Int

from transformer.nn.layers import LayerCache, cache_slots

NEG_INF = -1e9  # a finite "impossible" score, so that arithmetic on it never makes NaNs
CACHE_BLOCK = 16  # cache slots added per block of decoding steps (`_cache_blocks`)
# The fewest rows a batch is compacted to (`_compacted`); None, no compaction, by default: each
# size compiles every later block's loop again. On the 2-core CPU (Multi30k, batches of 32,
# `benchmarks/decode_vs_ctranslate2.py --compact_rows 0 8`, RESULTS.md) compaction to 16 and 8 rows
# gained 9% in throughput (greedy and beam 4), but the first pass over the test set, which
# compiles, took 37 s instead of 15 (greedy) and 47 s instead of 28 (beam 4). Worth it where one
# compiled shape decodes many batches (a server), not for one file.
COMPACT_ROWS: int | None = None


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


def _check_positive(name: str, value, none_means: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None ({none_means}), got {value!r}")


@dataclasses.dataclass(frozen=True)
class SearchRules:
    """What a search needs besides the model: sizes, ids and stopping rules (static: each value
    compiles a loop of its own)."""

    max_new: int  # the most tokens a row gets, its end token included (a row's own limit may be lower)
    offset: int  # the cache slot of the first new token: the start has written slots 0 … offset - 1
    bos_id: int
    eos_id: int
    pad_id: int
    # At its limit a row ends with the end token (a translation is a whole sentence) or is cut there
    # (a continuation of text).
    end_at_limit: bool
    cache_block: int | None = CACHE_BLOCK  # None: one loop over the whole cache
    compact_rows: int | None = COMPACT_ROWS  # the fewest rows of a compacted batch; None: never compact

    def __post_init__(self):
        if self.max_new < 1 or self.offset < 1:
            raise ValueError(f"a search makes at least one token after at least one slot, got max_new="
                             f"{self.max_new}, offset={self.offset}")
        self.check_options(self.cache_block, self.compact_rows)

    @staticmethod
    def check_options(cache_block, compact_rows) -> None:
        """ValueError, in one line, unless both options are positive integers or None."""
        _check_positive("cache_block", cache_block, "one block")
        _check_positive("compact_rows", compact_rows, "never compact")

    @property
    def slots(self) -> int:
        """The cache slots a search writes: the start's, then every new token's but the last."""
        return self.offset + self.max_new - 1


@flax.struct.dataclass
class Context:
    """What a family's step reads and writes besides the tokens: every leaf has the batch's sources
    on axis 0 (what `_compacted` gathers)."""

    cache: list[LayerCache] | None  # self-attention keys/values [b, h, C·k, d] over the C slots of the
    #     current block, k beams each (grown by `_grow_cache`); encoder-decoder keys/values [b, h, s, d]
    inputs: Any  # the family's own per-source inputs (the source tokens; a prompt's key mask)


class Start(Protocol):
    def __call__(self, slots: int, beams: int) -> tuple[Float[Array, "b v"], Context]:
        """The logits of every source's first new token, and the context for `beams` hypotheses per
        source whose cache holds `slots` slots (the start's own written; `share_prefix`)."""


class Step(Protocol):
    def __call__(self, context: Context, tokens: Int[Array, "b k"], slot: jax.Array,
                 ancestors: Int[Array, "b k c"] | None) -> tuple[Float[Array, "b k v"], Context]:
        """tokens -> logits: each hypothesis's newest token, written at cache `slot`, in, the logits
        of its next token out. Hypothesis r of a source reads slot j as beam ancestors[b, r, j] wrote
        it (None for one hypothesis per source: its own)."""


def share_prefix(cache: list[LayerCache], beams: int) -> list[LayerCache]:
    """A cache of one hypothesis per source as the cache of `beams` hypotheses that share its
    prefix: each self-attention slot holds a copy per beam (slot j, beam s at j · beams + s)."""
    if beams == 1:
        return cache
    return [{name: a if name.startswith("cross") else jnp.repeat(a, beams, axis=2) for name, a in layer.items()}
            for layer in cache]


def _log_probs(logits: jax.Array, rules: SearchRules) -> jax.Array:
    """log P(next token) in float32; padding and the begin token are never outputs (the decoder's
    input mask would hide them)."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    vocab = jnp.arange(log_p.shape[-1]).reshape((1,) * (log_p.ndim - 1) + (-1,))
    return jnp.where((vocab == rules.pad_id) | (vocab == rules.bos_id), NEG_INF, log_p)


def _cache_blocks(first: int, max_len: int, block: int | None) -> list[int]:
    """The cache lengths the decode loop runs at: the multiples of `block` above `first`, then
    max_len (one length, max_len, for block None).

    Step j writes cache slot j and attends to slots 0 … j, so a step runs in the first block whose
    length exceeds j, and its self-attention covers that block's slots rather than all max_len: on
    average about half of them fewer, less the (block - 1) / 2 empty slots of the last block. Each
    length is a loop of its own in the compiled program (static shapes, as XLA needs on every
    backend), so a smaller block attends to fewer empty slots but compiles more loops: 16 keeps a
    74-slot search (a 24-token source + 50) at 5 loops."""
    if block is None or block >= max_len:
        return [max_len]
    return list(range((first // block + 1) * block, max_len, block)) + [max_len]


def _grow_cache(cache: list[LayerCache], length: int, beams: int) -> list[LayerCache]:
    """The self-attention keys/values ([sources, h, slots · beams, d]) with empty slots appended up
    to `length` slots; the encoder-decoder keys/values, which do not grow, as they are."""
    def grow(name, a):
        return a if name.startswith("cross") else jnp.pad(a, ((0, 0), (0, 0), (0, length * beams - a.shape[2]), (0, 0)))

    return [{name: grow(name, a) for name, a in layer.items()} for layer in cache]


def _compacted(run: Callable, state, live: jax.Array, min_rows: int | None):
    """`run(state)` (a loop over a batch of b sources; every leaf of the state but the scalar step
    counter has the sources on axis 0) on only as many sources as are `live` [b]: the live ones are
    gathered in front, the smallest of b, ⌈b/2⌉, ⌈b/4⌉, … (none below min_rows) that holds them runs,
    and its rows are scattered back. Rows that have ended change nothing that is returned, so the
    outputs are those of `run(state)`; a batch of b sources is compacted only where ⌈b/2⌉ >=
    min_rows. Each size is a branch of `lax.switch`: compiled once, run only when chosen."""
    batch = live.shape[0]
    sizes = [batch]
    while min_rows is not None and sizes[-1] > 1 and -(-sizes[-1] // 2) >= min_rows:
        sizes.append(-(-sizes[-1] // 2))
    if len(sizes) == 1:
        return run(state)
    n = live.sum()
    # live first, each group in batch order; no row twice
    order = jnp.argsort(~live, stable=True)

    def on(size: int):
        if size == batch:
            return run

        def gathered(state):
            rows = order[:size]
            part = run(jax.tree.map(lambda a: a if a.ndim == 0 else a[rows], state))
            return jax.tree.map(lambda a, p: p if a.ndim == 0 else a.at[rows].set(p), state, part)

        return gathered

    # The smallest size that holds the live rows: sizes run from the largest down.
    index = sum((n <= size).astype(jnp.int32) for size in sizes[1:])
    return jax.lax.switch(index, [on(size) for size in sizes], state)


def _blocked_while_loop(cond, body, state, slot_of, rules: SearchRules, live_of, beams: int = 1):
    """`jax.lax.while_loop(cond, body, state)` for a loop state with a `context` whose cache covers
    only the slots written so far: one while_loop per length of `_cache_blocks` (each running while
    `cond` holds and the slot the next step writes, `slot_of(state)`, fits in that length), the
    cache first grown to it, and the block run on the `live_of(state)` sources alone
    (`_compacted`). A search without a cache runs as one block (rules.cache_block None)."""
    lengths = _cache_blocks(rules.offset, rules.slots, rules.cache_block)
    if state.context.cache is None and len(lengths) > 1:
        raise ValueError("a search without a cache runs in one block: SearchRules(cache_block=None)")
    for block, length in enumerate(lengths):
        if state.context.cache is not None:
            state = state.replace(context=state.context.replace(cache=_grow_cache(state.context.cache, length, beams)))

        def run(s, length=length):
            return jax.lax.while_loop(lambda c: (slot_of(c) < length) & cond(c), body, s)

        # The first block starts with every source live (one token chosen): nothing to compact.
        state = _compacted(run, state, live_of(state), None if block == 0 else rules.compact_rows)
    return state


def _first_block(rules: SearchRules) -> int:
    return _cache_blocks(rules.offset, rules.slots, rules.cache_block)[0]


@flax.struct.dataclass
class SampleState:
    """The loop state of `sample` (b sources, n = rules.max_new)."""

    i: jax.Array  # []: tokens chosen so far; the newest, tokens[:, i - 1], is at cache slot offset + i - 1
    tokens: jax.Array  # [b, n] int32: the chosen tokens, the end token then padding after each end
    log_probs: jax.Array  # [b] float32: log P(tokens) under the model (temperature and cut-offs aside)
    finished: jax.Array  # [b] bool: the row has ended
    limits: jax.Array  # [b] int32: the most tokens of each row
    rows: jax.Array  # [b] int32: each row's index in the batch (its own random keys; `on_token`)
    context: Context


Choose = Callable[[Float[Array, "b v"], jax.Array], Int[Array, "b"]]


def sample(start: Start, step: Step, limits: Int[Array, "b"], rules: SearchRules, choose: Choose | None = None,
           key: jax.Array | None = None, on_token: Callable[[np.ndarray], Any] | None = None
           ) -> tuple[Int[Array, "b n"], Float[Array, "b"]]:
    """One hypothesis per row, token by token: the most likely next token (choose None: greedy), or
    `choose(log_p [b, v], keys [b])`'s, with keys folded from `key`, the step and the row's index
    in the batch (so that no row's tokens depend on which others decode beside it). A row ends with
    the end token or at its limit (`rules.end_at_limit`). `on_token`, if given, gets each step's
    tokens on the host ([b] int32, padding for rows that have ended), in order.
    Returns the tokens [b, rules.max_new] and each row's log P of them."""
    first_logits, context = start(_first_block(rules), 1)
    batch = first_logits.shape[0]
    state = SampleState(
        i=jnp.zeros((), jnp.int32),
        tokens=jnp.full((batch, rules.max_new), rules.pad_id, jnp.int32),
        log_probs=jnp.zeros((batch,), jnp.float32),
        finished=jnp.zeros((batch,), bool),
        limits=limits.astype(jnp.int32),
        rows=jnp.arange(batch, dtype=jnp.int32),
        context=context,
    )

    def pick(state: SampleState, logits: jax.Array) -> SampleState:
        log_p = _log_probs(logits, rules)
        if choose is None:
            token = log_p.argmax(-1)
        else:
            keys = jax.vmap(lambda row: jax.random.fold_in(jax.random.fold_in(key, state.i), row))(state.rows)
            token = choose(log_p, keys)
        at_limit = state.i + 1 >= state.limits
        if rules.end_at_limit:
            token = jnp.where(at_limit, rules.eos_id, token)
        token = jnp.where(state.finished, rules.pad_id, token).astype(jnp.int32)
        if on_token is not None:  # ordered: the host sees the steps in order, as they run
            whole = jnp.full((batch,), rules.pad_id, jnp.int32).at[state.rows].set(token)
            io_callback(lambda t: on_token(np.asarray(t)), None, whole, ordered=True)
        token_log_p = jnp.take_along_axis(log_p, token[:, None], axis=1)[:, 0]
        return state.replace(
            i=state.i + 1,
            tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], state.i, axis=1),
            log_probs=state.log_probs + jnp.where(state.finished, 0.0, token_log_p),
            finished=state.finished | (token == rules.eos_id) | at_limit,
        )

    def body(state: SampleState) -> SampleState:
        newest = jax.lax.dynamic_slice_in_dim(state.tokens, state.i - 1, 1, axis=1)
        logits, context = step(state.context, newest, rules.offset + state.i - 1, None)
        return pick(state.replace(context=context), logits[:, 0])

    state = _blocked_while_loop(
        lambda s: (s.i < rules.max_new) & ~s.finished.all(), body, pick(state, first_logits),
        slot_of=lambda s: rules.offset + s.i - 1, rules=rules, live_of=lambda s: ~s.finished)
    return state.tokens, state.log_probs


def _gather_beams(x: jax.Array, parents: jax.Array) -> jax.Array:
    """x [b, k, …] -> [b, n, …]: for each source, the beams that parents [b, n] name."""
    return jnp.take_along_axis(x, parents.reshape(*parents.shape, *([1] * (x.ndim - 2))), axis=1)


@flax.struct.dataclass
class BeamState:
    """The loop state of `beam` (b sources, k beams, n = rules.max_new, L = rules.slots).

    k live hypotheses and, apart from them, the k best finished ones per source, as in
    tensor2tensor, fairseq and Flax's WMT example: a hypothesis that ends leaves the beam to the
    finished set, so k hypotheses stay live until the search stops."""

    i: jax.Array  # []: tokens per hypothesis so far; the newest, at [..., i - 1], is at slot offset + i - 1
    live_seqs: jax.Array  # [b, k, n] int32: each live hypothesis's tokens
    live_log_probs: jax.Array  # [b, k] float32: log P(hypothesis); <= NEG_INF / 2 for none
    finished_seqs: jax.Array  # [b, k, n] int32: ended hypotheses (end token, then padding), best first
    finished_scores: jax.Array  # [b, k] float32: log P / lp(length); NEG_INF for an empty slot
    ancestors: jax.Array  # [b, k, L] int32: the beam whose cached keys/values at slot j are live beam r's
    limits: jax.Array  # [b] int32: the most tokens of a source's hypotheses
    context: Context  # its cache holds each slot once per beam (`share_prefix`), never reordered


def beam(start: Start, step: Step, limits: Int[Array, "b"], rules: SearchRules, beam_size: int, alpha: float
         ) -> tuple[Int[Array, "b k n"], Float[Array, "b k"]]:
    """§6.1 beam search: beam_size live hypotheses and the beam_size best finished ones per source
    (`BeamState`), ranked by log P(Y) / lp(Y) (`length_penalty`). A source stops once no live
    hypothesis can beat its k-th finished one (and at its limit, where every hypothesis ends:
    `rules.end_at_limit`), the loop once every source has stopped.
    Returns the finished hypotheses [b, k, rules.max_new], best first, and their scores (NEG_INF
    where fewer than k exist)."""
    k = beam_size
    first_logits, context = start(_first_block(rules), k)
    batch, vocab = first_logits.shape
    # The best score a live hypothesis of log P = x can still reach is x / lp(its limit): log P only
    # falls as tokens are added, and lp grows with the length (α >= 0).
    limits = limits.astype(jnp.int32)
    seqs = jnp.full((batch, k, rules.max_new), rules.pad_id, jnp.int32)
    state = BeamState(
        i=jnp.zeros((), jnp.int32),
        live_seqs=seqs,
        # Only the first beam is live at the start, so the k beams do not all repeat one hypothesis.
        live_log_probs=jnp.full((batch, k), NEG_INF).at[:, 0].set(0.0),
        finished_seqs=seqs,
        finished_scores=jnp.full((batch, k), NEG_INF),
        # The start's slots hold the same keys/values in every beam's place: each reads its own.
        ancestors=jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None, :, None], (batch, k, rules.slots)),
        limits=limits,
        context=context,
    )

    def select(state: BeamState, log_p: jax.Array) -> BeamState:
        """The search's move, given log P(next token) [b, k, v] of each live hypothesis."""
        i, batch = state.i, state.limits.shape[0]  # (a compacted batch has fewer sources)
        at_limit = (i + 1 >= state.limits)[:, None]  # [b, 1]
        if rules.end_at_limit:  # a hypothesis at its limit can only end
            log_p = jnp.where(at_limit[..., None] & (jnp.arange(vocab) != rules.eos_id)[None, None, :], NEG_INF, log_p)
        # 2k candidates: even if k of them end, k remain to continue.
        candidates = (state.live_log_probs[..., None] + log_p).reshape(batch, k * vocab)
        cand_log_probs, flat_best = jax.lax.top_k(candidates, 2 * k)
        parents, tokens = flat_best // vocab, flat_best % vocab  # [b, 2k]
        cand_seqs = jax.lax.dynamic_update_slice_in_dim(_gather_beams(state.live_seqs, parents), tokens[..., None],
                                                        i, axis=2)
        alive = cand_log_probs > NEG_INF / 2
        ended = (tokens == rules.eos_id) | at_limit

        # Those that end join the finished set, ranked by log P / lp(length); the set keeps its best k.
        ended_scores = jnp.where(ended & alive, cand_log_probs / length_penalty(i + 1, alpha), NEG_INF)
        finished_scores, best = jax.lax.top_k(jnp.concatenate([state.finished_scores, ended_scores], axis=1), k)
        finished_seqs = _gather_beams(jnp.concatenate([state.finished_seqs, cand_seqs], axis=1), best)

        # The k most likely that go on are the new live beams.
        live_log_probs, best = jax.lax.top_k(jnp.where(ended, NEG_INF, cand_log_probs), k)
        # A source is done when no live hypothesis can still enter its finished set (ties cannot
        # change it): its live beams are dropped, so that nothing it has changes from here on.
        done = (live_log_probs[:, 0] / length_penalty(state.limits, alpha) <= finished_scores[:, -1])[:, None]
        # Each new live beam's prefix is its parent's: it reads the slots its parent read.
        return state.replace(i=i + 1, live_seqs=_gather_beams(cand_seqs, best),
                             live_log_probs=jnp.where(done, NEG_INF, live_log_probs),
                             finished_seqs=finished_seqs, finished_scores=finished_scores,
                             ancestors=_gather_beams(state.ancestors, _gather_beams(parents, best)))

    def body(state: BeamState) -> BeamState:
        slot = rules.offset + state.i - 1
        # The cache is never reordered: each step writes beam r's keys/values at the slot in beam
        # r's place, and a beam reads each earlier slot in the place of the beam that wrote its
        # prefix's token there (`masks.ancestry_causal_mask`). Only these indices follow the
        # parents; copying every layer's keys/values instead (fairseq's way) took a fifth of a
        # step on the CPU.
        own = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None, :, None], (state.limits.shape[0], k, 1))
        ancestors = jax.lax.dynamic_update_slice_in_dim(state.ancestors, own, slot, axis=2)
        cache = state.context.cache
        slots = rules.slots if cache is None else cache_slots(cache, k)
        newest = jax.lax.dynamic_index_in_dim(state.live_seqs, state.i - 1, axis=2, keepdims=False)
        logits, context = step(state.context, newest, slot, ancestors[:, :, :slots])
        return select(state.replace(ancestors=ancestors, context=context), _log_probs(logits, rules))

    first = _log_probs(jnp.broadcast_to(first_logits[:, None], (batch, k, vocab)), rules)
    state = _blocked_while_loop(
        lambda s: (s.i < rules.max_new) & (s.live_log_probs > NEG_INF / 2).any(), body, select(state, first),
        slot_of=lambda s: rules.offset + s.i - 1, rules=rules, live_of=lambda s: s.live_log_probs[:, 0] > NEG_INF / 2,
        beams=k)
    return state.finished_seqs, state.finished_scores
