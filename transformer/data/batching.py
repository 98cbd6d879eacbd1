"""Tokenised examples, batched by token count with length buckets (§5.1: "sentence pairs were
batched together by approximate sequence length"), optionally packed several per row. Host work
is NumPy; deterministic in (seed, epoch), so that a resumed run sees the batches it would have seen."""

from __future__ import annotations

import collections
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


def _pack(examples: Examples, order: Sequence[int], length: int) -> list[list[int]]:
    """Next-fit packing: examples in the given order fill a row until one side would overflow."""
    packed, row, s_used, t_used = [], [], 0, 0
    for i in order:
        s, t = len(examples.src[i]), len(examples.tgt[i])
        if row and (s_used + s > length or t_used + t > length):
            packed.append(row)
            row, s_used, t_used = [], 0, 0
        row.append(i)
        s_used, t_used = s_used + s, t_used + t
    if row:
        packed.append(row)
    return packed


class BatchPlan:
    """The batches of one pass over the data, as (length, rows, members) plans; deterministic in
    (seed, epoch) so that a resumed run sees exactly the batches it would have seen."""

    def __init__(self, examples: Examples, batch_tokens: int, max_length: int, multiple: int,
                 packing: bool = False, seed: int = 0, shuffle: bool = True):
        if len(examples) == 0:
            raise DataError("no examples left after length filtering: raise --max_length or check the data")
        self.examples, self.batch_tokens, self.multiple = examples, batch_tokens, multiple
        self.packing, self.seed, self.shuffle = packing, seed, shuffle
        self.max_length = _round_up(max_length, BUCKET_STEP)
        rows_per_batch(batch_tokens, self.max_length, multiple)  # the longest bucket must fit

    def epoch(self, epoch: int) -> list[tuple[int, int, list]]:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.examples)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        plans = []
        if self.packing:
            length = self.max_length
            rows = rows_per_batch(self.batch_tokens, length, self.multiple)
            packed = _pack(self.examples, order, length)
            for start in range(0, len(packed), rows):
                plans.append((length, rows, packed[start : start + rows]))
        else:
            buckets: dict[int, list[int]] = collections.defaultdict(list)
            for i in order:
                longest = max(len(self.examples.src[i]), len(self.examples.tgt[i]))
                buckets[_round_up(longest, BUCKET_STEP)].append(int(i))
            for length in sorted(buckets):
                rows = rows_per_batch(self.batch_tokens, length, self.multiple)
                members = buckets[length]
                for start in range(0, len(members), rows):
                    plans.append((length, rows, members[start : start + rows]))
        if self.shuffle:
            plans = [plans[i] for i in rng.permutation(len(plans))]
        return plans

    def collate(self, plan, rows: slice | None = None) -> dict[str, np.ndarray]:
        """The batch of `plan`, or only its rows `rows` (a process of a multi-process run builds
        only the rows its devices take)."""
        length, n_rows, members = plan
        if rows is not None:
            start, stop, _ = rows.indices(n_rows)
            members, n_rows = members[start:stop], stop - start
        ids = dict(pad_id=self.examples.pad_id, bos_id=self.examples.bos_id)
        if self.packing:
            return _collate_packed(self.examples, members, length, n_rows, **ids)
        return _collate(self.examples, members, length, n_rows, **ids)

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
