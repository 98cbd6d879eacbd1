"""Padding anywhere: every family's outputs at a row's real tokens are those of the row alone with
its pads removed, whether the pads stand left, between or right of the real tokens; right_padded=True
(per-row lengths, the kernels' form) gives the same as the general path on right-padded rows."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpy_reference import decoder_only_lm
from transformer import Transformer, TransformerClassifier, TransformerConfig, TransformerLM, TransformerMLM
from transformer.nn.attention import resolve_attention_impl
from transformer.nn.masks import real_positions, self_attention_mask

# Vocabulary 23, d_model 16, d_ff 24, h 2 (d_k = 8); batch 3, source length 7, target length 6.
CONFIG = TransformerConfig.tiny(vocab_size=23, d_model=16, d_ff=24, h=2, N=2, max_len=32)
PAD = CONFIG.pad_id

# Three rows with 5, 4 and 3 real tokens: padded left, left and between and right, and right.
SRC_REAL = [[5, 6, 7, 8, 9], [10, 11, 12, 13], [14, 15, 16]]
SRC = jnp.array([[0, 0, 5, 6, 7, 8, 9], [0, 10, 11, 0, 12, 13, 0], [14, 15, 16, 0, 0, 0, 0]], jnp.int32)
SRC_RIGHT = jnp.array([row + [PAD] * (7 - len(row)) for row in SRC_REAL], jnp.int32)
# Targets (begin token 2 first) of 3, 5 and 2 real tokens, padded left, between, and right.
TGT_REAL = [[2, 17, 18], [2, 19, 20, 21, 22], [2, 4]]
TGT = jnp.array([[0, 0, 0, 2, 17, 18], [2, 19, 0, 20, 21, 22], [2, 4, 0, 0, 0, 0]], jnp.int32)
TGT_RIGHT = jnp.array([row + [PAD] * (6 - len(row)) for row in TGT_REAL], jnp.int32)


def _real(row):
    return np.flatnonzero(np.asarray(row) != PAD)


def test_real_positions_and_the_general_key_mask_by_hand():
    tokens = jnp.array([[0, 5, 0, 6, 7], [5, 6, 0, 0, 0]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(real_positions(tokens, PAD)), [[0, 0, 0, 1, 2], [0, 1, 0, 0, 0]])
    mask = self_attention_mask(tokens, PAD, causal=True, right_padded=False)
    assert mask.kv_lengths is None and mask.dense.shape == (2, 1, 1, 5)
    np.testing.assert_array_equal(np.asarray(mask.to_dense(5, 5))[0, 0],
                                  [[0, 0, 0, 0, 0],  # a left pad sees no key at or before it
                                   [0, 1, 0, 0, 0],
                                   [0, 1, 0, 0, 0],
                                   [0, 1, 0, 1, 0],
                                   [0, 1, 0, 1, 1]])
    # The dense key mask goes to XLA; per-row lengths (right_padded) keep cuDNN where it serves.
    gpu = TransformerConfig.tiny(attention_impl="auto", dtype="bfloat16")
    right = self_attention_mask(tokens, PAD, causal=True)
    assert resolve_attention_impl(gpu, "gpu", dense_mask=mask.dense is not None) == "xla"
    assert resolve_attention_impl(gpu, "gpu", dense_mask=right.dense is not None) == "cudnn"


def test_language_model_rows_padded_anywhere_equal_each_row_alone():
    lm = TransformerLM(CONFIG, rngs=nnx.Rngs(0))
    xla = TransformerLM(dataclasses.replace(CONFIG, attention_impl="xla"), rngs=nnx.Rngs(0))
    batch, batch_xla = np.asarray(lm(SRC)), np.asarray(xla(SRC))
    # Left pads attend to nothing; their logits are meaningless but finite in both implementations.
    assert np.isfinite(batch).all() and np.isfinite(batch_xla).all()
    for i, real in enumerate(SRC_REAL):
        alone = np.asarray(lm(jnp.array([real], jnp.int32)))[0]
        np.testing.assert_allclose(batch[i, _real(SRC[i])], alone, atol=1e-5)
        np.testing.assert_allclose(batch_xla[i, _real(SRC[i])], alone, atol=1e-5)
    right = np.asarray(lm(SRC_RIGHT))
    fast = np.asarray(lm(SRC_RIGHT, right_padded=True))
    real = np.asarray(SRC_RIGHT) != PAD
    np.testing.assert_allclose(fast[real], right[real], atol=1e-6)


def test_language_model_interior_padded_row_equals_numpy():
    lm = TransformerLM(CONFIG, rngs=nnx.Rngs(1))
    row = jnp.array([[9, 0, 4, 0, 0, 13, 6]], jnp.int32)  # real tokens 9, 4, 13, 6 at positions 0 … 3
    got = np.asarray(lm(row))[0, [0, 2, 5, 6]]
    f64 = lambda x: np.asarray(x[...], np.float64)  # noqa: E731
    layers = [dict(Wq=f64(layer.self_attention.w_q), Wk=f64(layer.self_attention.w_k),
                   Wv=f64(layer.self_attention.w_v), Wo=f64(layer.self_attention.w_o),
                   W1=f64(layer.feed_forward.linear_1.kernel), b1=f64(layer.feed_forward.linear_1.bias),
                   W2=f64(layer.feed_forward.linear_2.kernel), b2=f64(layer.feed_forward.linear_2.bias),
                   norm1=(f64(layer.self_attention_residual.norm.scale), f64(layer.self_attention_residual.norm.bias)),
                   norm2=(f64(layer.feed_forward_residual.norm.scale), f64(layer.feed_forward_residual.norm.bias)))
              for layer in lm.decoder.layers]
    expected = decoder_only_lm([9, 4, 13, 6], f64(lm.embed.token_embedding.embedding), layers)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_encoder_decoder_rows_padded_anywhere_equal_each_row_alone():
    model = Transformer(CONFIG, rngs=nnx.Rngs(2))
    batch = np.asarray(model(SRC, TGT))
    assert np.isfinite(batch).all()
    for i in range(3):
        alone = np.asarray(model(jnp.array([SRC_REAL[i]]), jnp.array([TGT_REAL[i]])))[0]
        np.testing.assert_allclose(batch[i, _real(TGT[i])], alone, atol=1e-5)
    # encode and decode, called apart, are the same computation.
    memory = model.encode(SRC)
    np.testing.assert_allclose(np.asarray(model.decode(memory, SRC, TGT)), batch, atol=1e-6)
    real = np.asarray(TGT_RIGHT) != PAD
    fast = np.asarray(model(SRC_RIGHT, TGT_RIGHT, right_padded=True))
    np.testing.assert_allclose(fast[real], np.asarray(model(SRC_RIGHT, TGT_RIGHT))[real], atol=1e-6)


def test_classifier_probabilities_do_not_depend_on_pads():
    clf = TransformerClassifier(CONFIG, num_classes=4, rngs=nnx.Rngs(3))
    probabilities = np.asarray(jax.nn.softmax(clf(SRC)))
    for i, real in enumerate(SRC_REAL):
        alone = np.asarray(jax.nn.softmax(clf(jnp.array([real]))))[0]
        np.testing.assert_allclose(probabilities[i], alone, atol=1e-6)
    fast = np.asarray(jax.nn.softmax(clf(SRC_RIGHT, right_padded=True)))
    np.testing.assert_allclose(fast, probabilities, atol=1e-6)


def test_masked_language_model_rows_padded_anywhere_equal_each_row_alone():
    mlm = TransformerMLM(CONFIG, rngs=nnx.Rngs(4))
    batch = np.asarray(mlm(SRC))
    for i, real in enumerate(SRC_REAL):
        alone = np.asarray(mlm(jnp.array([real])))[0]
        np.testing.assert_allclose(batch[i, _real(SRC[i])], alone, atol=1e-5)
    real = np.asarray(SRC_RIGHT) != PAD
    fast = np.asarray(mlm(SRC_RIGHT, right_padded=True))
    np.testing.assert_allclose(fast[real], np.asarray(mlm(SRC_RIGHT))[real], atol=1e-6)


@pytest.mark.parametrize("family", ["lm", "mlm"])
def test_packed_rows_keep_their_segments_whatever_right_padded_says(family):
    # Two examples (3 and 2 tokens) and a pad in one row: segments and positions say it all.
    model = (TransformerLM if family == "lm" else TransformerMLM)(CONFIG, rngs=nnx.Rngs(5))
    row = jnp.array([[5, 6, 7, 8, 9, 0]], jnp.int32)
    packed = dict(segments=jnp.array([[1, 1, 1, 2, 2, 0]]), positions=jnp.array([[0, 1, 2, 0, 1, 0]]))
    general, fast = np.asarray(model(row, **packed)), np.asarray(model(row, right_padded=True, **packed))
    np.testing.assert_array_equal(general, fast)
    np.testing.assert_allclose(general[0, 3:5], np.asarray(model(jnp.array([[8, 9]])))[0], atol=1e-5)
