"""Tokenizers: SentencePiece for real text (§5.1 uses a shared source-target vocabulary), and a
character vocabulary for the embedded synthetic task. Both use the same special ids."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable, Protocol

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _strip(ids: Iterable[int]) -> list[int]:
    """Ids up to the first end token, without padding or begin tokens."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS_ID:
            break
        if i not in (PAD_ID, BOS_ID):
            out.append(i)
    return out


class SentencePieceTokenizer:
    """A SentencePiece model (unigram by default) trained on the training text of both languages."""

    FILE = "spm.model"

    def __init__(self, model_file: str):
        import sentencepiece as spm

        self.model_file = model_file
        self.processor = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.processor.get_piece_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, workdir: str, model_type: str = "unigram",
              max_sentences: int = 2_000_000) -> "SentencePieceTokenizer":
        import sentencepiece as spm

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
        return self.processor.decode(_strip(ids))


class CharTokenizer:
    """One token per character of a fixed alphabet (for the generated task; no training needed)."""

    FILE = "chars.json"

    def __init__(self, alphabet: str):
        self.alphabet = alphabet
        self.ids = {c: i + 4 for i, c in enumerate(alphabet)}
        self.vocab_size = len(alphabet) + 4

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(c, UNK_ID) for c in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.alphabet[i - 4] if i >= 4 else "?" for i in _strip(ids))

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
