"""Text translation in batches: the batch plan (`plan_batches`) against its token budget and its
bound on shapes; the same translations whether batches are counted in sentences or in tokens; and a
line translated the same alone and beside longer lines (an over-long one cut, with a warning)."""

import numpy as np
import pytest
from flax import nnx

from transformer import Transformer, TransformerConfig
from transformer.data import BUCKET_STEP
from transformer.data.tokenizer import EOS_ID, CharTokenizer
from transformer.decoding import translate_batches
from transformer.decoding.text import plan_batches


def _check_plan(plan, lengths, max_len, max_extra, batch_size, batch_tokens):
    members = sorted(i for _, _, batch, _ in plan for i in batch)
    assert members == list(range(len(lengths)))  # every sentence once
    fits = max_len - max_extra
    for length, extra, batch, rows in plan:
        assert 1 <= len(batch) <= rows <= batch_size
        assert all(lengths[i] <= length for i in batch)
        if extra == max_extra and all(lengths[i] <= fits for i in batch):
            assert length <= fits  # no row's limit lowered for its batch
        else:  # rows that max_len cuts: one length, unpadded, the rest of max_len to decode
            assert {lengths[i] for i in batch} == {length} and length > fits and extra == max_len - length
        if batch_tokens is not None:
            assert rows * length <= batch_tokens or rows == 1
            assert rows & (rows - 1) == 0 or rows == batch_size  # a power of two
    # One shape per padded length in a call.
    assert len({(length, rows) for length, _, _, rows in plan}) == len({length for length, _, _, _ in plan})


@pytest.mark.parametrize("max_len, max_extra, batch_size, batch_tokens", [
    (40, 10, 4, None), (40, 10, 64, 64), (40, 10, 6, 100), (40, 10, 64, 5), (256, 50, 64, 1024), (16, 20, 8, 32),
])
def test_batches_hold_every_sentence_within_the_budget_in_few_shapes(max_len, max_extra, batch_size, batch_tokens):
    rng = np.random.default_rng(0)
    shapes = set()
    for n in (1, 3, 17, 200):
        lengths = rng.integers(1, max_len + 1, n).tolist()
        plan = plan_batches(lengths, max_len, max_extra, batch_size, batch_tokens)
        _check_plan(plan, lengths, max_len, max_extra, batch_size, batch_tokens)
        shapes |= {(length, rows) for length, _, _, rows in plan}
        if batch_tokens is None:
            assert all(rows == batch_size for *_, rows in plan)
        else:  # full batches: only a length's last batch has fewer sentences than rows
            last = {length: batch for length, _, batch, _ in plan}
            assert all(len(batch) == rows or batch is last[length] for length, _, batch, rows in plan)
    # Over all calls: padded lengths (multiples of BUCKET_STEP or max_len - max_extra, and the lengths
    # max_len cuts), each with powers of two up to batch_size (or batch_size) as row counts.
    fits = max(max_len - max_extra, 0)
    row_counts = 1 if batch_tokens is None else batch_size.bit_length() + 1
    assert len(shapes) <= (-(-fits // BUCKET_STEP) + 1 + min(max_extra, max_len)) * row_counts


def test_a_batch_plan_worked_by_hand():
    # max_len 40, max_extra 10: lengths up to 30 fit; 33 and 40 are cut to their own batches.
    lengths = [3, 9, 40, 5, 12, 33, 7, 16, 2, 33]
    assert plan_batches(lengths, 40, 10, batch_size=3) == [
        (8, 10, [8, 0, 3], 3), (16, 10, [6, 1, 4], 3), (16, 10, [7], 3), (33, 7, [5, 9], 3), (40, 0, [2], 3)]
    # 40 tokens: 4 rows of 8 (of 5 there, 3 rows of 8 would be 24 tokens but 3 is no power of two),
    # 2 rows of 16, 1 row of 33 or 40 (2 x 33 > 40).
    assert plan_batches(lengths, 40, 10, batch_size=64, batch_tokens=40) == [
        (8, 10, [8, 0, 3, 6], 4), (16, 10, [1, 4], 2), (16, 10, [7], 2), (33, 7, [5], 1), (33, 7, [9], 1),
        (40, 0, [2], 1)]
    # A length's few sentences get no more rows than the power of two at or above their count.
    assert plan_batches([5, 6, 7], 40, 10, batch_size=64, batch_tokens=4096) == [(8, 10, [0, 1, 2], 4)]


@pytest.mark.parametrize("batch_size, batch_tokens", [(0, None), (4, 0), (4, -8)])
def test_a_batch_without_room_is_an_error(batch_size, batch_tokens):
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_batches([3, 4], 40, 10, batch_size, batch_tokens)


ALPHABET = "abcdefgh"
MAX_LEN, MAX_EXTRA = 40, 10


@pytest.fixture(scope="module")
def model():
    config = TransformerConfig(vocab_size=len(ALPHABET) + 4, d_model=16, d_ff=24, h=2, N=1, max_len=MAX_LEN,
                               dropout_rate=0.0)
    m = Transformer(config, rngs=nnx.Rngs(5))
    # The end token's logit 0 (a zero embedding, tied output projection): outputs run to their limits,
    # so a limit lowered for a batch would show.
    E = m.src_embed.token_embedding.embedding
    E[...] = (E[...] * 4.0).at[EOS_ID].set(0.0)
    return m


def test_batches_in_tokens_translate_as_batches_in_sentences(model, capsys):
    rng = np.random.default_rng(1)
    # Lengths 1 to 30 tokens (their limits fit in max_len), 33 (max_len cuts its limit), and one line
    # longer than max_len, cut to it.
    sizes = [0, 2, 5, 6, 7, 9, 12, 15, 20, 23, 28, 29, 32, 32, 60]
    texts = ["".join(rng.choice(list(ALPHABET), n)) for n in sizes]
    texts = [texts[i] for i in rng.permutation(len(texts))]
    tokenizer = CharTokenizer(ALPHABET)
    by_sentences = translate_batches(model, tokenizer, texts, 1, 0.6, MAX_EXTRA, batch_size=4)
    # 48 tokens: 4 rows of 8, 2 of 16 or 24, 1 of 30 or more; 1 token: every sentence alone.
    for batch_tokens in (48, 1):
        assert translate_batches(model, tokenizer, texts, 1, 0.6, MAX_EXTRA, batch_size=4,
                                 batch_tokens=batch_tokens) == by_sentences
    limits = [min(min(len(t), MAX_LEN - 1) + 1 + MAX_EXTRA, MAX_LEN) - 1 for t in texts]
    assert [len(t) for t in by_sentences] == limits  # every output at its own limit
    assert len(capsys.readouterr().err.splitlines()) == 3  # the long line's warning, once a call


SHORT = "abc"  # 3 + 1 tokens: limit 4 + 10 = 14 tokens, 13 letters before the forced end token
MEDIUM = "abcdefgh" * 3  # 24 + 1: limit 35 (fits in max_len 40), 34 letters
NEAR = "hgfedcba" * 4  # 32 + 1: 33 + 10 > 40, so max_len cuts the limit to 40: 39 letters
LONG = "abcdefgh" * 50  # 400 letters: cut to 39 (+ end = max_len), limit 40: 39 letters


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_line_translates_the_same_alone_and_beside_long_lines(model, capsys, beam_size):
    tokenizer = CharTokenizer(ALPHABET)
    alone = {text: translate_batches(model, tokenizer, [text], beam_size, 0.6, MAX_EXTRA, batch_size=4)[0]
             for text in (SHORT, MEDIUM, NEAR)}
    assert capsys.readouterr().err == ""
    texts = [SHORT, NEAR, LONG, MEDIUM, SHORT]
    together = translate_batches(model, tokenizer, texts, beam_size, 0.6, MAX_EXTRA, batch_size=4)
    assert together[0] == together[4] == alone[SHORT]
    assert together[3] == alone[MEDIUM] and together[1] == alone[NEAR]
    # The over-long line is translated as its first max_len - 1 tokens, with a warning naming it.
    cut = translate_batches(model, tokenizer, [LONG[: MAX_LEN - 1]], beam_size, 0.6, MAX_EXTRA, batch_size=4)
    assert together[2] == cut[0]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: line 3 has 400 tokens but the model takes at most 39 (max_len 40, with the end "
                   "token): only its first 39 are translated"]
    lengths = [len(t) for t in together]
    if beam_size == 1:  # greedy never ends early here (see the fixture): every output is at its limit
        assert lengths == [13, 39, 39, 34, 13]
    else:
        assert all(n <= limit for n, limit in zip(lengths, [13, 39, 39, 34, 13]))
