import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from numpy_reference import positional_encoding
from transformer import Transformer, TransformerConfig, sinusoidal_positional_encoding


def test_sinusoid_values_by_hand():
    pe = np.asarray(sinusoidal_positional_encoding(jnp.arange(4)[None], 6))[0]
    # pos 0: sin 0 = 0 on even features, cos 0 = 1 on odd ones.
    np.testing.assert_allclose(pe[0], [0, 1, 0, 1, 0, 1], atol=1e-7)
    # pos 1, i = 0: sin(1) = 0.841471, cos(1) = 0.540302.
    np.testing.assert_allclose(pe[1, :2], [0.841471, 0.540302], atol=1e-6)
    # pos 3, i = 1 (features 2, 3): 3 / 10000^(2/6) = 3 / 21.54435 = 0.139247;
    # sin = 0.138798, cos = 0.990320.
    np.testing.assert_allclose(pe[3, 2:4], [0.138798, 0.990320], atol=1e-6)
    # pos 2, i = 2 (features 4, 5): 2 / 10000^(4/6) = 2 / 464.1589 = 0.00430887;
    # sin = 0.00430886, cos = 0.99999072.
    np.testing.assert_allclose(pe[2, 4:6], [0.00430886, 0.99999072], atol=1e-6)


def test_sinusoid_matches_numpy_for_arbitrary_positions():
    positions = np.array([[0, 5, 17, 3], [9, 1, 2, 40]])
    pe = np.asarray(sinusoidal_positional_encoding(jnp.asarray(positions), 10))
    table = positional_encoding(41, 10)
    np.testing.assert_allclose(pe, table[positions], atol=1e-5)


def test_shared_embedding_is_one_matrix_used_three_ways():
    config = TransformerConfig.tiny(dropout_rate=0.0)
    model = Transformer(config, rngs=nnx.Rngs(0))
    E = model.src_embed.token_embedding.embedding
    assert E is model.tgt_embed.token_embedding.embedding
    assert model.output_projection.linear is None
    src = jnp.array([[3, 4, 5]]); tgt = jnp.array([[1, 6]])
    # Embedding: E[token] * sqrt(d_model) (plus the encoding of position 0 = [0, 1, 0, 1, ...]).
    x = np.asarray(model.src_embed(src))[0, 0]
    expected = np.asarray(E[...])[3] * math.sqrt(config.d_model) + positional_encoding(1, config.d_model)[0]
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    # Changing the one matrix changes source embedding, target embedding and logits together.
    before = np.asarray(model(src, tgt))
    E[...] = E[...].at[6].add(1.0)
    after = np.asarray(model(src, tgt))
    assert np.abs(after - before).max() > 1e-3
    # Parameters: one vocab x d_model matrix, counted once.
    n_params = sum(x.size for x in jax_leaves(nnx.state(model, nnx.Param)))
    unshared = Transformer(TransformerConfig.tiny(share_embeddings=False), rngs=nnx.Rngs(0))
    n_unshared = sum(x.size for x in jax_leaves(nnx.state(unshared, nnx.Param)))
    assert n_unshared - n_params == 2 * config.vocab_size * config.d_model


def test_logits_are_hidden_times_embedding_transpose():
    config = TransformerConfig.tiny()
    model = Transformer(config, rngs=nnx.Rngs(1))
    x = np.random.default_rng(0).normal(size=(2, 3, config.d_model)).astype(np.float32)
    logits = np.asarray(model.logits(jnp.asarray(x)))
    np.testing.assert_allclose(logits, x @ np.asarray(model.src_embed.token_embedding.embedding[...]).T, rtol=1e-4, atol=1e-4)


def test_learned_positions():
    config = TransformerConfig.tiny(positional_encoding="learned", dropout_rate=0.0)
    model = Transformer(config, rngs=nnx.Rngs(0))
    table = np.asarray(model.src_embed.position_embedding[...])
    assert table.shape == (config.max_len, config.d_model)
    x = np.asarray(model.src_embed(jnp.array([[7, 7]])))[0]
    E = np.asarray(model.src_embed.token_embedding.embedding[...])
    np.testing.assert_allclose(x, E[7] * math.sqrt(config.d_model) + table[:2], rtol=1e-5, atol=1e-5)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
