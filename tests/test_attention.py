import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpy_reference import attention, multi_head
from transformer import (
    MultiHeadAttention,
    TransformerConfig,
    causal_mask,
    fused_dot_product_attention,
    scaled_dot_product_attention,
)

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


@pytest.mark.parametrize("use_mask", [False, True])
def test_reference_matches_numpy(use_mask):
    q, k, v = _qkv()
    mask = _random_mask() if use_mask else None
    out = np.asarray(scaled_dot_product_attention(q, k, v, None if mask is None else jnp.asarray(mask)))
    for b in range(B):
        for i in range(H):
            expected = attention(q[b, :, i], k[b, :, i], v[b, :, i], None if mask is None else mask[b, 0])
            np.testing.assert_allclose(out[b, :, i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal"])
def test_fused_agrees_with_reference(mask_kind):
    q, k, v = _qkv(3)
    if mask_kind == "none":
        mask = None
    elif mask_kind == "padding":
        mask = jnp.asarray(_random_mask(4))
    else:
        mask = causal_mask(Q, K, offset=1)
    ref = scaled_dot_product_attention(q, k, v, mask)
    fused = fused_dot_product_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_multi_head_matches_numpy():
    config = TransformerConfig.tiny(d_model=H * D, h=H)
    mha = MultiHeadAttention(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(5)
    xq = rng.normal(size=(B, Q, H * D)).astype(np.float32)
    xkv = rng.normal(size=(B, K, H * D)).astype(np.float32)
    mask = _random_mask(6)
    out = np.asarray(mha(jnp.asarray(xq), jnp.asarray(xkv), jnp.asarray(mask)))
    w = [np.asarray(p[...]) for p in (mha.w_q, mha.w_k, mha.w_v, mha.w_o)]
    for b in range(B):
        expected = multi_head(xq[b], xkv[b], *w, mask=mask[b, 0])
        np.testing.assert_allclose(out[b], expected, rtol=1e-4, atol=1e-4)


def test_multi_head_fused_config_agrees():
    ref_config = TransformerConfig.tiny(d_model=H * D, h=H)
    fused_config = TransformerConfig.tiny(d_model=H * D, h=H, attention_impl="fused")
    x = jax.random.normal(jax.random.key(0), (B, K, H * D))
    mask = causal_mask(K)
    ref = MultiHeadAttention(ref_config, rngs=nnx.Rngs(7))(x, x, mask)
    fused = MultiHeadAttention(fused_config, rngs=nnx.Rngs(7))(x, x, mask)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_attention_weight_dropout_only_in_training():
    config = TransformerConfig.tiny(d_model=H * D, h=H, attention_dropout_rate=0.5)
    mha = MultiHeadAttention(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (B, K, H * D))
    eval_out = mha(x, x)
    np.testing.assert_allclose(np.asarray(mha(x, x)), np.asarray(eval_out))
    train_out = mha(x, x, deterministic=False, rngs=nnx.Rngs(dropout=2))
    assert not np.allclose(np.asarray(train_out), np.asarray(eval_out), atol=1e-3)
