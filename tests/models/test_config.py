import dataclasses

import pytest

from transformer import ConfigError, TransformerConfig


def test_defaults_are_the_paper_base_model():
    c = TransformerConfig()
    assert (c.N, c.d_model, c.d_ff, c.h, c.head_sizes, c.dropout_rate) == (6, 512, 2048, 8, (64, 64), 0.1)
    assert (c.d_k, c.d_v) == (None, None)  # d_model / h, following d_model and h
    assert c.norm_position == "post" and c.share_embeddings and c.positional_encoding == "sinusoidal"
    assert TransformerConfig.base() == c


def test_big_preset():
    c = TransformerConfig.big()
    assert (c.N, c.d_model, c.d_ff, c.h, c.head_sizes, c.dropout_rate) == (6, 1024, 4096, 16, (64, 64), 0.3)


def test_frozen_and_replace():
    c = TransformerConfig.tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.d_model = 3
    assert dataclasses.replace(c, N=3).N == 3
    # Unset head sizes follow d_model and h; set ones stay.
    assert dataclasses.replace(c, d_model=128).head_sizes == (32, 32)
    assert dataclasses.replace(c, d_k=8).head_sizes == (8, 16)
    assert dataclasses.replace(c, d_k=8, d_v=24, d_model=100).head_sizes == (8, 24)  # d_model need not divide by h


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(d_model=30, h=4), ["d_model=30", "h=4", "multiple of h"]),
        (dict(dropout_rate=1.0), ["dropout_rate", "[0, 1)"]),
        (dict(dropout_rate=-0.1), ["dropout_rate"]),
        (dict(d_ff=0), ["d_ff", "positive integer"]),
        (dict(N=-2), ["N must be"]),
        (dict(vocab_size=2.5), ["vocab_size"]),
        (dict(pad_id=99), ["pad_id", "vocab_size=64"]),
        (dict(norm_position="middle"), ["norm_position", "post, pre"]),
        (dict(dtype="float16"), ["dtype", "float32, bfloat16"]),
        (dict(attention_impl="flash"), ["attention_impl", "reference, xla, cudnn, pallas, auto"]),
        # A config written before the rename says what each new value runs.
        (dict(attention_impl="fused"), ["'fused' was renamed", "'xla'", "'cudnn'", "'auto'", "'reference'"]),
        (dict(attention_impl="xla", attention_dropout_rate=0.1), ["attention_impl='reference' or 'auto'"]),
        (dict(attention_impl="cudnn", dtype="float32"), ["dtype='bfloat16'", "'auto' or 'xla'"]),
        (dict(attention_impl="cudnn", dtype="bfloat16", d_model=48, h=4), ["multiple of 8", "d_k=12"]),
        (dict(attention_impl="cudnn", dtype="bfloat16", d_k=512, d_v=512), ["at most 256", "d_k=512", "'auto'"]),
        (dict(attention_impl="cudnn", dtype="bfloat16", d_k=8, d_v=20), ["max(d_k, d_v)", "d_v=20"]),
        (dict(d_k=0), ["d_k must be a positive integer"]),
        (dict(d_v=2.5), ["d_v must be a positive integer"]),
        (dict(d_model=30, h=4, d_k=8), ["d_model=30", "or set d_k and d_v"]),
    ],
)
def test_impossible_values_name_the_field(overrides, words):
    with pytest.raises(ConfigError) as err:
        TransformerConfig.tiny(**overrides)
    for word in words:
        assert word in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="tiny, base, big"):
        TransformerConfig.preset("huge")


def test_table3_lines_are_the_papers():
    base = TransformerConfig.base()
    a1 = TransformerConfig.table3("A", 1)
    assert (a1.h, a1.head_sizes) == (1, (512, 512)) and dataclasses.replace(a1, h=8, d_k=None, d_v=None) == base
    assert TransformerConfig.table3("A", 4).head_sizes == (16, 16) and TransformerConfig.table3("A", 4).h == 32
    assert TransformerConfig.table3("B", 1).head_sizes == (16, 64)
    assert TransformerConfig.table3("C", 4).d_model == 256 and TransformerConfig.table3("C", 4).head_sizes == (32, 32)
    assert TransformerConfig.table3("C", 3).N == 8
    assert TransformerConfig.table3("D", 2).dropout_rate == 0.2
    assert TransformerConfig.table3("D", 3) == base  # label smoothing is the recipe's
    assert TransformerConfig.table3("E", 1).positional_encoding == "learned"
    # The preset names of train.py's --config; overrides apply on top.
    assert TransformerConfig.preset("C5", vocab_size=100) == TransformerConfig.table3("C", 5, vocab_size=100)
    with pytest.raises(ConfigError, match="A1-A4, B1-B2, C1-C7, D1-D4, E1-E1"):
        TransformerConfig.table3("B", 3)
