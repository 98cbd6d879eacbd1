"""Input pipeline: parallel text from tensorflow-datasets, a local folder, or a generated task;
tokenised once, length-filtered, then batched by token count with length buckets (§5.1: "sentence
pairs were batched together by approximate sequence length"), optionally packed several per row.

Host work is NumPy; `prefetch_to_devices` keeps the next batches on the devices while a step runs.
TensorFlow is imported only where tfds reads a dataset.
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from transformer.tokenizer import Tokenizer

Pair = tuple[str, str]
BUCKET_STEP = 8  # bucket lengths are multiples of 8 (fewer shapes to compile, little padding)


class DataError(ValueError):
    """A problem with the user's data or data options; the message says what to fix."""


# ---------------------------------------------------------------------------------------------
# Sources of sentence pairs
# ---------------------------------------------------------------------------------------------

REVERSE_ALPHABET = "abcdefghijklmnopqrst"


def reverse_task_pairs(num: int, seed: int, min_len: int = 4, max_len: int = 12) -> list[Pair]:
    """The embedded task: a random string of letters and its reverse ("abc" -> "cba")."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(REVERSE_ALPHABET))
    pairs = []
    for length in rng.integers(min_len, max_len + 1, num):
        s = "".join(rng.choice(letters, length))
        pairs.append((s, s[::-1]))
    return pairs


def _import_tfds():
    # TensorFlow only reads text here: keep its start-up notices (oneDNN, CPU features) quiet.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:  # pragma: no cover - depends on the install
        raise DataError(
            f"reading datasets needs tensorflow-datasets and TensorFlow ({err}); install them with "
            "pip install '.[data]'"
        ) from None
    return tfds


def _pairs_from_dataset(ds, src_lang: str, tgt_lang: str, tfds, where: str) -> list[Pair]:
    pairs = []
    for n, example in enumerate(tfds.as_numpy(ds), start=1):
        if src_lang not in example or tgt_lang not in example:
            raise DataError(
                f"the dataset has languages {sorted(example)}, not {src_lang!r} and {tgt_lang!r}: "
                "set --src_lang/--tgt_lang"
            )
        try:
            pairs.append((example[src_lang].decode("utf-8"), example[tgt_lang].decode("utf-8")))
        except UnicodeDecodeError:
            raise DataError(f"example {n} of {where} is not valid UTF-8: the dataset must hold UTF-8 text") from None
    _check_usable(pairs, where)
    return pairs


def _check_usable(pairs: Sequence[Pair], where: str) -> None:
    """A split with no pair that has text on both sides would only fail later, far from its cause
    (SentencePiece cannot train on no text; batching finds no examples)."""
    if not pairs:
        raise DataError(f"no sentence pairs in {where}")
    if not any(s.strip() and t.strip() for s, t in pairs):
        raise DataError(f"no sentence pair in {where} has text on both sides (all {len(pairs)} are blank on one side or both)")


def load_tfds_pairs(name: str, split: str, src_lang: str, tgt_lang: str, data_dir: str | None = None) -> list[Pair]:
    """Sentence pairs of a prepared tensorflow-datasets translation dataset (e.g. wmt14_translate/de-en)."""
    tfds = _import_tfds()
    try:
        ds = tfds.load(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # tfds raises several types for "not prepared" / "unknown"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"cannot read tfds dataset {name!r} split {split!r} ({first_line}). Prepare it where there is "
            f"network with `tfds build {name}` (then pass --tfds_data_dir if not the default), or train on "
            "local text files with --dataset_dir DIR ({lang}.{split}.txt)"
        ) from None
    return _pairs_from_dataset(ds, src_lang, tgt_lang, tfds, f"split {split!r} of tfds dataset {name!r}")


def read_text_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file ("-": standard input), split at "\\n" only, with a "\\r"
    before it dropped. Bytes that are not UTF-8 raise DataError naming the file and the line."""
    import sys

    name = "standard input" if path == "-" else path
    lines = []
    with (open(sys.stdin.fileno(), "rb", closefd=False) if path == "-" else open(path, "rb")) as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{name} line {n} is not valid UTF-8 (byte {raw[err.start]:#04x} at byte {err.start + 1} of "
                    "the line): convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            lines.append(text.removesuffix("\n").removesuffix("\r"))
    return lines


def _read_folder_split(root: str, split: str, langs: Sequence[str]) -> dict[str, list[str]]:
    """The lines of {lang}.{split}.txt for each language, checked to pair up."""
    if not os.path.isdir(root):
        raise DataError(f"--dataset_dir {root!r} is not a folder")
    texts = {}
    for lang in langs:
        path = os.path.join(root, f"{lang}.{split}.txt")
        if not os.path.isfile(path):
            raise DataError(f"{path} is missing: the folder needs one {{lang}}.{{split}}.txt file per language and split")
        texts[path] = read_text_lines(path)
        if not texts[path]:
            raise DataError(f"{path} is empty: it needs one sentence per line")
    counts = {p: len(lines) for p, lines in texts.items()}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{os.path.basename(p)} has {n} lines" for p, n in counts.items())
        raise DataError(f"parallel files of split {split!r} differ in length ({detail}): line N of each must translate line N of the other")
    if len(langs) == 2:
        _check_usable(list(zip(*texts.values())), " and ".join(texts))
    return dict(zip(langs, texts.values()))


def check_translate_folder(root: str, splits: Sequence[str], langs: Sequence[str]) -> None:
    """Fail early, naming the file (and line), on a folder whose files cannot pair up: a file missing,
    empty or not UTF-8, parallel files of different lengths, or no pair with text on both sides."""
    for split in splits:
        _read_folder_split(root, split, langs)


def load_folder_pairs(root: str, split: str, src_lang: str, tgt_lang: str) -> list[Pair]:
    """Sentence pairs from {lang}.{split}.txt files (the tfds.TranslateFolder layout): line N of the
    source file and line N of the target file. Read here rather than with tfds.TranslateFolder,
    which loads every file of the folder (a stray file or a bad byte in another split breaks it) and
    also splits lines at characters such as U+2028 that a line count with `wc -l` does not see."""
    texts = _read_folder_split(root, split, [src_lang, tgt_lang])
    return list(zip(texts[src_lang], texts[tgt_lang]))


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

    def collate(self, plan) -> dict[str, np.ndarray]:
        length, rows, members = plan
        ids = dict(pad_id=self.examples.pad_id, bos_id=self.examples.bos_id)
        if self.packing:
            return _collate_packed(self.examples, members, length, rows, **ids)
        return _collate(self.examples, members, length, rows, **ids)

    def batches(self, start: int = 0, epochs: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(position, batch) from global batch number `start` on; forever unless `epochs` is given."""
        position = 0
        for epoch in itertools.count() if epochs is None else range(epochs):
            plans = self.epoch(epoch)
            if position + len(plans) <= start:
                position += len(plans)
                continue
            for plan in plans:
                if position >= start:
                    yield position, self.collate(plan)
                position += 1


def host_shard(batch: dict[str, np.ndarray], process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """This host's rows of a global batch (multi-host data parallelism)."""
    if process_count == 1:
        return batch
    rows = next(iter(batch.values())).shape[0] // process_count
    return {k: v[process_index * rows : (process_index + 1) * rows] for k, v in batch.items()}


def shard_for_devices(batch: dict[str, np.ndarray], n_devices: int) -> dict[str, np.ndarray]:
    """[rows, …] -> [n_devices, rows / n_devices, …] for pmap."""
    def split(x):
        if x.shape[0] % n_devices:
            raise DataError(f"a batch of {x.shape[0]} rows cannot be split across {n_devices} devices")
        return x.reshape(n_devices, x.shape[0] // n_devices, *x.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def put_on_devices(tree, devices):
    """Place arrays whose leading axis is the device axis, one slice per device (pmap's layout)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(np.asarray(devices), ("devices",)), PartitionSpec("devices"))
    return jax.device_put(tree, sharding)


def replicate_on_devices(tree, devices):
    """One identical copy of every array per device, for pmap."""
    import jax

    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))), tree)
    return put_on_devices(stacked, devices)


def prefetch_to_devices(iterator, devices, size: int = 2):
    """Move the next `size` (position, batch) items onto the devices in a background thread, so that
    host work and transfers overlap the running step. One device gets the batch as it is; several
    get [n_devices, rows / n_devices, …] for pmap.

    Close the generator (`.close()`, or let it be collected) when the run ends early: the producer
    thread then stops at its next batch instead of waiting forever on a full queue, holding the
    batches it placed on the devices."""
    import jax

    def place(batch):
        if len(devices) == 1:
            return jax.device_put(batch, devices[0])
        return put_on_devices(shard_for_devices(batch, len(devices)), devices)

    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    closed = threading.Event()

    def put(item) -> bool:
        """Hand `item` over unless the consumer has gone; True if it was handed over."""
        while not closed.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def producer():
        try:
            for position, batch in iterator:
                if closed.is_set() or not put((position, place(batch))):
                    return
        except BaseException as err:  # hand the error to the consumer
            put(err)
            return
        put(done)

    thread = threading.Thread(target=producer, daemon=True, name="prefetch_to_devices")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        closed.set()
        while not q.empty():  # let go of the batches already placed
            q.get_nowait()
        thread.join(timeout=10)
