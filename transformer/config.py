"""The model's hyper-parameters: one frozen dataclass whose defaults are the paper's base model.

Table 3 of the paper ("base"): N=6, d_model=512, d_ff=2048, h=8, d_k=d_v=64, P_drop=0.1.
Variants are made with `dataclasses.replace` or the presets `base()`, `big()` and `tiny()`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ATTENTION_IMPLS = ("reference", "xla", "cudnn", "pallas", "auto")
POSITIONAL_ENCODINGS = ("sinusoidal", "learned")
NORM_POSITIONS = ("post", "pre")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of the encoder-decoder (and of the LM / classifier built from its layers).

    Defaults are the paper's base model (§3, Table 3) with the 37k shared BPE vocabulary of §5.1.
    """

    vocab_size: int = 37000
    d_model: int = 512
    d_ff: int = 2048
    h: int = 8
    N: int = 6
    # §5.4 "Residual Dropout": on each sub-layer output and on the embedding + encoding sums.
    dropout_rate: float = 0.1
    # Departure (off by default): dropout on the attention weights, as tensor2tensor allows.
    attention_dropout_rate: float = 0.0
    # Longest sequence the learned position table covers; sinusoids need no limit but are
    # checked against it too so that both encodings accept the same inputs.
    max_len: int = 1024
    pad_id: int = 0
    # §3.4: one matrix for source embedding, target embedding and pre-softmax projection.
    share_embeddings: bool = True
    positional_encoding: Literal["sinusoidal", "learned"] = "sinusoidal"
    # §3.1 post-LN: LayerNorm(x + Sublayer(x)). "pre" (x + Sublayer(LayerNorm(x))) is a departure.
    norm_position: Literal["post", "pre"] = "post"
    # Which code computes §3.2.1 (transformer/nn/attention.py): "reference" (the formula written out),
    # "xla" or "cudnn" (jax.nn.dot_product_attention with that implementation; "cudnn" is cuDNN's
    # flash attention and needs a GPU), "pallas" (JAX's Pallas splash-attention kernel for TPUs,
    # nn/pallas_attention.py; interpret mode, slow, on other devices), or "auto" (on a TPU the
    # Pallas kernel, elsewhere cuDNN where it supports the device, dtype, head size and mask; else
    # XLA; never fails). `attention.resolve_attention_impl` says what runs.
    attention_impl: Literal["reference", "xla", "cudnn", "pallas", "auto"] = "reference"
    # Compute dtype of activations and matrix multiplies; parameters, optimizer state, gradients,
    # logits, softmax and LayerNorm statistics stay float32 (README.md, "Precision").
    dtype: Literal["float32", "bfloat16"] = "float32"
    layer_norm_epsilon: float = 1e-6
    # Activation rematerialisation per encoder/decoder layer in training (not in the paper; memory
    # for compute): "none" keeps every activation for the backward pass; "full" keeps only each
    # layer's input and recomputes the rest; "dots" keeps the matrix-multiply outputs and recomputes
    # the cheap element-wise work (jax.checkpoint_policies.dots_saveable). The results are the same.
    remat: Literal["none", "full", "dots"] = "none"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_ff", "h", "N", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.h:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by h={self.h}: choose d_model a multiple of h "
                f"(d_k = d_v = d_model / h)"
            )
        for name in ("dropout_rate", "attention_dropout_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if self.attention_impl == "fused":
            raise ConfigError(
                "attention_impl='fused' was renamed: use 'xla' (what 'fused' ran), 'cudnn' (cuDNN flash "
                "attention, GPU only), 'auto' (the fastest the device supports) or 'reference'"
            )
        if self.attention_impl in ("xla", "cudnn", "pallas") and self.attention_dropout_rate > 0:
            raise ConfigError(
                f"attention_dropout_rate > 0 needs attention_impl='reference' or 'auto' "
                f"(jax.nn.dot_product_attention and the Pallas kernel have no dropout); "
                f"got attention_impl={self.attention_impl!r}"
            )
        if self.attention_impl == "cudnn" and (self.dtype != "bfloat16" or self.d_k % 8 or self.d_k > 256):
            raise ConfigError(
                f"attention_impl='cudnn' needs dtype='bfloat16' and a head size d_k = d_model / h that is a "
                f"multiple of 8 and at most 256 (got dtype={self.dtype!r}, d_k={self.d_k}): change them or "
                f"use attention_impl='auto' or 'xla'"
            )
        if not isinstance(self.pad_id, int) or not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError(f"pad_id must be a token id in [0, vocab_size={self.vocab_size}), got {self.pad_id!r}")
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")
        for name, allowed in (
            ("positional_encoding", POSITIONAL_ENCODINGS),
            ("norm_position", NORM_POSITIONS),
            ("attention_impl", ATTENTION_IMPLS),
            ("dtype", DTYPES),
            ("remat", REMAT_POLICIES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    @property
    def d_k(self) -> int:
        """§3.2.2: d_k = d_v = d_model / h."""
        return self.d_model // self.h

    @property
    def d_v(self) -> int:
        return self.d_model // self.h

    @classmethod
    def base(cls, **overrides) -> "TransformerConfig":
        """Table 3, "base": N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1."""
        return cls(**overrides)

    @classmethod
    def big(cls, **overrides) -> "TransformerConfig":
        """Table 3, "big": N=6, d_model=1024, d_ff=4096, h=16, P_drop=0.3."""
        return cls(**{"d_model": 1024, "d_ff": 4096, "h": 16, "dropout_rate": 0.3, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "TransformerConfig":
        """Not from the paper: a small model for CPU tests and demos."""
        return cls(**{"vocab_size": 64, "d_model": 64, "d_ff": 256, "h": 4, "N": 2, "max_len": 128, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> "TransformerConfig":
        """The preset called `name` ("tiny", "base" or "big")."""
        presets = {"tiny": cls.tiny, "base": cls.base, "big": cls.big}
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(presets)}")
        return presets[name](**overrides)

    @property
    def compute_dtype(self):
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)
