"""Sources of parallel text: tensorflow-datasets, a local folder of plain-text files, or the embedded
string-reversal task. TensorFlow is imported only where tfds reads a dataset."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

Pair = tuple[str, str]


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
# Generated text for the other tasks' offline demos (the same 20 letters as the reverse task)
# ---------------------------------------------------------------------------------------------


def counting_documents(num: int, seed: int, min_len: int = 4, max_len: int = 16) -> list[str]:
    """Documents that count through the alphabet with a stride: a random first letter and a stride
    of 1, 2 or 3 letters (wrapping around), e.g. "cfiloradg". After its first two letters every
    letter of a document is determined, so a language model (or a masked LM, from the neighbours)
    can learn to predict it exactly."""
    rng = np.random.default_rng(seed)
    size = len(REVERSE_ALPHABET)
    documents = []
    for length, first, stride in zip(rng.integers(min_len, max_len + 1, num), rng.integers(0, size, num),
                                     rng.integers(1, 4, num)):
        documents.append("".join(REVERSE_ALPHABET[(first + stride * i) % size] for i in range(length)))
    return documents


MAJORITY_CLASSES = ["a-j", "k-t"]


def majority_examples(num: int, seed: int, min_len: int = 5, max_len: int = 15) -> tuple[list[str], list[int]]:
    """Labelled strings for the classifier's demo: an odd number of letters, labelled by which half
    of the alphabet most of them come from (class 0 "a-j", class 1 "k-t")."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(REVERSE_ALPHABET))
    half = len(REVERSE_ALPHABET) // 2
    texts, labels = [], []
    for length in rng.integers(min_len // 2, max_len // 2 + 1, num) * 2 + 1:
        ids = rng.integers(0, len(REVERSE_ALPHABET), length)
        texts.append("".join(letters[ids]))
        labels.append(int((ids >= half).sum() > length // 2))
    return texts, labels
