import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpy_reference import attention, multi_head
from transformer import (
    ConfigError,
    MultiHeadAttention,
    attention_weights,
    TransformerConfig,
    causal_mask,
    dot_product_attention,
    padding_mask,
    resolve_attention_impl,
    scaled_dot_product_attention,
    segment_mask,
)
from transformer.nn.masks import AttentionMask, cross_attention_mask, self_attention_mask

# Every dimension a different size: batch 2, queries 3, keys 5, heads 4, d_k 6 (d_model 24).
B, Q, K, H, D = 2, 3, 5, 4, 6


def _qkv(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, Q, H, D)).astype(np.float32),
            rng.normal(size=(B, K, H, D)).astype(np.float32),
            rng.normal(size=(B, K, H, D)).astype(np.float32))


def _random_mask(seed=1):
    mask = np.random.default_rng(seed).random((B, 1, Q, K)) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    return mask


def test_hand_worked_case():
    # One query q = (1, 0), keys (1, 0) and (0, 1), values 10 and 20; d_k = 2.
    # Scores q·k/√2 = (0.7071, 0); softmax = e^0.7071/(e^0.7071+1) = 0.66976, 0.33024.
    # Output = 0.66976·10 + 0.33024·20 = 13.3024.
    q = jnp.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    k = jnp.array([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    v = jnp.array([10.0, 20.0]).reshape(1, 2, 1, 1)
    out = scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(out).ravel(), [13.3024], atol=1e-4)
    # Hiding the second key leaves only the first value.
    out = scaled_dot_product_attention(q, k, v, jnp.array([True, False]).reshape(1, 1, 1, 2))
    np.testing.assert_allclose(np.asarray(out).ravel(), [10.0], atol=1e-5)


def test_hand_worked_weights():
    # The case above: weights softmax(0.7071, 0) = (0.66976, 0.33024); the hidden key gets exactly 0.
    q = jnp.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    k = jnp.array([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    w = attention_weights(q, k)
    assert w.shape == (1, 1, 1, 2) and w.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(w).ravel(), [0.66976, 0.33024], atol=1e-5)
    hidden = np.asarray(attention_weights(q, k, jnp.array([False, True]).reshape(1, 1, 1, 2))).ravel()
    assert hidden[0] == 0.0 and hidden[1] == 1.0


@pytest.mark.parametrize("use_mask", [False, True])
def test_reference_matches_numpy(use_mask):
    q, k, v = _qkv()
    mask = _random_mask() if use_mask else None
    out = np.asarray(scaled_dot_product_attention(q, k, v, None if mask is None else jnp.asarray(mask)))
    for b in range(B):
        for i in range(H):
            expected = attention(q[b, :, i], k[b, :, i], v[b, :, i], None if mask is None else mask[b, 0])
            np.testing.assert_allclose(out[b, :, i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "dense", "causal_offset"])
def test_xla_with_a_dense_mask_agrees_with_reference(mask_kind):
    q, k, v = _qkv(3)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "dense":
        mask = jnp.asarray(_random_mask(4))
    else:
        mask = causal_mask(Q, K, offset=1)  # the KV-cache decoding step's mask
    ref = scaled_dot_product_attention(q, k, v, mask)
    xla = dot_product_attention(q, k, v, AttentionMask(dense=mask), "xla")
    np.testing.assert_allclose(np.asarray(xla), np.asarray(ref), rtol=1e-5, atol=1e-5)


# The lengths path, every dimension a different size: batch 3, length 7 (self-attention; cross:
# 6 queries over 7 keys), heads 2, d_k 5. Rows are right-padded to lengths 7, 4 and 0 (a filler row).
LB, LS, LT, LH, LD = 3, 7, 6, 2, 5


def _right_padded(lengths, length, seed):
    tokens = np.random.default_rng(seed).integers(1, 9, (len(lengths), length))
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0
    return jnp.asarray(tokens, jnp.int32)


def _segments(tokens, splits):
    # Packed rows: example ids 1, 2, … starting at the given positions, 0 on padding.
    segments = np.zeros(tokens.shape, np.int32)
    for row, starts in enumerate(splits):
        for start in starts:
            segments[row, start:] += 1
    return jnp.asarray(np.where(np.asarray(tokens) != 0, segments, 0), jnp.int32)


@pytest.mark.parametrize("kind", ["self", "causal", "cross", "packed_self", "packed_causal", "packed_cross"])
def test_lengths_and_causal_flag_through_xla_agree_with_dense_reference(kind):
    rng = np.random.default_rng(8)
    src = _right_padded([7, 4, 0], LS, 9)
    tgt = _right_padded([6, 5, 0], LT, 10)
    packed = kind.startswith("packed")
    src_seg = _segments(src, [[0, 3], [0, 2], [0]])
    tgt_seg = _segments(tgt, [[0, 2], [0, 4], [0]])
    if kind.endswith("cross"):
        q_tokens, k_tokens = tgt, src
        mask = cross_attention_mask(src, 0, tgt_seg if packed else None, src_seg if packed else None)
        dense = padding_mask(tgt, src) & (segment_mask(tgt_seg, src_seg) if packed else True)
    else:
        causal = kind.endswith("causal")
        q_tokens = k_tokens = tgt if causal else src
        seg = tgt_seg if causal else src_seg
        mask = self_attention_mask(q_tokens, 0, causal=causal, segments=seg if packed else None)
        dense = padding_mask(q_tokens, q_tokens)
        if causal:
            dense = dense & causal_mask(q_tokens.shape[1])
        if packed:
            dense = dense & segment_mask(seg, seg)
    assert mask.causal == (kind.endswith("causal")) and (mask.dense is not None) == packed
    q = jnp.asarray(rng.normal(size=(LB, q_tokens.shape[1], LH, LD)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(LB, k_tokens.shape[1], LH, LD)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(LB, k_tokens.shape[1], LH, LD)), jnp.float32)
    ref = np.asarray(scaled_dot_product_attention(q, k, v, dense))
    xla = np.asarray(dot_product_attention(q, k, v, mask, "xla"))
    described = np.asarray(scaled_dot_product_attention(q, k, v, mask.to_dense(q.shape[1], k.shape[1])))
    real = np.asarray(q_tokens) != 0  # padded queries' outputs are ignored by the loss
    assert real.sum() == 11  # 7 + 4 + 0 source tokens, 6 + 5 + 0 target tokens
    np.testing.assert_allclose(xla[real], ref[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(described[real], ref[real], rtol=1e-6, atol=1e-6)
    # The masks matter here: attending everywhere gives other outputs (so the test can fail).
    unmasked = np.asarray(scaled_dot_product_attention(q, k, v))
    assert np.abs(unmasked[real] - ref[real]).max() > 1e-2


@pytest.mark.parametrize("d_k, d_v", [(3, 7), (7, 3)])
def test_head_sizes_apart_through_xla_agree_with_reference(d_k, d_v):
    # Table 3 (B): d_k != d_v; jax.nn.dot_product_attention takes one head size, so the shorter side is
    # zero-padded and the scale stays 1/√d_k.
    rng = np.random.default_rng(11)
    q, k = (jnp.asarray(rng.normal(size=(B, n, H, d_k)), jnp.float32) for n in (Q, K))
    v = jnp.asarray(rng.normal(size=(B, K, H, d_v)), jnp.float32)
    tokens = jnp.array([[3, 4, 5, 6, 7], [3, 4, 0, 0, 0]])
    mask = self_attention_mask(tokens, 0)
    ref = np.asarray(scaled_dot_product_attention(q, k, v, mask.to_dense(Q, K)))
    xla = np.asarray(dot_product_attention(q, k, v, mask, "xla"))
    assert xla.shape == (B, Q, H, d_v)
    np.testing.assert_allclose(xla, ref, rtol=1e-5, atol=1e-5)
    for b in range(B):
        for i in range(H):
            expected = attention(np.asarray(q[b, :, i]), np.asarray(k[b, :, i]), np.asarray(v[b, :, i]),
                                 np.asarray(mask.to_dense(Q, K))[b, 0])
            np.testing.assert_allclose(ref[b, :, i], expected, rtol=1e-5, atol=1e-5)


def test_resolve_attention_impl():
    def resolve(backend, dense_mask=False, **overrides):
        config = TransformerConfig.tiny(**{"attention_impl": "auto", "dtype": "bfloat16", **overrides})
        return resolve_attention_impl(config, backend, dense_mask=dense_mask)

    # d_k = 64 / 4 = 16 in the tiny preset.
    assert resolve("gpu") == "cudnn"
    assert resolve("gpu", dense_mask=True) == "xla"  # segment ids of packed rows, the decoding step
    assert resolve("gpu", dtype="float32") == "xla"  # cuDNN's flash attention takes fp16/bf16 only
    assert resolve("gpu", d_model=48, h=4) == "xla"  # d_k = 12: not a multiple of 8
    assert resolve("gpu", d_model=768, h=4) == "xla"  # d_k = 192: above 128, Hopper-only
    assert resolve("gpu", d_k=12, d_v=16) == "cudnn"  # padded to max(d_k, d_v) = 16
    assert resolve("gpu", d_k=16, d_v=12) == "cudnn"
    assert resolve("gpu", d_k=512, d_v=512, h=1) == "xla"  # Table 3 (A) h = 1: a head too big for cuDNN
    assert resolve("gpu", attention_dropout_rate=0.1) == "reference"  # only the formula has dropout
    assert resolve("cpu") == "xla"  # on a TPU: the Pallas kernel (tests/nn/test_pallas_attention.py)
    for impl in ("reference", "xla"):
        assert resolve("cpu", attention_impl=impl) == impl and resolve("gpu", attention_impl=impl) == impl
    assert resolve("gpu", attention_impl="cudnn") == "cudnn"
    with pytest.raises(ConfigError, match="needs a GPU but JAX runs on 'tpu': use attention_impl='auto' or 'xla'"):
        resolve("tpu", attention_impl="cudnn")


def test_cudnn_on_cpu_is_a_config_error_when_the_model_is_built():
    config = TransformerConfig.tiny(attention_impl="cudnn", dtype="bfloat16")
    with pytest.raises(ConfigError, match="attention_impl='cudnn' needs a GPU but JAX runs on 'cpu'"):
        MultiHeadAttention(config, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("heads", [dict(), dict(d_k=3, d_v=7)])
def test_multi_head_matches_numpy(heads):
    config = TransformerConfig.tiny(d_model=H * D, h=H, **heads)
    mha = MultiHeadAttention(config, rngs=nnx.Rngs(0))
    d_k, d_v = config.head_sizes
    assert mha.w_q[...].shape == (H * D, H, d_k) and mha.w_v[...].shape == (H * D, H, d_v)
    assert mha.w_o[...].shape == (H, d_v, H * D)
    rng = np.random.default_rng(5)
    xq = rng.normal(size=(B, Q, H * D)).astype(np.float32)
    xkv = rng.normal(size=(B, K, H * D)).astype(np.float32)
    mask = _random_mask(6)
    out = np.asarray(mha(jnp.asarray(xq), jnp.asarray(xkv), jnp.asarray(mask)))
    w = [np.asarray(p[...]) for p in (mha.w_q, mha.w_k, mha.w_v, mha.w_o)]
    for b in range(B):
        expected = multi_head(xq[b], xkv[b], *w, mask=mask[b, 0])
        np.testing.assert_allclose(out[b], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "auto"])
@pytest.mark.parametrize("heads", [dict(), dict(d_k=3, d_v=7)])
def test_multi_head_implementations_agree(impl, heads):
    assert jax.default_backend() == "cpu"  # "auto" must resolve to something that runs here
    ref_config = TransformerConfig.tiny(d_model=H * D, h=H, **heads)
    config = TransformerConfig.tiny(d_model=H * D, h=H, attention_impl=impl, **heads)
    x = jax.random.normal(jax.random.key(0), (B, K, H * D))
    tokens = jnp.array([[3, 4, 5, 6, 7], [3, 4, 5, 0, 0]])
    for mask in (causal_mask(K), self_attention_mask(tokens, 0, causal=True)):
        ref = MultiHeadAttention(ref_config, rngs=nnx.Rngs(7))(x, x, mask)
        out = MultiHeadAttention(config, rngs=nnx.Rngs(7))(x, x, mask)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_attention_weight_dropout_only_in_training():
    config = TransformerConfig.tiny(d_model=H * D, h=H, attention_dropout_rate=0.5)
    mha = MultiHeadAttention(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (B, K, H * D))
    eval_out = mha(x, x)
    np.testing.assert_allclose(np.asarray(mha(x, x)), np.asarray(eval_out))
    train_out = mha(x, x, deterministic=False, rngs=nnx.Rngs(dropout=2))
    assert not np.allclose(np.asarray(train_out), np.asarray(eval_out), atol=1e-3)
