"""LM generation: cached generation against the full model recomputed over the growing sequence, for
prompts padded anywhere in one batch; sampling's seed, top-k and nucleus; the token callback."""

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import TransformerConfig, TransformerLM
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from transformer.decoding import generate
from transformer.decoding.search import nucleus

# Vocabulary 19, d_model 16, d_ff 24, h 2 (d_k = 8), N 2; batch 3, prompt length 6, 5 new tokens. An
# output projection of its own: with the tied one, an initialised model's most likely next token is
# the token it was given, and continuations would repeat one token; untied (seed 2), they vary.
CONFIG = TransformerConfig.tiny(vocab_size=19, d_model=16, d_ff=24, h=2, N=2, max_len=24, share_embeddings=False)
IDS = dict(bos_id=BOS_ID, eos_id=EOS_ID)
REAL = [[4, 5, 6, 7], [8, 9], [10, 11, 12]]
# Left-padded, right-padded, and padded between and after its tokens.
PROMPTS = np.array([[0, 0, 4, 5, 6, 7], [8, 9, 0, 0, 0, 0], [10, 0, 11, 0, 12, 0]], np.int32)
NEW = 5


@pytest.fixture(scope="module")
def lm():
    return TransformerLM(CONFIG, rngs=nnx.Rngs(2))


_forward = nnx.jit(lambda lm, tokens: lm(tokens))


def _full_logits(lm, prompts, out):
    """[b, n, vocab]: for each new token out[:, j], the logits the whole model (no cache) gives over
    the prompt as it is, pads in place, followed by out[:, :j], padding after."""
    b, p = prompts.shape
    last = np.array([np.flatnonzero(row != PAD_ID)[-1] for row in prompts])  # each row's last real token
    buffer = np.concatenate([prompts, np.full((b, out.shape[1]), PAD_ID, np.int32)], axis=1)
    steps = []
    for j in range(out.shape[1]):
        logits = np.array(_forward(lm, jnp.asarray(buffer)))
        steps.append(logits[np.arange(b), last if j == 0 else p + j - 1])
        buffer[:, p + j] = out[:, j]
    logits = np.stack(steps, axis=1)
    logits[..., [PAD_ID, BOS_ID]] = -np.inf  # never generated
    return logits


def _until_end(tokens):
    """The tokens up to and including the first end token, and the padding that must follow."""
    tokens = list(tokens)
    end = tokens.index(EOS_ID) + 1 if EOS_ID in tokens else len(tokens)
    return tokens[:end], tokens[end:]


def test_cached_generation_equals_full_argmax_and_each_prompt_alone(lm):
    out = np.asarray(generate(lm, PROMPTS, NEW, **IDS))
    assert out.shape == (3, NEW) and out.dtype == np.int32
    greedy = _full_logits(lm, PROMPTS, out).argmax(-1)
    for i, real in enumerate(REAL):
        chosen, after = _until_end(out[i])
        np.testing.assert_array_equal(chosen, greedy[i, : len(chosen)])
        assert all(t == PAD_ID for t in after)
        alone = np.asarray(generate(lm, np.array([real], np.int32), NEW, **IDS))[0]
        np.testing.assert_array_equal(out[i], alone)


def test_generation_in_cache_blocks_equals_one_loop_over_the_whole_cache(lm):
    # 6 prompt slots + 5 new ones: blocks of 4 run at 8 and then 11 cache slots, blocks of 2 at 8,
    # 10, 11 (the first block holds the prompt); greedy and sampled, prompts padded anywhere.
    def run(block, sampled):
        sampling = dict(temperature=1.0, top_p=0.9, rngs=nnx.Rngs(sample=7)) if sampled else {}
        return np.asarray(generate(lm, PROMPTS, NEW, cache_block=block, **sampling, **IDS))

    for sampled in (False, True):
        for block in (2, 4):
            np.testing.assert_array_equal(run(block, sampled), run(None, sampled))


def test_compacting_the_batch_changes_no_continuation(lm):
    # Blocks of 2 steps; at each block's start the rows still generating are gathered into 3, 2 or 1
    # rows (compact_rows=1). A row's random keys follow its index in the batch, not its place in
    # the compacted one, so sampled tokens are the same too.
    for temperature in (0.0, 1.0):
        def run(compact_rows):
            return np.asarray(generate(lm, PROMPTS, NEW, temperature, cache_block=2, compact_rows=compact_rows,
                                       rngs=nnx.Rngs(sample=2), **IDS))

        whole = run(None)
        np.testing.assert_array_equal(run(1), whole)
    assert EOS_ID in whole[0, :-1]  # (seed 2, sampled) a row ends while others go on


def test_a_rows_samples_do_not_depend_on_the_rows_beside_it(lm):
    sampling = dict(temperature=1.0, top_p=0.9, rngs=nnx.Rngs(sample=5))
    first = np.asarray(generate(lm, PROMPTS, NEW, **sampling, **IDS))
    others = PROMPTS.copy()
    others[1:] = [[13, 14, 15, 0, 0, 0], [16, 17, 18, 4, 5, 6]]
    second = np.asarray(generate(lm, others, NEW, **dict(sampling, rngs=nnx.Rngs(sample=5)), **IDS))
    np.testing.assert_array_equal(second[0], first[0])
    assert not np.array_equal(second[1:], first[1:])  # the other rows did change


def _continuation_log_prob(lm, prompt, continuation):
    tokens = jnp.asarray([list(prompt) + list(continuation)], jnp.int32)
    log_p = np.asarray(jax.nn.log_softmax(lm(tokens)[0].astype(jnp.float32)))
    return float(sum(log_p[len(prompt) - 1 + j, t] for j, t in enumerate(continuation)))


def test_lm_beam_search_finds_the_exhaustive_best(lm):
    # Continuations of at most 2 tokens: the end token alone, a token and the end token, or two
    # tokens cut at the limit (a continuation does not end with the end token there, unlike a
    # translation). The widest beam must return the best under log P / lp.
    from transformer.decoding import length_penalty

    prompt, alpha = [8, 9], 0.6
    tokens = [t for t in range(CONFIG.vocab_size) if t not in (PAD_ID, BOS_ID, EOS_ID)]
    candidates = [(EOS_ID,)] + [(a, EOS_ID) for a in tokens] + list(itertools.product(tokens, tokens))
    scored = {c: _continuation_log_prob(lm, prompt, c) / float(length_penalty(jnp.array(len(c)), alpha))
              for c in candidates}
    best = max(scored, key=scored.get)
    # Left-padded, as a batch of prompts would be.
    out = np.asarray(generate(lm, np.array([[PAD_ID] + prompt], np.int32), 2, beam_size=len(candidates), alpha=alpha,
                              **IDS))[0]
    assert tuple(int(t) for t in out if t != PAD_ID) == best
    # Greedy takes another path here: the search is not greedy decoding under another name.
    greedy = np.asarray(generate(lm, np.array([prompt], np.int32), 2, **IDS))[0]
    assert tuple(int(t) for t in greedy if t != PAD_ID) != best


def test_sampling_with_a_seed_is_deterministic(lm):
    first = generate(lm, PROMPTS, NEW, temperature=1.0, top_p=0.9, rngs=nnx.Rngs(sample=7), **IDS)
    again = generate(lm, PROMPTS, NEW, temperature=1.0, top_p=0.9, rngs=nnx.Rngs(sample=7), **IDS)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))


def test_nucleus_keeps_the_smallest_most_likely_set_that_reaches_top_p():
    p = np.array([0.1, 0.5, 0.25, 0.15], np.float32)  # sorted: 0.5 (1), 0.25 (2), 0.15 (3), 0.1 (0)
    logits = jnp.log(jnp.asarray(p))[None]
    # (Sums exactly at top_p are left out: float32 rounding decides them.)
    for top_p, kept in ((0.3, [1]), (0.45, [1]), (0.6, [1, 2]), (0.74, [1, 2]), (0.8, [1, 2, 3]),
                        (0.95, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])):
        got = np.asarray(nucleus(logits, top_p))[0]
        assert sorted(np.flatnonzero(got > -1e8)) == kept, top_p
        np.testing.assert_array_equal(got[kept], np.asarray(logits)[0, kept])


def _nucleus_numpy(logits, top_p):
    """The token ids of the nucleus of softmax(logits), written out from the definition."""
    order = np.argsort(-logits, kind="stable")
    p = np.exp(logits[order] - logits[order[0]])
    p /= p.sum()
    size = int(np.searchsorted(np.cumsum(p), top_p)) + 1  # the first prefix whose sum reaches top_p
    return set(order[:size].tolist())


@pytest.mark.parametrize("limit", [dict(top_k=3), dict(top_p=0.6)])
def test_sampled_tokens_stay_in_the_top_k_or_the_nucleus(lm, limit):
    # 12 rows of one prompt: the rows draw their tokens independently.
    prompts = np.repeat(PROMPTS[2:], 12, axis=0)
    temperature = 0.8
    out = np.asarray(generate(lm, prompts, NEW, temperature=temperature, rngs=nnx.Rngs(sample=3), **limit, **IDS))
    logits = _full_logits(lm, prompts, out) / temperature
    drawn = outside_argmax = 0
    for i in range(len(prompts)):
        chosen, _ = _until_end(out[i])
        for j, token in enumerate(chosen):
            if "top_k" in limit:
                allowed = set(np.argsort(-logits[i, j])[: limit["top_k"]].tolist())
            else:
                allowed = _nucleus_numpy(logits[i, j], limit["top_p"])
            assert token in allowed, (i, j, token, allowed)
            drawn += 1
            outside_argmax += token != logits[i, j].argmax()
    # The check covered draws that were not the most likely token (it was not greedy decoding).
    assert drawn >= 12 and outside_argmax > 0


def test_on_token_sees_each_step_as_it_is_returned(lm):
    seen = []
    out = np.asarray(generate(lm, PROMPTS, NEW, temperature=1.0, rngs=nnx.Rngs(sample=2), on_token=seen.append,
                              **IDS))
    assert EOS_ID in out[0, :-1]  # (seed 2) the first row ends early: the callback sees its padding too
    assert all(step.shape == (3,) and step.dtype == np.int32 for step in seen) and 1 <= len(seen) <= NEW
    np.testing.assert_array_equal(np.stack(seen, axis=1), out[:, : len(seen)])
    assert (out[:, len(seen):] == PAD_ID).all()  # steps not run (every row had ended) hold padding


@pytest.mark.parametrize("bad, message", [(dict(top_p=0.0), "top_p must be in"), (dict(top_p=1.5), "top_p must be in"),
                                          (dict(top_k=-1), "top_k must be"),
                                          (dict(temperature=-0.5), "temperature must be"),
                                          (dict(beam_size=0), "beam_size must be"),
                                          (dict(beam_size=2, temperature=1.0), "beam search neither samples")])
def test_bad_sampling_settings_are_a_clear_error(lm, bad, message):
    with pytest.raises(ValueError, match=message):
        generate(lm, PROMPTS, NEW, **bad, **IDS)


def test_a_prompt_row_without_real_tokens_is_a_clear_error(lm):
    with pytest.raises(ValueError, match="at least one real token"):
        generate(lm, np.array([[4, 5], [PAD_ID, PAD_ID]], np.int32), NEW, **IDS)


def test_streamed_text_is_the_whole_continuation_and_each_call_its_own(lm):
    from transformer.data.tokenizer import CharTokenizer
    from transformer.decoding.text import continue_texts

    tokenizer = CharTokenizer("abcdefghijklmno")  # 15 letters + 4 special ids = the model's vocabulary of 19
    for prompt, seed in (("abc", 1), ("hello", 2)):
        pieces = []

        def slow_reader(piece):  # a reader slower than the loop: the loop's callbacks queue up behind it
            time.sleep(0.02)
            pieces.append(piece)

        out = continue_texts(lm, tokenizer, [prompt], max_new_tokens=17, temperature=1.0, seed=seed,
                             on_text=slow_reader)
        # Every piece arrived before continue_texts returned, and into this call's list only.
        assert len(out) == 1 and "".join(pieces) == out[0]
    with pytest.raises(ValueError, match="streams one prompt"):
        continue_texts(lm, tokenizer, ["a", "b"], on_text=print)
    # A beam's continuation is known only when the search ends: handed over whole, once.
    pieces = []
    out = continue_texts(lm, tokenizer, ["abc"], max_new_tokens=6, on_text=pieces.append, beam_size=3)
    assert pieces == out
