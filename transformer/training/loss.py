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
    sums = loss_and_metrics(logits, targets, weights, label_smoothing)
    return sums["loss_sum"], sums["tokens"]


def loss_and_metrics(
    logits: Float[Array, "b t v"], targets: Int[Array, "b t"], weights: Float[Array, "b t"], label_smoothing: float
) -> dict[str, Float[Array, ""]]:
    """The smoothed loss and the token metrics from one pass over the vocabulary's logits.

    Sums (not means), so that they add up across devices and batches: "loss_sum" (label-smoothed),
    "nll_sum" (negative log-likelihood, for perplexity), "correct" (argmax = target) and "tokens"
    (real target tokens).
    """
    # With z the logits and lse = log Σ_v exp z_v: −log p_target = lse − z_target and
    # mean_v(−log p_v) = lse − mean_v z_v, so the [b, t, V] log-probabilities are never stored.
    z = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    z_target = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    nll = lse - z_target
    loss = nll - label_smoothing * (z.mean(axis=-1) - z_target)  # = (1−ε)·nll + ε·(lse − mean z)
    # The target is the argmax iff no logit exceeds its own (ties count as correct).
    correct = (z.max(axis=-1) <= z_target).astype(jnp.float32)
    return {"loss_sum": (loss * weights).sum(), "nll_sum": (nll * weights).sum(),
            "correct": (correct * weights).sum(), "tokens": weights.sum()}


def token_means(sums: dict[str, float]) -> dict[str, float]:
    """Per-token means of summed token metrics (`loss_and_metrics`'s, added over batches): loss,
    NLL, accuracy, and perplexity = exp(mean NLL) (the NLL is without label smoothing)."""
    import math

    tokens = max(sums["tokens"], 1.0)
    nll = sums["nll_sum"] / tokens
    return {"loss": sums["loss_sum"] / tokens, "nll": nll, "accuracy": sums["correct"] / tokens,
            "perplexity": math.exp(min(nll, 50.0))}
