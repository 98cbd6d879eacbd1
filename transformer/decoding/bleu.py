"""BLEU as the field reports it: sacreBLEU's corpus BLEU on detokenised text, with its signature."""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class BleuScore:
    score: float
    signature: str
    text: str  # sacreBLEU's own one-line report


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> BleuScore:
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} translations but {len(references)} references: they must pair up line by line")
    bleu = BLEU()
    result = bleu.corpus_score(list(hypotheses), [list(references)])
    return BleuScore(result.score, str(bleu.get_signature()), str(result))
