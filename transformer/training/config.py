"""The training recipe (§5) shared by every task, with the presets of train.py's --config, and the
training loop's config (how long, how often to log, evaluate, checkpoint)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from transformer.config import TABLE3, TABLE3_LABEL_SMOOTHING, ConfigError

RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
TOKENIZER_TYPES = ("bpe", "unigram")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to log, evaluate and checkpoint (all counted in updates)."""

    num_steps: int
    grad_accum_steps: int = 1
    log_every: int = 100
    eval_every: int = 1000
    checkpoint_every: int = 1000
    throughput: tuple[str, ...] = ("tokens", "src_tokens")  # the summed counts behind tokens_per_s

    def __post_init__(self):
        for name in ("num_steps", "grad_accum_steps", "log_every", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training recipe shared by every task; defaults are the paper's (§5). A task's own data
    and evaluation options are in its config (`transformer/tasks/`)."""

    tfds_data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    num_train_steps: int = 100_000  # §5.3: base models trained for 100k steps
    batch_tokens: int = 25_000  # §5.1: ~25k source and ~25k target tokens per batch
    max_length: int = 256  # longest sequence (in tokens, EOS included) kept
    packing: bool = False
    # §5.1: byte-pair encoding (SentencePiece's BPE trainer); "unigram" is SentencePiece's unigram
    # language model, a departure. Unused by the generated tasks, which have a character vocabulary.
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    # §5.3 Adam and the learning-rate schedule ("noam"; "linear" and "constant" are for fine-tuning).
    schedule: Literal["noam", "linear", "constant"] = "noam"
    learning_rate: float | None = None  # the peak rate of "linear" and "constant"; noam's comes from d_model
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-9
    warmup_steps: int = 4000
    lr_scale: float = 1.0  # multiplies the §5.3 schedule (1.0 is the paper's)
    freeze: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "parameters kept fixed: regular expressions searched in their paths, e.g. embed "
                                      "encoder/layers/[0-3]"})
    label_smoothing: float = 0.1  # §5.4
    # Micro-batches per update: the update is the one-step update on their union (gradients summed,
    # divided once by all their real target tokens), so batch_tokens·grad_accum_steps is the batch.
    grad_accum_steps: int = 1
    # Start a new run from another run's parameters (fine-tuning): WORKDIR or WORKDIR@STEP.
    init_from: str | None = None
    # Bookkeeping.
    log_every: int = 100
    eval_every: int = 1000
    eval_batches: int = 0  # 0 = the whole eval split
    checkpoint_every: int = 1000
    keep_checkpoints: int = 5
    seed: int = 0
    rng_impl: str = "threefry2x32"  # "rbg"/"unsafe_rbg" make dropout masks cheaper on accelerators

    def __post_init__(self):
        object.__setattr__(self, "freeze", tuple(self.freeze))  # config.json gives a list
        positive = ("num_train_steps", "batch_tokens", "max_length", "grad_accum_steps",
                    "log_every", "eval_every", "checkpoint_every", "keep_checkpoints")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.eval_batches, int) or self.eval_batches < 0:
            raise ConfigError(f"eval_batches must be a non-negative integer, got {self.eval_batches!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ConfigError(
                f"tokenizer_type must be one of {', '.join(TOKENIZER_TYPES)}; got {self.tokenizer_type!r}"
            )
        if self.rng_impl not in RNG_IMPLS:
            raise ConfigError(f"rng_impl must be one of {', '.join(RNG_IMPLS)}; got {self.rng_impl!r}")
        self.optimizer  # validates the optimizer's share

    @property
    def optimizer(self):
        """The optimizer's share of the recipe (`training/optimizer.py`)."""
        from transformer.training.optimizer import OptimizerConfig

        return OptimizerConfig(schedule=self.schedule, learning_rate=self.learning_rate,
                               warmup_steps=self.warmup_steps, lr_scale=self.lr_scale, adam_b1=self.adam_b1,
                               adam_b2=self.adam_b2, adam_eps=self.adam_eps, freeze=tuple(self.freeze))

    @property
    def loop(self) -> LoopConfig:
        """The training loop's share of the recipe."""
        return LoopConfig(num_steps=self.num_train_steps, grad_accum_steps=self.grad_accum_steps,
                          log_every=self.log_every, eval_every=self.eval_every,
                          checkpoint_every=self.checkpoint_every)


# Training defaults that go with each model preset of train.py's --config.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # The embedded demo: reverse letter strings; a few minutes on a laptop CPU.
    "tiny": dict(num_train_steps=3000, batch_tokens=1024, max_length=16, warmup_steps=200, lr_scale=2.0,
                 log_every=100, eval_every=1000, checkpoint_every=1000),
    "base": dict(),
    # §6.1: big models trained for 300k steps.
    "big": dict(num_train_steps=300_000),
    # Table 3's lines ("A1" … "E1"): the base recipe; lines D3 and D4 change label smoothing (ε_ls).
    **{name: ({"label_smoothing": TABLE3_LABEL_SMOOTHING[name]} if name in TABLE3_LABEL_SMOOTHING else {})
       for name in TABLE3},
}
