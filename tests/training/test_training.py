"""The training recipe: loss, schedule, data parallelism, and a tiny run whose loss falls."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from transformer import data as data_lib
from transformer.tasks.translate import translation_objective
from transformer.data import batching
from transformer.config import TransformerConfig
from transformer.data import BatchPlan, Examples, encode_pairs, reverse_task_pairs
from transformer.parallel.devices import pmap_placer, replicate_on_devices, shard_for_devices
from transformer.training.loss import label_smoothed_cross_entropy, loss_and_metrics
from transformer.training.schedule import transformer_schedule
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, CharTokenizer
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
    single_step, _ = compile_steps(graphdef, tx, translation_objective(train.label_smoothing, MODEL.pad_id), train, 1)
    devices = jax.local_devices()
    multi_step, _ = compile_steps(graphdef, tx, translation_objective(train.label_smoothing, MODEL.pad_id), train, 8)
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
    step, _ = compile_steps(graphdef, tx, translation_objective(train.label_smoothing, model.pad_id), train, 1)
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
    step, _ = compile_steps(graphdef, tx, translation_objective(train.label_smoothing, MODEL.pad_id), train, 1)
    batch = _batch(1, 256)
    tokens = float((batch["tgt_out"] != MODEL.pad_id).sum())
    after_one, _ = step(jax.tree.map(jnp.copy, state), batch)
    # After one micro-batch of two, the parameters have not moved yet; its gradient and tokens wait.
    after_one = jax.tree.map(jnp.copy, after_one)
    for a, b in zip(jax.tree.leaves(after_one.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(after_one.count_sum) == tokens and int(after_one.micro_step) == 1 and int(after_one.step) == 0
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(after_one.grad_sum)) > 0
    kept = jax.tree.map(jnp.copy, after_one)
    after_two, _ = step(kept, batch)
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(after_two.params), jax.tree.leaves(state.params)))
    # The update emptied the accumulators, and Adam (whose count drives the §5.3 schedule) counted one update.
    assert float(after_two.count_sum) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(after_two.grad_sum))
    counts = optax.tree_utils.tree_get_all_with_path(after_two.opt_state, "count")  # Adam's and the schedule's
    assert len(counts) == 2 and all(int(c) == 1 for _, c in counts)
    # Without accumulation the state has no accumulators.
    _, plain, _ = create_train_state(MODEL, TrainConfig(warmup_steps=10))
    assert plain.grad_sum is None and plain.count_sum is None


def _examples(target_lengths, seed, length=16):
    """Reverse-task-like examples with the given target lengths (EOS included); sources one longer."""
    rng = np.random.default_rng(seed)
    src, tgt = [], []
    for n in target_lengths:
        tgt.append(np.append(rng.integers(4, MODEL.vocab_size, n - 1), EOS_ID).astype(np.int32))
        src.append(np.append(rng.integers(4, MODEL.vocab_size, min(n, length - 1)), EOS_ID).astype(np.int32))
    return Examples(src, tgt, pad_id=PAD_ID, bos_id=BOS_ID)


def test_accumulated_update_equals_one_step_on_the_union_of_micro_batches():
    # Two micro-batches of 8 rows, padded to the same length 16, with very different real target
    # tokens: 8 long rows (107 tokens) and 2 short rows plus 6 rows of padding (5 tokens).
    full = _examples([16, 15, 13, 12, 16, 11, 14, 10], seed=0)
    sparse = _examples([2, 3], seed=1)
    micro = [batching._collate(full, range(8), 16, 8, PAD_ID, BOS_ID),
             batching._collate(sparse, range(2), 16, 8, PAD_ID, BOS_ID)]
    union = {k: np.concatenate([micro[0][k], micro[1][k]]) for k in micro[0]}
    n = [float((m["tgt_out"] != PAD_ID).sum()) for m in micro]
    assert n == [107.0, 5.0]

    one_step = TrainConfig(warmup_steps=10)
    accumulate = dataclasses.replace(one_step, grad_accum_steps=2)
    graphdef, state, tx = create_train_state(MODEL, one_step)
    union_step, _ = compile_steps(graphdef, tx, translation_objective(one_step.label_smoothing, MODEL.pad_id), one_step, 1)
    expected = jax.tree.map(jnp.copy, state)
    for _ in range(2):  # two updates: from the second on Adam's moments mix the two updates' scales
        expected, _ = union_step(expected, union)

    _, acc_state, _ = create_train_state(MODEL, accumulate)
    acc_step, _ = compile_steps(graphdef, tx, translation_objective(accumulate.label_smoothing, MODEL.pad_id), accumulate, 1)
    got = acc_state
    for m in micro * 2:
        got, _ = acc_step(got, m)
    assert int(got.step) == 2 and int(got.micro_step) == 4  # updates and micro-batches
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(expected.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    for a, b in zip(jax.tree.leaves(got.opt_state), jax.tree.leaves(expected.opt_state)):  # Adam's moments
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
    counts = optax.tree_utils.tree_get_all_with_path(got.opt_state, "count")
    assert [int(c) for _, c in counts] == [2, 2]  # the schedule counted updates, not the 4 micro-batches

    # The same under pmap: one row of each micro-batch per device, gradients and tokens summed.
    pmapped, _ = compile_steps(graphdef, tx, translation_objective(accumulate.label_smoothing, MODEL.pad_id), accumulate, 8)
    _, acc_state, _ = create_train_state(MODEL, accumulate)
    got8 = replicate_on_devices(acc_state, jax.local_devices())
    for m in micro * 2:
        got8, _ = pmapped(got8, shard_for_devices(m, 8))
    for a, b in zip(jax.tree.leaves(got8.params), jax.tree.leaves(expected.params)):
        np.testing.assert_allclose(np.asarray(a[5]), np.asarray(b), atol=1e-6)

    # The rule of optax.MultiSteps, the mean of the per-micro-batch mean gradients, weighs the 5
    # tokens of the sparse micro-batch as much as the 107 of the full one: a different update.
    model_state = create_train_state(MODEL, one_step)[1]
    params, opt_state = model_state.params, model_state.opt_state

    def mean_grad(params, batch):
        def loss(params):
            logits = nnx.merge(graphdef, params)(batch["src"], batch["tgt_in"])
            weights = (batch["tgt_out"] != PAD_ID).astype(jnp.float32)
            sums = loss_and_metrics(logits, batch["tgt_out"], weights, one_step.label_smoothing)
            return sums["loss_sum"] / sums["tokens"]

        return jax.grad(loss)(params)

    mean_grad = jax.jit(mean_grad)
    for _ in range(2):
        grads = jax.tree.map(lambda a, b: (a + b) / 2, mean_grad(params, micro[0]), mean_grad(params, micro[1]))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    gap = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected.params)))
    assert gap > 1e-3  # a thousand times the tolerance the accumulated update meets


def _permuted_ids(perm):
    """A character tokenizer whose every id i becomes perm[i]: padding is no longer 0."""

    class Permuted(CharTokenizer):
        pad_id, unk_id, bos_id, eos_id = (int(perm[i]) for i in (PAD_ID, 1, BOS_ID, EOS_ID))

        def encode(self, text):
            return [int(perm[i]) for i in super().encode(text)]

    return Permuted


def test_batches_pad_with_the_tokenizer_pad_id_and_the_loss_ignores_it():
    # Relabel the vocabulary: pad 0 <-> 5, BOS 2 <-> 9, EOS 3 <-> 17. A model whose config.pad_id is
    # 5 and whose embedding rows are relabelled the same way must see exactly what the original sees.
    perm = np.arange(MODEL.vocab_size)
    for a, b in ((0, 5), (2, 9), (3, 17)):
        perm[a], perm[b] = b, a
    alphabet = "abcdefghijklmnopqrst"
    pairs = reverse_task_pairs(40, seed=6)
    base_tok, perm_tok = CharTokenizer(alphabet), _permuted_ids(perm)(alphabet)
    assert (perm_tok.pad_id, perm_tok.bos_id, perm_tok.eos_id) == (5, 9, 17)
    for packing in (False, True):
        plans = [BatchPlan(encode_pairs(pairs, tok, 16), 256, 16, 1, packing=packing, shuffle=False)
                 for tok in (base_tok, perm_tok)]
        for (_, base), (_, permuted) in zip(plans[0].batches(epochs=1), plans[1].batches(epochs=1)):
            for k in base:
                relabel = k in ("src", "tgt_in", "tgt_out")
                np.testing.assert_array_equal(permuted[k], perm[base[k]] if relabel else base[k])
            padding = base["tgt_out"] == 0
            assert padding.any() and (permuted["tgt_out"][padding] == 5).all()
    assert (permuted["tgt_out"] == 0).any()  # and 0 is a real token (the letter "b") there

    batch = next(plans[0].batches(epochs=1))[1]  # packed
    permuted = next(plans[1].batches(epochs=1))[1]
    results = []
    for config, b in ((MODEL, batch), (dataclasses.replace(MODEL, pad_id=5), permuted)):
        train = TrainConfig(warmup_steps=10)
        graphdef, state, tx = create_train_state(config, train)
        table = state.params["src_embed"]["token_embedding"]["embedding"]
        if config.pad_id == 5:  # row perm[i] holds what row i holds in the original model
            table[...] = table[...][np.argsort(perm)]
        step, _ = compile_steps(graphdef, tx, translation_objective(train.label_smoothing, config.pad_id), train, 1)
        new_state, metrics = step(state, b)  # the loss of the parameters before the update (dropout 0)
        results.append((metrics, new_state.params))
    (m0, p0), (m5, p5) = results
    for k in ("loss_sum", "nll_sum", "correct", "tokens"):
        np.testing.assert_allclose(float(m5[k]), float(m0[k]), rtol=1e-6)
    assert float(m0["tokens"]) == float((batch["tgt_out"] != 0).sum())
    e0 = p0["src_embed"]["token_embedding"]["embedding"][...]
    e5 = p5["src_embed"]["token_embedding"]["embedding"][...]
    np.testing.assert_allclose(np.asarray(e5)[perm], np.asarray(e0), atol=1e-6)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(p0), jax.tree_util.tree_leaves_with_path(p5)):
        if "embedding" not in str(path):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


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
    _, evaluate = compile_steps(graphdef, tx, translation_objective(train.label_smoothing, MODEL.pad_id), train, 1)
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


def test_prefetch_stops_its_thread_when_the_run_ends_early():
    """A run that stops before the data does (SIGTERM, the last step) must not leave the producer thread
    waiting forever on a full queue while it holds batches on the device."""
    import threading

    produced = []

    def endless():
        for i in range(10_000):
            produced.append(i)
            yield i, {"x": np.full((4, 3), i, np.int32)}

    batches = data_lib.prefetch(endless(), pmap_placer(jax.devices()[:1]), size=2)
    first = [next(batches) for _ in range(3)]
    assert [p for p, _ in first] == [0, 1, 2] and int(first[2][1]["x"][0, 0]) == 2
    batches.close()
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]
    # consumed + queued + the one waiting to be queued, + at most one drawn before the producer saw the close
    assert len(produced) <= 3 + 2 + 1 + 1


def test_prefetch_hands_on_the_producers_error():
    def broken():
        yield 0, {"x": np.zeros((2, 2), np.int32)}
        raise data_lib.DataError("line 7 of train.de is empty")

    batches = data_lib.prefetch(broken(), pmap_placer(jax.devices()[:1]))
    assert next(batches)[0] == 0
    with pytest.raises(data_lib.DataError, match="line 7"):
        next(batches)
