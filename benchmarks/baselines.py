"""What a user would otherwise build, for side-by-side timing (benchmarks only, not the library):

(a) the same encoder-decoder assembled from Flax's stock NNX layers (nnx.MultiHeadAttention,
    nnx.Linear, nnx.LayerNorm, nnx.Embed) with a plain training step (nnx.Optimizer, one-hot
    smoothed labels with optax, nnx.jit, a stateful dropout stream);
(b) PyTorch's nn.Transformer with tied embeddings and CrossEntropyLoss(label_smoothing=0.1),
    eager and under torch.compile, when torch is installed.

Both follow the paper's architecture and hyper-parameters as closely as their stock parts allow.
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


class _StockEncoderLayer(nnx.Module):
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


class FlaxStockTransformer(nnx.Module):
    def __init__(self, vocab, d, h, d_ff, N, p, max_len, dtype, rngs):
        self.d = d
        self.embed = nnx.Embed(vocab, d, dtype=dtype, rngs=rngs)
        self.pe = nnx.Variable(jnp.asarray(_sinusoids(max_len, d)))
        self.drop = nnx.Dropout(p, rngs=rngs)
        self.enc = nnx.List([_StockEncoderLayer(d, h, d_ff, p, dtype, rngs) for _ in range(N)])
        self.dec = nnx.List([_StockDecoderLayer(d, h, d_ff, p, dtype, rngs) for _ in range(N)])

    def __call__(self, src, tgt_in, deterministic=False):
        d = dict(deterministic=deterministic)
        enc_mask = nnx.make_attention_mask(src > 0, src > 0)
        dec_mask = nnx.combine_masks(nnx.make_attention_mask(tgt_in > 0, tgt_in > 0), nnx.make_causal_mask(tgt_in))
        cross_mask = nnx.make_attention_mask(tgt_in > 0, src > 0)
        x = self.drop(self.embed(src) * math.sqrt(self.d) + self.pe[...][: src.shape[1]][None], **d)
        for layer in self.enc:
            x = layer(x, enc_mask, deterministic)
        y = self.drop(self.embed(tgt_in) * math.sqrt(self.d) + self.pe[...][: tgt_in.shape[1]][None], **d)
        for layer in self.dec:
            y = layer(y, x, dec_mask, cross_mask, deterministic)
        return self.embed.attend(y)


def flax_stock_step(config, warmup_steps: int = 4000):
    """(model, optimizer, train_step, forward_step) built the plain NNX way."""
    dtype = jnp.dtype(config.dtype)
    model = FlaxStockTransformer(config.vocab_size, config.d_model, config.h, config.d_ff, config.N,
                                 config.dropout_rate, config.max_len, dtype, nnx.Rngs(0, dropout=1))
    lr = lambda step: config.d_model**-0.5 * jnp.minimum((step + 1) ** -0.5, (step + 1) * warmup_steps**-1.5)  # noqa: E731
    optimizer = nnx.Optimizer(model, optax.adam(lr, b1=0.9, b2=0.98, eps=1e-9), wrt=nnx.Param)

    def loss_fn(model, batch):
        logits = model(batch["src"], batch["tgt_in"]).astype(jnp.float32)
        labels = optax.smooth_labels(jax.nn.one_hot(batch["tgt_out"], config.vocab_size), 0.1)
        weights = (batch["tgt_out"] > 0).astype(jnp.float32)
        return (optax.softmax_cross_entropy(logits, labels) * weights).sum() / weights.sum()

    @nnx.jit
    def train_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def forward_step(model, batch):
        return model(batch["src"], batch["tgt_in"], deterministic=True)

    return model, optimizer, train_step, forward_step


def torch_step(config, compile: bool, warmup_steps: int = 4000):
    """(train_step(batch) -> loss, forward(batch)) for PyTorch nn.Transformer, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    from torch import nn

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # bfloat16 compute the way PyTorch users get it: autocast, float32 parameters.
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16")

    class TorchTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = config.d_model
            self.embed = nn.Embedding(config.vocab_size, config.d_model, padding_idx=0)
            self.register_buffer("pe", torch.from_numpy(_sinusoids(config.max_len, config.d_model)))
            self.drop = nn.Dropout(config.dropout_rate)
            self.transformer = nn.Transformer(
                config.d_model, config.h, config.N, config.N, config.d_ff, config.dropout_rate, batch_first=True
            )

        def forward(self, src, tgt_in):
            causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1], device=tgt_in.device, dtype=torch.bool)
            x = self.drop(self.embed(src) * math.sqrt(self.d) + self.pe[: src.shape[1]])
            y = self.drop(self.embed(tgt_in) * math.sqrt(self.d) + self.pe[: tgt_in.shape[1]])
            # tgt_is_causal: said, not detected (detecting it reads the mask back, a graph break for torch.compile)
            out = self.transformer(x, y, tgt_mask=causal, src_key_padding_mask=src == 0,
                                   tgt_key_padding_mask=tgt_in == 0, memory_key_padding_mask=src == 0,
                                   tgt_is_causal=True)
            return out @ self.embed.weight.T  # tied pre-softmax projection

    model = TorchTransformer().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: config.d_model**-0.5 * min((s + 1) ** -0.5, (s + 1) * warmup_steps**-1.5))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=0)
    forward = torch.compile(model) if compile else model

    def train_step(batch):
        model.train()
        src, tgt_in, tgt_out = (torch.from_numpy(np.asarray(batch[k])).long().to(device)
                                for k in ("src", "tgt_in", "tgt_out"))
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = forward(src, tgt_in)
            loss = criterion(logits.reshape(-1, logits.shape[-1]).float(), tgt_out.reshape(-1))
        loss.backward()
        optimizer.step()
        schedule.step()
        return loss.detach()

    def forward_step(batch):
        model.eval()
        with torch.no_grad(), autocast:
            src, tgt_in = (torch.from_numpy(np.asarray(batch[k])).long().to(device) for k in ("src", "tgt_in"))
            return forward(src, tgt_in)

    return train_step, forward_step
