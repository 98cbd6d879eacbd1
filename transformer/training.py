"""§5 Training: the optimizer, the training state, and one pure train step (state, batch) ->
(state, metrics), run under `jax.jit` on one device or `jax.pmap` across all local devices."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from transformer.config import ConfigError, TransformerConfig
from transformer.loss import loss_and_metrics
from transformer.model import Transformer
from transformer.schedule import transformer_schedule

Batch = dict[str, jax.Array]
AXIS = "devices"  # the pmap axis name
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
TOKENIZER_TYPES = ("bpe", "unigram")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training recipe; defaults are the paper's (§5), with the data options of train.py."""

    dataset: str = "reverse"  # "reverse" (generated, no download) or a tfds name, e.g. wmt14_translate/de-en
    dataset_dir: str | None = None  # a folder of {lang}.{split}.txt files (tfds.TranslateFolder layout)
    tfds_data_dir: str | None = None
    src_lang: str = "en"  # the paper translates English -> German
    tgt_lang: str = "de"
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    num_train_steps: int = 100_000  # §5.3: base models trained for 100k steps
    batch_tokens: int = 25_000  # §5.1: ~25k source and ~25k target tokens per batch
    max_length: int = 256  # longest source or target (in tokens, EOS included) kept
    packing: bool = False
    synthetic_examples: int = 50_000  # size of the generated training set of the "reverse" task
    # §5.1: byte-pair encoding (SentencePiece's BPE trainer); "unigram" is SentencePiece's unigram
    # language model, a departure. Unused by the generated task, which has a character vocabulary.
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    # §5.3 Adam and the learning-rate schedule.
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-9
    warmup_steps: int = 4000
    lr_scale: float = 1.0  # multiplies the §5.3 schedule (1.0 is the paper's)
    label_smoothing: float = 0.1  # §5.4
    # Micro-batches per update: the update is the one-step update on their union (gradients summed,
    # divided once by all their real target tokens), so batch_tokens·grad_accum_steps is the batch.
    grad_accum_steps: int = 1
    # Bookkeeping.
    log_every: int = 100
    eval_every: int = 1000
    eval_batches: int = 0  # 0 = the whole eval split
    checkpoint_every: int = 1000
    keep_checkpoints: int = 5
    seed: int = 0
    rng_impl: str = "threefry2x32"  # "rbg"/"unsafe_rbg" make dropout masks cheaper on accelerators
    # §6.1 inference.
    beam_size: int = 4
    length_penalty: float = 0.6
    max_decode_extra: int = 50  # output length limit = input length + 50
    bleu_examples: int = 0  # 0 = score the whole eval/test split at the end

    def __post_init__(self):
        positive = ("num_train_steps", "batch_tokens", "max_length", "warmup_steps", "grad_accum_steps",
                    "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "beam_size",
                    "synthetic_examples")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_batches", "bleu_examples", "max_decode_extra"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        for name in ("adam_b1", "adam_b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not self.adam_eps > 0 or not self.lr_scale > 0:
            raise ConfigError("adam_eps and lr_scale must be positive")
        if self.length_penalty < 0:
            raise ConfigError(f"length_penalty must be >= 0, got {self.length_penalty!r}")
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ConfigError(
                f"tokenizer_type must be one of {', '.join(TOKENIZER_TYPES)}; got {self.tokenizer_type!r}"
            )
        if self.rng_impl not in RNG_IMPLS:
            raise ConfigError(f"rng_impl must be one of {', '.join(RNG_IMPLS)}; got {self.rng_impl!r}")
        if self.src_lang == self.tgt_lang:
            raise ConfigError(f"src_lang and tgt_lang are both {self.src_lang!r}: choose two languages")


# Training defaults that go with each model preset of train.py's --config.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The embedded demo: reverse letter strings; a few minutes on a laptop CPU.
    "tiny": dict(num_train_steps=3000, batch_tokens=1024, max_length=16, warmup_steps=200, lr_scale=2.0,
                 log_every=100, eval_every=1000, checkpoint_every=1000, synthetic_examples=20_000, beam_size=1),
    "base": dict(),
    # §6.1: big models trained for 300k steps.
    "big": dict(num_train_steps=300_000),
}


def make_optimizer(model_config: TransformerConfig, train_config: TrainConfig) -> optax.GradientTransformation:
    """§5.3: Adam(β1=0.9, β2=0.98, ε=1e-9) with the warm-up / inverse-square-root schedule.

    The schedule counts Adam updates: with gradient accumulation the train step calls `update` once
    per grad_accum_steps micro-batches, so "step" in the §5.3 formula is an update, not a micro-batch."""
    schedule = transformer_schedule(model_config.d_model, train_config.warmup_steps, train_config.lr_scale)
    return optax.adam(schedule, b1=train_config.adam_b1, b2=train_config.adam_b2, eps=train_config.adam_eps)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # micro-batches done (= updates done · grad_accum_steps)
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array  # raw key data; dropout keys are folded from it per step and device
    # Gradient accumulation (None when grad_accum_steps == 1): the gradient of the summed loss over
    # the micro-batches of the current update so far, and their real target tokens.
    grad_sum: nnx.State | None = None
    tokens_sum: jax.Array | None = None


def create_train_state(
    model_config: TransformerConfig, train_config: TrainConfig, model_cls=Transformer
) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
    """A freshly initialised model, split into its static graph and its parameters."""
    model = model_cls(model_config, rngs=nnx.Rngs(params=train_config.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(model_config, train_config)
    rng = jax.random.key_data(jax.random.key(train_config.seed + 1, impl=train_config.rng_impl))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)
    if train_config.grad_accum_steps > 1:
        state = state.replace(grad_sum=jax.tree.map(jnp.zeros_like, params), tokens_sum=jnp.zeros((), jnp.float32))
    return graphdef, state, tx


def _model_inputs(batch: Batch) -> dict[str, jax.Array]:
    return {k: batch[k] for k in ("src_positions", "tgt_positions", "src_segments", "tgt_segments") if k in batch}


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    label_smoothing: float,
    pad_id: int,
    rng_impl: str = "threefry2x32",
    axis_name: str | None = None,
    grad_accum_steps: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step, called once per micro-batch. With `axis_name` (under pmap) the loss and
    gradients are summed over devices, so the update equals the one-device update on the whole
    global batch.

    With grad_accum_steps = k > 1 the gradients of the summed loss and the real target tokens are
    added into the state for k micro-batches; the k-th divides the gradient sum once by the token
    sum and applies one Adam update, so the update equals the one-step update on the union of the
    k micro-batches, however their real tokens are spread. (Averaging per-micro-batch means, as
    optax.MultiSteps does, would weigh a micro-batch with few real tokens as much as a full one.)
    """
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be a positive integer, got {grad_accum_steps!r}")

    def apply_update(state: TrainState, grad_sum, tokens: jax.Array):
        # Gradient of the mean loss over all real target tokens of the (accumulated) global batch.
        grads = jax.tree.map(lambda g: g / jnp.maximum(tokens, 1.0), grad_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=rng_impl), state.step)
        if axis_name is not None:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))  # a fresh key per device
        weights = (batch["tgt_out"] != pad_id).astype(jnp.float32)

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            logits = model(batch["src"], batch["tgt_in"], **_model_inputs(batch),
                           deterministic=False, rngs=nnx.Rngs(dropout=key))
            sums = loss_and_metrics(logits, batch["tgt_out"], weights, label_smoothing)
            return sums["loss_sum"], sums

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        metrics["src_tokens"] = (batch["src"] != pad_id).sum().astype(jnp.float32)
        if axis_name is not None:
            grads, metrics = jax.lax.psum((grads, metrics), axis_name)
        if grad_accum_steps == 1:
            params, opt_state = apply_update(state, grads, metrics["tokens"])
            return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

        grad_sum = jax.tree.map(jnp.add, state.grad_sum, grads)
        tokens_sum = state.tokens_sum + metrics["tokens"]

        def update(_):
            params, opt_state = apply_update(state, grad_sum, tokens_sum)
            return params, opt_state, jax.tree.map(jnp.zeros_like, grad_sum), jnp.zeros_like(tokens_sum)

        def accumulate(_):
            return state.params, state.opt_state, grad_sum, tokens_sum

        # The step counter is the same on every device, so every device takes the same branch.
        last_micro_batch = (state.step + 1) % grad_accum_steps == 0
        params, opt_state, grad_sum, tokens_sum = jax.lax.cond(last_micro_batch, update, accumulate, None)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  grad_sum=grad_sum, tokens_sum=tokens_sum)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, label_smoothing: float, pad_id: int, axis_name: str | None = None):
    """(params, batch) -> summed metrics: smoothed loss, NLL, correct tokens, tokens."""

    def eval_step(params: nnx.State, batch: Batch) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, params)
        logits = model(batch["src"], batch["tgt_in"], **_model_inputs(batch))
        weights = (batch["tgt_out"] != pad_id).astype(jnp.float32)
        metrics = loss_and_metrics(logits, batch["tgt_out"], weights, label_smoothing)
        return metrics if axis_name is None else jax.lax.psum(metrics, axis_name)

    return eval_step


def compile_steps(graphdef, tx, model_config: TransformerConfig, train_config: TrainConfig, n_devices: int):
    """jit for one device, pmap (gradients summed over AXIS) for several; the state is donated."""
    common = dict(label_smoothing=train_config.label_smoothing, pad_id=model_config.pad_id)
    step_options = dict(rng_impl=train_config.rng_impl, grad_accum_steps=train_config.grad_accum_steps)
    if n_devices == 1:
        train = jax.jit(make_train_step(graphdef, tx, **step_options, **common), donate_argnums=0)
        evaluate = jax.jit(make_eval_step(graphdef, **common))
    else:
        train = jax.pmap(make_train_step(graphdef, tx, axis_name=AXIS, **step_options, **common),
                         axis_name=AXIS, donate_argnums=0)
        evaluate = jax.pmap(make_eval_step(graphdef, axis_name=AXIS, **common), axis_name=AXIS)
    return train, evaluate


def summarize(metrics: dict[str, float]) -> dict[str, float]:
    """Per-token means from summed metrics."""
    import math

    tokens = max(metrics["tokens"], 1.0)
    nll = metrics["nll_sum"] / tokens
    return {"loss": metrics["loss_sum"] / tokens, "nll": nll, "accuracy": metrics["correct"] / tokens,
            "perplexity": math.exp(min(nll, 50.0))}
