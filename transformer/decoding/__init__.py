"""§6.1 Inference: greedy decoding, sampling and beam search over token ids for every family that
generates (`search`: the searches; `families`: each family's start and step, and the public
entries), text-to-text translation and continuation (`text`), and BLEU."""

from transformer.decoding.families import beam_search, generate, greedy_decode, translate
from transformer.decoding.search import check_decode_length, length_penalty, nucleus
from transformer.decoding.text import translate_batches, translation_attention

__all__ = ["beam_search", "check_decode_length", "generate", "greedy_decode", "length_penalty", "nucleus",
           "translate", "translate_batches", "translation_attention"]
