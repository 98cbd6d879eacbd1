"""The masked-LM objective: which positions are chosen and what replaces them, and what the loss counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer.tasks.mlm import FIRST_ORDINARY_ID, MLMConfig, mask_tokens

PAD, MASK, VOCAB = 0, 2, 57


def test_fifteen_percent_chosen_and_eighty_ten_ten_on_a_large_batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(FIRST_ORDINARY_ID, VOCAB, (256, 300)).astype(np.int32)
    tokens[:, 200:] = PAD  # a third of every row is padding
    inputs, chosen = jax.jit(lambda k, t: mask_tokens(k, t, PAD, MASK, VOCAB, MLMConfig()))(jax.random.key(3), tokens)
    inputs, chosen = np.asarray(inputs), np.asarray(chosen)
    real = tokens != PAD
    assert not chosen[~real].any()  # padding is never chosen
    assert (inputs[~real] == PAD).all()
    n = chosen.sum()
    assert abs(n / real.sum() - 0.15) < 0.005  # 51,200 real positions: 3 standard deviations ≈ 0.0047
    masked = (inputs == MASK) & chosen
    kept = (inputs == tokens) & chosen
    random = chosen & ~masked & ~kept
    assert abs(masked.sum() / n - 0.8) < 0.012
    # A random replacement may draw the token itself (1 in 53): it then counts as kept.
    assert abs(kept.sum() / n - (0.1 + 0.1 / (VOCAB - FIRST_ORDINARY_ID))) < 0.01
    assert abs(random.sum() / n - 0.1 * (1 - 1 / (VOCAB - FIRST_ORDINARY_ID))) < 0.01
    assert (inputs[random] >= FIRST_ORDINARY_ID).all() and (inputs[random] < VOCAB).all()  # never a special token
    assert (inputs[~chosen] == tokens[~chosen]).all()  # what is not chosen is untouched


def test_the_loss_counts_the_chosen_positions_only():
    from flax import nnx

    from transformer.config import TransformerConfig
    from transformer.models.transformer import TransformerMLM
    from transformer.tasks.mlm import mlm_objective

    config = TransformerConfig.tiny(d_model=16, d_ff=24, h=2, N=1, vocab_size=VOCAB, dropout_rate=0.0)
    model = TransformerMLM(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    tokens = rng.integers(FIRST_ORDINARY_ID, VOCAB, (3, 11)).astype(np.int32)
    tokens[0, 7:] = PAD
    batch = {"tokens": jnp.asarray(tokens), "segments": jnp.asarray((tokens != PAD).astype(np.int32)),
             "positions": jnp.broadcast_to(jnp.arange(11), (3, 11))}
    objective = mlm_objective(MLMConfig(), 0.0, PAD, MASK, VOCAB)
    rngs = nnx.Rngs(dropout=0, data=5)
    sums = objective.fn(model, batch, deterministic=True, rngs=rngs)
    inputs, chosen = mask_tokens(nnx.Rngs(dropout=0, data=5).data(), batch["tokens"], PAD, MASK, VOCAB, MLMConfig())
    assert float(sums["tokens"]) == float(chosen.sum()) > 0
    # The summed NLL is that of the original tokens at the chosen positions, from the masked inputs.
    log_p = jax.nn.log_softmax(model(inputs, positions=batch["positions"], segments=batch["segments"]))
    nll = -jnp.take_along_axis(log_p, batch["tokens"][..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(float(sums["nll_sum"]), float((nll * chosen).sum()), rtol=1e-5)
    assert float(sums["input_tokens"]) == float((tokens != PAD).sum())


@pytest.mark.parametrize("fields, message", [
    (dict(mask_rate=0.0), "mask_rate must be in (0, 1)"),
    (dict(mask_token_rate=0.9, random_token_rate=0.2), "a sum of at most 1"),
    (dict(dataset="corpus.txt"), "name the validation data with --eval_dataset"),
    (dict(max_predictions=0), "max_predictions must be a positive integer"),
])
def test_bad_masking_settings_are_one_line(fields, message):
    from transformer.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MLMConfig(**fields)


def test_a_row_has_at_most_max_predictions_chosen_and_the_loss_scores_those_alone():
    from flax import nnx

    from transformer.config import TransformerConfig
    from transformer.models.transformer import TransformerMLM
    from transformer.tasks.mlm import chosen_positions, mlm_objective

    config = MLMConfig(mask_rate=0.5, max_predictions=3)
    rng = np.random.default_rng(2)
    tokens = rng.integers(FIRST_ORDINARY_ID, VOCAB, (64, 13)).astype(np.int32)
    tokens[:5, 2:] = PAD  # rows with 2 real tokens: fewer chosen than the cap
    inputs, chosen = mask_tokens(jax.random.key(7), jnp.asarray(tokens), PAD, MASK, VOCAB, config)
    inputs, chosen = np.asarray(inputs), np.asarray(chosen)
    counts = chosen.sum(axis=1)
    assert counts.max() == 3 and (counts[:5] <= 2).all()
    assert (inputs[~chosen] == tokens[~chosen]).all()  # beyond the cap, positions are neither changed nor scored
    at, weights = chosen_positions(jnp.asarray(chosen), 3)
    at, weights = np.asarray(at), np.asarray(weights)
    for row in range(64):
        n = counts[row]
        assert list(at[row, :n]) == list(np.flatnonzero(chosen[row])) and (weights[row] == (np.arange(3) < n)).all()

    # The objective's sums equal those of the full logits at the chosen positions.
    model = TransformerMLM(TransformerConfig.tiny(d_model=16, d_ff=24, h=2, N=1, vocab_size=VOCAB, dropout_rate=0.0),
                           rngs=nnx.Rngs(0))
    positions = jnp.broadcast_to(jnp.arange(13), (64, 13))
    batch = {"tokens": jnp.asarray(tokens), "segments": jnp.asarray((tokens != PAD).astype(np.int32)),
             "positions": positions}
    sums = mlm_objective(config, 0.0, PAD, MASK, VOCAB).fn(model, batch, deterministic=True, rngs=None)
    inputs, chosen = mask_tokens(jax.random.key(0), batch["tokens"], PAD, MASK, VOCAB, config)  # its fixed key
    log_p = jax.nn.log_softmax(model(inputs, positions=positions, segments=batch["segments"]))
    nll = -jnp.take_along_axis(log_p, batch["tokens"][..., None], axis=-1)[..., 0]
    assert float(sums["tokens"]) == float(chosen.sum())
    np.testing.assert_allclose(float(sums["nll_sum"]), float((nll * chosen).sum()), rtol=1e-5)
