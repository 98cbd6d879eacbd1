"""§5.3 The training state: parameters, Adam moments, the two step counters, random key."""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from transformer.config import TransformerConfig
from transformer.models.transformer import Transformer
from transformer.training.config import TrainConfig
from transformer.training.optimizer import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # []: updates done (what the schedule, the logs and the checkpoints count)
    micro_step: jax.Array  # []: micro-batches done (= step · grad_accum_steps between updates); the data position
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array  # raw key data; dropout keys are folded from it per micro-step and device
    # Gradient accumulation (None when grad_accum_steps == 1): the gradient of the summed loss over
    # the micro-batches of the current update so far, and the sum of what the loss counts.
    grad_sum: nnx.State | None = None
    count_sum: jax.Array | None = None


def create_train_state(
    model_config: TransformerConfig, train_config: TrainConfig, model_cls: Callable[..., nnx.Module] = Transformer,
    tx: optax.GradientTransformation | None = None,
) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
    """A freshly initialised model `model_cls(model_config, rngs=…)` (a task's model family, e.g.
    `functools.partial(TransformerClassifier, num_classes=2)`), split into its static graph and its
    parameters, with the optimizer (`tx`, or `make_optimizer` for the recipe) and its state."""
    model = model_cls(model_config, rngs=nnx.Rngs(params=train_config.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    if tx is None:
        tx = make_optimizer(train_config.optimizer, model_config.d_model, train_config.num_train_steps, params)[0]
    rng = jax.random.key_data(jax.random.key(train_config.seed + 1, impl=train_config.rng_impl))
    state = TrainState(step=jnp.zeros((), jnp.int32), micro_step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=tx.init(params), rng=rng)
    if train_config.grad_accum_steps > 1:
        state = state.replace(grad_sum=jax.tree.map(jnp.zeros_like, params), count_sum=jnp.zeros((), jnp.float32))
    return graphdef, state, tx
