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
from transformer.tasks.translate import translation_objective
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


def test_resolve_attention_impl_with_pallas(monkeypatch):
    def resolve(backend, dense_mask=False, segment_ids=False, **overrides):
        config = TransformerConfig.tiny(**{"attention_impl": "auto", "dtype": "bfloat16", **overrides})
        return resolve_attention_impl(config, backend, dense_mask=dense_mask, segment_ids=segment_ids)

    # "auto": the kernel on a TPU, for padding, causality and packed rows' segment ids...
    assert resolve("tpu") == "pallas" and resolve("tpu", dtype="float32") == "pallas"
    assert resolve("tpu", dense_mask=True, segment_ids=True) == "pallas"
    # ...not for the KV-cache decoding step's mask, nor with attention dropout (only the formula has it).
    assert resolve("tpu", dense_mask=True) == "xla"
    assert resolve("tpu", attention_dropout_rate=0.1) == "reference"
    # "auto" elsewhere keeps its choices: never the kernel (interpret mode is for tests).
    assert resolve("cpu") == "xla" and resolve("cpu", dense_mask=True, segment_ids=True) == "xla"
    assert resolve("gpu") == "cudnn" and resolve("gpu", dense_mask=True, segment_ids=True) == "xla"
    # "pallas" asked for: the kernel on any backend (interpret mode off a TPU), XLA for the decoding step.
    for backend in ("tpu", "cpu", "gpu"):
        assert resolve(backend, attention_impl="pallas") == "pallas"
        assert resolve(backend, attention_impl="pallas", dense_mask=True, segment_ids=True) == "pallas"
        assert resolve(backend, attention_impl="pallas", dense_mask=True) == "xla"
    # A JAX without the kernel: "auto" falls back, "pallas" is one line saying why and what to do.
    monkeypatch.setattr(pallas, "_UNAVAILABLE", "this JAX (0.0) has no usable splash_attention (ImportError: x)")
    assert resolve("tpu") == "xla"
    with pytest.raises(ConfigError, match=r"^attention_impl='pallas' cannot run: this JAX \(0.0\) has no usable "
                                          r"splash_attention .*; install .* or use attention_impl='auto' or 'xla'$"):
        resolve("tpu", attention_impl="pallas")


def test_pallas_with_attention_dropout_is_a_config_error():
    with pytest.raises(ConfigError, match="attention_dropout_rate > 0 needs attention_impl='reference' or 'auto'"):
        TransformerConfig.tiny(attention_impl="pallas", attention_dropout_rate=0.1)


# The whole model: tiny preset but every size different (d_model 40, h 4, d_k 10, d_ff 48, N 2).
MODEL = TransformerConfig.tiny(d_model=40, h=4, d_ff=48, N=2, dropout_rate=0.0)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_whole_model_logits_equal_the_reference(packed):
    src = _tokens([13, 6, 0], 13, 4)  # the last row all padding (a filler row of a last batch)
    tgt = _tokens([10, 3, 0], 10, 5)
    segments = dict(src_segments=_segments(src, [[0, 5], [0, 2], [0]]),
                    tgt_segments=_segments(tgt, [[0, 4], [0, 1], [0]])) if packed else {}
    logits = {}
    for impl in ("reference", "pallas"):
        model = Transformer(dataclasses.replace(MODEL, attention_impl=impl), rngs=nnx.Rngs(0))
        logits[impl] = np.asarray(model(src, tgt, right_padded=True, **segments))  # lengths: the kernel's form
    real = np.asarray(tgt) != 0
    assert np.isfinite(logits["pallas"]).all()
    np.testing.assert_allclose(logits["pallas"][real], logits["reference"][real], rtol=1e-4, atol=1e-4)


def test_decoding_a_pallas_model_works_and_equals_the_reference():
    """The cached decoding step's offset-causal mask has no segment-id form: it goes to XLA."""
    from transformer.decoding import greedy_decode

    src = _tokens([7, 4], 7, 6)
    out = {}
    for impl in ("reference", "pallas"):
        model = Transformer(dataclasses.replace(MODEL, attention_impl=impl), rngs=nnx.Rngs(1))
        tokens, log_p = greedy_decode(model, src, max_extra=3, bos_id=2, eos_id=3)
        out[impl] = (np.asarray(tokens), np.asarray(log_p))
    np.testing.assert_array_equal(out["pallas"][0], out["reference"][0])
    np.testing.assert_allclose(out["pallas"][1], out["reference"][1], rtol=1e-5)


def test_a_few_training_steps_with_pallas_equal_the_reference():
    # Packed rows: segment ids and padding in all three attentions (unpacked rows train in
    # tests/parallel/test_mesh_pallas.py; compiling the interpret-mode kernel takes the time here).
    packing = True
    from transformer.data import BatchPlan, encode_pairs, reverse_task_pairs
    from transformer.data.tokenizer import CharTokenizer
    from transformer.training import TrainConfig, compile_steps, create_train_state

    tok = CharTokenizer("abcdefghijklmnopqrst")
    plan = BatchPlan(encode_pairs(reverse_task_pairs(200, seed=0), tok, 16), 384, 16, 8, packing=packing, seed=0)
    batches = plan.batches()
    batches = [next(batches)[1] for _ in range(2)]  # the second step uses the first's Adam moments
    assert ("src_segments" in batches[0]) == packing
    # One layer per side (compiling the interpret-mode kernel is slow); dropout on: the same bits either way.
    model = dataclasses.replace(MODEL, vocab_size=tok.vocab_size, N=1, dropout_rate=0.1)
    train = TrainConfig(warmup_steps=10)
    results = {}
    for impl in ("reference", "pallas"):
        graphdef, state, tx = create_train_state(dataclasses.replace(model, attention_impl=impl), train)
        step, _ = compile_steps(graphdef, tx, translation_objective(train.label_smoothing, model.pad_id), train, 1)
        losses = []
        for batch in batches:
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss_sum"]))
        results[impl] = (losses, jax.device_get(state.params))
    np.testing.assert_allclose(results["pallas"][0], results["reference"][0], rtol=1e-5)
    # float32 tolerance: Adam's first steps divide by √v, which amplifies rounding in tiny gradients
    # (seen: 8.5e-6 on a parameter of 0.21 after three steps).
    for a, b in zip(jax.tree.leaves(results["pallas"][1]), jax.tree.leaves(results["reference"][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert results["reference"][0][-1] < results["reference"][0][0]  # it trained (the comparison means something)


@pytest.mark.parametrize("backend,dtype", [("tpu", "bfloat16"), ("cpu", "float32"), ("gpu", "float32")])
def test_train_py_default_dtype_is_bfloat16_on_tpu_only(backend, dtype):
    from transformer.run.cli import default_dtype

    assert default_dtype(backend) == dtype


def test_bfloat16_kernel_is_within_bfloat16_rounding_of_the_float32_formula():
    """bfloat16 is the compute default on a TPU: scores and softmax stay float32 in the kernel."""
    q_tokens, k_tokens, mask = _case("causal", short=True)
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.normal(size=(B, n, 2, D_K)), jnp.float32)
               for n in (q_tokens.shape[1], k_tokens.shape[1], k_tokens.shape[1]))
    want = np.asarray(scaled_dot_product_attention(q, k, v, mask.to_dense(q.shape[1], k.shape[1])))
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = pallas.pallas_attention(*bf16, mask, interpret=True, max_block=128)
    assert got.dtype == jnp.bfloat16
    real = np.asarray(q_tokens) != 0
    error = np.abs(np.asarray(got, np.float32) - want)[real]
    assert error.max() < 3e-2 and error.mean() < 5e-3, (error.max(), error.mean())
