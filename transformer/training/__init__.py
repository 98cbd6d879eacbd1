"""§5 Training: the recipe (config), the optimizer and state, the loss, the schedule, one pure
train step, and the loop that runs it (for any model)."""

from transformer.training.config import RNG_IMPLS, TOKENIZER_TYPES, TRAIN_PRESETS, LoopConfig, TrainConfig
from transformer.training.loop import LoopHooks, LoopResult, NonFinite, TrainLoop
from transformer.training.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from transformer.training.state import TrainState, create_train_state
from transformer.training.loss import loss_and_metrics, token_means
from transformer.training.step import (
    AXIS, Objective, compile_mesh_steps, compile_steps, make_eval_step, make_train_step,
)

__all__ = ["AXIS", "RNG_IMPLS", "TOKENIZER_TYPES", "TRAIN_PRESETS", "LoopConfig", "LoopHooks", "LoopResult",
           "NonFinite", "OptimizerConfig", "TrainConfig", "TrainLoop", "TrainState", "compile_mesh_steps", "compile_steps",
           "Objective", "create_train_state", "learning_rate_schedule", "loss_and_metrics", "make_eval_step", "make_optimizer", "make_train_step",
           "token_means"]
