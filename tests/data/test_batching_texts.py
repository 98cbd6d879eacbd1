"""Batches of the text tasks: language-model pieces packed or bucketed, masked-LM pieces, labelled
texts; token-bounded, device-divisible, deterministic in (seed, epoch) and resumable."""

import collections

import numpy as np
import pytest

from transformer.data import (
    BUCKET_STEP, CLASSIFY, LM, MLM, DataError, TextPlan, encode_documents, encode_labelled,
)
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


class WordIds:
    """A tokenizer for tests: a text of numbers ("12 13 14") is those ids, so that every token
    can be traced back to its document."""

    pad_id, unk_id, bos_id, eos_id = PAD_ID, 1, BOS_ID, EOS_ID

    def encode_batch(self, texts):
        return [[int(w) for w in t.split()] for t in texts]


def _documents(n, seed, longest=40):
    """n documents of 0 to `longest` ids, every id distinct across documents (ids from 4 on)."""
    rng = np.random.default_rng(seed)
    docs, next_id = [], 4
    for size in rng.integers(0, longest + 1, n):
        docs.append(" ".join(str(i) for i in range(next_id, next_id + size)))
        next_id += size
    return docs


def _segments_of(batch, tokens_key):
    """The token runs of every example of a batch, row by row, checking segments and positions."""
    runs = []
    for r in range(batch["segments"].shape[0]):
        seg, pos = batch["segments"][r], batch["positions"][r]
        used = int((seg > 0).sum())
        assert (seg[used:] == 0).all() and (batch[tokens_key][r, used:] == PAD_ID).all()  # padding at the end
        for s in range(1, int(seg.max(initial=0)) + 1):
            at = np.flatnonzero(seg == s)
            assert len(at) and (np.diff(at) == 1).all()  # one run per segment, numbered in order
            np.testing.assert_array_equal(pos[at], np.arange(len(at)))  # positions restart per example
            runs.append((r, at))
    return runs


@pytest.mark.parametrize("packing", [True, False])
def test_lm_every_token_is_a_target_exactly_once_per_epoch(packing):
    docs = _documents(120, seed=0)
    seq_len = 12
    examples = encode_documents(docs, WordIds(), seq_len, kind=LM)
    sizes = [len(examples.example(i)) for i in range(len(examples))]
    assert max(sizes) <= seq_len + 1 and max(sizes) == seq_len + 1
    plan = TextPlan(examples, 100, seq_len, 4, packing=packing, seed=1)
    targets, inputs = collections.Counter(), collections.Counter()
    rows = 100 // seq_len // 4 * 4
    for _, batch in plan.batches(epochs=1):
        assert set(batch) == {"tokens_in", "tokens_out", "segments", "positions"}
        assert all(v.dtype == np.int32 for v in batch.values())
        length = batch["tokens_in"].shape[1]
        if packing:
            assert batch["tokens_in"].shape == (rows, seq_len)
        else:
            assert length == seq_len or length % BUCKET_STEP == 0
            assert batch["segments"].max() <= 1  # one piece per row
            assert batch["tokens_in"].shape[0] == (100 // length) // 4 * 4
        for r, at in _segments_of(batch, "tokens_in"):
            t_in, t_out = batch["tokens_in"][r, at], batch["tokens_out"][r, at]
            # The target of position p is the input of p + 1: one text, shifted.
            np.testing.assert_array_equal(t_in[1:], t_out[:-1])
            targets.update(t_out.tolist())
            inputs.update(t_in.tolist())
    ids = [int(w) for d in docs for w in d.split()]
    kept = sum(1 for d in docs if d.strip())
    assert targets == collections.Counter(ids + [EOS_ID] * kept)  # every id once, one EOS per document
    assert inputs[BOS_ID] == kept and PAD_ID not in targets
    if packing:
        assert max(b["segments"].max() for _, b in plan.batches(epochs=1)) >= 2  # really packed


def test_lm_pieces_of_a_long_document_share_one_token():
    examples = encode_documents(["4 5 6 7 8 9 10", "", "11"], WordIds(), 3, kind=LM)
    pieces = [examples.example(i).tolist() for i in range(len(examples))]
    assert pieces == [[BOS_ID, 4, 5, 6], [6, 7, 8, 9], [9, 10, EOS_ID], [BOS_ID, 11, EOS_ID]]
    assert examples.positions.tolist() == [3, 3, 2, 2]
    # A document that ends exactly at a piece's end gives no piece of one token.
    examples = encode_documents(["4 5"], WordIds(), 3, kind=LM)
    assert [examples.example(i).tolist() for i in range(len(examples))] == [[BOS_ID, 4, 5, EOS_ID]]


def test_mlm_pieces_have_no_bos_and_are_packed():
    docs = _documents(60, seed=2)
    examples = encode_documents(docs, WordIds(), 16, kind=MLM)
    assert examples.kind == MLM and BOS_ID not in examples.tokens
    assert encode_documents(["4 5 6 7 8"], WordIds(), 2, kind=MLM).sizes.tolist() == [2, 2, 2]
    plan = TextPlan(examples, 128, 16, 2, packing=True, seed=0)
    seen = collections.Counter()
    for _, batch in plan.batches(epochs=1):
        assert set(batch) == {"tokens", "segments", "positions"} and batch["tokens"].shape == (8, 16)
        for r, at in _segments_of(batch, "tokens"):
            # A piece is a document's end (EOS) or a full 16 tokens of a longer one.
            assert batch["tokens"][r, at][-1] == EOS_ID or len(at) == 16
            seen.update(batch["tokens"][r, at].tolist())
    ids = [int(w) for d in docs for w in d.split()]
    assert seen == collections.Counter(ids + [EOS_ID] * sum(1 for d in docs if d.strip()))


def test_text_batches_are_deterministic_per_seed_and_epoch_and_resume():
    examples = encode_documents(_documents(200, seed=3), WordIds(), 16, kind=LM)
    plan = TextPlan(examples, 128, 16, 2, packing=True, seed=7)
    first = [(p, b) for p, b in plan.batches(epochs=2)]
    again = [(p, b) for p, b in TextPlan(examples, 128, 16, 2, packing=True, seed=7).batches(epochs=2)]
    assert [p for p, _ in first] == list(range(len(first)))
    for (_, a), (_, b) in zip(first, again, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    per_epoch = len(plan.epoch(0))
    epoch0, epoch1 = first[:per_epoch], first[per_epoch:]
    assert not np.array_equal(epoch0[0][1]["tokens_in"], epoch1[0][1]["tokens_in"])  # a new order each epoch
    other_seed = next(TextPlan(examples, 128, 16, 2, packing=True, seed=8).batches())[1]
    assert not np.array_equal(other_seed["tokens_in"], first[0][1]["tokens_in"])
    # Resuming at any position, even in the second epoch, gives the same batches from there on.
    for start in (3, per_epoch + 1):
        resumed = list(plan.batches(start=start, epochs=2))
        assert [p for p, _ in resumed] == list(range(start, len(first)))
        for (_, a), (_, b) in zip(resumed, first[start:], strict=True):
            np.testing.assert_array_equal(a["tokens_out"], b["tokens_out"])
    # Each process builds only its rows: together they are the whole batch.
    halves = [list(plan.batches(epochs=1, rows=lambda n, h=h: slice(h * n // 2, (h + 1) * n // 2))) for h in (0, 1)]
    for (_, whole), (_, top), (_, bottom) in zip(first[:per_epoch], *halves, strict=True):
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([top[k], bottom[k]]), whole[k])


def test_lm_rows_need_not_be_a_multiple_of_the_bucket_step():
    examples = encode_documents(_documents(50, seed=4), WordIds(), 13, kind=LM)
    for packing in (True, False):
        lengths = {b["tokens_in"].shape[1] for _, b in TextPlan(examples, 200, 13, 1, packing=packing).batches(epochs=1)}
        assert lengths == {13} if packing else max(lengths) == 13 and lengths - {13} <= {8}


def test_classify_labels_line_up_and_filler_rows_weigh_nothing():
    rng = np.random.default_rng(5)
    texts, labels = [], []
    for n in range(101):
        label = int(rng.integers(0, 3))
        # The first id of a text says its label and its number; texts of 1 to 30 ids.
        texts.append(" ".join(str(100 * (n + 1) + label) for _ in range(int(rng.integers(1, 31)))))
        labels.append(label)
    texts[7] = ""  # an empty text keeps its label: EOS alone
    examples = encode_labelled(texts, labels, WordIds(), max_length=24)
    assert examples.kind == CLASSIFY and examples.example(7).tolist() == [EOS_ID]
    assert max(examples.sizes) == 24 and all(examples.example(i)[-1] == EOS_ID for i in range(len(examples)))
    plan = TextPlan(examples, 96, 24, 2, seed=0)
    counted, weights = collections.Counter(), 0.0
    for _, batch in plan.batches(epochs=1):
        assert set(batch) == {"tokens", "labels", "weights"}
        assert batch["tokens"].dtype == batch["labels"].dtype == np.int32 and batch["weights"].dtype == np.float32
        rows, length = batch["tokens"].shape
        assert rows % 2 == 0 and rows * length <= 96 and batch["labels"].shape == batch["weights"].shape == (rows,)
        for r in range(rows):
            tokens = batch["tokens"][r]
            if batch["weights"][r] == 0:
                assert (tokens == PAD_ID).all() and batch["labels"][r] == 0
                continue
            assert batch["weights"][r] == 1
            if tokens[0] == EOS_ID:
                n, label = 7, labels[7]
            else:
                n, label = divmod(int(tokens[0]), 100)
                n -= 1
            assert batch["labels"][r] == label == labels[n]
            counted[n] += 1
        weights += float(batch["weights"].sum())
    assert weights == len(texts) and counted == collections.Counter(range(len(texts)))


def test_plan_refusals():
    examples = encode_labelled(["4 5", "6"], [0, 1], WordIds(), 8)
    with pytest.raises(DataError, match="classification examples cannot be packed"):
        TextPlan(examples, 64, 8, 1, packing=True)
    with pytest.raises(DataError, match="no examples: the data has no text"):
        TextPlan(encode_documents(["", "  "], WordIds(), 8), 64, 8, 1)
    with pytest.raises(ValueError, match="an example takes 9 positions but rows have 8"):
        TextPlan(encode_documents(["4 5 6 7 8 9 10 11 12 13"], WordIds(), 9), 64, 8, 1)
    with pytest.raises(DataError, match="8 devices cannot divide"):
        TextPlan(encode_documents(["4 5"], WordIds(), 16), 64, 16, 8)
