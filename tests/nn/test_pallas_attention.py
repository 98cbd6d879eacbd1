"""attention_impl="pallas": JAX's TPU splash-attention kernel, run here in Pallas interpret mode, against
the §3.2.1 reference formula — outputs and gradients, for padding, causality, packed rows and
cross-attention, lengths that are and are not multiples of the kernel's 128-wide blocks; then in the
whole model and in training. (The mesh step is in tests/parallel/test_mesh_pallas.py.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import ConfigError, Transformer, TransformerConfig, resolve_attention_impl, scaled_dot_product_attention
from transformer.nn import pallas_attention as pallas
from transformer.nn.masks import cross_attention_mask, self_attention_mask

pytestmark = pytest.mark.skipif(pallas.unavailable_reason() is not None, reason=str(pallas.unavailable_reason()))

# Every dimension a different size: batch 3, heads 2 or 3, d_k 5 (and d_v 7: the kernel takes a
# value head size of its own); lengths 9 / 11 (under one block) and 131 / 137 (over one: two
# 128-blocks, the second mostly block padding). Rows right-padded; the last row is all padding.
B, D_K, D_V = 3, 5, 7


def _tokens(lengths, length, seed):
    tokens = np.random.default_rng(seed).integers(1, 9, (len(lengths), length))
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0
    return jnp.asarray(tokens, jnp.int32)


def _segments(tokens, starts):
    """Packed rows: example ids 1, 2, … from the given positions on, 0 on padding."""
    segments = np.zeros(tokens.shape, np.int32)
    for row, row_starts in enumerate(starts):
        for start in row_starts:
            segments[row, start:] += 1
    return jnp.asarray(np.where(np.asarray(tokens) != 0, segments, 0), jnp.int32)


def _case(kind, short):
    """(q_tokens, mask) for one kind of attention: self, causal, cross, each optionally packed."""
    s_len, t_len = (9, 11) if short else (137, 131)
    src = _tokens([s_len, s_len - 4, 0], s_len, 1)
    tgt = _tokens([t_len - 1, t_len - 5, 0], t_len, 2)
    packed = kind.startswith("packed")
    src_seg = _segments(src, [[0, 3], [0, 2, 4], [0]])
    tgt_seg = _segments(tgt, [[0, 5], [0, 1], [0]])
    if kind.endswith("cross"):
        return tgt, src, cross_attention_mask(src, 0, tgt_seg if packed else None, src_seg if packed else None)
    causal = kind.endswith("causal")
    tokens, seg = (tgt, tgt_seg) if causal else (src, src_seg)
    return tokens, tokens, self_attention_mask(tokens, 0, causal=causal, segments=seg if packed else None)


@pytest.mark.parametrize("short", [True, False], ids=["under_a_block", "over_a_block"])
@pytest.mark.parametrize("kind,heads", [("self", 2), ("causal", 3), ("cross", 3),
                                        ("packed_self", 3), ("packed_causal", 2), ("packed_cross", 2)])
def test_kernel_output_and_gradients_equal_the_reference(kind, heads, short):
    q_tokens, k_tokens, mask = _case(kind, short)
    q_len, k_len = q_tokens.shape[1], k_tokens.shape[1]
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(B, q_len, heads, D_K)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, k_len, heads, D_K)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, k_len, heads, D_V)), jnp.float32)
    # Padded queries' outputs are ignored by the loss (and differ where a query may see no key):
    # the scalar whose gradient is compared weighs real queries only, each output differently.
    real = np.asarray(q_tokens) != 0
    weights = jnp.asarray(rng.normal(size=(B, q_len, heads, D_V)) * real[:, :, None, None], jnp.float32)
    dense = mask.to_dense(q_len, k_len)

    def reference(q, k, v):
        return scaled_dot_product_attention(q, k, v, dense)

    def kernel(q, k, v):
        return pallas.pallas_attention(q, k, v, mask, interpret=True, max_block=128)

    outs, grads = {}, {}
    for name, fn in (("reference", reference), ("pallas", kernel)):
        outs[name] = np.asarray(jax.jit(fn)(q, k, v))
        grads[name] = jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v) * weights).sum(), argnums=(0, 1, 2)))(q, k, v)
    assert outs["pallas"].shape == (B, q_len, heads, D_V)
    assert np.isfinite(outs["pallas"]).all()  # padded queries too, also where they may see no key
    np.testing.assert_allclose(outs["pallas"][real], outs["reference"][real], rtol=1e-5, atol=1e-5)
    for name, got, want in zip("qkv", grads["pallas"], grads["reference"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=f"d{name}")
    # The mask matters here: attending everywhere gives other outputs (so the test can fail).
    unmasked = np.asarray(scaled_dot_product_attention(q, k, v))
    assert np.abs(unmasked[real] - outs["reference"][real]).max() > 1e-2
