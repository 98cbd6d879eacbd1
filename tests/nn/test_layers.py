"""Each layer against the paper's equations in NumPy (every dimension a different size)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpy_reference import ffn, layer_norm, multi_head
from transformer import DecoderLayer, EncoderLayer, PositionwiseFeedForward, Transformer, TransformerConfig, causal_mask

CONFIG = TransformerConfig.tiny(d_model=20, h=4, d_ff=36, dropout_rate=0.1)  # d_k = 5
B, S, T = 2, 7, 3


def _np(x):
    return np.asarray(x[...])


def _ffn(module, x):
    return ffn(x, _np(module.linear_1.kernel), _np(module.linear_1.bias), _np(module.linear_2.kernel), _np(module.linear_2.bias))


def _mha(module, xq, xkv, mask):
    return multi_head(xq, xkv, _np(module.w_q), _np(module.w_k), _np(module.w_v), _np(module.w_o), mask)


def _ln(residual, x):
    return layer_norm(x, _np(residual.norm.scale), _np(residual.norm.bias))


def test_feed_forward_matches_numpy():
    module = PositionwiseFeedForward(CONFIG, rngs=nnx.Rngs(0))
    module.linear_1.bias[...] = jnp.linspace(-1, 1, CONFIG.d_ff)  # non-zero biases, some ReLUs clip
    module.linear_2.bias[...] = jnp.linspace(2, 3, CONFIG.d_model)
    x = np.random.default_rng(0).normal(size=(B, S, CONFIG.d_model)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(module(jnp.asarray(x))), _ffn(module, x), rtol=1e-4, atol=1e-4)


def _perturb_norms(layer, seed):
    # LayerNorm starts at scale 1, bias 0; other values make the test see whether they are used.
    rng = np.random.default_rng(seed)
    for _, residual in nnx.iter_graph(layer):
        if isinstance(residual, nnx.LayerNorm):
            residual.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, CONFIG.d_model), jnp.float32)
            residual.bias[...] = jnp.asarray(rng.normal(size=CONFIG.d_model), jnp.float32)


def test_encoder_layer_is_post_ln_of_attention_then_ffn():
    layer = EncoderLayer(CONFIG, rngs=nnx.Rngs(1))
    _perturb_norms(layer, 0)
    x = np.random.default_rng(1).normal(size=(B, S, CONFIG.d_model)).astype(np.float32)
    mask = np.ones((B, 1, S, S), bool)
    mask[1, ..., 5:] = False  # the second example has two padding positions
    out = np.asarray(layer(jnp.asarray(x), jnp.asarray(mask)))
    for b in range(B):
        h = _ln(layer.self_attention_residual, x[b] + _mha(layer.self_attention, x[b], x[b], mask[b, 0]))
        expected = _ln(layer.feed_forward_residual, h + _ffn(layer.feed_forward, h))
        np.testing.assert_allclose(out[b], expected, rtol=1e-4, atol=1e-4)


def test_decoder_layer_is_masked_self_then_cross_then_ffn():
    layer = DecoderLayer(CONFIG, rngs=nnx.Rngs(2))
    _perturb_norms(layer, 1)
    rng = np.random.default_rng(2)
    y = rng.normal(size=(B, T, CONFIG.d_model)).astype(np.float32)
    memory = rng.normal(size=(B, S, CONFIG.d_model)).astype(np.float32)
    self_mask = np.broadcast_to(np.asarray(causal_mask(T)), (B, 1, T, T))
    cross_mask = np.ones((B, 1, T, S), bool)
    cross_mask[0, ..., 4:] = False
    out, cache = layer(jnp.asarray(y), jnp.asarray(memory), jnp.asarray(self_mask), jnp.asarray(cross_mask))
    assert cache is None
    for b in range(B):
        h1 = _ln(layer.self_attention_residual, y[b] + _mha(layer.self_attention, y[b], y[b], self_mask[b, 0]))
        h2 = _ln(layer.cross_attention_residual, h1 + _mha(layer.cross_attention, h1, memory[b], cross_mask[b, 0]))
        expected = _ln(layer.feed_forward_residual, h2 + _ffn(layer.feed_forward, h2))
        np.testing.assert_allclose(np.asarray(out)[b], expected, rtol=1e-4, atol=1e-4)


def test_pre_ln_option():
    config = TransformerConfig.tiny(d_model=20, h=4, d_ff=36, norm_position="pre")
    layer = EncoderLayer(config, rngs=nnx.Rngs(3))
    _perturb_norms(layer, 2)
    x = np.random.default_rng(3).normal(size=(1, S, config.d_model)).astype(np.float32)
    out = np.asarray(layer(jnp.asarray(x), jnp.ones((1, 1, S, S), bool)))[0]
    n1 = _ln(layer.self_attention_residual, x[0])
    h = x[0] + _mha(layer.self_attention, n1, n1, None)
    expected = h + _ffn(layer.feed_forward, _ln(layer.feed_forward_residual, h))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_residual_dropout_active_only_in_training():
    layer = EncoderLayer(CONFIG, rngs=nnx.Rngs(4))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(B, S, CONFIG.d_model)), jnp.float32)
    mask = jnp.ones((B, 1, S, S), bool)
    a = layer(x, mask, deterministic=False, rngs=nnx.Rngs(dropout=0))
    b = layer(x, mask, deterministic=False, rngs=nnx.Rngs(dropout=0))
    c = layer(x, mask, deterministic=False, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b))  # same key, same result
    eval_out = np.asarray(layer(x, mask))
    assert np.abs(np.asarray(c) - eval_out).max() > 1e-2
    with pytest.raises(Exception):
        layer(x, mask, deterministic=False)  # training without a dropout key is a mistake


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_rematerialised_layers_give_the_same_loss_and_gradients_and_recompute_the_forward_pass(policy):
    """remat trades compute for memory: the same numbers (dropout included), and the compiled
    backward pass really recomputes each layer's element-wise work (its softmax exponentials appear
    again). Memory is not asserted: XLA:CPU's buffer assignment reports the same temporaries either
    way (a plain jax.checkpoint MLP shows the same), so the saving shows only on accelerators."""
    import dataclasses

    base = TransformerConfig.tiny(vocab_size=23, d_model=32, d_ff=96, h=4, N=3, dropout_rate=0.2)
    src = jnp.asarray(np.random.default_rng(0).integers(3, 23, (6, 40)), jnp.int32)
    tgt = jnp.asarray(np.random.default_rng(1).integers(3, 23, (6, 36)), jnp.int32)
    results = {}
    for name in ("none", policy):
        graphdef, params = nnx.split(Transformer(dataclasses.replace(base, remat=name), rngs=nnx.Rngs(0)), nnx.Param)

        def loss(p, graphdef=graphdef):
            logits = nnx.merge(graphdef, p)(src, tgt, deterministic=False, rngs=nnx.Rngs(dropout=7))
            return (logits.astype(jnp.float32) ** 2).mean()

        step = jax.jit(jax.value_and_grad(loss))
        value, grads = step(params)
        exponentials = step.lower(params).compile().as_text().count(" exponential(")
        results[name] = (float(value), jax.tree.leaves(grads), exponentials)
    assert results[policy][0] == pytest.approx(results["none"][0], rel=1e-6)
    for a, b in zip(results[policy][1], results["none"][1]):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert results[policy][2] > results["none"][2], (policy, results[policy][2], results["none"][2])
