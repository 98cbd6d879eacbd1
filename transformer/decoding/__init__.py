"""§6.1 Inference: greedy and beam search over token ids, text-to-text translation, and BLEU."""

from transformer.decoding.search import (
    beam_search, check_decode_length, generate, greedy_decode, length_penalty, nucleus, translate,
)
from transformer.decoding.text import translate_batches, translation_attention

__all__ = ["beam_search", "check_decode_length", "generate", "greedy_decode", "length_penalty", "nucleus",
           "translate", "translate_batches", "translation_attention"]
