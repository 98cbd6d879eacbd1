"""Tokenised examples, batched by token count with length buckets (§5.1: "sentence pairs were
batched together by approximate sequence length"), optionally packed several per row: sentence
pairs for translation (`BatchPlan`), and the pieces of documents or labelled texts of the text
tasks (`TextPlan`), both planned by one `_Plan`. Host work is NumPy; deterministic in (seed,
epoch), so that a resumed run sees the batches it would have seen."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from transformer.data.corpus import DataError, Pair
from transformer.data.tokenizer import Tokenizer

BUCKET_STEP = 8  # bucket lengths are multiples of 8 (fewer shapes to compile, little padding)


# ---------------------------------------------------------------------------------------------
# Tokenised examples and batches
# ---------------------------------------------------------------------------------------------


@dataclass
class Examples:
    """Tokenised pairs: source ids end with EOS; target ids end with EOS (the decoder input is
    BOS + target without its EOS). `pad_id` and `bos_id` are those of the tokenizer that made them,
    for the batches built from them."""

    src: list[np.ndarray]
    tgt: list[np.ndarray]
    pad_id: int
    bos_id: int

    def __len__(self):
        return len(self.src)


def encode_pairs(pairs: Sequence[Pair], tokenizer: Tokenizer, max_length: int) -> Examples:
    """Tokenise and drop pairs whose source or target (with EOS) is longer than max_length."""
    src, tgt = [], []
    src_ids = tokenizer.encode_batch([s for s, _ in pairs])
    tgt_ids = tokenizer.encode_batch([t for _, t in pairs])
    for s_ids, t_ids in zip(src_ids, tgt_ids):
        # Both sides end with EOS; empty sentences (EOS alone) and over-long ones are dropped.
        if 0 < len(s_ids) < max_length and 0 < len(t_ids) < max_length:
            src.append(np.asarray(s_ids + [tokenizer.eos_id], np.int32))
            tgt.append(np.asarray(t_ids + [tokenizer.eos_id], np.int32))
    return Examples(src, tgt, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def rows_per_batch(batch_tokens: int, length: int, multiple: int) -> int:
    """Rows of `length` tokens in a batch of about batch_tokens tokens per side, a multiple of
    `multiple` (the number of devices, so that every device gets the same share)."""
    rows = (batch_tokens // length) // multiple * multiple
    if rows == 0:
        raise DataError(
            f"a batch of {batch_tokens} tokens holds {batch_tokens // length} rows of length {length}, which "
            f"{multiple} devices cannot divide: raise --batch_tokens to at least {length * multiple} or lower --max_length"
        )
    return rows


def _collate(examples: Examples, indices: Sequence[int], length: int, rows: int, pad_id: int,
             bos_id: int) -> dict[str, np.ndarray]:
    """Unpacked batch: one example per row, padded with pad_id to `length`; missing rows are all
    padding."""
    batch = {k: np.full((rows, length), pad_id, np.int32) for k in ("src", "tgt_in", "tgt_out")}
    for r, i in enumerate(indices):
        s, t = examples.src[i], examples.tgt[i]
        batch["src"][r, : len(s)] = s
        batch["tgt_in"][r, 0] = bos_id
        batch["tgt_in"][r, 1 : len(t)] = t[:-1]
        batch["tgt_out"][r, : len(t)] = t
    return batch


def _collate_packed(examples: Examples, packed_rows: Sequence[Sequence[int]], length: int, rows: int,
                    pad_id: int, bos_id: int) -> dict[str, np.ndarray]:
    """Packed batch: several examples per row, with segment ids (1, 2, …; 0 = padding) and
    positions restarting at 0 for every example; the rest of each row is pad_id."""
    tokens, meta = ("src", "tgt_in", "tgt_out"), ("src_segments", "tgt_segments", "src_positions", "tgt_positions")
    batch = {k: np.full((rows, length), pad_id, np.int32) for k in tokens}
    batch.update({k: np.zeros((rows, length), np.int32) for k in meta})
    for r, members in enumerate(packed_rows):
        s_at = t_at = 0
        for seg, i in enumerate(members, start=1):
            s, t = examples.src[i], examples.tgt[i]
            batch["src"][r, s_at : s_at + len(s)] = s
            batch["src_segments"][r, s_at : s_at + len(s)] = seg
            batch["src_positions"][r, s_at : s_at + len(s)] = np.arange(len(s))
            batch["tgt_in"][r, t_at] = bos_id
            batch["tgt_in"][r, t_at + 1 : t_at + len(t)] = t[:-1]
            batch["tgt_out"][r, t_at : t_at + len(t)] = t
            batch["tgt_segments"][r, t_at : t_at + len(t)] = seg
            batch["tgt_positions"][r, t_at : t_at + len(t)] = np.arange(len(t))
            s_at, t_at = s_at + len(s), t_at + len(t)
    return batch


def _pack(lengths: np.ndarray, order: np.ndarray, length: int) -> list[list[int]]:
    """Next-fit packing: examples in the given order fill a row until one of their sequences would
    overflow its row of `length` positions. `lengths[i]` holds example i's length in each of its
    rows (translation: source and target; a text task: one)."""
    packed, row = [], []
    if lengths.shape[1] == 1:  # one row per example (the text tasks): a plain sum, 5x faster (lm1b: 30M pieces)
        used = 0
        for i, n in zip(order.tolist(), lengths[order, 0].tolist()):
            if row and used + n > length:
                packed.append(row)
                row, used = [], 0
            row.append(i)
            used += n
    else:
        used = [0] * lengths.shape[1]
        for i, ns in zip(order.tolist(), lengths[order].tolist()):
            if row and any(u + n > length for u, n in zip(used, ns)):
                packed.append(row)
                row, used = [], [0] * len(used)
            row.append(i)
            used = [u + n for u, n in zip(used, ns)]
    if row:
        packed.append(row)
    return packed


class _Plan:
    """The batches of one pass over examples known by their lengths, as (length, rows, members)
    plans: shuffled (or not) in an order drawn from (seed, epoch), then either packed next-fit into
    rows of `row_length` positions (members: the examples of each row) or grouped in buckets of
    BUCKET_STEP positions (members: one example per row). Each batch holds rows_per_batch rows; the
    batches are shuffled too. Deterministic in (seed, epoch), so that a resumed run sees exactly the
    batches it would have seen. Subclasses build a batch from its plan (`_collate`)."""

    def __init__(self, lengths: np.ndarray, batch_tokens: int, row_length: int, multiple: int,
                 packing: bool, seed: int, shuffle: bool):
        self.lengths = np.asarray(lengths, np.int64).reshape(len(lengths), -1)  # [examples, rows per example]
        self.batch_tokens, self.row_length, self.multiple = batch_tokens, row_length, multiple
        self.packing, self.seed, self.shuffle = packing, seed, shuffle
        rows_per_batch(batch_tokens, row_length, multiple)  # the longest bucket must fit
        longest = self.lengths.max(axis=1)
        rounded = -(-longest // BUCKET_STEP) * BUCKET_STEP
        # A row length need not be a multiple of BUCKET_STEP (a language model's seq_len): no
        # bucket of examples that fit a row is longer than the row. (Hand-made translation
        # examples longer than their rows keep a bucket of their own length, as they always had.)
        self.bucket = np.where(longest <= row_length, np.minimum(rounded, row_length), rounded)

    def epoch(self, epoch: int) -> list[tuple[int, int, list]]:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        plans = []
        if self.packing:
            length = self.row_length
            rows = rows_per_batch(self.batch_tokens, length, self.multiple)
            packed = _pack(self.lengths, order, length)
            for start in range(0, len(packed), rows):
                plans.append((length, rows, packed[start : start + rows]))
        else:
            bucket = self.bucket[order]
            for length in np.unique(bucket).tolist():  # ascending; members keep the epoch's order
                rows = rows_per_batch(self.batch_tokens, length, self.multiple)
                members = order[bucket == length].tolist()
                for start in range(0, len(members), rows):
                    plans.append((length, rows, members[start : start + rows]))
        if self.shuffle:
            plans = [plans[i] for i in rng.permutation(len(plans))]
        return plans

    def _collate(self, members: list, length: int, rows: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def collate(self, plan, rows: slice | None = None) -> dict[str, np.ndarray]:
        """The batch of `plan`, or only its rows `rows` (a process of a multi-process run builds
        only the rows its devices take)."""
        length, n_rows, members = plan
        if rows is not None:
            start, stop, _ = rows.indices(n_rows)
            members, n_rows = members[start:stop], stop - start
        return self._collate(members, length, n_rows)

    def batches(self, start: int = 0, epochs: int | None = None,
                rows: Callable[[int], slice] | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(position, batch) from global batch number `start` on; forever unless `epochs` is given.
        With `rows`, only the rows `rows(global_rows)` of each batch are built."""
        position = 0
        for epoch in itertools.count() if epochs is None else range(epochs):
            plans = self.epoch(epoch)
            if position + len(plans) <= start:
                position += len(plans)
                continue
            for plan in plans:
                if position >= start:
                    yield position, self.collate(plan, None if rows is None else rows(plan[1]))
                position += 1


class BatchPlan(_Plan):
    """The batches of one pass over sentence pairs (`_Plan`), rows of max_length rounded up to
    BUCKET_STEP; a packed row holds whole pairs while both its source and its target fit."""

    def __init__(self, examples: Examples, batch_tokens: int, max_length: int, multiple: int,
                 packing: bool = False, seed: int = 0, shuffle: bool = True):
        if len(examples) == 0:
            raise DataError("no examples left after length filtering: raise --max_length or check the data")
        self.examples = examples
        self.max_length = _round_up(max_length, BUCKET_STEP)
        lengths = np.array([[len(s), len(t)] for s, t in zip(examples.src, examples.tgt)], np.int64)
        super().__init__(lengths, batch_tokens, self.max_length, multiple, packing, seed, shuffle)

    def _collate(self, members, length, rows):
        ids = dict(pad_id=self.examples.pad_id, bos_id=self.examples.bos_id)
        if self.packing:
            return _collate_packed(self.examples, members, length, rows, **ids)
        return _collate(self.examples, members, length, rows, **ids)


# ---------------------------------------------------------------------------------------------
# Text tasks: a language model, a masked language model, classification
# ---------------------------------------------------------------------------------------------

LM, MLM, CLASSIFY = "lm", "mlm", "classify"

_ENCODE_CHUNK = 65_536  # texts tokenised at a time: bounds the Python lists of one call


@dataclass
class TextExamples:
    """Tokenised examples of a text task, stored one after another in `tokens`: example i is
    `tokens[starts[i] : starts[i] + sizes[i]]` (examples may overlap: a language model's pieces of a
    document share one token). `kind` is LM, MLM or CLASSIFY; `labels` (int32, one per example)
    only for CLASSIFY. `pad_id` is that of the tokenizer that made them, for their batches."""

    kind: str
    tokens: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    pad_id: int
    labels: np.ndarray | None = None

    def __len__(self):
        return len(self.starts)

    def example(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i] : self.starts[i] + self.sizes[i]]

    @property
    def positions(self) -> np.ndarray:
        """The row positions each example takes: a language-model piece of n tokens gives n - 1
        inputs (and n - 1 targets, the same tokens one later); the other kinds, their n tokens."""
        return self.sizes - 1 if self.kind == LM else self.sizes


def _join(texts: Sequence[str], tokenizer: Tokenizer, bos: bool, max_ids: int | None,
          keep_empty: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each text as `[bos] + ids + [eos]` (bos only if `bos`; ids cut to their first max_ids, all
    if None), stored one after another; texts with no ids are dropped unless keep_empty.
    Returns (tokens int32, starts int64, sizes int64) of the texts kept, in order."""
    chunks, sizes = [], []
    head = [tokenizer.bos_id] if bos else []
    for first in range(0, len(texts), _ENCODE_CHUNK):
        encoded = tokenizer.encode_batch(list(texts[first : first + _ENCODE_CHUNK]))
        seqs = [head + ids[:max_ids] + [tokenizer.eos_id] for ids in encoded if ids or keep_empty]
        sizes.extend(len(seq) for seq in seqs)
        # One array per chunk, not per text: a corpus of millions of short texts stays compact.
        chunks.append(np.fromiter(itertools.chain.from_iterable(seqs), np.int32, sum(map(len, seqs))))
    sizes = np.asarray(sizes, np.int64)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    return tokens, np.cumsum(sizes) - sizes, sizes


def encode_documents(docs: Sequence[str], tokenizer: Tokenizer, length: int, kind: str = LM) -> TextExamples:
    """Tokenise documents for a language model (kind LM) or a masked language model (kind MLM),
    cut into pieces that fit rows of `length` positions. Documents with no ids are dropped.

    LM: a document is `[bos] + ids + [eos]`, cut into pieces of at most length + 1 tokens, piece k
    starting at token k * length: consecutive pieces share one token (the last target of one is the
    first input of the next), so that every token after bos is the target of exactly one piece.
    MLM: a document is `ids + [eos]`, cut into consecutive pieces of at most `length` tokens.
    Every piece is an example of its own (its positions start at 0 in a batch)."""
    if kind not in (LM, MLM):
        raise ValueError(f"kind must be {LM!r} or {MLM!r}; got {kind!r}")
    if length < 1:
        raise ValueError(f"length must be at least 1; got {length}")
    causal = int(kind == LM)
    tokens, doc_start, doc_size = _join(docs, tokenizer, bos=bool(causal), max_ids=None, keep_empty=False)
    # Piece k of a document starts k * length tokens in; an LM piece reaches one token further
    # (its last target). A document has as many pieces as it takes to cover its targets (LM: every
    # token but bos) or its tokens (MLM).
    counts = -(-(doc_size - causal) // length)
    doc_of = np.repeat(np.arange(len(counts)), counts)
    k = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    starts = doc_start[doc_of] + k * length
    sizes = np.minimum(length + causal, doc_size[doc_of] - k * length)
    return TextExamples(kind, tokens, starts, sizes, pad_id=tokenizer.pad_id)


def encode_labelled(texts: Sequence[str], labels: Sequence[int], tokenizer: Tokenizer, max_length: int) -> TextExamples:
    """Tokenise labelled texts for classification: each text is `ids + [eos]` with its ids cut to
    their first max_length - 1, so that every example ends with eos and has at most max_length
    tokens. A text with no ids is kept (eos alone): every text keeps its label."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1; got {max_length}")
    tokens, starts, sizes = _join(texts, tokenizer, bos=False, max_ids=max_length - 1, keep_empty=True)
    return TextExamples(CLASSIFY, tokens, starts, sizes, pad_id=tokenizer.pad_id,
                        labels=np.asarray(labels, np.int32).reshape(len(texts)))


class TextPlan(_Plan):
    """The batches of one pass over a text task's examples (`_Plan`; the same `epoch`, `collate` and
    `batches`), in rows of at most max_length positions (exactly max_length when packed; buckets of
    BUCKET_STEP positions up to max_length when not), padded with pad_id.

    LM: tokens_in, tokens_out, segments, positions, all int32 [rows, length]: a piece's tokens but
    its last, and its tokens but its first (the next-token targets).
    MLM: tokens, segments, positions, int32 [rows, length].
    In both, segments number the examples of a row 1, 2, … (0 = padding; 1 for the one example of
    an unpacked row) and positions restart at 0 for each: nothing need attend across examples.
    CLASSIFY (never packed): tokens int32 [rows, length], labels int32 [rows], weights float32 [rows]:
    1 for a row that holds an example, 0 for the filler rows (all padding, label 0) that complete
    the last batch of a bucket."""

    def __init__(self, examples: TextExamples, batch_tokens: int, max_length: int, multiple: int,
                 packing: bool = False, seed: int = 0, shuffle: bool = True):
        if len(examples) == 0:
            raise DataError("no examples: the data has no text")
        if packing and examples.kind == CLASSIFY:
            raise DataError("classification examples cannot be packed (one label per row): turn packing off")
        longest = int(examples.positions.max())
        if longest > max_length:
            raise ValueError(f"an example takes {longest} positions but rows have {max_length}: "
                             "encode the examples with the length of the plan")
        self.examples = examples
        super().__init__(examples.positions, batch_tokens, max_length, multiple, packing, seed, shuffle)

    def _collate(self, members, length, rows):
        ex = self.examples
        row_members = members if self.packing else [[i] for i in members]
        if ex.kind == CLASSIFY:
            batch = {"tokens": np.full((rows, length), ex.pad_id, np.int32),
                     "labels": np.zeros(rows, np.int32), "weights": np.zeros(rows, np.float32)}
            for r, (i,) in enumerate(row_members):
                tokens = ex.example(i)
                batch["tokens"][r, : len(tokens)] = tokens
                batch["labels"][r], batch["weights"][r] = ex.labels[i], 1.0
            return batch
        causal = ex.kind == LM
        names = ("tokens_in", "tokens_out") if causal else ("tokens",)
        batch = {k: np.full((rows, length), ex.pad_id, np.int32) for k in names}
        batch.update(segments=np.zeros((rows, length), np.int32), positions=np.zeros((rows, length), np.int32))
        for r, row in enumerate(row_members):
            at = 0
            for segment, i in enumerate(row, start=1):
                piece = ex.example(i)
                n = len(piece) - causal
                if causal:
                    batch["tokens_in"][r, at : at + n] = piece[:-1]
                    batch["tokens_out"][r, at : at + n] = piece[1:]
                else:
                    batch["tokens"][r, at : at + n] = piece
                batch["segments"][r, at : at + n] = segment
                batch["positions"][r, at : at + n] = np.arange(n)
                at += n
        return batch
