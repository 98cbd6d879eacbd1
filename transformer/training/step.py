"""§5 One pure train step (state, batch) -> (state, metrics) for any task's `Objective`, and the eval
step; run under `jax.jit` on one device, `jax.pmap` across this host's devices, or `jax.jit` over a device mesh."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from transformer.nn.partitioning import activation_sharding
from transformer.parallel.rules import activation_rule
from transformer.training.config import TrainConfig
from transformer.training.state import TrainState

Batch = dict[str, jax.Array]
AXIS = "devices"  # the pmap axis name


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a task's train step minimises, written once per task (`transformer/tasks/`).

    `fn(model, batch, *, deterministic, rngs)` runs the model on a batch and returns sums (not
    means, so that they add up across devices, micro-batches and batches): "loss_sum", the count
    named by `count` (what the loss is summed over: real target tokens, masked positions or
    examples) and any other metric sums the task reports. The gradient is that of
    loss_sum / count over the global batch. `rngs` holds the streams "dropout" and "data" (a task's
    own randomness on the device, e.g. the masked-LM's choice of positions); it is None in
    evaluation, where a task that needs randomness uses a fixed key.
    """

    fn: Callable[..., dict[str, jax.Array]]
    count: str = "tokens"


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    objective: Objective,
    rng_impl: str = "threefry2x32",
    axis_name: str | None = None,
    grad_accum_steps: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step, called once per micro-batch. With `axis_name` (under pmap) the loss and
    gradients are summed over devices, so the update equals the one-device update on the whole
    global batch.

    With grad_accum_steps = k > 1 the gradients of the summed loss and the objective's counts are
    added into the state for k micro-batches; the k-th divides the gradient sum once by the count
    sum and applies one Adam update, so the update equals the one-step update on the union of the
    k micro-batches, however their real tokens are spread. (Averaging per-micro-batch means, as
    optax.MultiSteps does, would weigh a micro-batch with few real tokens as much as a full one.)
    """
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be a positive integer, got {grad_accum_steps!r}")

    def apply_update(state: TrainState, grad_sum, count: jax.Array):
        # Gradient of the mean loss over everything the (accumulated) global batch counts.
        grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grad_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=rng_impl), state.micro_step)
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))  # a fresh key per device
        dropout_key, data_key = jax.random.split(key)

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            sums = objective.fn(model, batch, deterministic=False, rngs=nnx.Rngs(dropout=dropout_key, data=data_key))
            return sums["loss_sum"], sums

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if axis_name is not None:
            grads, metrics = jax.lax.psum((grads, metrics), axis_name)
        micro_step = state.micro_step + 1
        if grad_accum_steps == 1:
            params, opt_state = apply_update(state, grads, metrics[objective.count])
            return state.replace(step=state.step + 1, micro_step=micro_step, params=params,
                                 opt_state=opt_state), metrics

        grad_sum = jax.tree.map(jnp.add, state.grad_sum, grads)
        count_sum = state.count_sum + metrics[objective.count]

        def update(_):
            params, opt_state = apply_update(state, grad_sum, count_sum)
            return params, opt_state, jax.tree.map(jnp.zeros_like, grad_sum), jnp.zeros_like(count_sum)

        def accumulate(_):
            return state.params, state.opt_state, grad_sum, count_sum

        # The micro-step counter is the same on every device, so every device takes the same branch.
        last_micro_batch = micro_step % grad_accum_steps == 0
        params, opt_state, grad_sum, count_sum = jax.lax.cond(last_micro_batch, update, accumulate, None)
        new_state = state.replace(step=state.step + last_micro_batch.astype(state.step.dtype), micro_step=micro_step,
                                  params=params, opt_state=opt_state, grad_sum=grad_sum, count_sum=count_sum)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, objective: Objective, axis_name: str | None = None):
    """(params, batch) -> the objective's sums on the batch, without dropout."""

    def eval_step(params: nnx.State, batch: Batch) -> dict[str, jax.Array]:
        metrics = objective.fn(nnx.merge(graphdef, params), batch, deterministic=True, rngs=None)
        return metrics if axis_name is None else jax.lax.psum(metrics, axis_name)

    return eval_step


def compile_steps(graphdef, tx, objective: Objective, train_config: TrainConfig, n_devices: int,
                  pmap: bool = False):
    """jit for one device, pmap (gradients summed over AXIS) for several, or with `pmap` also for one
    (the benchmarks time pmap on a single GPU); the state is donated."""
    step_options = dict(rng_impl=train_config.rng_impl, grad_accum_steps=train_config.grad_accum_steps)
    if n_devices == 1 and not pmap:
        train = jax.jit(make_train_step(graphdef, tx, objective, **step_options), donate_argnums=0)
        evaluate = jax.jit(make_eval_step(graphdef, objective))
    else:
        train = jax.pmap(make_train_step(graphdef, tx, objective, axis_name=AXIS, **step_options),
                         axis_name=AXIS, donate_argnums=0)
        evaluate = jax.pmap(make_eval_step(graphdef, objective, axis_name=AXIS), axis_name=AXIS)
    return train, evaluate


def compile_mesh_steps(graphdef, tx, objective: Objective, train_config: TrainConfig,
                       state_shardings, batch_sharding, replicated):
    """jit over a device mesh: the same step as on one device (no axis name: the loss and gradient
    sums over the global batch are XLA's collectives), with the state's and the batch's shardings
    declared (`parallel/rules.py`) and the state donated. The metrics come out replicated."""
    rule = activation_rule(batch_sharding.mesh)

    def pinned(fn):
        """`fn` traced with the activations' layout pinned at the key points (`nn.partitioning.constrain`)."""
        def traced(*args):
            with activation_sharding(rule):
                return fn(*args)
        return traced

    step = make_train_step(graphdef, tx, objective, rng_impl=train_config.rng_impl,
                           grad_accum_steps=train_config.grad_accum_steps)
    train = jax.jit(pinned(step), in_shardings=(state_shardings, batch_sharding),
                    out_shardings=(state_shardings, replicated), donate_argnums=0)
    evaluate = jax.jit(pinned(make_eval_step(graphdef, objective)), in_shardings=(state_shardings.params, batch_sharding),
                       out_shardings=replicated)
    return train, evaluate
