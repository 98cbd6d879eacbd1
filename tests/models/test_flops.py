import jax
import jax.numpy as jnp
from flax import nnx

from transformer import Transformer, TransformerConfig
from transformer.models.flops import forward_flops, peak_flops


def test_flop_formula_matches_xla_cost_analysis():
    # No padding, no masks that XLA could skip: the formula's matrix multiplies are all XLA does.
    config = TransformerConfig.tiny(vocab_size=300, d_model=96, d_ff=200, h=3, N=2)
    model = Transformer(config, rngs=nnx.Rngs(0))
    b, s, t = 2, 7, 5
    src, tgt = jnp.ones((b, s), jnp.int32), jnp.ones((b, t), jnp.int32)
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, x, y: nnx.merge(graphdef, p)(x, y))
    cost = forward.lower(params, src, tgt).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    formula = forward_flops(config, b, s, t)
    # XLA also counts element-wise work (softmax, LayerNorm, ReLU…), a few percent at this size;
    # a missing or doubled matrix multiply would be off by far more.
    assert formula <= cost["flops"] <= 1.1 * formula, (formula, cost["flops"])


def test_hand_count_for_one_layer():
    config = TransformerConfig.tiny(vocab_size=10, d_model=4, d_ff=8, h=2, N=1)
    # S = T = 1: encoder 4·2·16 + 4·4 + 4·32 = 272; decoder 128 + 16 + 64 + 64 + 16 + 128 = 416; output 80.
    assert forward_flops(config, 1, 1, 1) == 272 + 416 + 80


def test_known_peaks():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert peak_flops("cpu", "float32") is None
