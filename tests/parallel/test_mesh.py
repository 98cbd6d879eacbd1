"""jit over a device mesh: the same step as one device and as pmap, parameters and optimizer state
sharded as the rules declare, and clear errors for a mesh that cannot work."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from transformer.config import ConfigError, TransformerConfig
from transformer.tasks.translate import translation_objective
from transformer.data import BatchPlan, encode_pairs, reverse_task_pairs
from transformer.data.tokenizer import CharTokenizer
from transformer.parallel.devices import replicate_on_devices, shard_for_devices
from transformer.parallel.mesh import ParallelConfig, check_model_fits, make_mesh
from transformer.parallel.rules import batch_sharding, bytes_per_device, place, replicated, state_shardings
from transformer.training import TrainConfig, compile_mesh_steps, compile_steps, create_train_state

# Every size different, and each divisible where the meshes below split it: h=4 and d_ff=24 by
# tensor=4, d_model=20 by fsdp=4, vocab 24 by tensor=4.
MODEL = TransformerConfig.tiny(vocab_size=24, d_model=20, d_ff=24, h=4, N=1, dropout_rate=0.0)
TRAIN = TrainConfig(warmup_steps=10)
OBJECTIVE = translation_objective(TRAIN.label_smoothing, MODEL.pad_id)  # every model here pads with 0
STEPS = 2  # the second step uses the Adam moments of the first, so the optimizer state is compared too


def _batches(n=STEPS):
    tok = CharTokenizer("abcdefghijklmnopqrst")
    examples = encode_pairs(reverse_task_pairs(300, seed=0), tok, 16)
    plan = BatchPlan(examples, 512, 16, 8, seed=0)
    batches = plan.batches()
    return [next(batches)[1] for _ in range(n)]


def _run(step, state, batches, place_batch=lambda b: b):
    losses = []
    for batch in batches:
        state, metrics = step(state, place_batch(batch))
        losses.append(metrics["loss_sum"])
    return state, losses


@pytest.fixture(scope="module")
def reference():
    """The single-device and the 8-device pmap results of the same two steps."""
    graphdef, state, tx = create_train_state(MODEL, TRAIN)
    batches = _batches()
    single_step, _ = compile_steps(graphdef, tx, OBJECTIVE, TRAIN, 1)
    single, single_losses = _run(single_step, jax.tree.map(jnp.copy, state), batches)
    pmap_step, _ = compile_steps(graphdef, tx, OBJECTIVE, TRAIN, 8)
    devices = jax.local_devices()
    pmapped, pmap_losses = _run(pmap_step, replicate_on_devices(state, devices), batches,
                                lambda b: shard_for_devices(b, 8))
    pmapped = jax.tree.map(lambda x: np.asarray(x[0]), pmapped)
    return dict(graphdef=graphdef, tx=tx, state=state, batches=batches, single=jax.device_get(single),
                single_losses=[float(x) for x in single_losses], pmap=pmapped,
                pmap_losses=[float(x[0]) for x in pmap_losses])


@pytest.mark.parametrize("mesh_spec", ["data=8", "data=2,fsdp=4", "data=2,tensor=4", "fsdp=2,tensor=4"])
def test_mesh_step_equals_the_single_device_and_the_pmap_step(reference, mesh_spec):
    mesh = make_mesh(ParallelConfig(parallel="mesh", mesh=mesh_spec))
    check_model_fits(MODEL, mesh)
    shardings = state_shardings(reference["state"], mesh)
    train_step, _ = compile_mesh_steps(reference["graphdef"], reference["tx"], OBJECTIVE, TRAIN, shardings,
                                       batch_sharding(mesh), replicated(mesh))
    state = place(reference["state"], shardings)
    sharded, losses = _run(train_step, state, reference["batches"], lambda b: place(b, batch_sharding(mesh)))
    np.testing.assert_allclose([float(x) for x in losses], reference["single_losses"], rtol=1e-5)
    np.testing.assert_allclose([float(x) for x in losses], reference["pmap_losses"], rtol=1e-5)
    got = jax.device_get(sharded)
    for name, expected in (("single", reference["single"]), ("pmap", reference["pmap"])):
        for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(expected.params)):
            np.testing.assert_allclose(a, b, atol=2e-6, err_msg=f"params, mesh {mesh_spec} vs {name}")
        for a, b in zip(jax.tree.leaves(got.opt_state), jax.tree.leaves(expected.opt_state)):
            np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5, err_msg=f"Adam state, mesh {mesh_spec} vs {name}")
    # The two steps really moved the parameters (so the comparison means something).
    moved = max(float(np.abs(a - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(reference["state"].params)))
    assert moved > 1e-4


def test_dropout_on_a_mesh_draws_what_one_device_draws():
    """The dropout bits are a hash of each element's position in the global array, so sharding the
    batch does not change them: with dropout on, the mesh step still equals the one-device step."""
    model = dataclasses.replace(MODEL, dropout_rate=0.3)
    graphdef, state, tx = create_train_state(model, TRAIN)
    batches = _batches(1)
    single_step, _ = compile_steps(graphdef, tx, OBJECTIVE, TRAIN, 1)
    single, single_losses = _run(single_step, jax.tree.map(jnp.copy, state), batches)
    mesh = make_mesh(ParallelConfig(parallel="mesh", mesh="data=2,fsdp=2,tensor=2"))
    shardings = state_shardings(state, mesh)
    step, _ = compile_mesh_steps(graphdef, tx, OBJECTIVE, TRAIN, shardings, batch_sharding(mesh), replicated(mesh))
    sharded, losses = _run(step, place(state, shardings), batches, lambda b: place(b, batch_sharding(mesh)))
    np.testing.assert_allclose(float(losses[0]), float(single_losses[0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(sharded.params)), jax.tree.leaves(jax.device_get(single.params))):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_head_sizes_apart_from_d_model_over_h_on_a_tensor_mesh():
    """Table 3 (A)/(B)-like heads (d_k = 3, d_v = 7, d_model / h = 5): tensor parallelism splits the
    h heads of W^Q, W^K, W^V and W^O whatever their size, and the step equals one device's."""
    model = dataclasses.replace(MODEL, d_k=3, d_v=7)
    graphdef, state, tx = create_train_state(model, TRAIN)
    batches = _batches(1)
    single_step, _ = compile_steps(graphdef, tx, OBJECTIVE, TRAIN, 1)
    single, single_losses = _run(single_step, jax.tree.map(jnp.copy, state), batches)
    mesh = make_mesh(ParallelConfig(parallel="mesh", mesh="data=4,tensor=2"))
    check_model_fits(model, mesh)
    shardings = state_shardings(state, mesh)
    assert _params_by_name(shardings.params)["encoder/layers/0/self_attention/w_v"].spec == P(None, "tensor", None)
    assert _params_by_name(shardings.params)["encoder/layers/0/self_attention/w_o"].spec == P("tensor", None, None)
    step, _ = compile_mesh_steps(graphdef, tx, OBJECTIVE, TRAIN, shardings, batch_sharding(mesh), replicated(mesh))
    sharded, losses = _run(step, place(state, shardings), batches, lambda b: place(b, batch_sharding(mesh)))
    np.testing.assert_allclose(float(losses[0]), float(single_losses[0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(sharded.params)), jax.tree.leaves(jax.device_get(single.params))):
        np.testing.assert_allclose(a, b, atol=2e-6)
    w_v = _params_by_name(jax.device_get(sharded.params))["encoder/layers/0/self_attention/w_v"]
    assert w_v.shape == (20, 4, 7)


def _params_by_name(tree):
    """'decoder/layers/0/feed_forward/linear_1/kernel' -> array."""
    def name(path):
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        return "/".join(p for p in parts if p != "value")
    return {name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_parameters_and_adam_moments_are_sharded_as_the_rules_declare():
    model = dataclasses.replace(MODEL, share_embeddings=False)
    _, state, _ = create_train_state(model, TRAIN)
    mesh = make_mesh(ParallelConfig(parallel="mesh", mesh="data=1,fsdp=2,tensor=4"))
    placed = place(state, state_shardings(state, mesh))
    specs = {name: leaf.sharding.spec for name, leaf in _params_by_name(placed.params).items()}
    expected = {  # logical axes -> mesh axes: embed -> fsdp, vocab/heads/mlp -> tensor, kv never
        "embedding": P("tensor", "fsdp"), "w_q": P("fsdp", "tensor", None), "w_o": P("tensor", None, "fsdp"),
        "linear_1/kernel": P("fsdp", "tensor"), "linear_1/bias": P("tensor"), "linear_2/kernel": P("tensor", "fsdp"),
        "linear_2/bias": P("fsdp"), "norm/scale": P("fsdp"), "output_projection/linear/kernel": P("fsdp", "tensor"),
    }
    for suffix, spec in expected.items():
        matches = [name for name in specs if name.endswith(suffix)]
        assert matches, f"no parameter named …{suffix} in {sorted(specs)}"
        for name in matches:
            assert specs[name] == spec, (name, specs[name], spec)
    # Adam's moments are sharded like the parameters.
    mu = placed.opt_state[0].mu
    for (pa, p_leaf), (ma, m_leaf) in zip(jax.tree_util.tree_flatten_with_path(placed.params)[0],
                                          jax.tree_util.tree_flatten_with_path(mu)[0]):
        assert p_leaf.sharding.spec == m_leaf.sharding.spec
    # Each device holds exactly its share: an array of N elements split k ways costs N·4/k bytes.
    expected_bytes = 0
    for leaf in jax.tree.leaves(placed):
        split = math.prod(mesh.shape[a] for axes in leaf.sharding.spec if axes
                          for a in ((axes,) if isinstance(axes, str) else axes))
        expected_bytes += leaf.nbytes // split
    held = bytes_per_device(placed)
    assert len(held) == 8 and set(held.values()) == {expected_bytes}
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(placed))
    assert expected_bytes < total / 4  # most of the state is split 8 ways, little is replicated


@pytest.mark.parametrize("spec, devices, message", [
    ("data=3", 8, "--mesh data=3,fsdp=1,tensor=1 needs 3 devices but there are 8"),
    ("data=-1,fsdp=3", 8, "the other axes take 3 devices, which does not divide the 8 devices"),
    ("data=2,pipeline=4", 8, "NAME one of data, fsdp, tensor"),
    ("data=-1,fsdp=-1", 8, "at most one size may be -1"),
    ("data=two", 8, "must be an integer"),
    ("data=0", 8, "must be >= 1"),
])
def test_a_bad_mesh_is_one_clear_error(spec, devices, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        make_mesh(ParallelConfig(parallel="mesh", mesh=spec), jax.devices()[:devices])


def test_a_tensor_size_that_does_not_divide_the_heads_or_d_ff_is_refused():
    mesh = make_mesh(ParallelConfig(parallel="mesh", mesh="data=2,tensor=4"))
    with pytest.raises(ConfigError, match="tensor=4 does not divide h=6"):
        check_model_fits(dataclasses.replace(MODEL, h=6, d_model=24), mesh)
    with pytest.raises(ConfigError, match="tensor=4 does not divide d_ff=30"):
        check_model_fits(dataclasses.replace(MODEL, d_ff=30), mesh)


def test_gradient_accumulation_on_a_mesh_equals_it_on_one_device(reference):
    """Two micro-batches per update: the mesh step accumulates the sharded gradients as one device does."""
    train = dataclasses.replace(TRAIN, grad_accum_steps=2)
    graphdef, state, tx = create_train_state(MODEL, train)
    single_step, _ = compile_steps(graphdef, tx, OBJECTIVE, train, 1)
    single, single_losses = _run(single_step, jax.tree.map(jnp.copy, state), reference["batches"])
    mesh = make_mesh(ParallelConfig(parallel="mesh", mesh="data=2,fsdp=2,tensor=2"))
    shardings = state_shardings(state, mesh)
    step, _ = compile_mesh_steps(graphdef, tx, OBJECTIVE, train, shardings, batch_sharding(mesh), replicated(mesh))
    sharded, losses = _run(step, place(state, shardings), reference["batches"], lambda b: place(b, batch_sharding(mesh)))
    assert int(sharded.micro_step) == 2 and int(sharded.step) == 1  # two micro-batches, one update
    np.testing.assert_allclose([float(x) for x in losses], [float(x) for x in single_losses], rtol=1e-5)
    got, expected = jax.device_get(sharded), jax.device_get(single)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(expected.params)):
        np.testing.assert_allclose(a, b, atol=2e-6)
    moved = max(float(np.abs(a - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(state.params)))
    assert moved > 1e-4  # the second micro-batch applied the update
