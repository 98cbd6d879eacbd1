"""The optimizer config: schedules worked by hand, frozen parameters that stay bit for bit, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from transformer.config import ConfigError, TransformerConfig
from transformer.models.transformer import Transformer, TransformerClassifier
from transformer.training.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer, parameter_paths
from transformer.training.schedule import transformer_schedule

MODEL = TransformerConfig.tiny(vocab_size=24, d_model=16, d_ff=24, h=2, N=2, dropout_rate=0.0)


def _rates(schedule, counts):
    return [float(schedule(c)) for c in counts]


# -- schedules ------------------------------------------------------------------------------------

def test_noam_is_the_paper_formula_and_transformer_schedule():
    schedule = learning_rate_schedule(OptimizerConfig(warmup_steps=4000, lr_scale=2.0), d_model=512, num_steps=10)
    # count 0 is step 1: 2 · 512^-0.5 · 1 · 4000^-1.5 = 2 · 0.0441942 · 3.95285e-6 = 3.49386e-7
    np.testing.assert_allclose(float(schedule(0)), 3.49386e-7, rtol=1e-5)
    # count 3999, step 4000 (the peak): 2 · 512^-0.5 · 4000^-0.5 = 2 · 6.98771e-4
    np.testing.assert_allclose(float(schedule(3999)), 1.397542e-3, rtol=1e-5)
    # count 15999, step 16000: 2 · 512^-0.5 · 16000^-0.5 = 6.98771e-4
    np.testing.assert_allclose(float(schedule(15999)), 6.98771e-4, rtol=1e-5)
    paper = transformer_schedule(512, 4000, 2.0)
    counts = [0, 1, 100, 3998, 3999, 4000, 10**5]
    assert _rates(schedule, counts) == _rates(paper, counts)


def test_linear_warms_up_then_decays_to_zero_at_the_last_update():
    schedule = learning_rate_schedule(OptimizerConfig(schedule="linear", learning_rate=1e-3, warmup_steps=10),
                                      d_model=16, num_steps=110)
    # warm-up: 1e-3 · count / 10; decay: 1e-3 · (110 - count) / 100
    expected = {0: 0.0, 5: 5e-4, 9: 9e-4, 10: 1e-3, 60: 5e-4, 109: 1e-5, 110: 0.0, 500: 0.0}
    np.testing.assert_allclose(_rates(schedule, expected), list(expected.values()), rtol=1e-5, atol=1e-12)

    no_warmup = learning_rate_schedule(OptimizerConfig(schedule="linear", learning_rate=1e-3, warmup_steps=0),
                                       d_model=16, num_steps=100)
    expected = {0: 1e-3, 50: 5e-4, 75: 2.5e-4, 100: 0.0}
    np.testing.assert_allclose(_rates(no_warmup, expected), list(expected.values()), rtol=1e-5, atol=1e-12)


def test_constant_warms_up_then_holds():
    schedule = learning_rate_schedule(OptimizerConfig(schedule="constant", learning_rate=1e-3, warmup_steps=4),
                                      d_model=16, num_steps=10)
    expected = {0: 0.0, 1: 2.5e-4, 2: 5e-4, 4: 1e-3, 9: 1e-3, 10**6: 1e-3}
    np.testing.assert_allclose(_rates(schedule, expected), list(expected.values()), rtol=1e-6)
    no_warmup = learning_rate_schedule(OptimizerConfig(schedule="constant", learning_rate=3e-4, warmup_steps=0),
                                       d_model=16, num_steps=10)
    np.testing.assert_allclose(_rates(no_warmup, [0, 7]), [3e-4, 3e-4], rtol=1e-6)


def test_the_schedule_returned_is_the_one_adam_uses():
    # Adam's first update of a gradient g is -lr · ĝ/(√v̂ + ε) = -lr · g/(|g| + ε): with g = 2 and a
    # linear warm-up of 4 updates to 1e-2, update k (count k) moves a parameter by about -schedule(k).
    config = OptimizerConfig(schedule="linear", learning_rate=1e-2, warmup_steps=4, adam_eps=1e-9)
    params = {"w": jnp.zeros(3)}
    tx, schedule, frozen = make_optimizer(config, 16, 20, params)
    assert frozen == []
    state = tx.init(params)
    moves = []
    for _ in range(3):
        updates, state = tx.update({"w": jnp.full(3, 2.0)}, state, params)
        moves.append(float(updates["w"][0]))
    # A constant gradient keeps m̂ = g and v̂ = g², so every update is -lr · 2/(2 + 1e-9).
    np.testing.assert_allclose(moves, [-float(schedule(k)) for k in range(3)], rtol=1e-6)
    np.testing.assert_allclose(moves, [0.0, -2.5e-3, -5e-3], rtol=1e-6)


# -- frozen parameters ----------------------------------------------------------------------------

def _bits(x):
    return np.asarray(x).view(np.uint32)


def test_frozen_parameters_stay_bit_for_bit_and_keep_no_adam_moments():
    model = TransformerClassifier(MODEL, num_classes=3, rngs=nnx.Rngs(params=0))
    _, params = nnx.split(model, nnx.Param)
    # A -0.0 in a frozen matrix: p + (+0.0) would turn it into +0.0; it must keep its sign bit.
    table = params["embed"]["token_embedding"]["embedding"]
    table.value = table.value.at[0, 0].set(-0.0)
    config = OptimizerConfig(schedule="constant", learning_rate=1e-2, warmup_steps=0,
                             freeze=("^embed/", "encoder/layers/0/self_attention/"))
    tx, _, frozen = make_optimizer(config, MODEL.d_model, 100, params)
    assert frozen == ["embed/token_embedding/embedding"] + [
        f"encoder/layers/0/self_attention/{w}" for w in ("w_k", "w_o", "w_q", "w_v")]

    before = parameter_paths(params)
    state = tx.init(params)
    trained_size = sum(x.size for p, x in before.items() if p not in frozen)
    # Adam's two moments of the trained parameters, and nothing for the frozen ones (plus its count).
    moments = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * trained_size

    def step(params, state):  # eagerly: under jit XLA may drop the add of a constant zero altogether
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)  # every parameter has a gradient
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(3):
        params, state = step(params, state)
    after = parameter_paths(params)
    for path in frozen:
        np.testing.assert_array_equal(_bits(after[path]), _bits(before[path]))
    assert np.signbit(after["embed/token_embedding/embedding"][0, 0])
    # A constant gradient makes each Adam update -lr · 0.5/(0.5 + 1e-9): three of them move every
    # trained parameter by -3e-2.
    for path in ("classifier/kernel", "encoder/layers/1/self_attention/w_q", "encoder/layers/0/feed_forward/linear_1/bias"):
        np.testing.assert_allclose(np.asarray(after[path]) - np.asarray(before[path]), -3e-2, rtol=1e-4)


def test_the_shared_embedding_matrix_is_frozen_under_its_one_path():
    model = Transformer(MODEL, rngs=nnx.Rngs(params=0))
    _, params = nnx.split(model, nnx.Param)
    _, _, frozen = make_optimizer(OptimizerConfig(freeze=("src_embed",)), MODEL.d_model, 10, params)
    assert frozen == ["src_embed/token_embedding/embedding"]
    # §3.4: target embedding = source embedding; nnx stores the one matrix under src_embed/ only.
    with pytest.raises(ConfigError, match="'tgt_embed' matches no parameter"):
        make_optimizer(OptimizerConfig(freeze=("tgt_embed",)), MODEL.d_model, 10, params)


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="linear"), "the linear schedule needs learning_rate"),
    (dict(schedule="constant", warmup_steps=0), "the constant schedule needs learning_rate"),
    (dict(learning_rate=1e-3), "leave learning_rate unset"),
    (dict(schedule="cosine"), "schedule must be one of noam, linear, constant"),
    (dict(schedule="linear", learning_rate=-1.0), "learning_rate must be a positive number"),
    (dict(schedule="linear", learning_rate=1e-4, lr_scale=2.0), "lr_scale scales the noam schedule only"),
    (dict(warmup_steps=0), "warmup_steps must be an integer >= 1 for the noam schedule"),
    (dict(adam_b2=1.0), r"adam_b2 must be in \[0, 1\)"),
    (dict(adam_eps=0.0), "adam_eps must be a positive number"),
    (dict(freeze="embed"), "freeze must be a tuple of regular expressions"),
    (dict(freeze=("encoder/layers/[0-3",)), r"freeze pattern 'encoder/layers/\[0-3' is not a valid regular expression"),
])
def test_config_errors_say_what_to_fix(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OptimizerConfig(**kwargs)


def test_freeze_list_becomes_a_tuple():
    assert OptimizerConfig(freeze=["^embed/"]).freeze == ("^embed/",)


@functools.cache
def _classifier_params():
    return nnx.split(TransformerClassifier(MODEL, num_classes=3, rngs=nnx.Rngs(params=0)), nnx.Param)[1]


def test_a_pattern_that_matches_nothing_is_named_with_example_paths():
    with pytest.raises(ConfigError) as err:
        make_optimizer(OptimizerConfig(freeze=("^embed/", "decoder/")), MODEL.d_model, 10, _classifier_params())
    assert str(err.value) == ("freeze pattern 'decoder/' matches no parameter of this model (its parameters are named "
                              "like classifier/bias, classifier/kernel, embed/token_embedding/embedding, …): "
                              "fix or remove it")


def test_freezing_everything_is_refused():
    with pytest.raises(ConfigError, match="matches every parameter: nothing would be trained"):
        make_optimizer(OptimizerConfig(freeze=("embed", "encoder", "classifier")), MODEL.d_model, 10,
                       _classifier_params())


def test_linear_needs_more_updates_than_warmup():
    with pytest.raises(ConfigError, match=r"warmup_steps \(10\) must be below the number of updates \(10\)"):
        learning_rate_schedule(OptimizerConfig(schedule="linear", learning_rate=1e-4, warmup_steps=10), 16, 10)
