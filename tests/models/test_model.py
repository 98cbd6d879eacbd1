"""Whole-model properties: causality, padding, packing, precision, the three families, bad calls."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transformer import Transformer, TransformerClassifier, TransformerConfig, TransformerLM, count_parameters
from transformer.nn.masks import segment_mask

CONFIG = TransformerConfig.tiny(vocab_size=50, d_model=24, d_ff=40, h=3, N=2)


@pytest.fixture(scope="module")
def model():
    return Transformer(CONFIG, rngs=nnx.Rngs(0))


def _tokens(seed, shape, low=1):
    return jnp.asarray(np.random.default_rng(seed).integers(low, CONFIG.vocab_size, shape), jnp.int32)


def test_shapes(model):
    logits = model(_tokens(0, (2, 7)), _tokens(1, (2, 5)))
    assert logits.shape == (2, 5, CONFIG.vocab_size) and logits.dtype == jnp.float32


def test_future_target_tokens_do_not_change_earlier_logits(model):
    src, tgt = _tokens(2, (2, 6)), _tokens(3, (2, 5))
    before = np.asarray(model(src, tgt))
    for t in range(4):
        changed = tgt.at[:, t + 1 :].set(_tokens(4 + t, (2, 4 - t)))
        after = np.asarray(model(src, changed))
        np.testing.assert_allclose(after[:, : t + 1], before[:, : t + 1], atol=1e-5)
        # …and the change is seen by the later positions (the test can fail).
        assert np.abs(after[:, t + 1 :] - before[:, t + 1 :]).max() > 1e-4


def test_padding_does_not_change_real_positions(model):
    src, tgt = _tokens(5, (1, 6)), _tokens(6, (1, 4))
    reference = np.asarray(model(src, tgt))
    padded_src = jnp.pad(src, ((0, 0), (0, 3)), constant_values=CONFIG.pad_id)
    padded_tgt = jnp.pad(tgt, ((0, 0), (0, 2)), constant_values=CONFIG.pad_id)
    padded = np.asarray(model(padded_src, padded_tgt))
    np.testing.assert_allclose(padded[:, :4], reference, atol=1e-5)
    # A batch where only one row is padded gives each row its own unpadded result.
    other_src, other_tgt = _tokens(7, (1, 9)), _tokens(8, (1, 6))
    batch = np.asarray(model(jnp.concatenate([padded_src, other_src]), jnp.concatenate([padded_tgt, other_tgt])))
    np.testing.assert_allclose(batch[:1, :4], reference, atol=1e-5)
    np.testing.assert_allclose(batch[1:], np.asarray(model(other_src, other_tgt)), atol=1e-5)


def test_packed_rows_equal_separate_examples(model):
    examples = [(_tokens(10, (1, 3)), _tokens(11, (1, 2))), (_tokens(12, (1, 2)), _tokens(13, (1, 3)))]
    src = jnp.concatenate([examples[0][0], examples[1][0], jnp.zeros((1, 1), jnp.int32)], axis=1)
    tgt = jnp.concatenate([examples[0][1], examples[1][1], jnp.zeros((1, 2), jnp.int32)], axis=1)
    src_segments = jnp.array([[1, 1, 1, 2, 2, 0]]); src_positions = jnp.array([[0, 1, 2, 0, 1, 0]])
    tgt_segments = jnp.array([[1, 1, 2, 2, 2, 0, 0]]); tgt_positions = jnp.array([[0, 1, 0, 1, 2, 0, 0]])
    packed = np.asarray(model(src, tgt, src_positions=src_positions, tgt_positions=tgt_positions,
                              src_segments=src_segments, tgt_segments=tgt_segments))
    np.testing.assert_allclose(packed[:, 0:2], np.asarray(model(*examples[0])), atol=1e-5)
    np.testing.assert_allclose(packed[:, 2:5], np.asarray(model(*examples[1])), atol=1e-5)


def test_segment_mask_blocks_other_examples_and_padding():
    m = np.asarray(segment_mask(jnp.array([[1, 1, 2, 0]]), jnp.array([[1, 2, 2, 0]])))[0, 0]
    np.testing.assert_array_equal(m, [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])


def test_jit_equals_eager_and_dropout_changes_training_outputs(model):
    src, tgt = _tokens(20, (2, 5)), _tokens(21, (2, 4))
    eager = np.asarray(model(src, tgt))
    jitted = nnx.jit(lambda m, s, t: m(s, t))(model, src, tgt)
    np.testing.assert_allclose(np.asarray(jitted), eager, atol=1e-5)
    train = np.asarray(model(src, tgt, deterministic=False, rngs=nnx.Rngs(dropout=0)))
    assert np.isfinite(train).all() and np.abs(train - eager).max() > 1e-3


def test_bfloat16_compute_keeps_float32_parameters():
    config = TransformerConfig.tiny(vocab_size=50, d_model=24, d_ff=40, h=3, N=2, dtype="bfloat16")
    f32 = Transformer(CONFIG, rngs=nnx.Rngs(0))
    bf16 = Transformer(config, rngs=nnx.Rngs(0))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype("float32")}
    src, tgt = _tokens(22, (2, 6)), _tokens(23, (2, 5))
    low = nnx.jit(lambda m, s, t: m(s, t))(bf16, src, tgt)
    assert low.dtype == jnp.float32  # computed in bf16, returned in float32 (tests/test_precision.py)
    high = np.asarray(f32(src, tgt))
    low = np.asarray(low.astype(jnp.float32))
    # Same parameters, so bf16 logits track the float32 ones up to bf16 rounding.
    assert np.abs(low - high).max() < 0.1 * np.abs(high).max()
    assert (low.argmax(-1) == high.argmax(-1)).mean() > 0.8


def test_pre_ln_and_learned_positions_and_attention_impls_build_and_run():
    for overrides in (dict(norm_position="pre"), dict(positional_encoding="learned"), dict(attention_impl="xla"),
                      dict(attention_impl="auto")):
        config = TransformerConfig.tiny(**overrides)
        logits = Transformer(config, rngs=nnx.Rngs(0))(jnp.ones((2, 4), jnp.int32), jnp.ones((2, 3), jnp.int32))
        assert logits.shape == (2, 3, config.vocab_size) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("impl", ["xla", "auto"])
def test_attention_impls_agree_with_reference_model(impl):
    # Right-padded rows of different lengths, then the same examples packed two to a row.
    src, tgt = _tokens(24, (2, 6)), _tokens(25, (2, 5))
    src, tgt = src.at[1, 4:].set(0), tgt.at[1, 3:].set(0)
    reference = Transformer(CONFIG, rngs=nnx.Rngs(3))
    other = Transformer(dataclasses.replace(CONFIG, attention_impl=impl), rngs=nnx.Rngs(3))
    real = np.asarray(tgt) != 0
    ref = np.asarray(reference(src, tgt))
    np.testing.assert_allclose(np.asarray(other(src, tgt))[real], ref[real], atol=1e-5)
    packed = dict(src_segments=jnp.array([[1, 1, 1, 2, 2, 0]]), src_positions=jnp.array([[0, 1, 2, 0, 1, 0]]),
                  tgt_segments=jnp.array([[1, 1, 2, 2, 2, 0]]), tgt_positions=jnp.array([[0, 1, 0, 1, 2, 0]]))
    p_src, p_tgt = _tokens(26, (1, 6)).at[:, 5:].set(0), _tokens(27, (1, 6)).at[:, 5:].set(0)
    real = np.asarray(p_tgt) != 0
    ref = np.asarray(reference(p_src, p_tgt, **packed))
    np.testing.assert_allclose(np.asarray(other(p_src, p_tgt, **packed))[real], ref[real], atol=1e-5)
    # The LM and the classifier use the same masks.
    lm_ref = TransformerLM(CONFIG, rngs=nnx.Rngs(4))(tgt)
    lm = TransformerLM(dataclasses.replace(CONFIG, attention_impl=impl), rngs=nnx.Rngs(4))(tgt)
    lm_real = np.asarray(tgt) != 0
    np.testing.assert_allclose(np.asarray(lm)[lm_real], np.asarray(lm_ref)[lm_real], atol=1e-5)
    clf_ref = TransformerClassifier(CONFIG, num_classes=3, rngs=nnx.Rngs(5))(src)
    clf = TransformerClassifier(dataclasses.replace(CONFIG, attention_impl=impl), num_classes=3, rngs=nnx.Rngs(5))(src)
    np.testing.assert_allclose(np.asarray(clf), np.asarray(clf_ref), atol=1e-5)


def test_language_model_is_causal():
    lm = TransformerLM(CONFIG, rngs=nnx.Rngs(1))
    tokens = _tokens(30, (2, 6))
    before = np.asarray(lm(tokens))
    assert before.shape == (2, 6, CONFIG.vocab_size)
    after = np.asarray(lm(tokens.at[:, 3:].set(7)))
    np.testing.assert_allclose(after[:, :3], before[:, :3], atol=1e-5)
    assert not hasattr(lm.decoder.layers[0], "cross_attention") or lm.decoder.layers[0].cross_attention is None


def test_classifier_pools_real_tokens_only():
    clf = TransformerClassifier(CONFIG, num_classes=3, rngs=nnx.Rngs(2))
    tokens = _tokens(31, (1, 5))
    logits = np.asarray(clf(tokens))
    assert logits.shape == (1, 3)
    padded = np.asarray(clf(jnp.pad(tokens, ((0, 0), (0, 4)))))
    np.testing.assert_allclose(padded, logits, atol=1e-5)
    with pytest.raises(ValueError, match="num_classes"):
        TransformerClassifier(CONFIG, num_classes=1, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "src, tgt, message",
    [
        (jnp.ones((2, 5), jnp.float32), jnp.ones((2, 3), jnp.int32), "src_tokens must hold integer token ids"),
        (jnp.ones((2, 5, 1), jnp.int32), jnp.ones((2, 3), jnp.int32), "src_tokens must be a 2-D integer array"),
        (jnp.ones((2, 5), jnp.int32), jnp.ones((3, 3), jnp.int32), "tgt_in_tokens has batch size 3 but the source has 2"),
        (jnp.ones((2, 5), jnp.int32), jnp.ones((3,), jnp.int32), "tgt_in_tokens must be a 2-D"),
        (jnp.ones((1, 200), jnp.int32), jnp.ones((1, 3), jnp.int32), "max_len=128"),
    ],
)
def test_bad_calls_raise_at_trace_time(model, src, tgt, message):
    with pytest.raises(ValueError, match=message):
        nnx.jit(lambda m, s, t: m(s, t))(model, src, tgt)


def test_parameter_counts_of_the_paper_models():
    counts = {name: count_parameters(nnx.eval_shape(lambda c=c: Transformer(c, rngs=nnx.Rngs(0))))
              for name, c in (("base", TransformerConfig.base()), ("big", TransformerConfig.big()))}
    # Worked out in README.md: 37000·512 + 6·(4·512² + FFN + 2 LN) + 6·(8·512² + FFN + 3 LN).
    assert counts == {"base": 63_045_632, "big": 214_171_648}


def _closed_form_parameters(c: TransformerConfig) -> int:
    """Table 3's models counted from their sizes alone: the shared embedding, and per layer the
    attention projections (W^Q, W^K: d_model × h·d_k; W^V: d_model × h·d_v; W^O: h·d_v × d_model;
    no biases), the FFN (two matrices and their biases) and the LayerNorms (scale and bias); row (E)
    adds a learned position table of max_len rows for the source and one for the target."""
    d_k, d_v = c.d_model // c.h if c.d_k is None else c.d_k, c.d_model // c.h if c.d_v is None else c.d_v
    attention = 2 * c.d_model * c.h * d_k + 2 * c.h * d_v * c.d_model
    ffn = 2 * c.d_model * c.d_ff + c.d_ff + c.d_model
    norm = 2 * c.d_model
    embedding = c.vocab_size * c.d_model + (2 * c.max_len * c.d_model if c.positional_encoding == "learned" else 0)
    return embedding + c.N * (attention + ffn + 2 * norm) + c.N * (2 * attention + ffn + 3 * norm)


@pytest.mark.parametrize("line", ["base", "big", "A1", "A2", "A3", "A4", "B1", "B2", "C1", "C2", "C3", "C4", "C5",
                                  "C6", "C7", "D1", "D2", "D3", "D4", "E1"])
def test_table3_parameter_counts_follow_the_closed_form(line):
    config = TransformerConfig.preset(line)
    # Abstract shapes only (nnx.eval_shape): no memory or time for the big models.
    counted = count_parameters(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    assert counted == _closed_form_parameters(config)
    if line in ("A1", "A2", "A3", "A4"):  # h·d_k = h·d_v = d_model: the base model's count
        assert counted == 63_045_632


def test_head_sizes_apart_from_d_model_over_h_train_and_decode():
    # d_k = 5 and d_v = 7 while d_model / h = 8 (Table 3 (A)/(B)-like): forward, backward, and the
    # KV cache (its keys hold d_k, its values d_v) against full forward passes.
    config = dataclasses.replace(CONFIG, d_k=5, d_v=7)
    model = Transformer(config, rngs=nnx.Rngs(0))
    attention = model.decoder.layers[0].self_attention
    assert attention.w_q[...].shape == (24, 3, 5) and attention.w_v[...].shape == (24, 3, 7)
    src, tgt = _tokens(40, (2, 6)), _tokens(41, (2, 5))
    logits = model(src, tgt)
    assert logits.shape == (2, 5, config.vocab_size)

    def loss(m):
        return -jax.nn.log_softmax(m(src, tgt)).mean()

    grads = nnx.grad(loss)(model)
    for name in ("w_q", "w_k", "w_v", "w_o"):
        g = np.asarray(getattr(grads.decoder.layers[0].self_attention, name)[...])
        assert g.shape == getattr(attention, name)[...].shape and np.isfinite(g).all() and np.abs(g).max() > 0
    full = np.asarray(logits)
    cache = model.init_cache(model.encode(src), max_len=8)
    assert cache[0]["k"].shape == (2, 3, 8, 5) and cache[0]["v"].shape == (2, 3, 8, 7)  # [rows, h, slots, d]
    for i in range(tgt.shape[1]):
        step, cache = model.decode_step(tgt[:, i : i + 1], src, cache, i)
        np.testing.assert_allclose(np.asarray(step)[:, 0], full[:, i], atol=1e-4)
