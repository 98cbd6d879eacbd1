"""Model FLOPs of the encoder-decoder and the decoder-only model, for throughput and MFU figures.

Every matrix multiply counts 2 FLOPs per multiply-add. For one example with source length S,
target length T, d = d_model, V = vocabulary, and the attention widths a = h·d_k (queries, keys)
and o = h·d_v (values, the input of W^O), per layer:

  encoder:  2·S·d·(2a + o) + 2·S·o·d          (W^Q, W^K, W^V; W^O)
          + 2·S²·(a + o)                      (Q·Kᵀ and weights·V)
          + 2·2·S·d·d_ff                      (FFN)
  decoder:  2·T·d·(2a + o) + 2·T·o·d + 2·T²·(a + o)       (masked self-attention, computed in full)
          + 2·T·d·a + 2·T·o·d + 2·S·d·(a + o)            (cross-attention: W^Q, W^O on targets; W^K, W^V on sources)
          + 2·T·S·(a + o)                                (cross-attention scores and weighted sum)
          + 2·2·T·d·d_ff                                 (FFN)
  output:   2·T·d·V                           (pre-softmax projection)

With the paper's d_k = d_v = d_model / h (a = o = d) these are the familiar 4·2·S·d² + 2·2·S²·d + ….

The decoder-only model (`TransformerLM`) over rows of length L has, per layer, the encoder's terms
with S = L (its masked self-attention counted over the full L×L, as the decoder's is above), and
the output projection 2·L·d·V.

Training is counted as 3× the forward pass (the backward pass costs two matrix multiplies per
forward one). Embedding look-ups, softmax, LayerNorm and the optimizer are not matrix multiplies
and are left out, as is usual for MFU.
"""

from __future__ import annotations

from transformer.config import TransformerConfig

# Peak dense matrix throughput (FLOP/s) of known devices, per compute dtype.
# float32 matrix multiplies run as TF32 on NVIDIA tensor cores (XLA's default precision there).
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float32": 494e12},
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "V100": {"bfloat16": 125e12, "float32": 15.7e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
}


def forward_flops(config: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> float:
    """Matrix-multiply FLOPs of one forward pass over [batch, src_len] sources, [batch, tgt_len] targets."""
    d, d_ff, S, T = config.d_model, config.d_ff, src_len, tgt_len
    d_k, d_v = config.head_sizes
    a, o = config.h * d_k, config.h * d_v
    encoder = 2 * S * d * (2 * a + o) + 2 * S * o * d + 2 * S * S * (a + o) + 2 * 2 * S * d * d_ff
    decoder = (2 * T * d * (2 * a + o) + 2 * T * o * d + 2 * T * T * (a + o)
               + 2 * T * d * a + 2 * T * o * d + 2 * S * d * (a + o) + 2 * T * S * (a + o)
               + 2 * 2 * T * d * d_ff)
    output = 2 * T * d * config.vocab_size
    return float(batch * (config.N * (encoder + decoder) + output))


def train_flops(config: TransformerConfig, batch: int, src_len: int, tgt_len: int) -> float:
    """Forward + backward: 3× the forward FLOPs."""
    return 3.0 * forward_flops(config, batch, src_len, tgt_len)


def lm_forward_flops(config: TransformerConfig, batch: int, length: int) -> float:
    """Matrix-multiply FLOPs of one forward pass of the decoder-only model over [batch, length] tokens:
    per layer W^Q, W^K, W^V, W^O, Q·Kᵀ and weights·V and the FFN, then the tied output projection.
    The causal self-attention is counted over the full length × length scores (no halving for the
    masked half), as `forward_flops` counts the encoder-decoder's masked self-attention."""
    d, d_ff, L = config.d_model, config.d_ff, length
    d_k, d_v = config.head_sizes
    a, o = config.h * d_k, config.h * d_v
    layer = 2 * L * d * (2 * a + o) + 2 * L * o * d + 2 * L * L * (a + o) + 2 * 2 * L * d * d_ff
    output = 2 * L * d * config.vocab_size
    return float(batch * (config.N * layer + output))


def lm_train_flops(config: TransformerConfig, batch: int, length: int) -> float:
    """Forward + backward of the decoder-only model: 3× its forward FLOPs."""
    return 3.0 * lm_forward_flops(config, batch, length)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The peak of a known device (matched by name, e.g. "NVIDIA H100 80GB HBM3"), else None."""
    for name, peaks in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None
