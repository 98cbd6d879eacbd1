import jax.numpy as jnp
import numpy as np

from transformer import AttentionMask, attention_masks, causal_mask, padding_mask
from transformer.nn.masks import ancestry_causal_mask, real_lengths


def test_causal_mask_with_offset_for_cached_decoding():
    m = np.asarray(causal_mask(2, 5, offset=2))[0, 0]
    np.testing.assert_array_equal(m, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(np.asarray(causal_mask(3))[0, 0], np.tril(np.ones((3, 3))))


def test_ancestry_mask_shows_each_beam_its_own_prefix_in_a_shared_cache():
    # One source, 2 beams, 4 slots, at step 2: beam 0's prefix was written by beam 1 at slot 0 and
    # by beam 0 at slots 1 and 2; beam 1's by beam 1 throughout. Keys: slot j of beam s at 2j + s.
    ancestors = jnp.array([[[1, 0, 0, 0], [1, 1, 1, 0]]])
    m = np.asarray(ancestry_causal_mask(ancestors, 2))
    assert m.shape == (1, 1, 2, 8)
    np.testing.assert_array_equal(m[0, 0], [[0, 1, 1, 0, 1, 0, 0, 0], [0, 1, 0, 1, 0, 1, 0, 0]])


def test_padding_mask_hides_pad_keys_with_configurable_pad_id():
    m = np.asarray(padding_mask(jnp.array([[5, 5]]), jnp.array([[4, 9, 9]]), pad_id=9))
    assert m.shape == (1, 1, 1, 3)
    np.testing.assert_array_equal(m[0, 0, 0], [1, 0, 0])


def test_combined_decoder_masks():
    src = jnp.array([[3, 4, 0]]); tgt = jnp.array([[1, 2, 0, 0]])
    enc, dec, cross = attention_masks(src, tgt, pad_id=0)
    # Unpacked rows: padding as lengths, causality as a flag, no dense part.
    assert (enc.dense, dec.dense, cross.dense) == (None, None, None)
    assert (enc.causal, dec.causal, cross.causal) == (False, True, False)
    assert [int(m.kv_lengths[0]) for m in (enc, dec, cross)] == [2, 2, 2]
    shapes = [(3, 3), (4, 4), (4, 3)]  # the masks broadcast over queries where only keys matter
    enc, dec, cross = (np.broadcast_to(np.asarray(m.to_dense(*s))[0, 0], s) for m, s in zip((enc, dec, cross), shapes))
    np.testing.assert_array_equal(enc, [[1, 1, 0]] * 3)
    np.testing.assert_array_equal(dec, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(cross, [[1, 1, 0]] * 4)


def test_packed_masks_keep_segments_dense():
    src = jnp.array([[3, 4, 5, 0]]); tgt = jnp.array([[1, 6, 1, 0, 0]])
    src_seg = jnp.array([[1, 1, 2, 0]]); tgt_seg = jnp.array([[1, 1, 2, 0, 0]])
    enc, dec, cross = attention_masks(src, tgt, 0, src_seg, tgt_seg)
    np.testing.assert_array_equal(np.asarray(enc.to_dense(4, 4))[0, 0],
                                  [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(dec.to_dense(5, 5))[0, 0],
                                  [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0] * 5, [0] * 5])
    np.testing.assert_array_equal(np.asarray(cross.to_dense(5, 4))[0, 0],
                                  [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0] * 4, [0] * 4])


def test_real_lengths_and_combining_descriptions():
    tokens = jnp.array([[5, 6, 7, 9, 9], [5, 9, 9, 9, 9], [9] * 5])
    np.testing.assert_array_equal(np.asarray(real_lengths(tokens, pad_id=9)), [3, 1, 0])
    assert real_lengths(tokens, 9).dtype == jnp.int32  # what jax.nn.dot_product_attention requires
    a = AttentionMask(kv_lengths=jnp.array([3, 1, 0]))
    b = AttentionMask(kv_lengths=jnp.array([2, 4, 1]), causal=True, dense=causal_mask(5, 5, offset=1))
    both = a & b
    assert both.causal
    np.testing.assert_array_equal(np.asarray(both.kv_lengths), [2, 1, 0])
    np.testing.assert_array_equal(np.asarray(both.to_dense(5, 5)), np.asarray(a.to_dense(5, 5) & b.to_dense(5, 5)))
    assert AttentionMask().to_dense(2, 3) is None
