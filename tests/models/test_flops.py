import jax
import jax.numpy as jnp
from flax import nnx

from transformer import Transformer, TransformerConfig
from transformer.models.flops import forward_flops, lm_forward_flops, lm_train_flops, peak_flops
from transformer.models.transformer import TransformerLM


import pytest


# The paper's head size (d_k = d_v = d_model / h), and Table 3 (A)/(B)-like sizes set apart from it.
@pytest.mark.parametrize("heads", [dict(), dict(d_k=8, d_v=20)])
def test_flop_formula_matches_xla_cost_analysis(heads):
    # No padding, no masks that XLA could skip: the formula's matrix multiplies are all XLA does.
    config = TransformerConfig.tiny(vocab_size=300, d_model=96, d_ff=200, h=3, N=2, **heads)
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


def test_hand_count_with_head_sizes_apart_from_d_model():
    # d = 4, h = 2, d_k = 1, d_v = 5: a = h·d_k = 2, o = h·d_v = 10; S = T = 1, d_ff = 8, V = 10.
    config = TransformerConfig.tiny(vocab_size=10, d_model=4, d_ff=8, h=2, N=1, d_k=1, d_v=5)
    # encoder: W^Q, W^K, W^V 2·4·(2 + 2 + 10) = 112, W^O 2·10·4 = 80, Q·Kᵀ and weights·V 2·(2 + 10) = 24,
    #          FFN 2·2·4·8 = 128 -> 344
    # decoder: self-attention 112 + 80 + 24 = 216; cross W^Q 2·4·2 = 16, W^O 80, W^K and W^V 2·4·12 = 96,
    #          scores and sum 24 -> 216; FFN 128 -> 560
    # output:  2·4·10 = 80
    assert forward_flops(config, 1, 1, 1) == 344 + 560 + 80


@pytest.mark.parametrize("heads", [dict(), dict(d_k=8, d_v=20)])
def test_lm_flop_formula_matches_xla_cost_analysis(heads):
    # The reference attention computes every causal score, masked or not, as the formula counts them.
    config = TransformerConfig.tiny(vocab_size=300, d_model=96, d_ff=200, h=3, N=2, **heads)
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    b, length = 2, 9
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    cost = forward.lower(params, jnp.ones((b, length), jnp.int32)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    formula = lm_forward_flops(config, b, length)
    assert formula <= cost["flops"] <= 1.1 * formula, (formula, cost["flops"])


def test_lm_hand_count_with_every_size_apart():
    # h = 2, d_k = 3, d = 4, d_v = 5, a = h·d_k = 6, N = 7, L = 8, B = 9, o = h·d_v = 10, V = 11, d_ff = 12.
    config = TransformerConfig.tiny(vocab_size=11, d_model=4, d_ff=12, h=2, N=7, d_k=3, d_v=5)
    # per layer: W^Q, W^K, W^V 2·8·4·(6 + 6 + 10) = 1408, W^O 2·8·10·4 = 640,
    #            Q·Kᵀ and weights·V over the full 8×8 2·64·(6 + 10) = 2048, FFN 2·2·8·4·12 = 1536 -> 5632
    # 7 layers 39424; tied output projection 2·8·4·11 = 704; per row 40128; 9 rows 361152.
    assert lm_forward_flops(config, 9, 8) == 361152
    assert lm_train_flops(config, 9, 8) == 3 * 361152


def test_known_peaks():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert peak_flops("cpu", "float32") is None
