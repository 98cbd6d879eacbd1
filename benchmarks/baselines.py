"""What a user would otherwise build, for side-by-side timing (benchmarks only, not the library):

(a) the same model assembled from Flax's stock NNX layers (nnx.MultiHeadAttention, nnx.Linear,
    nnx.LayerNorm, nnx.Embed) with a plain training step (nnx.Optimizer, one-hot smoothed labels
    with optax, nnx.jit, a stateful dropout stream);
(b) PyTorch's stock layers with tied embeddings and CrossEntropyLoss(label_smoothing=0.1), eager
    and under torch.compile, when torch is installed: nn.Transformer for the encoder-decoder,
    nn.TransformerEncoder layers under a causal mask for the decoder-only model.

Each builds one of two families (`family`): "translate", the encoder-decoder, whose batches hold
src, tgt_in and tgt_out; "lm", the decoder-only language model (post-LN self-attention layers under
a causal mask, no cross-attention, the output projection tied to the embedding), whose batches hold
tokens_in and tokens_out. Both follow the paper's architecture and hyper-parameters as closely as
their stock parts allow.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def _sinusoids(length: int, d_model: int) -> np.ndarray:
    pos = np.arange(length)[:, None]
    div = np.power(10000.0, np.arange(0, d_model, 2) / d_model)
    pe = np.zeros((length, d_model), np.float32)
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos / div), np.cos(pos / div)
    return pe


# Per family: the batch entries the model reads, and the targets.
FAMILY_KEYS = {"translate": (("src", "tgt_in"), "tgt_out"), "lm": (("tokens_in",), "tokens_out")}


class _StockEncoderLayer(nnx.Module):
    """A post-LN self-attention layer; under a causal mask, the decoder-only model's layer."""

    def __init__(self, d, h, d_ff, p, dtype, rngs):
        self.attn = nnx.MultiHeadAttention(h, d, dropout_rate=0.0, decode=False, dtype=dtype, rngs=rngs)
        self.ln1, self.ln2 = nnx.LayerNorm(d, dtype=dtype, rngs=rngs), nnx.LayerNorm(d, dtype=dtype, rngs=rngs)
        self.ff1, self.ff2 = nnx.Linear(d, d_ff, dtype=dtype, rngs=rngs), nnx.Linear(d_ff, d, dtype=dtype, rngs=rngs)
        self.drop = nnx.Dropout(p, rngs=rngs)

    def __call__(self, x, mask, deterministic):
        x = self.ln1(x + self.drop(self.attn(x, mask=mask, deterministic=deterministic), deterministic=deterministic))
        return self.ln2(x + self.drop(self.ff2(jax.nn.relu(self.ff1(x))), deterministic=deterministic))


class _StockDecoderLayer(nnx.Module):
    def __init__(self, d, h, d_ff, p, dtype, rngs):
        self.self_attn = nnx.MultiHeadAttention(h, d, dropout_rate=0.0, decode=False, dtype=dtype, rngs=rngs)
        self.cross_attn = nnx.MultiHeadAttention(h, d, dropout_rate=0.0, decode=False, dtype=dtype, rngs=rngs)
        self.ln1, self.ln2, self.ln3 = (nnx.LayerNorm(d, dtype=dtype, rngs=rngs) for _ in range(3))
        self.ff1, self.ff2 = nnx.Linear(d, d_ff, dtype=dtype, rngs=rngs), nnx.Linear(d_ff, d, dtype=dtype, rngs=rngs)
        self.drop = nnx.Dropout(p, rngs=rngs)

    def __call__(self, y, memory, self_mask, cross_mask, deterministic):
        d = dict(deterministic=deterministic)
        y = self.ln1(y + self.drop(self.self_attn(y, mask=self_mask, **d), **d))
        y = self.ln2(y + self.drop(self.cross_attn(y, memory, memory, mask=cross_mask, **d), **d))
        return self.ln3(y + self.drop(self.ff2(jax.nn.relu(self.ff1(y))), **d))


class _FlaxStockEmbedded(nnx.Module):
    """The embedding both families share: Dropout(E[tokens]·√d + sinusoids), and its tied output projection."""

    def __init__(self, vocab, d, p, max_len, dtype, rngs):
        self.d = d
        self.embed = nnx.Embed(vocab, d, dtype=dtype, rngs=rngs)
        self.pe = nnx.Variable(jnp.asarray(_sinusoids(max_len, d)))
        self.drop = nnx.Dropout(p, rngs=rngs)

    def embedded(self, tokens, deterministic):
        return self.drop(self.embed(tokens) * math.sqrt(self.d) + self.pe[...][: tokens.shape[1]][None],
                         deterministic=deterministic)


class FlaxStockTransformer(_FlaxStockEmbedded):
    def __init__(self, vocab, d, h, d_ff, N, p, max_len, dtype, rngs):
        super().__init__(vocab, d, p, max_len, dtype, rngs)
        self.enc = nnx.List([_StockEncoderLayer(d, h, d_ff, p, dtype, rngs) for _ in range(N)])
        self.dec = nnx.List([_StockDecoderLayer(d, h, d_ff, p, dtype, rngs) for _ in range(N)])

    def __call__(self, src, tgt_in, deterministic=False):
        enc_mask = nnx.make_attention_mask(src > 0, src > 0)
        dec_mask = nnx.combine_masks(nnx.make_attention_mask(tgt_in > 0, tgt_in > 0), nnx.make_causal_mask(tgt_in))
        cross_mask = nnx.make_attention_mask(tgt_in > 0, src > 0)
        x = self.embedded(src, deterministic)
        for layer in self.enc:
            x = layer(x, enc_mask, deterministic)
        y = self.embedded(tgt_in, deterministic)
        for layer in self.dec:
            y = layer(y, x, dec_mask, cross_mask, deterministic)
        return self.embed.attend(y)


class FlaxStockLM(_FlaxStockEmbedded):
    """The decoder-only model: N self-attention layers under a causal mask."""

    def __init__(self, vocab, d, h, d_ff, N, p, max_len, dtype, rngs):
        super().__init__(vocab, d, p, max_len, dtype, rngs)
        self.layers = nnx.List([_StockEncoderLayer(d, h, d_ff, p, dtype, rngs) for _ in range(N)])

    def __call__(self, tokens, deterministic=False):
        mask = nnx.combine_masks(nnx.make_attention_mask(tokens > 0, tokens > 0), nnx.make_causal_mask(tokens))
        x = self.embedded(tokens, deterministic)
        for layer in self.layers:
            x = layer(x, mask, deterministic)
        return self.embed.attend(x)


def flax_stock_step(config, family: str = "translate", warmup_steps: int = 4000):
    """(model, optimizer, train_step, forward_step) of `family` built the plain NNX way."""
    dtype = jnp.dtype(config.dtype)
    model_cls = {"translate": FlaxStockTransformer, "lm": FlaxStockLM}[family]
    inputs, target = FAMILY_KEYS[family]
    model = model_cls(config.vocab_size, config.d_model, config.h, config.d_ff, config.N,
                      config.dropout_rate, config.max_len, dtype, nnx.Rngs(0, dropout=1))
    lr = lambda step: config.d_model**-0.5 * jnp.minimum((step + 1) ** -0.5, (step + 1) * warmup_steps**-1.5)  # noqa: E731
    optimizer = nnx.Optimizer(model, optax.adam(lr, b1=0.9, b2=0.98, eps=1e-9), wrt=nnx.Param)

    def loss_fn(model, batch):
        logits = model(*(batch[k] for k in inputs)).astype(jnp.float32)
        labels = optax.smooth_labels(jax.nn.one_hot(batch[target], config.vocab_size), 0.1)
        weights = (batch[target] > 0).astype(jnp.float32)
        return (optax.softmax_cross_entropy(logits, labels) * weights).sum() / weights.sum()

    @nnx.jit
    def train_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def forward_step(model, batch):
        return model(*(batch[k] for k in inputs), deterministic=True)

    return model, optimizer, train_step, forward_step


def torch_step(config, compile: bool, family: str = "translate", warmup_steps: int = 4000):
    """(train_step(batch) -> loss, forward(batch)) of `family` in PyTorch, or None without torch:
    nn.Transformer for "translate", nn.TransformerEncoder layers under a causal mask for "lm"."""
    try:
        import torch
    except ImportError:
        return None
    from torch import nn

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # bfloat16 compute the way PyTorch users get it: autocast, float32 parameters.
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16")
    inputs, target = FAMILY_KEYS[family]

    class Embedded(nn.Module):
        """The embedding both families share: Dropout(E[tokens]·√d + sinusoids), and its tied output projection."""

        def __init__(self):
            super().__init__()
            self.d = config.d_model
            self.embed = nn.Embedding(config.vocab_size, config.d_model, padding_idx=0)
            self.register_buffer("pe", torch.from_numpy(_sinusoids(config.max_len, config.d_model)))
            self.drop = nn.Dropout(config.dropout_rate)

        def embedded(self, tokens):
            return self.drop(self.embed(tokens) * math.sqrt(self.d) + self.pe[: tokens.shape[1]])

        def project(self, out):
            return out @ self.embed.weight.T  # tied pre-softmax projection

    class TorchTransformer(Embedded):
        def __init__(self):
            super().__init__()
            self.transformer = nn.Transformer(
                config.d_model, config.h, config.N, config.N, config.d_ff, config.dropout_rate, batch_first=True
            )

        def forward(self, src, tgt_in):
            causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1], device=tgt_in.device, dtype=torch.bool)
            # tgt_is_causal: said, not detected (detecting it reads the mask back, a graph break for torch.compile)
            out = self.transformer(self.embedded(src), self.embedded(tgt_in), tgt_mask=causal,
                                   src_key_padding_mask=src == 0, tgt_key_padding_mask=tgt_in == 0,
                                   memory_key_padding_mask=src == 0, tgt_is_causal=True)
            return self.project(out)

    class TorchLM(Embedded):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(config.d_model, config.h, config.d_ff, config.dropout_rate,
                                               batch_first=True)
            # No final LayerNorm: each post-LN layer already ends in one (as in this library's model).
            self.layers = nn.TransformerEncoder(layer, config.N, enable_nested_tensor=False)

        def forward(self, tokens):
            causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device, dtype=torch.bool)
            # is_causal: said, not detected, as tgt_is_causal above
            out = self.layers(self.embedded(tokens), mask=causal, src_key_padding_mask=tokens == 0, is_causal=True)
            return self.project(out)

    model = {"translate": TorchTransformer, "lm": TorchLM}[family]().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: config.d_model**-0.5 * min((s + 1) ** -0.5, (s + 1) * warmup_steps**-1.5))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=0)
    forward = torch.compile(model) if compile else model

    def tensors(batch, keys):
        return [torch.from_numpy(np.asarray(batch[k])).long().to(device) for k in keys]

    def train_step(batch):
        model.train()
        *args, labels = tensors(batch, (*inputs, target))
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = forward(*args)
            loss = criterion(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        loss.backward()
        optimizer.step()
        schedule.step()
        return loss.detach()

    def forward_step(batch):
        model.eval()
        with torch.no_grad(), autocast:
            return forward(*tensors(batch, inputs))

    return train_step, forward_step
