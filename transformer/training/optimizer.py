"""§5.3 The optimizer, as one config: Adam, a learning-rate schedule (the paper's, or the linear
warm-up and decay used to fine-tune), and parameters left frozen.

Parameters are named by their paths in the model, written with "/" (`parameter_paths`):
`encoder/layers/0/self_attention/w_q`, `src_embed/token_embedding/embedding` (encoder-decoder),
`embed/token_embedding/embedding` (LM and classifier), `classifier/kernel`. A matrix shared by
several modules (§3.4) has one path, the first one nnx meets: in the encoder-decoder with
share_embeddings, `src_embed/token_embedding/embedding` (there is no `tgt_embed/token_embedding/…`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Shaped

from transformer.config import ConfigError
from transformer.training.schedule import transformer_schedule

SCHEDULES = ("noam", "linear", "constant")


def _key_name(key: Any) -> str:
    """One step of a JAX key path as it reads in a parameter path."""
    for field in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
        if hasattr(key, field):
            return str(getattr(key, field))
    return str(key)


def path_name(key_path: tuple) -> str:
    """A JAX key path written with "/". The last step is dropped when it is "value": it is the field
    of the nnx.Variable that holds the array (a live nnx.State) or its saved name (the same State in
    an Orbax checkpoint), not part of the parameter's name, so both give the same path."""
    names = [_key_name(key) for key in key_path]
    if names and names[-1] == "value":
        names = names[:-1]
    return "/".join(names)


def parameter_paths(params: nnx.State | dict) -> dict[str, Shaped[Array, "..."]]:
    """{path: array} for every array leaf of `params` (an nnx.State of parameters, or the nested
    dicts a checkpoint restores it as), in jax.tree_util's flattening order: sorted keys, so layer
    10 comes before layer 2 in a checkpoint, whose layer numbers are strings."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {path_name(key_path): leaf for key_path, leaf in leaves}


def _positive_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Adam and its learning-rate schedule, and the parameters that are not trained.

    schedule:
      "noam" (§5.3, the default): lrate = d_model^-0.5 · min(step^-0.5, step · warmup_steps^-1.5)
        · lr_scale, step counted from 1. learning_rate must be None: the rate comes from d_model.
      "linear": linear warm-up from 0 to learning_rate over warmup_steps updates, then linear decay
        to 0 at the last update (BERT's fine-tuning schedule).
      "constant": linear warm-up from 0 to learning_rate over warmup_steps updates, then constant.
      warmup_steps may be 0 for "linear" and "constant" (start at learning_rate).
    freeze: regular expressions; a parameter whose path (see `parameter_paths`) contains a match
      (re.search: anywhere in the path, so `embed` also matches `src_embed/…`; write `^embed/` for
      one module) gets no update at all.
    """

    schedule: Literal["noam", "linear", "constant"] = "noam"
    learning_rate: float | None = None  # the peak rate of "linear" and "constant"
    warmup_steps: int = 4000
    lr_scale: float = 1.0  # multiplies the "noam" schedule (1.0 is the paper's)
    # §5.3: Adam with β1 = 0.9, β2 = 0.98 and ε = 10^-9.
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-9
    freeze: tuple[str, ...] = ()

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.schedule == "noam":
            if self.learning_rate is not None:
                raise ConfigError("the noam schedule's rate comes from d_model and warmup_steps: leave learning_rate "
                                  "unset (scale the schedule with lr_scale), or choose schedule linear or constant")
        else:
            if self.learning_rate is None:
                raise ConfigError(f"the {self.schedule} schedule needs learning_rate (its peak rate, e.g. 5e-5)")
            if not _positive_number(self.learning_rate):
                raise ConfigError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
            if self.lr_scale != 1.0:
                raise ConfigError(f"lr_scale scales the noam schedule only: with schedule {self.schedule} set "
                                  "learning_rate instead")
        least = 1 if self.schedule == "noam" else 0  # noam divides by warmup_steps^1.5
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < least:
            raise ConfigError(f"warmup_steps must be an integer >= {least} for the {self.schedule} schedule, "
                              f"got {self.warmup_steps!r}")
        if not _positive_number(self.lr_scale):
            raise ConfigError(f"lr_scale must be a positive number, got {self.lr_scale!r}")
        for name in ("adam_b1", "adam_b2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if not _positive_number(self.adam_eps):
            raise ConfigError(f"adam_eps must be a positive number, got {self.adam_eps!r}")
        # A lone string would be read as a sequence of one-letter patterns.
        if isinstance(self.freeze, str) or not isinstance(self.freeze, (tuple, list)):
            raise ConfigError(f"freeze must be a tuple of regular expressions, e.g. ('^embed/',); got {self.freeze!r}")
        object.__setattr__(self, "freeze", tuple(self.freeze))
        for pattern in self.freeze:
            if not isinstance(pattern, str):
                raise ConfigError(f"freeze holds {pattern!r}, which is not a regular expression (a string)")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"freeze pattern {pattern!r} is not a valid regular expression ({err}): "
                                  "fix or quote it") from None


def learning_rate_schedule(config: OptimizerConfig, d_model: int, num_steps: int) -> optax.Schedule:
    """The learning rate of the update made after `count` updates (optax's count, from 0).

    noam: `transformer_schedule(d_model, warmup_steps, lr_scale)`, the §5.3 formula with step = count + 1.
    linear: learning_rate · count / warmup_steps while count < warmup_steps, then
      learning_rate · (num_steps − count) / (num_steps − warmup_steps), 0 from count = num_steps on.
    constant: learning_rate · count / warmup_steps while count < warmup_steps, then learning_rate.
    As in BERT's schedule, the first update of a warm-up (count 0) has rate 0 for linear and constant.
    `num_steps` (the number of updates of the run) is used by linear only.
    """
    if not isinstance(d_model, int) or d_model <= 0:
        raise ConfigError(f"d_model must be a positive integer, got {d_model!r}")
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps <= 0:
        raise ConfigError(f"the number of updates must be a positive integer, got {num_steps!r}")
    if config.schedule == "noam":
        return transformer_schedule(d_model, config.warmup_steps, config.lr_scale)
    peak, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "linear":
        if warmup >= num_steps:
            raise ConfigError(f"the linear schedule decays to 0 at the last update: warmup_steps ({warmup}) must be "
                              f"below the number of updates ({num_steps})")
        decay = optax.linear_schedule(peak, 0.0, num_steps - warmup)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        # optax.linear_schedule over 0 steps holds its initial value: it cannot say "no warm-up".
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _frozen_patterns_check(config: OptimizerConfig, paths: list[str]) -> list[str]:
    """The frozen paths; ConfigError for a pattern that matches nothing or for freezing everything."""
    examples = ", ".join(paths[:3] + (["…"] if len(paths) > 3 else []))
    for pattern in config.freeze:
        if not any(re.search(pattern, path) for path in paths):
            raise ConfigError(f"freeze pattern {pattern!r} matches no parameter of this model "
                              f"(its parameters are named like {examples}): fix or remove it")
    frozen = [path for path in paths if any(re.search(pattern, path) for pattern in config.freeze)]
    if frozen and len(frozen) == len(paths):
        raise ConfigError(f"freeze ({', '.join(map(repr, config.freeze))}) matches every parameter: nothing would "
                          "be trained; narrow the patterns")
    return frozen


def _keep_bits() -> optax.GradientTransformation:
    """The update of a frozen parameter: -0.0 everywhere. Why not optax.set_to_zero's +0.0: p + (-0.0)
    is p bit for bit for every p, while (-0.0) + (+0.0) is +0.0."""
    return optax.stateless(lambda updates, params: jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates))


def make_optimizer(
    config: OptimizerConfig, d_model: int, num_steps: int, params: nnx.State
) -> tuple[optax.GradientTransformation, optax.Schedule, list[str]]:
    """(tx, schedule, frozen): Adam(adam_b1, adam_b2, adam_eps) at `learning_rate_schedule(config, d_model,
    num_steps)`, the very schedule object returned (so a logged rate is the rate used); the schedule
    counts Adam updates (tx.update calls).

    With `config.freeze`, `frozen` lists the paths of `params` that match a pattern: their update is
    -0.0 (they stay bit for bit) and Adam keeps no moments for them (optax.partition). A pattern that
    matches no parameter, or patterns that match them all, raise ConfigError.
    """
    schedule = learning_rate_schedule(config, d_model, num_steps)
    adam = optax.adam(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)
    if not config.freeze:
        return adam, schedule, []
    frozen = _frozen_patterns_check(config, list(parameter_paths(params)))
    frozen_set = set(frozen)

    def labels(tree):
        # Computed from the tree optax is given (parameters or updates): the same paths as `params`.
        return jax.tree_util.tree_map_with_path(
            lambda key_path, _: "frozen" if path_name(key_path) in frozen_set else "trained", tree)

    return optax.partition({"trained": adam, "frozen": _keep_bits()}, labels), schedule, frozen
