"""Tokenizers: SentencePiece for real text (§5.1: byte-pair encoding with a shared source-target
vocabulary), and a character vocabulary for the embedded synthetic task.

The tokenizer is the one source of truth for the special ids: every tokenizer has `pad_id`,
`unk_id`, `bos_id` and `eos_id` attributes; the model's config takes its pad id from them, batches
are padded with it, and decoding is given its begin and end ids. Both tokenizers here use the ids
below (SentencePiece models are trained with them)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable, Protocol

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def pieces(self, ids: Iterable[int]) -> list[str]: ...


MODEL_TYPES = ("bpe", "unigram")


def _strip(ids: Iterable[int], tokenizer: Tokenizer) -> list[int]:
    """Ids up to the first end token, without padding or begin tokens."""
    out = []
    for i in ids:
        i = int(i)
        if i == tokenizer.eos_id:
            break
        if i not in (tokenizer.pad_id, tokenizer.bos_id):
            out.append(i)
    return out


class SentencePieceTokenizer:
    """A SentencePiece model trained on the training text of both languages: byte-pair encoding by
    default (§5.1), or SentencePiece's unigram language model. Its special ids are read from the
    model file."""

    FILE = "spm.model"

    def __init__(self, model_file: str):
        import sentencepiece as spm

        self.model_file = model_file
        self.processor = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.processor.get_piece_size()
        self.pad_id, self.unk_id = self.processor.pad_id(), self.processor.unk_id()
        self.bos_id, self.eos_id = self.processor.bos_id(), self.processor.eos_id()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, workdir: str, model_type: str = "bpe",
              max_sentences: int = 2_000_000) -> "SentencePieceTokenizer":
        """Train on `texts` and save `spm.model` in workdir.

        `vocab_size` is an upper limit (hard_vocab_limit=False, for BPE as for unigram): a corpus too
        small for it gives a smaller vocabulary instead of an error, and the model's vocab_size is
        taken from the tokenizer. character_coverage=1.0 keeps every character of the text (no
        character becomes UNK); the four special ids are reserved at PAD_ID … EOS_ID."""
        import sentencepiece as spm

        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}; got {model_type!r}")

        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
            for n, text in enumerate(texts):
                if n >= max_sentences:
                    break
                f.write(text.replace("\n", " ") + "\n")
            corpus = f.name
        prefix = os.path.join(workdir, cls.FILE[: -len(".model")])
        try:
            spm.SentencePieceTrainer.train(
                input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
                pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, character_coverage=1.0,
                hard_vocab_limit=False, minloglevel=2, num_threads=os.cpu_count() or 1,
            )
        finally:
            os.remove(corpus)
        return cls(prefix + ".model")

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # SentencePiece encodes a list on all cores at once.
        return self.processor.encode(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode(_strip(ids, self))

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """The vocabulary's piece for each id, special ids included (e.g. "▁Hund", "</s>")."""
        return [self.processor.id_to_piece(int(i)) for i in ids]


class CharTokenizer:
    """One token per character of a fixed alphabet (for the generated task; no training needed)."""

    FILE = "chars.json"
    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, alphabet: str):
        self.alphabet = alphabet
        self.ids = {c: i + 4 for i, c in enumerate(alphabet)}  # after the four special ids
        self.vocab_size = len(alphabet) + 4

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(c, self.unk_id) for c in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.alphabet[i - 4] if i >= 4 else "?" for i in _strip(ids, self))

    SPECIAL_PIECES = ("<pad>", "<unk>", "<s>", "</s>")  # PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """Each id's character, or the name of a special id."""
        return [self.alphabet[i - 4] if i >= 4 else self.SPECIAL_PIECES[i] for i in map(int, ids)]

    def save(self, workdir: str) -> None:
        with open(os.path.join(workdir, self.FILE), "w") as f:
            json.dump({"alphabet": self.alphabet}, f)

    @classmethod
    def load(cls, workdir: str) -> "CharTokenizer":
        with open(os.path.join(workdir, cls.FILE)) as f:
            return cls(json.load(f)["alphabet"])


def load_tokenizer(workdir: str) -> Tokenizer | None:
    """The tokenizer a run saved in its work dir, or None if it has none yet."""
    if os.path.exists(os.path.join(workdir, SentencePieceTokenizer.FILE)):
        return SentencePieceTokenizer(os.path.join(workdir, SentencePieceTokenizer.FILE))
    if os.path.exists(os.path.join(workdir, CharTokenizer.FILE)):
        return CharTokenizer.load(workdir)
    return None
