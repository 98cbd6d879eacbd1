"""§5.4 Label smoothing, and the token-level metrics of training and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def label_smoothed_cross_entropy(
    logits: Float[Array, "b t v"],
    targets: Int[Array, "b t"],
    weights: Float[Array, "b t"],
    label_smoothing: float,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """§5.4: cross-entropy against q = (1 - ε)·onehot(target) + ε/V (ε = 0.1 in the paper).

    −Σ_v q_v log p_v = (1 − ε)·(−log p_target) + ε·mean_v(−log p_v), computed without a one-hot
    [b, t, V] array. Returns (sum of per-token losses, sum of weights); padding has weight 0.
    """
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
    smooth = -log_p.mean(axis=-1)
    loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    return (loss * weights).sum(), weights.sum()


def token_metrics(
    logits: Float[Array, "b t v"], targets: Int[Array, "b t"], weights: Float[Array, "b t"]
) -> dict[str, Float[Array, ""]]:
    """Sums (not means) so that they add up across devices and batches: negative log-likelihood,
    correct argmax predictions, and the number of real tokens."""
    nll_sum, n = label_smoothed_cross_entropy(logits, targets, weights, 0.0)
    correct = ((logits.argmax(-1) == targets) * weights).sum()
    return {"nll_sum": nll_sum, "correct": correct, "tokens": n}
