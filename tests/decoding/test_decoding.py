"""Incremental decoding against full forward passes; beam search against exhaustive enumeration."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import Transformer, TransformerConfig, TransformerLM
from transformer.decoding import beam_search, generate, greedy_decode, length_penalty
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

CONFIG = TransformerConfig.tiny(vocab_size=11, d_model=24, d_ff=40, h=3, N=2, dropout_rate=0.0)
IDS = dict(bos_id=BOS_ID, eos_id=EOS_ID)


@pytest.fixture(scope="module")
def model():
    m = Transformer(CONFIG, rngs=nnx.Rngs(0))
    # Sharper output distributions than at initialisation, so that greedy and beam choices differ.
    E = m.src_embed.token_embedding.embedding
    E[...] = E[...] * 4.0
    return m


SRC = jnp.array([[5, 6, 7, 8, EOS_ID], [9, 4, EOS_ID, PAD_ID, PAD_ID]], jnp.int32)


def test_cached_logits_equal_full_forward_at_every_step(model):
    tgt = jnp.array([[BOS_ID, 4, 5, 6, 7, 8], [BOS_ID, 9, 10, 4, 5, 6]], jnp.int32)
    full = np.asarray(model(SRC, tgt))
    cache = model.init_cache(model.encode(SRC), max_len=8)
    for i in range(tgt.shape[1]):
        logits, cache = model.decode_step(tgt[:, i : i + 1], SRC, cache, i)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, i], atol=1e-4)


def _full_greedy(model, src, steps):
    out = jnp.full((src.shape[0], 1), BOS_ID, jnp.int32)
    for _ in range(steps):
        logits = np.array(model(src, out))[:, -1]
        logits[:, [PAD_ID, BOS_ID]] = -np.inf
        out = jnp.concatenate([out, jnp.asarray(logits.argmax(-1), jnp.int32)[:, None]], axis=1)
    return np.asarray(out[:, 1:])


def test_greedy_through_cache_equals_repeated_full_argmax(model):
    tokens, _ = greedy_decode(model, SRC[:1], max_extra=6, **IDS)
    tokens = np.asarray(tokens)[0]
    reference = _full_greedy(model, SRC[:1], tokens.shape[0])[0]
    end = list(tokens).index(EOS_ID) if EOS_ID in tokens else len(tokens)
    np.testing.assert_array_equal(tokens[:end], reference[:end])
    assert (tokens[end + 1 :] == PAD_ID).all()


def test_beam_of_one_scores_at_least_greedy(model):
    # Greedy's hypothesis is always among beam search's candidates (the live beam follows the most
    # likely token that does not end), so the beam's best scores at least as well under the
    # objective log P / lp; where both chose the same tokens, the scores agree.
    alpha = 0.6
    greedy, greedy_log_prob = greedy_decode(model, SRC, max_extra=6, **IDS)
    beams, scores = beam_search(model, SRC, beam_size=1, alpha=alpha, max_extra=6, **IDS)
    greedy, beams = np.asarray(greedy), np.asarray(beams)[:, 0]
    for row in range(SRC.shape[0]):
        length = list(greedy[row]).index(EOS_ID) + 1
        greedy_score = float(greedy_log_prob[row]) / float(length_penalty(jnp.array(length), alpha))
        assert float(scores[row, 0]) >= greedy_score - 1e-5
        if (beams[row] == greedy[row]).all():
            np.testing.assert_allclose(float(scores[row, 0]), greedy_score, atol=1e-5)


def test_beams_share_the_encoder_keys_and_values_of_their_source(model):
    cache = model.init_cache(model.encode(SRC), max_len=9, beams=3)
    assert cache[0]["k"].shape[:3] == (2, CONFIG.h, 9 * 3) and cache[0]["cross_k"].shape[0] == 2
    # Three hypotheses per source step through the cache as rows of their own (of one source adjacent),
    # each as it would alone.
    tgt = jnp.array([[BOS_ID], [BOS_ID], [BOS_ID], [BOS_ID], [BOS_ID], [BOS_ID]], jnp.int32)
    shared, _ = model.decode_step(tgt, SRC, cache, 0)
    alone, _ = model.decode_step(tgt[:2], SRC, model.init_cache(model.encode(SRC), max_len=9), 0)
    np.testing.assert_allclose(np.asarray(shared).reshape(2, 3, 1, -1), np.repeat(np.asarray(alone)[:, None], 3, 1),
                               atol=1e-5)


def _sequence_log_prob(model, src, seq):
    tgt_in = jnp.asarray([[BOS_ID] + list(seq[:-1])], jnp.int32)
    log_p = jax.nn.log_softmax(model(src, tgt_in)[0])
    return float(sum(log_p[i, t] for i, t in enumerate(seq)))


def test_wide_beam_finds_the_exhaustive_best(model):
    src = jnp.array([[5, EOS_ID]], jnp.int32)  # input length 2, so outputs have at most 2 + 1 tokens
    max_extra, alpha = 1, 0.6
    tokens = [t for t in range(CONFIG.vocab_size) if t not in (PAD_ID, BOS_ID, EOS_ID)]
    candidates = [(EOS_ID,)]
    candidates += [(a, EOS_ID) for a in tokens]
    candidates += [(a, b, EOS_ID) for a, b in itertools.product(tokens, tokens)]  # the limit forces EOS
    scored = {c: _sequence_log_prob(model, src, c) / float(length_penalty(jnp.array(len(c)), alpha)) for c in candidates}
    best = max(scored, key=scored.get)
    beams, scores = beam_search(model, src, beam_size=len(candidates), alpha=alpha, max_extra=max_extra, **IDS)
    found = tuple(int(t) for t in np.asarray(beams)[0, 0] if t != PAD_ID)
    assert found == best
    np.testing.assert_allclose(float(scores[0, 0]), scored[best], atol=1e-4)
    # And the n-best list is sorted, best first.
    assert (np.diff(np.asarray(scores)[0]) <= 1e-6).all()


def test_padding_in_the_batch_does_not_change_translations(model):
    alone = [np.asarray(beam_search(model, SRC[i : i + 1, : 5 - i * 2], 3, 0.6, 4, **IDS)[0])[0, 0] for i in range(2)]
    batch = np.asarray(beam_search(model, jnp.pad(SRC, ((0, 0), (0, 3))), 3, 0.6, 4, **IDS)[0])[:, 0]
    for i in range(2):
        n = len(alone[i])
        np.testing.assert_array_equal(batch[i, :n], alone[i])
        assert (batch[i, n:] == PAD_ID).all()


def test_language_model_greedy_generation_with_prefill():
    lm = TransformerLM(CONFIG, rngs=nnx.Rngs(3))
    prompt = jnp.array([[4, 5, 6]], jnp.int32)
    out = np.asarray(generate(lm, prompt, max_new_tokens=4, **IDS))[0]
    seq = prompt
    for t in out:
        logits = np.array(lm(seq))[0, -1]
        logits[[PAD_ID, BOS_ID]] = -np.inf
        assert int(t) == int(logits.argmax())
        if t == EOS_ID:
            break
        seq = jnp.concatenate([seq, jnp.array([[t]], jnp.int32)], axis=1)
    # A left-padded prompt continues the same way.
    padded = np.asarray(generate(lm, jnp.array([[PAD_ID, PAD_ID, 4, 5, 6]], jnp.int32), max_new_tokens=4, **IDS))[0]
    np.testing.assert_array_equal(padded, out)
    # Sampling with top_k=1 is greedy; temperature sampling stays inside the vocabulary.
    np.testing.assert_array_equal(np.asarray(generate(lm, prompt, 4, temperature=1.0, top_k=1, rngs=nnx.Rngs(sample=1), **IDS))[0], out)
    sampled = np.asarray(generate(lm, prompt, 4, temperature=1.5, rngs=nnx.Rngs(sample=2), **IDS))
    assert ((sampled >= 0) & (sampled < CONFIG.vocab_size)).all()



def test_decoding_without_the_cache_gives_the_same_outputs(model):
    cached, cached_lp = greedy_decode(model, SRC, max_extra=5, **IDS)
    uncached, uncached_lp = greedy_decode(model, SRC, max_extra=5, use_cache=False, **IDS)
    np.testing.assert_array_equal(np.asarray(uncached), np.asarray(cached))
    np.testing.assert_allclose(np.asarray(uncached_lp), np.asarray(cached_lp), atol=1e-4)
    beams, scores = beam_search(model, SRC, 3, 0.6, 4, **IDS)
    beams_nc, scores_nc = beam_search(model, SRC, 3, 0.6, 4, use_cache=False, **IDS)
    np.testing.assert_array_equal(np.asarray(beams_nc), np.asarray(beams))
    np.testing.assert_allclose(np.asarray(scores_nc), np.asarray(scores), atol=1e-4)


# Every size different (vocabulary 13, d_model 20, d_ff 28, h 2 with d_k 10, N 3), an output
# embedding of its own; seed 2 ends rows at different steps, seed 3 runs them to their limits.
BLOCKS_CONFIG = TransformerConfig.tiny(vocab_size=13, d_model=20, d_ff=28, h=2, N=3, dropout_rate=0.0,
                                       share_embeddings=False)
BLOCKS_SRC = jnp.array([[5, 6, 7, 8, 9, 10, EOS_ID], [11, 4, 12, EOS_ID, PAD_ID, PAD_ID, PAD_ID],
                        [6, EOS_ID] + [PAD_ID] * 5], jnp.int32)


@pytest.mark.parametrize("seed", [2, 3])
def test_decoding_in_cache_blocks_equals_one_loop_over_the_whole_cache(seed):
    # 7 + 9 = 16 decoder positions: blocks of 4 attend over 4, 8, 12, 16 slots; blocks of 5 over
    # 5, 10, 15, then 16 (a block of one step). None is one loop over all 16, as before blocks.
    model = Transformer(BLOCKS_CONFIG, rngs=nnx.Rngs(seed))
    E = model.tgt_embed.token_embedding.embedding
    E[...] = E[...] * 3.0  # sharper choices, so that hypotheses differ
    greedy, log_prob = greedy_decode(model, BLOCKS_SRC, 9, cache_block=None, **IDS)
    beams, scores = beam_search(model, BLOCKS_SRC, 3, 0.6, 9, cache_block=None, **IDS)
    for block in (4, 5):
        greedy_b, log_prob_b = greedy_decode(model, BLOCKS_SRC, 9, cache_block=block, **IDS)
        np.testing.assert_array_equal(np.asarray(greedy_b), np.asarray(greedy))
        np.testing.assert_allclose(np.asarray(log_prob_b), np.asarray(log_prob), atol=1e-5)
        beams_b, scores_b = beam_search(model, BLOCKS_SRC, 3, 0.6, 9, cache_block=block, **IDS)
        np.testing.assert_array_equal(np.asarray(beams_b), np.asarray(beams))
        np.testing.assert_allclose(np.asarray(scores_b), np.asarray(scores), atol=1e-5)


# Six sources of lengths 7, 4, 2, 5, 3 and 1 (seed 2 ends their outputs at different steps).
COMPACT_SRC = jnp.concatenate([BLOCKS_SRC, jnp.array([[7, 8, 9, 10, EOS_ID, PAD_ID, PAD_ID],
                                                       [12, 11, EOS_ID] + [PAD_ID] * 4,
                                                       [EOS_ID] + [PAD_ID] * 6], jnp.int32)])


def test_compacting_the_batch_changes_no_output():
    # Blocks of 4 steps; at each block's start the sources still decoding are gathered into 6, 3, 2
    # or 1 rows (compact_rows=1), and the outputs must be those of the whole batch all along.
    model = Transformer(BLOCKS_CONFIG, rngs=nnx.Rngs(2))
    E = model.tgt_embed.token_embedding.embedding
    E[...] = E[...] * 3.0
    greedy, log_prob = greedy_decode(model, COMPACT_SRC, 9, cache_block=4, compact_rows=None, **IDS)
    ends = [list(row).index(EOS_ID) + 1 for row in np.asarray(greedy)]
    # The case compaction is for: at the start of a later block at most half the rows still decode.
    assert any(sum(end > start for end in ends) <= 3 for start in (4, 8, 12)), ends
    greedy_c, log_prob_c = greedy_decode(model, COMPACT_SRC, 9, cache_block=4, compact_rows=1, **IDS)
    np.testing.assert_array_equal(np.asarray(greedy_c), np.asarray(greedy))
    np.testing.assert_allclose(np.asarray(log_prob_c), np.asarray(log_prob), atol=1e-5)
    beams, scores = beam_search(model, COMPACT_SRC, 3, 0.6, 9, cache_block=4, compact_rows=None, **IDS)
    beams_c, scores_c = beam_search(model, COMPACT_SRC, 3, 0.6, 9, cache_block=4, compact_rows=1, **IDS)
    np.testing.assert_array_equal(np.asarray(beams_c), np.asarray(beams))
    np.testing.assert_allclose(np.asarray(scores_c), np.asarray(scores), atol=1e-5)


def test_cache_blocks_cover_the_written_slots():
    from transformer.decoding.search import _cache_blocks

    assert _cache_blocks(0, 74, 16) == [16, 32, 48, 64, 74]
    assert _cache_blocks(0, 16, 4) == [4, 8, 12, 16]
    assert _cache_blocks(8, 17, 4) == [12, 16, 17]  # a prompt of 8 slots: the first new token goes to slot 8
    assert _cache_blocks(0, 16, 16) == _cache_blocks(0, 16, 40) == _cache_blocks(0, 16, None) == [16]
    with pytest.raises(ValueError, match="cache_block must be a positive integer"):
        greedy_decode(Transformer(CONFIG, rngs=nnx.Rngs(0)), SRC, 3, cache_block=0, **IDS)
    with pytest.raises(ValueError, match="compact_rows must be a positive integer"):
        greedy_decode(Transformer(CONFIG, rngs=nnx.Rngs(0)), SRC, 3, compact_rows=0, **IDS)


@pytest.mark.parametrize("encoding", ["learned", "sinusoidal"])
def test_decoding_past_max_len_is_a_clear_error(encoding):
    # Decoding a source of length 5 with max_extra 4 runs the decoder over positions 0 … 8. A learned
    # table of max_len = 8 rows has no row 8 (the gather would give NaN); sinusoids have the same
    # limit, as the model's own check of input lengths does for both encodings.
    config = dataclasses.replace(CONFIG, positional_encoding=encoding, max_len=8)
    model = Transformer(config, rngs=nnx.Rngs(1))
    message = r"src length 5 \+ max_extra 4 = 9 decoder positions > max_len=8 .*max_extra to at most 3"
    with pytest.raises(ValueError, match=message):
        greedy_decode(model, SRC, max_extra=4, **IDS)
    with pytest.raises(ValueError, match=message):
        greedy_decode(model, SRC, max_extra=4, use_cache=False, **IDS)
    with pytest.raises(ValueError, match=message):
        beam_search(model, SRC, 2, 0.6, max_extra=4, **IDS)
    lm = TransformerLM(config, rngs=nnx.Rngs(2))
    with pytest.raises(ValueError, match=r"prompt length 3 \+ max_new_tokens 6 = 9 .*max_len=8"):
        generate(lm, SRC[:, :3], max_new_tokens=6, **IDS)
    if encoding == "learned":  # at the limit every position has its row: finite scores, full length
        tokens, log_prob = greedy_decode(model, SRC, max_extra=3, **IDS)
        assert tokens.shape == (2, 8) and np.isfinite(np.asarray(log_prob)).all()


def test_search_uses_the_special_ids_it_is_given(model):
    # Relabel the vocabulary (pad 0 <-> 5, BOS 2 <-> 7, EOS 3 <-> 10) in a copy of the model whose
    # config.pad_id is 5 and whose embedding row perm[i] is the original's row i: its outputs must
    # be the relabelled outputs of the original, with padding 5 after its end token 10.
    perm = np.arange(CONFIG.vocab_size)
    for a, b in ((PAD_ID, 5), (BOS_ID, 7), (EOS_ID, 10)):
        perm[a], perm[b] = b, a
    relabelled = Transformer(dataclasses.replace(CONFIG, pad_id=5), rngs=nnx.Rngs(0))
    nnx.update(relabelled, nnx.state(model))
    E = relabelled.src_embed.token_embedding.embedding
    E[...] = E[...][np.argsort(perm)]
    src = jnp.asarray(perm[np.asarray(SRC)])
    ids = dict(bos_id=int(perm[BOS_ID]), eos_id=int(perm[EOS_ID]))
    greedy, log_prob = greedy_decode(model, SRC, max_extra=5, **IDS)
    greedy_r, log_prob_r = greedy_decode(relabelled, src, max_extra=5, **ids)
    np.testing.assert_array_equal(np.asarray(greedy_r), perm[np.asarray(greedy)])
    np.testing.assert_allclose(np.asarray(log_prob_r), np.asarray(log_prob), atol=1e-5)
    assert (np.asarray(greedy) == PAD_ID).any()  # the comparison covers padding after the end
    beams, scores = beam_search(model, SRC, 3, 0.6, 4, **IDS)
    beams_r, scores_r = beam_search(relabelled, src, 3, 0.6, 4, **ids)
    np.testing.assert_array_equal(np.asarray(beams_r), perm[np.asarray(beams)])
    np.testing.assert_allclose(np.asarray(scores_r), np.asarray(scores), atol=1e-5)


def test_each_public_name_is_one_thing():
    # The package's `translate` is the search function, not a submodule of the same name.
    import transformer.decoding as decoding
    from transformer.decoding.families import translate

    assert decoding.translate is translate and callable(decoding.translate)
    for name in decoding.__all__:
        assert callable(getattr(decoding, name)), name
