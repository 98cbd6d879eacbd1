"""The masked language model: shapes, the projection tied to the token embedding, packed rows, and
parameter paths that a classifier shares."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer import TransformerClassifier, TransformerConfig, TransformerMLM
from transformer.nn.masks import real_positions, self_attention_mask

# Vocabulary 23, d_model 16, d_ff 24, h 2 (d_k = 8), N 3; batch 2, length 5.
CONFIG = TransformerConfig.tiny(vocab_size=23, d_model=16, d_ff=24, h=2, N=3, max_len=32)


def test_logits_are_the_encoder_output_times_the_embedding_matrix():
    mlm = TransformerMLM(CONFIG, rngs=nnx.Rngs(0))
    tokens = jnp.array([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]], jnp.int32)
    logits = mlm(tokens)
    assert logits.shape == (2, 5, 23) and logits.dtype == jnp.float32
    assert mlm.output_projection.linear is None  # share_embeddings: no matrix of its own
    pad_id = CONFIG.pad_id
    x = mlm.encoder(mlm.embed(tokens, real_positions(tokens, pad_id)),
                    self_attention_mask(tokens, pad_id, right_padded=False))
    E = np.asarray(mlm.embed.token_embedding.embedding[...])
    np.testing.assert_allclose(np.asarray(logits), np.asarray(x) @ E.T, atol=1e-5)


def test_packed_row_equals_its_examples_one_by_one():
    mlm = TransformerMLM(CONFIG, rngs=nnx.Rngs(1))
    a, b = [5, 6, 7], [8, 9]
    row = jnp.array([a + b + [0]], jnp.int32)
    packed = np.asarray(mlm(row, segments=jnp.array([[1, 1, 1, 2, 2, 0]]),
                            positions=jnp.array([[0, 1, 2, 0, 1, 0]])))[0]
    np.testing.assert_allclose(packed[0:3], np.asarray(mlm(jnp.array([a])))[0], atol=1e-5)
    np.testing.assert_allclose(packed[3:5], np.asarray(mlm(jnp.array([b])))[0], atol=1e-5)


def test_a_classifier_takes_every_parameter_but_its_own_layer_from_the_mlm():
    shapes = lambda m: {path: x.shape for path, x in nnx.to_flat_state(nnx.state(m, nnx.Param))}  # noqa: E731
    mlm = shapes(nnx.eval_shape(lambda: TransformerMLM(CONFIG, rngs=nnx.Rngs(0))))
    clf = shapes(nnx.eval_shape(lambda: TransformerClassifier(CONFIG, num_classes=3, rngs=nnx.Rngs(0))))
    shared = {path: shape for path, shape in clf.items() if path[0] != "classifier"}
    assert {path[0] for path in shared} == {"embed", "encoder"}
    assert {path: mlm.get(path) for path in shared} == shared
    # The MLM's only parameters of its own would be an untied projection; tied, it has none.
    assert set(mlm) == set(shared)
