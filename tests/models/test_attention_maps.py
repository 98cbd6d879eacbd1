"""Attention maps (the paper's Figures 3-5): recorded weights of every layer and head of the three
families, checked against the formula by hand, and their picture."""

import struct

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numpy_reference import softmax
from transformer import Transformer, TransformerClassifier, TransformerConfig, TransformerLM
from transformer.models.attention_maps import attention_maps, figure_pixels, layer_maps, plot_attention

# Every dimension a different size: vocabulary 30, d_model 12, h 3 with d_k 5 and d_v 2 (apart from
# d_model / h = 4), N 2; batch 2, source 6, target 4.
CONFIG = TransformerConfig.tiny(vocab_size=30, d_model=12, d_ff=20, h=3, N=2, d_k=5, d_v=2)
SRC = jnp.array([[5, 6, 7, 8, 9, 3], [5, 6, 3, 0, 0, 0]], jnp.int32)  # lengths 6 and 3
TGT = jnp.array([[2, 10, 11, 12], [2, 10, 0, 0]], jnp.int32)  # lengths 4 and 2


def _check_rows(weights, key_lengths, causal):
    """Rows sum to 1; masked keys (padding, the future) have exactly zero weight."""
    weights = np.asarray(weights)
    assert weights.dtype == np.float32
    b, h, q, k = weights.shape
    for row in range(b):
        for i in range(q):
            allowed = np.arange(k) < key_lengths[row]
            if causal:
                allowed &= np.arange(k) <= i
            np.testing.assert_allclose(weights[row, :, i].sum(-1), 1.0, rtol=1e-6)
            assert (weights[row, :, i][:, ~allowed] == 0.0).all()
            assert (weights[row, :, i][:, allowed] > 0.0).all()


def test_encoder_decoder_maps_every_layer_and_head_and_the_logits_do_not_change():
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    plain = np.asarray(model(SRC, TGT))
    logits, maps = attention_maps(model, SRC, TGT)
    np.testing.assert_array_equal(np.asarray(logits), plain)  # the same computation
    expected = {f"{stack}/layers/{i}/{kind}" for i in range(CONFIG.N)
                for stack, kind in (("encoder", "self_attention"), ("decoder", "self_attention"),
                                    ("decoder", "cross_attention"))}
    assert set(maps) == expected
    for i in range(CONFIG.N):
        by_kind = layer_maps(maps, i)
        assert by_kind["encoder"].shape == (2, 3, 6, 6)
        assert by_kind["decoder"].shape == (2, 3, 4, 4)
        assert by_kind["cross"].shape == (2, 3, 4, 6)
        _check_rows(by_kind["encoder"], [6, 3], causal=False)
        _check_rows(by_kind["decoder"], [4, 2], causal=True)
        _check_rows(by_kind["cross"], [6, 3], causal=False)
    # Recording is off again, and nothing was left behind on the modules.
    attention = model.encoder.layers[0].self_attention
    assert not attention.record_weights and not hasattr(attention, "attention_weights")
    np.testing.assert_array_equal(np.asarray(model(SRC, TGT)), plain)


def test_first_layer_weights_equal_the_formula_by_hand():
    # Layer 0 of the encoder: its input is the embedding × √d_model + PE (no dropout), so its
    # weights can be worked out from the parameters with NumPy: softmax(X·W_i^Q (X·W_i^K)ᵀ / √d_k).
    model = Transformer(CONFIG, rngs=nnx.Rngs(1))
    # Right-padded rows: positions 0 … s-1 at every token, pads too (their rows are compared as well).
    _, maps = attention_maps(model, SRC, TGT, right_padded=True)
    x = np.asarray(model.src_embed(SRC))  # [b, s, m]
    attention = model.encoder.layers[0].self_attention
    w_q, w_k = np.asarray(attention.w_q[...]), np.asarray(attention.w_k[...])
    got = np.asarray(maps["encoder/layers/0/self_attention"])
    for row, length in enumerate([6, 3]):
        for head in range(CONFIG.h):
            q, k = x[row] @ w_q[:, head], x[row] @ w_k[:, head]  # [s, d_k = 5]
            scores = q @ k.T / np.sqrt(5)
            scores[:, length:] = -np.inf
            np.testing.assert_allclose(got[row, head], softmax(scores), rtol=1e-5, atol=1e-6)


def test_language_model_and_classifier_maps():
    lm = TransformerLM(CONFIG, rngs=nnx.Rngs(2))
    plain = np.asarray(lm(TGT))
    logits, maps = attention_maps(lm, TGT)
    np.testing.assert_array_equal(np.asarray(logits), plain)
    assert set(maps) == {f"decoder/layers/{i}/self_attention" for i in range(CONFIG.N)}
    assert set(layer_maps(maps, 1)) == {"decoder"}
    _check_rows(maps["decoder/layers/1/self_attention"], [4, 2], causal=True)

    clf = TransformerClassifier(CONFIG, num_classes=3, rngs=nnx.Rngs(3))
    plain = np.asarray(clf(SRC))
    logits, maps = attention_maps(clf, SRC)
    np.testing.assert_array_equal(np.asarray(logits), plain)
    assert set(maps) == {f"encoder/layers/{i}/self_attention" for i in range(CONFIG.N)}
    _check_rows(maps["encoder/layers/0/self_attention"], [6, 3], causal=False)


def _png_size(path):
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize("heads", [None, [1]])
def test_plot_has_one_panel_per_kind_and_head_labelled_with_the_pieces(tmp_path, heads):
    rng = np.random.default_rng(0)
    src, tgt = ["▁Ein", "▁Hund", "▁läuft", ".", "</s>"], ["<s>", "▁A", "▁dog", "▁runs"]
    maps = {kind: softmax(rng.normal(size=(3, len(q), len(k))))
            for kind, (q, k) in (("encoder", (src, src)), ("decoder", (tgt, tgt)), ("cross", (tgt, src)))}
    labels = {"encoder": (src, src), "decoder": (tgt, tgt), "cross": (tgt, src)}
    path = tmp_path / "attention.png"
    fig = plot_attention(maps, labels, str(path), heads=heads)
    columns = 3 if heads is None else 1
    assert _png_size(path) == figure_pixels(3, columns, longest=5)
    axes = np.asarray(fig.axes).reshape(3, columns)
    for row, kind in enumerate(("encoder", "decoder", "cross")):
        queries, keys = labels[kind]
        for ax in axes[row]:
            assert [t.get_text() for t in ax.get_yticklabels()] == queries
            assert [t.get_text() for t in ax.get_xticklabels()] == keys
    assert axes[0][0].get_title() == "encoder self-attention, head " + ("1" if heads is None else "2")
