"""BERT-style masked-language-model pre-training of the encoder (Devlin et al., 2019; not in the
paper): 15% of the real positions are chosen, of them 80% replaced by the mask token, 10% by a
random token and 10% kept; the loss is the cross-entropy at the chosen positions only. Validation:
masked-token accuracy and perplexity. The encoder and embedding it trains (`TransformerMLM`'s
`embed` and `encoder`) are what `classify --init_from` fine-tunes.

The begin token serves as the mask token: the encoder never sees it otherwise, so the vocabulary,
and the tokenizer that a classifier fine-tuned from this run takes over, needs no piece of its own."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from transformer.config import ConfigError
from transformer.data.tokenizer import Tokenizer
from transformer.tasks.text_data import COUNTING as GENERATED, DocumentTask, check_sources
from transformer.training.loss import loss_and_metrics
from transformer.training.step import Objective

FIRST_ORDINARY_ID = 4  # ids 0-3 are padding, unknown, begin and end (`data/tokenizer.py`)


@dataclasses.dataclass(frozen=True)
class MLMConfig:
    """The data and the masking of a masked-LM run (rows of TrainConfig.max_length positions)."""

    dataset: str = GENERATED  # as `LMConfig.dataset`
    eval_dataset: str | None = None
    text_feature: str = "text"
    synthetic_examples: int = 20_000
    mask_rate: float = 0.15  # positions chosen
    mask_token_rate: float = 0.8  # of the chosen, replaced by the mask token
    random_token_rate: float = 0.1  # of the chosen, replaced by a random token (the rest are kept)
    # The most positions chosen in a row (BERT's max_predictions_per_seq); None: the mean of a full
    # row plus four standard deviations, a cap that about 3 rows in 100,000 would exceed.
    max_predictions: int | None = None

    def __post_init__(self):
        if not isinstance(self.synthetic_examples, int) or self.synthetic_examples <= 0:
            raise ConfigError(f"synthetic_examples must be a positive integer, got {self.synthetic_examples!r}")
        if not 0 < self.mask_rate < 1:
            raise ConfigError(f"mask_rate must be in (0, 1), got {self.mask_rate!r}")
        if not (0 <= self.mask_token_rate and 0 <= self.random_token_rate
                and self.mask_token_rate + self.random_token_rate <= 1):
            raise ConfigError("mask_token_rate and random_token_rate must be >= 0 with a sum of at most 1; got "
                              f"{self.mask_token_rate} and {self.random_token_rate}")
        if self.max_predictions is not None and (not isinstance(self.max_predictions, int) or self.max_predictions < 1):
            raise ConfigError(f"max_predictions must be a positive integer (or None), got {self.max_predictions!r}")
        check_sources(self.dataset, self.eval_dataset, GENERATED)

    def predictions_per_row(self, length: int) -> int:
        """The cap on the positions chosen in a row of `length` positions."""
        if self.max_predictions is not None:
            return min(self.max_predictions, length)
        mean, var = length * self.mask_rate, length * self.mask_rate * (1 - self.mask_rate)
        return min(length, math.ceil(mean + 4 * math.sqrt(var)))


def mask_tokens(key: jax.Array, tokens: jax.Array, pad_id: int, mask_id: int, vocab_size: int,
                config: MLMConfig) -> tuple[jax.Array, jax.Array]:
    """(inputs, chosen): `chosen` marks the positions to predict (each real position with
    probability mask_rate, padding never, and no more than `config.predictions_per_row` in a row:
    the first ones); of those, inputs hold the mask token with probability mask_token_rate, a
    uniformly random ordinary token with probability random_token_rate, else the token itself."""
    choose_key, action_key, random_key = jax.random.split(key, 3)
    chosen = (jax.random.uniform(choose_key, tokens.shape) < config.mask_rate) & (tokens != pad_id)
    chosen &= jnp.cumsum(chosen, axis=1) <= config.predictions_per_row(tokens.shape[1])
    action = jax.random.uniform(action_key, tokens.shape)
    random_tokens = jax.random.randint(random_key, tokens.shape, FIRST_ORDINARY_ID, vocab_size, tokens.dtype)
    replaced = jnp.where(action < config.mask_token_rate, mask_id,
                         jnp.where(action < config.mask_token_rate + config.random_token_rate, random_tokens, tokens))
    return jnp.where(chosen, replaced, tokens), chosen


def chosen_positions(chosen: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(at, weights), each [b, k]: the indices of a row's chosen positions, in order, then index 0
    with weight 0 for the slots left over (a row has at most k chosen)."""
    at = jnp.argsort(~chosen, axis=1, stable=True)[:, :k].astype(jnp.int32)
    return at, jnp.take_along_axis(chosen, at, axis=1).astype(jnp.float32)


def mlm_objective(config: MLMConfig, label_smoothing: float, pad_id: int, mask_id: int, vocab_size: int) -> Objective:
    """Cross-entropy of the original tokens at the chosen positions; the masking draws from the
    step's "data" key (a fixed key in evaluation, so every evaluation masks the same positions).
    The model scores the chosen positions only (`at`): the pre-softmax projection over the
    vocabulary, the largest matmul of a small encoder, then runs on predictions_per_row positions a
    row rather than on all of them (`benchmarks/mlm_step.py` times both; benchmarks/RESULTS.md,
    "Other tasks on real data", has the figures)."""

    def fn(model, batch, *, deterministic: bool, rngs):
        tokens = batch["tokens"]
        key = rngs.data() if rngs is not None else jax.random.key(0)
        inputs, chosen = mask_tokens(key, tokens, pad_id, mask_id, vocab_size, config)
        at, weights = chosen_positions(chosen, config.predictions_per_row(tokens.shape[1]))
        logits = model(inputs, positions=batch["positions"], segments=batch["segments"], at=at,
                       deterministic=deterministic, rngs=rngs)
        sums = loss_and_metrics(logits, jnp.take_along_axis(tokens, at, axis=1), weights, label_smoothing)
        sums["input_tokens"] = (tokens != pad_id).sum().astype(jnp.float32)
        return sums

    return Objective(fn, count="tokens")


class MLMTask(DocumentTask):
    name = "mlm"
    Config = MLMConfig
    # The noam schedule at the paper's scale (lr_scale 1: a peak of 0.0125 at d_model 64 and 100
    # warm-up steps; the other tasks' tiny presets use 2.0, a peak of 0.025): the generated demo
    # then reaches a masked accuracy of 0.93 in 600 steps, where at 2.0 it reached 0.22.
    PRESETS = {"tiny": {"train": dict(num_train_steps=600, batch_tokens=2048, max_length=32, warmup_steps=100,
                                      lr_scale=1.0, label_smoothing=0.0, log_every=100, eval_every=300,
                                      checkpoint_every=300)}}
    throughput = ("input_tokens",)

    def plans(self, tokenizer: Tokenizer, multiple: int):
        from transformer.data.batching import MLM

        return self.document_plans(tokenizer, multiple, self.train.max_length, MLM, packing=self.train.packing)

    def model_cls(self):
        from transformer.models.transformer import TransformerMLM

        return TransformerMLM

    def objective(self, model_config) -> Objective:
        from transformer.data.tokenizer import BOS_ID

        return mlm_objective(self.config, self.train.label_smoothing, model_config.pad_id, BOS_ID,
                             model_config.vocab_size)

