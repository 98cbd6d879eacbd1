import dataclasses

import pytest

from transformer import ConfigError, TransformerConfig


def test_defaults_are_the_paper_base_model():
    c = TransformerConfig()
    assert (c.N, c.d_model, c.d_ff, c.h, c.d_k, c.d_v, c.dropout_rate) == (6, 512, 2048, 8, 64, 64, 0.1)
    assert c.norm_position == "post" and c.share_embeddings and c.positional_encoding == "sinusoidal"
    assert TransformerConfig.base() == c


def test_big_preset():
    c = TransformerConfig.big()
    assert (c.N, c.d_model, c.d_ff, c.h, c.d_k, c.dropout_rate) == (6, 1024, 4096, 16, 64, 0.3)


def test_frozen_and_replace():
    c = TransformerConfig.tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.d_model = 3
    assert dataclasses.replace(c, N=3).N == 3


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
