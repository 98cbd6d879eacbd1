"""The training recipe: loss, schedule, data parallelism, and a tiny run whose loss falls."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer.config import TransformerConfig
from transformer.data import BatchPlan, encode_pairs, replicate_on_devices, reverse_task_pairs, shard_for_devices
from transformer.loss import label_smoothed_cross_entropy
from transformer.schedule import transformer_schedule
from transformer.tokenizer import CharTokenizer
from transformer.training import TrainConfig, compile_steps, create_train_state

MODEL = TransformerConfig.tiny(vocab_size=24, d_model=16, d_ff=24, h=2, N=1, dropout_rate=0.0)


def test_label_smoothing_by_hand():
    # Two classes... V = 4, logits 0 except 2 on the target: p_t = e^2/(e^2+3) = 0.71123, others 0.09626.
    logits = jnp.array([[[0.0, 2.0, 0.0, 0.0]]])
    loss, n = label_smoothed_cross_entropy(logits, jnp.array([[1]]), jnp.array([[1.0]]), 0.1)
    p_t, p_o = math.exp(2) / (math.exp(2) + 3), 1 / (math.exp(2) + 3)
    expected = -(0.9 + 0.1 / 4) * math.log(p_t) - 3 * (0.1 / 4) * math.log(p_o)
    assert float(n) == 1.0
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # Padding positions (weight 0) add nothing.
    loss2, n2 = label_smoothed_cross_entropy(jnp.concatenate([logits, logits], 1), jnp.array([[1, 0]]),
                                             jnp.array([[1.0, 0.0]]), 0.1)
    np.testing.assert_allclose(float(loss2), expected, rtol=1e-5)
    assert float(n2) == 1.0


def test_paper_learning_rate_schedule():
    lr = transformer_schedule(512, 4000)
    # step 1: 512^-0.5 · 1 · 4000^-1.5 = 0.0441942 · 3.9528e-6 = 1.7469e-7
    np.testing.assert_allclose(float(lr(0)), 512**-0.5 * 4000**-1.5, rtol=1e-5)
    # the peak at step = warmup: 512^-0.5 · 4000^-0.5 = 6.9877e-4
    np.testing.assert_allclose(float(lr(3999)), 6.9877e-4, rtol=1e-4)
    # decay: step 16000 -> 512^-0.5 · 16000^-0.5 = 3.4939e-4
    np.testing.assert_allclose(float(lr(15999)), 3.4939e-4, rtol=1e-4)


def _batch(multiple=8, batch_tokens=512, seed=0):
    tok = CharTokenizer("abcdefghijklmnopqrst")
    examples = encode_pairs(reverse_task_pairs(200, seed=seed), tok, 16)
    plan = BatchPlan(examples, batch_tokens, 16, multiple, seed=seed)
    return next(plan.batches())[1]


def test_pmapped_step_equals_single_device_step():
    assert jax.local_device_count() == 8
    train = TrainConfig(warmup_steps=10)
    graphdef, state, tx = create_train_state(MODEL, train)
    batch = _batch()
    single_step, _ = compile_steps(graphdef, tx, MODEL, train, 1)
    devices = jax.local_devices()
    multi_step, _ = compile_steps(graphdef, tx, MODEL, train, 8)
    replicated = replicate_on_devices(state, devices)
    state = jax.tree.map(jnp.copy, state)  # the steps donate their input state
    multi_state, multi_metrics = multi_step(replicated, shard_for_devices(batch, 8))
    single_state, single_metrics = single_step(jax.tree.map(jnp.copy, state), batch)
    np.testing.assert_allclose(float(multi_metrics["loss_sum"][0]), float(single_metrics["loss_sum"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(multi_state.params), jax.tree.leaves(single_state.params)):
        np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b), atol=1e-6)
        np.testing.assert_allclose(np.asarray(a[3]), np.asarray(a[0]))  # replicas stay identical
    # The update really moved the parameters (so the comparison above means something).
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(single_state.params), jax.tree.leaves(state.params)))
    assert moved > 1e-4


def test_tiny_training_run_loss_falls():
    model = dataclasses.replace(MODEL, d_model=32, d_ff=64, dropout_rate=0.1)
    train = TrainConfig(warmup_steps=60)
    graphdef, state, tx = create_train_state(model, train)
    step, _ = compile_steps(graphdef, tx, model, train, 1)
    tok = CharTokenizer("abcdefghijklmnopqrst")
    plan = BatchPlan(encode_pairs(reverse_task_pairs(2000, seed=1), tok, 16), 512, 16, 1, seed=1)
    losses = []
    for _, batch in zip(range(150), (b for _, b in plan.batches())):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss_sum"] / metrics["tokens"]))
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:10])


def test_gradient_accumulation_counts_micro_batches():
    train = TrainConfig(grad_accum_steps=2, warmup_steps=10)
    graphdef, state, tx = create_train_state(MODEL, train)
    step, _ = compile_steps(graphdef, tx, MODEL, train, 1)
    batch = _batch(1, 256)
    after_one, _ = step(jax.tree.map(jnp.copy, state), batch)
    # After one micro-batch of two, the parameters have not moved yet.
    after_one = jax.tree.map(jnp.copy, after_one)
    for a, b in zip(jax.tree.leaves(after_one.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kept = jax.tree.map(jnp.copy, after_one)
    after_two, _ = step(kept, batch)
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(after_two.params), jax.tree.leaves(state.params)))


def test_batches_are_token_bounded_device_divisible_and_deterministic():
    tok = CharTokenizer("abcdefghijklmnopqrst")
    examples = encode_pairs(reverse_task_pairs(300, seed=2), tok, 16)
    plan = BatchPlan(examples, 200, 16, 4, seed=3)
    first = [b for _, b in plan.batches(epochs=1)]
    again = [b for _, b in plan.batches(epochs=1)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["src"], b["src"])
    rows = sum(int((b["tgt_out"][:, 0] != 0).sum()) for b in first)
    assert rows == len(examples)  # every example exactly once per epoch
    for b in first:
        assert b["src"].shape[0] % 4 == 0 and b["src"].size <= 200
    # Resuming at position 3 gives the batches from 3 on.
    resumed = [b for _, b in plan.batches(start=3, epochs=1)]
    np.testing.assert_array_equal(resumed[0]["src"], first[3]["src"])


def test_packing_keeps_examples_apart():
    tok = CharTokenizer("abcdefghijklmnopqrst")
    examples = encode_pairs(reverse_task_pairs(50, seed=4), tok, 16)
    plan = BatchPlan(examples, 160, 16, 2, packing=True, seed=0)
    batches = [b for _, b in plan.batches(epochs=1)]
    packed = sum(int(b["src_segments"].max(axis=1).sum()) for b in batches)
    assert packed == len(examples)
    b = batches[0]
    assert b["src_segments"].max() >= 2  # several examples in a row
    row = b["tgt_positions"][0][b["tgt_segments"][0] == 2]
    np.testing.assert_array_equal(row, np.arange(len(row)))  # positions restart per example


def test_packed_batch_gives_the_loss_of_the_same_examples_unpacked():
    train = TrainConfig(warmup_steps=10)
    graphdef, state, tx = create_train_state(MODEL, train)
    _, evaluate = compile_steps(graphdef, tx, MODEL, train, 1)
    tok = CharTokenizer("abcdefghijklmnopqrst")
    examples = encode_pairs(reverse_task_pairs(24, seed=5), tok, 16)
    packed = BatchPlan(examples, 10_000, 16, 1, packing=True, shuffle=False)
    unpacked = BatchPlan(examples, 10_000, 16, 1, packing=False, shuffle=False)
    totals = []
    for plan in (packed, unpacked):
        sums = [evaluate(state.params, b) for _, b in plan.batches(epochs=1)]
        totals.append({k: sum(float(s[k]) for s in sums) for k in ("loss_sum", "tokens", "correct")})
    assert next(packed.batches(epochs=1))[1]["src_segments"].max() >= 2  # really packed
    assert totals[0]["tokens"] == totals[1]["tokens"]
    np.testing.assert_allclose(totals[0]["loss_sum"], totals[1]["loss_sum"], rtol=1e-5)
    assert totals[0]["correct"] == totals[1]["correct"]
