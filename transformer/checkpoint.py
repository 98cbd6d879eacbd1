"""Checkpoints with Orbax: the training state plus the data position, saved every N steps and at
the end, the last K kept; and §6.1's averaging of the last checkpoints."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpoints:
    """The checkpoints of one work dir (`<workdir>/checkpoints/<step>/`)."""

    def __init__(self, workdir: str, keep: int = 5):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save host copies of `state` (a pytree of arrays) and the JSON-able `meta`."""
        state = jax.device_get(state)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                          force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """The state saved at `step`, with the structure of `like` (arrays or shape-dtype structs)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), like)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        self.manager.close()


def average_states(states: list) -> Any:
    """§6.1: the element-wise mean of several checkpoints' parameters ("we used a single model
    obtained by averaging the last 5 checkpoints", 20 for big). The step, optimizer state and random
    key are those of the last one."""
    if not states:
        raise ValueError("no checkpoints to average")
    mean = jax.tree.map(lambda *xs: np.mean(np.stack([np.asarray(x, np.float64) for x in xs]), axis=0).astype(xs[0].dtype),
                        *[s.params for s in states])
    return states[-1].replace(params=mean)


def load_params(workdir: str, like: Any, average_last: int = 1, step: int | None = None) -> tuple[Any, list[int]]:
    """Parameters of a run's checkpoint at `step` (default the latest), or the average of its last
    `average_last` checkpoints. Returns (train state, the steps used)."""
    checkpoints = Checkpoints(workdir, keep=10**9)
    try:
        steps = checkpoints.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {checkpoints.directory}")
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint of step {step} in {checkpoints.directory} (have {steps})")
            steps = [s for s in steps if s <= step]
        used = steps[-average_last:]
        states = [checkpoints.restore(s, like)[0] for s in used]
    finally:
        checkpoints.close()
    return average_states(states), used


def average_into(workdir: str, out_dir: str, last: int, like: Any) -> list[int]:
    """Write a new work dir `out_dir` whose one checkpoint is the average of the last `last`
    checkpoints of `workdir` (with its config and tokenizer), ready for translate.py."""
    import shutil

    state, used = load_params(workdir, like, average_last=last)
    if os.path.abspath(out_dir) == os.path.abspath(workdir):
        raise ValueError("the averaged checkpoint must go to a new folder, not the run's own work dir")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(workdir):
        if name == "config.json" or name.startswith(("spm.", "chars.")):
            shutil.copy(os.path.join(workdir, name), os.path.join(out_dir, name))
    checkpoints = Checkpoints(out_dir, keep=1)
    try:
        checkpoints.save(used[-1], state, {"averaged_steps": used, "source": os.path.abspath(workdir),
                                           "data_position": int(np.asarray(state.step)), "step": used[-1]})
    finally:
        checkpoints.close()
    return used
