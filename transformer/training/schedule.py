"""§5.3 The learning-rate schedule."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def transformer_schedule(d_model: int, warmup_steps: int = 4000, scale: float = 1.0) -> optax.Schedule:
    """§5.3: lrate = d_model^-0.5 · min(step^-0.5, step · warmup_steps^-1.5).

    Linear warm-up for warmup_steps, then decay with the inverse square root of the step.
    `step` counts from 1 (optax counts updates from 0). `scale` multiplies the whole schedule
    (1.0 is the paper).
    """

    def lrate(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return lrate
