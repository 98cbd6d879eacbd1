"""The model's hyper-parameters: one frozen dataclass whose defaults are the paper's base model.

Table 3 of the paper ("base"): N=6, d_model=512, d_ff=2048, h=8, d_k=d_v=64, P_drop=0.1.
Variants are made with `dataclasses.replace` or the presets `base()`, `big()`, `tiny()` and
`table3(row, line)` (every model variation of Table 3, rows (A)-(E)).
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
    # §3.2.2: the size of each head's queries/keys (d_k) and values (d_v). None = d_model / h, the
    # paper's choice for its base and big models (and it follows d_model and h under
    # `dataclasses.replace`); Table 3 rows (A) and (B) set them apart from d_model / h.
    d_k: int | None = dataclasses.field(default=None, metadata={"help": "per-head query/key size (default: d_model / h)"})
    d_v: int | None = dataclasses.field(default=None, metadata={"help": "per-head value size (default: d_model / h)"})
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
        for name in ("d_k", "d_v"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer (or None for d_model / h), got {value!r}")
        if (self.d_k is None or self.d_v is None) and self.d_model % self.h:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by h={self.h}: choose d_model a multiple of h "
                f"(d_k = d_v = d_model / h), or set d_k and d_v"
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
        if self.attention_impl == "cudnn" and (self.dtype != "bfloat16" or self.kernel_head_size % 8
                                               or self.kernel_head_size > 256):
            d_k, d_v = self.head_sizes
            raise ConfigError(
                f"attention_impl='cudnn' needs dtype='bfloat16' and a head size max(d_k, d_v) that is a multiple "
                f"of 8 and at most 256 (got dtype={self.dtype!r}, d_k={d_k}, d_v={d_v}): change them or use "
                f"attention_impl='auto' or 'xla'"
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
    def head_sizes(self) -> tuple[int, int]:
        """(d_k, d_v) as the model uses them: the fields, or §3.2.2's d_k = d_v = d_model / h where None."""
        return (self.d_model // self.h if self.d_k is None else self.d_k,
                self.d_model // self.h if self.d_v is None else self.d_v)

    @property
    def kernel_head_size(self) -> int:
        """The head size that `jax.nn.dot_product_attention` ("xla", "cudnn") is given: max(d_k, d_v),
        since it takes one size for queries, keys and values (the shorter ones are zero-padded)."""
        return max(self.head_sizes)

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
    def table3(cls, row: str, line: int, **overrides) -> "TransformerConfig":
        """Table 3 of the paper, row `row` ("A" to "E"), its `line`-th line (from 1): the base model
        with that line's changes (`TABLE3`). Lines D3 and D4 vary label smoothing, a training
        setting (`TABLE3_LABEL_SMOOTHING`), so their model is the base model."""
        name = f"{row}{line}"
        if name not in TABLE3:
            rows = ", ".join(f"{r}1-{r}{sum(n.startswith(r) for n in TABLE3)}" for r in "ABCDE")
            raise ConfigError(f"Table 3 has no line {row!r} {line!r}: choose one of {rows}")
        return cls(**{**TABLE3[name], **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> "TransformerConfig":
        """The preset called `name`: "tiny", "base", "big", or a Table 3 line such as "B1"."""
        presets = {"tiny": cls.tiny, "base": cls.base, "big": cls.big}
        if name in TABLE3:
            return cls.table3(name[0], int(name[1:]), **overrides)
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(presets)}, or a Table 3 line "
                              f"({', '.join(TABLE3)})")
        return presets[name](**overrides)

    @property
    def compute_dtype(self):
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)


# Table 3 of the paper, "Variations on the Transformer architecture": each line changes the base
# model (N=6, d_model=512, d_ff=2048, h=8, d_k=d_v=64, P_drop=0.1, ε_ls=0.1) in the values given;
# the names are the row's letter and the line's number within it. Parameter counts beside the
# paper's: README.md, "Table 3".
TABLE3: dict[str, dict] = {
    # (A) the number of heads, keeping h·d_k = h·d_v = d_model (the same computation).
    "A1": dict(h=1, d_k=512, d_v=512),
    "A2": dict(h=4, d_k=128, d_v=128),
    "A3": dict(h=16, d_k=32, d_v=32),
    "A4": dict(h=32, d_k=16, d_v=16),
    # (B) a smaller attention key size d_k (d_v stays 64).
    "B1": dict(d_k=16),
    "B2": dict(d_k=32),
    # (C) bigger and smaller models.
    "C1": dict(N=2),
    "C2": dict(N=4),
    "C3": dict(N=8),
    "C4": dict(d_model=256, d_k=32, d_v=32),
    "C5": dict(d_model=1024, d_k=128, d_v=128),
    "C6": dict(d_ff=1024),
    "C7": dict(d_ff=4096),
    # (D) dropout, then label smoothing (a training setting: TABLE3_LABEL_SMOOTHING).
    "D1": dict(dropout_rate=0.0),
    "D2": dict(dropout_rate=0.2),
    "D3": dict(),
    "D4": dict(),
    # (E) learned positional embeddings instead of sinusoids.
    "E1": dict(positional_encoding="learned"),
}
# Table 3 (D): ε_ls of the label-smoothing lines (the training recipe's `label_smoothing`).
TABLE3_LABEL_SMOOTHING: dict[str, float] = {"D3": 0.0, "D4": 0.2}
