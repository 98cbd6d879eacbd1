"""§6.1 Inference: greedy and beam search over token ids, text-to-text translation, and BLEU."""

from transformer.decoding.search import (
    beam_search, check_decode_length, generate, greedy_decode, length_penalty, translate,
)
from transformer.decoding.translate import translate_batches

__all__ = ["beam_search", "check_decode_length", "generate", "greedy_decode", "length_penalty", "translate",
           "translate_batches"]
