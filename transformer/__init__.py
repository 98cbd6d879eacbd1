"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017) as Flax NNX modules."""

from transformer.nn.attention import (
    MultiHeadAttention, attention_weights, dot_product_attention, record_attention_weights, resolve_attention_impl,
    scaled_dot_product_attention,
)
from transformer.config import ConfigError, TransformerConfig
from transformer.nn.embeddings import InputEmbedding, TokenEmbedding, sinusoidal_positional_encoding
from transformer.nn.feed_forward import PositionwiseFeedForward
from transformer.nn.layers import Decoder, DecoderLayer, Encoder, EncoderLayer, ResidualSublayer
from transformer.nn.masks import AttentionMask, attention_masks, causal_mask, padding_mask, segment_mask
from transformer.models.transformer import (
    Transformer, TransformerClassifier, TransformerLM, TransformerMLM, count_parameters,
)

__all__ = [
    "AttentionMask", "ConfigError", "Decoder", "DecoderLayer", "Encoder", "EncoderLayer", "InputEmbedding",
    "MultiHeadAttention", "PositionwiseFeedForward", "ResidualSublayer", "TokenEmbedding", "Transformer",
    "TransformerClassifier", "TransformerConfig", "TransformerLM", "TransformerMLM", "attention_masks",
    "attention_weights", "causal_mask", "count_parameters", "dot_product_attention", "padding_mask", "record_attention_weights", "resolve_attention_impl",
    "scaled_dot_product_attention", "segment_mask", "sinusoidal_positional_encoding",
]
