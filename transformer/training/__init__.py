"""§5 Training: the recipe (config), the optimizer and state, the loss, the schedule and one pure
train step."""

from transformer.training.config import RNG_IMPLS, TOKENIZER_TYPES, TRAIN_PRESETS, TrainConfig
from transformer.training.state import TrainState, create_train_state, make_optimizer
from transformer.training.step import (
    AXIS, compile_mesh_steps, compile_steps, make_eval_step, make_train_step, summarize,
)

__all__ = ["AXIS", "RNG_IMPLS", "TOKENIZER_TYPES", "TRAIN_PRESETS", "TrainConfig", "TrainState", "compile_mesh_steps", "compile_steps",
           "create_train_state", "make_eval_step", "make_optimizer", "make_train_step", "summarize"]
