"""attention_impl="pallas" in a mesh step on 8 CPU devices: the Pallas kernel (interpret mode here)
runs under jax.shard_map, split over rows and heads, and the step equals the one-device step of
the reference formula."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_mesh import MODEL, OBJECTIVE, TRAIN, _batches, _run
from transformer.nn import pallas_attention as pallas
from transformer.parallel.mesh import ParallelConfig, check_model_fits, make_mesh
from transformer.parallel.rules import batch_sharding, place, replicated, state_shardings
from transformer.training import compile_mesh_steps, compile_steps, create_train_state


@pytest.mark.skipif(pallas.unavailable_reason() is not None, reason=str(pallas.unavailable_reason()))
def test_pallas_mesh_step_equals_the_reference_single_device_step():
    batches = _batches(2)
    graphdef, state, tx = create_train_state(MODEL, TRAIN)  # attention_impl="reference"
    single_step, _ = compile_steps(graphdef, tx, OBJECTIVE, TRAIN, 1)
    single, single_losses = _run(single_step, jax.tree.map(jnp.copy, state), batches)

    model = dataclasses.replace(MODEL, attention_impl="pallas")
    pallas_graphdef, pallas_state, pallas_tx = create_train_state(model, TRAIN)
    for a, b in zip(jax.tree.leaves(pallas_state), jax.tree.leaves(state)):  # the same initial state
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mesh = make_mesh(ParallelConfig(parallel="mesh", mesh="data=2,fsdp=2,tensor=2"))
    check_model_fits(model, mesh)
    shardings = state_shardings(pallas_state, mesh)
    step, _ = compile_mesh_steps(pallas_graphdef, pallas_tx, OBJECTIVE, TRAIN, shardings, batch_sharding(mesh),
                                 replicated(mesh))
    placed = place(pallas_state, shardings)
    batch = place(batches[0], batch_sharding(mesh))
    # The kernel is split by hand (shard_map over rows and heads), not left to XLA's partitioner.
    text = str(jax.make_jaxpr(step)(placed, batch))
    assert "shard_map" in text and "pallas_call" in text
    sharded, losses = _run(step, placed, batches, lambda b: place(b, batch_sharding(mesh)))
    np.testing.assert_allclose([float(x) for x in losses], [float(x) for x in single_losses], rtol=1e-5)
    got, want = jax.device_get(sharded), jax.device_get(single)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a, b, atol=5e-6)
    moved = max(float(np.abs(a - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(state.params)))
    assert moved > 1e-4  # the steps moved the parameters, so the comparison means something
