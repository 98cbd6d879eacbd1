"""Independent NumPy versions of the paper's equations, written from the paper, not from the library."""

import numpy as np


def softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def attention(Q, K, V, mask=None):
    """Q [q, d_k], K [k, d_k], V [k, d_v], mask [q, k] bool -> [q, d_v]."""
    scores = Q @ K.T / np.sqrt(Q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, -1e30)
    return softmax(scores) @ V


def multi_head(Xq, Xkv, Wq, Wk, Wv, Wo, mask=None):
    """Xq [q, m], Xkv [k, m]; Wq/Wk/Wv [m, h, d]; Wo [h, d, m]. Concat(head_1..head_h)·W^O."""
    h = Wq.shape[1]
    heads = [attention(Xq @ Wq[:, i], Xkv @ Wk[:, i], Xkv @ Wv[:, i], mask) for i in range(h)]
    return np.concatenate(heads, axis=-1) @ Wo.reshape(-1, Wo.shape[-1])


def ffn(x, W1, b1, W2, b2):
    return np.maximum(0, x @ W1 + b1) @ W2 + b2


def layer_norm(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def positional_encoding(length, d_model):
    pe = np.zeros((length, d_model))
    for pos in range(length):
        for i in range(d_model // 2):
            pe[pos, 2 * i] = np.sin(pos / 10000 ** (2 * i / d_model))
            pe[pos, 2 * i + 1] = np.cos(pos / 10000 ** (2 * i / d_model))
    return pe


def decoder_only_lm(tokens, E, layers, eps=1e-6):
    """Logits [n, vocab] of a post-LN decoder-only language model over one unpadded row of n tokens:
    x = E[tokens]·√d_model + PE(0 … n-1) (§3.4, §3.5); per layer x = LayerNorm(x + MultiHead(x, x, x)
    with causal masking) and x = LayerNorm(x + FFN(x)) (§3.1, §3.2.3); logits x·Eᵀ (§3.4, tied).
    `layers`: one dict per layer with Wq, Wk, Wv [m, h, d], Wo [h, d, m], W1, b1, W2, b2 and the two
    LayerNorms' (scale, bias) as norm1 and norm2."""
    n, d_model = len(tokens), E.shape[1]
    x = E[np.asarray(tokens)] * np.sqrt(d_model) + positional_encoding(n, d_model)
    causal = np.tril(np.ones((n, n), bool))
    for p in layers:
        x = layer_norm(x + multi_head(x, x, p["Wq"], p["Wk"], p["Wv"], p["Wo"], causal), *p["norm1"], eps)
        x = layer_norm(x + ffn(x, p["W1"], p["b1"], p["W2"], p["b2"]), *p["norm2"], eps)
    return x @ E.T
