import jax.numpy as jnp
import numpy as np

from transformer import attention_masks, causal_mask, padding_mask


def test_causal_mask_with_offset_for_cached_decoding():
    m = np.asarray(causal_mask(2, 5, offset=2))[0, 0]
    np.testing.assert_array_equal(m, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(np.asarray(causal_mask(3))[0, 0], np.tril(np.ones((3, 3))))


def test_padding_mask_hides_pad_keys_with_configurable_pad_id():
    m = np.asarray(padding_mask(jnp.array([[5, 5]]), jnp.array([[4, 9, 9]]), pad_id=9))
    assert m.shape == (1, 1, 1, 3)
    np.testing.assert_array_equal(m[0, 0, 0], [1, 0, 0])


def test_combined_decoder_masks():
    src = jnp.array([[3, 4, 0]]); tgt = jnp.array([[1, 2, 0, 0]])
    shapes = [(3, 3), (4, 4), (4, 3)]  # the masks broadcast over queries where only keys matter
    enc, dec, cross = (np.broadcast_to(np.asarray(m)[0, 0], s) for m, s in zip(attention_masks(src, tgt, pad_id=0), shapes))
    np.testing.assert_array_equal(enc, [[1, 1, 0]] * 3)
    np.testing.assert_array_equal(dec, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(cross, [[1, 1, 0]] * 4)
