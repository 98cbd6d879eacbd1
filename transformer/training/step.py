"""§5 One pure train step (state, batch) -> (state, metrics), and the eval step; run under `jax.jit`
on one device, `jax.pmap` across this host's devices, or `jax.jit` over a device mesh."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from transformer.config import TransformerConfig
from transformer.nn.partitioning import activation_sharding
from transformer.parallel.rules import activation_rule
from transformer.training.config import TrainConfig
from transformer.training.loss import loss_and_metrics
from transformer.training.state import TrainState

Batch = dict[str, jax.Array]
AXIS = "devices"  # the pmap axis name


def _model_inputs(batch: Batch) -> dict[str, jax.Array]:
    return {k: batch[k] for k in ("src_positions", "tgt_positions", "src_segments", "tgt_segments") if k in batch}


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    label_smoothing: float,
    pad_id: int,
    rng_impl: str = "threefry2x32",
    axis_name: str | None = None,
    grad_accum_steps: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step, called once per micro-batch. With `axis_name` (under pmap) the loss and
    gradients are summed over devices, so the update equals the one-device update on the whole
    global batch.

    With grad_accum_steps = k > 1 the gradients of the summed loss and the real target tokens are
    added into the state for k micro-batches; the k-th divides the gradient sum once by the token
    sum and applies one Adam update, so the update equals the one-step update on the union of the
    k micro-batches, however their real tokens are spread. (Averaging per-micro-batch means, as
    optax.MultiSteps does, would weigh a micro-batch with few real tokens as much as a full one.)
    """
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be a positive integer, got {grad_accum_steps!r}")

    def apply_update(state: TrainState, grad_sum, tokens: jax.Array):
        # Gradient of the mean loss over all real target tokens of the (accumulated) global batch.
        grads = jax.tree.map(lambda g: g / jnp.maximum(tokens, 1.0), grad_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=rng_impl), state.step)
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))  # a fresh key per device
        weights = (batch["tgt_out"] != pad_id).astype(jnp.float32)

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            logits = model(batch["src"], batch["tgt_in"], **_model_inputs(batch),
                           deterministic=False, rngs=nnx.Rngs(dropout=key))
            sums = loss_and_metrics(logits, batch["tgt_out"], weights, label_smoothing)
            return sums["loss_sum"], sums

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        metrics["src_tokens"] = (batch["src"] != pad_id).sum().astype(jnp.float32)
        if axis_name is not None:
            grads, metrics = jax.lax.psum((grads, metrics), axis_name)
        if grad_accum_steps == 1:
            params, opt_state = apply_update(state, grads, metrics["tokens"])
            return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

        grad_sum = jax.tree.map(jnp.add, state.grad_sum, grads)
        tokens_sum = state.tokens_sum + metrics["tokens"]

        def update(_):
            params, opt_state = apply_update(state, grad_sum, tokens_sum)
            return params, opt_state, jax.tree.map(jnp.zeros_like, grad_sum), jnp.zeros_like(tokens_sum)

        def accumulate(_):
            return state.params, state.opt_state, grad_sum, tokens_sum

        # The step counter is the same on every device, so every device takes the same branch.
        last_micro_batch = (state.step + 1) % grad_accum_steps == 0
        params, opt_state, grad_sum, tokens_sum = jax.lax.cond(last_micro_batch, update, accumulate, None)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  grad_sum=grad_sum, tokens_sum=tokens_sum)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, label_smoothing: float, pad_id: int, axis_name: str | None = None):
    """(params, batch) -> summed metrics: smoothed loss, NLL, correct tokens, tokens."""

    def eval_step(params: nnx.State, batch: Batch) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, params)
        logits = model(batch["src"], batch["tgt_in"], **_model_inputs(batch))
        weights = (batch["tgt_out"] != pad_id).astype(jnp.float32)
        metrics = loss_and_metrics(logits, batch["tgt_out"], weights, label_smoothing)
        return metrics if axis_name is None else jax.lax.psum(metrics, axis_name)

    return eval_step


def compile_steps(graphdef, tx, model_config: TransformerConfig, train_config: TrainConfig, n_devices: int,
                  pmap: bool = False):
    """jit for one device, pmap (gradients summed over AXIS) for several, or with `pmap` also for one
    (the benchmarks time pmap on a single GPU); the state is donated."""
    common = dict(label_smoothing=train_config.label_smoothing, pad_id=model_config.pad_id)
    step_options = dict(rng_impl=train_config.rng_impl, grad_accum_steps=train_config.grad_accum_steps)
    if n_devices == 1 and not pmap:
        train = jax.jit(make_train_step(graphdef, tx, **step_options, **common), donate_argnums=0)
        evaluate = jax.jit(make_eval_step(graphdef, **common))
    else:
        train = jax.pmap(make_train_step(graphdef, tx, axis_name=AXIS, **step_options, **common),
                         axis_name=AXIS, donate_argnums=0)
        evaluate = jax.pmap(make_eval_step(graphdef, axis_name=AXIS, **common), axis_name=AXIS)
    return train, evaluate


def summarize(metrics: dict[str, float]) -> dict[str, float]:
    """Per-token means from summed metrics."""
    import math

    tokens = max(metrics["tokens"], 1.0)
    nll = metrics["nll_sum"] / tokens
    return {"loss": metrics["loss_sum"] / tokens, "nll": nll, "accuracy": metrics["correct"] / tokens,
            "perplexity": math.exp(min(nll, 50.0))}


def compile_mesh_steps(graphdef, tx, model_config: TransformerConfig, train_config: TrainConfig,
                       state_shardings, batch_sharding, replicated):
    """jit over a device mesh: the same step as on one device (no axis name: the loss and gradient
    sums over the global batch are XLA's collectives), with the state's and the batch's shardings
    declared (`parallel/rules.py`) and the state donated. The metrics come out replicated."""
    common = dict(label_smoothing=train_config.label_smoothing, pad_id=model_config.pad_id)
    rule = activation_rule(batch_sharding.mesh)

    def pinned(fn):
        """`fn` traced with the activations' layout pinned at the key points (`nn.partitioning.constrain`)."""
        def traced(*args):
            with activation_sharding(rule):
                return fn(*args)
        return traced

    step = make_train_step(graphdef, tx, rng_impl=train_config.rng_impl,
                           grad_accum_steps=train_config.grad_accum_steps, **common)
    train = jax.jit(pinned(step), in_shardings=(state_shardings, batch_sharding),
                    out_shardings=(state_shardings, replicated), donate_argnums=0)
    evaluate = jax.jit(pinned(make_eval_step(graphdef, **common)), in_shardings=(state_shardings.params, batch_sharding),
                       out_shardings=replicated)
    return train, evaluate
