"""Checkpoints with Orbax: the training state plus the data position, saved every N steps and at
the end, the last K kept; and §6.1's averaging of the last checkpoints.

This is the one place that decides whether a checkpoint is usable. A checkpoint that cannot be
restored (a data file truncated or removed, `_METADATA`, `meta` or `state` missing) or that holds
non-finite numbers is skipped with one line on standard error, and the next older one is used; a
skipped checkpoint is never deleted. A state with non-finite numbers is never saved."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

SKIPPED_DIR = "skipped_checkpoints"  # in the work dir, beside checkpoints/


class UnusableCheckpoint(Exception):
    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint step {step} is unusable: {reason}")
        self.step, self.reason = step, reason


class NonFiniteState(ValueError):
    """A state to be saved holds NaN or inf; the message names the first such array."""


class NoUsableCheckpoint(FileNotFoundError):
    pass


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def non_finite_leaf(tree: Any) -> str | None:
    """The path of the first floating-point array of `tree` holding NaN or inf, else None. JAX
    arrays are checked where they are (a sharded array is never gathered; every process gets the
    same answer), host arrays on the host."""
    named = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
             if np.issubdtype(getattr(leaf, "dtype", np.asarray(leaf).dtype), np.floating)]
    on_device = [leaf for _, leaf in named if isinstance(leaf, jax.Array)]
    device_ok = iter(jax.device_get(_finite_per_leaf(on_device)) if on_device else [])
    for path, leaf in named:
        ok = next(device_ok) if isinstance(leaf, jax.Array) else np.isfinite(np.asarray(leaf)).all()
        if not ok:
            return jax.tree_util.keystr(path)
    return None


@jax.jit
def _finite_per_leaf(leaves: list) -> list:
    return [jax.numpy.isfinite(x).all() for x in leaves]


def _sharded_over_a_mesh(state: Any) -> bool:
    """Arrays sharded over a mesh (of every process's devices, or of one process's several) are
    written shard by shard by the processes that hold them, never gathered. Anything else (one
    device's arrays, pmap's per-process copies) is saved from host copies."""
    leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    if any(not x.is_fully_addressable for x in leaves):
        return True
    return jax.process_count() == 1 and any(len(x.sharding.device_set) > 1 for x in leaves)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    """What to restore `x` as: its shape and dtype, and its sharding if it is a JAX array (so that a
    checkpoint saved under one mesh, or by pmap, is read straight into another layout)."""
    sharding = x.sharding if isinstance(x, jax.Array) else None
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:160]}{'…' if len(text) > 160 else ''}"


def _quiet_late_reads() -> None:
    """After Orbax gives up on a damaged checkpoint, TensorStore's other reads of it still finish
    and report to an asyncio loop that is already closed (seen on Python 3.11): dozens of
    "Event loop is closed" tracebacks on stderr, harmless. Drop exactly those reports."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_late_reads", False):
        return

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.quiets_late_reads = True
    sys.unraisablehook = hook


class Checkpoints:
    """The checkpoints of one work dir (`<workdir>/checkpoints/<step>/`)."""

    def __init__(self, workdir: str, keep: int = 5):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.closed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save `state` (a pytree of arrays; sharded ones shard by shard) and the JSON-able `meta`. Refuses
        (NonFiniteState) a state holding NaN or inf: such a checkpoint could only fail again."""
        bad = non_finite_leaf(state)
        if bad is not None:
            raise NonFiniteState(f"{bad} holds NaN or inf")
        if not _sharded_over_a_mesh(state):
            state = jax.device_get(state)  # host copies, saved by process 0 (a pmap copy is the same everywhere)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                          force=True)
        self.manager.wait_until_finished()

    def _missing_part(self, step: int) -> str | None:
        """A plain-words reason when a part of the step's folder is missing (Orbax's own errors are long)."""
        folder = os.path.join(self.directory, str(step))
        for part, what in (("state", "its state/ folder"), ("meta", "its meta/ folder"),
                           (os.path.join("state", "_METADATA"), "state/_METADATA")):
            if not os.path.exists(os.path.join(folder, part)):
                return f"{what} is missing"
        return None

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """The state saved at `step`, with the structure of `like` (arrays or shape-dtype structs).
        Raises UnusableCheckpoint, with the reason in a few words, when it cannot be used."""
        missing = self._missing_part(step)
        if missing:
            raise UnusableCheckpoint(step, missing)
        abstract = jax.tree.map(_abstract, like)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            )
        except Exception as err:  # Orbax/TensorStore raise many kinds; any of them makes it unusable
            _quiet_late_reads()
            raise UnusableCheckpoint(step, f"it cannot be read ({_short(err)})") from err
        bad = non_finite_leaf(restored["state"])
        if bad is not None:
            raise UnusableCheckpoint(step, f"{bad} holds NaN or inf")
        return restored["state"], dict(restored["meta"])

    def restore_params(self, step: int) -> dict:
        """The `params` of the state saved at `step`, read without the model that saved it: nested
        dicts of host arrays as Orbax keeps an nnx.State (layer numbers as strings, each array under
        a last key "value", the nnx.Variable's field), shapes and dtypes from the checkpoint's own
        metadata. Of the state's arrays only the parameters are read (not Adam's moments, twice
        their size). Raises UnusableCheckpoint, as `restore` does, when it cannot be used."""
        missing = self._missing_part(step)
        if missing:
            raise UnusableCheckpoint(step, missing)
        handler = ocp.PyTreeCheckpointHandler()
        path = epath.Path(self.directory) / str(step) / "state"
        try:
            saved = handler.metadata(path)
            saved = getattr(saved, "tree", saved)
            if not isinstance(saved, dict):
                raise UnusableCheckpoint(step, "its state/_METADATA cannot be read")
            if not isinstance(saved.get("params"), dict):
                raise UnusableCheckpoint(step, "its state holds no params")
            abstract = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), saved["params"])
            # Host arrays, whatever devices saved them (a mesh's shards are read whole), and with
            # partial_restore only the leaves named in `item` are read.
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
            args = ocp.args.PyTreeRestore(item={"params": abstract}, restore_args={"params": as_numpy},
                                          partial_restore=True)
            params = handler.restore(path, args=args)["params"]
        except UnusableCheckpoint:
            raise
        except Exception as err:  # Orbax/TensorStore raise many kinds; any of them makes it unusable
            _quiet_late_reads()
            raise UnusableCheckpoint(step, f"it cannot be read ({_short(err)})") from err
        finally:
            handler.close()
        bad = non_finite_leaf(params)
        if bad is not None:
            raise UnusableCheckpoint(step, f"params{bad} holds NaN or inf")
        return params

    def set_aside(self, step: int, reason: str) -> str:
        """Move a bad checkpoint out of Orbax's sight (so that neither its rotation deletes it nor a
        new save of the same step collides with it) into <workdir>/skipped_checkpoints/; keep the
        reason beside it. Only the run that holds the work dir's lock may do this."""
        target_root = os.path.join(self.workdir, SKIPPED_DIR)
        os.makedirs(target_root, exist_ok=True)
        target, n = os.path.join(target_root, str(step)), 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(target_root, f"{step}.{n}")
        shutil.move(os.path.join(self.directory, str(step)), target)
        with open(os.path.join(target, "WHY_SKIPPED.txt"), "w") as f:
            f.write(reason + "\n")
        self.manager.reload()
        return target

    def restore_newest(self, like: Any, set_aside: bool = False,
                       note: Callable[[str], None] = _stderr) -> tuple[int, Any, dict] | None:
        """The newest checkpoint that restores: (step, state, meta), or None if there is none.
        Each one skipped on the way is named in one line, with why; with `set_aside` it is also
        moved to skipped_checkpoints/ (see set_aside), never deleted."""
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(step, like)
            except UnusableCheckpoint as err:
                where = ""
                if set_aside:
                    where = f"; moved to {self.set_aside(step, err.reason)}"
                note(f"warning: skipped checkpoint step {step} in {self.directory}: {err.reason}{where}")
                continue
            return step, state, meta
        return None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.manager.close()


def average_params(trees: list) -> Any:
    """§6.1: the element-wise mean of several checkpoints' parameters ("we used a single model
    obtained by averaging the last 5 checkpoints", 20 for big), summed in float64."""
    if not trees:
        raise ValueError("no checkpoints to average")
    if len(trees) == 1:  # the mean of one: no float64 copy
        return trees[0]
    return jax.tree.map(lambda *xs: np.mean(np.stack([np.asarray(x, np.float64) for x in xs]), axis=0).astype(xs[0].dtype),
                        *trees)


def average_states(states: list) -> Any:
    """`average_params` of several train states; the step, optimizer state and random key are
    those of the last one."""
    mean = average_params([s.params for s in states])  # (raises for none)
    return states[-1].replace(params=mean)


def _fit_params(like_params: Any, saved: dict, step: int) -> Any:
    """`like_params` (the run's model's nnx.State) holding the arrays of `saved` (what
    `Checkpoints.restore_params` reads); UnusableCheckpoint unless every parameter is there with
    its shape."""
    from transformer.training.optimizer import parameter_paths, path_name

    saved = parameter_paths(saved)
    for path, leaf in parameter_paths(like_params).items():
        if path not in saved:
            raise UnusableCheckpoint(step, f"it has no parameter {path}, which the run's model has")
        if tuple(np.shape(saved[path])) != tuple(np.shape(leaf)):
            raise UnusableCheckpoint(step, f"its {path} has shape {tuple(np.shape(saved[path]))}, the run's model "
                                           f"{tuple(np.shape(leaf))}")
    return jax.tree_util.tree_map_with_path(
        lambda key_path, leaf: np.asarray(saved[path_name(key_path)]).astype(leaf.dtype), like_params)


def _usable_steps(checkpoints: Checkpoints, step: int | None, average_last: int, read) -> tuple[list, list[int]]:
    """(what `read(step)` gave, the steps) for the newest `average_last` checkpoints that can be
    read, at or before `step` if given (that one must be readable); the others skipped with a line
    on standard error."""
    steps = checkpoints.all_steps()
    if not steps:
        raise NoUsableCheckpoint(f"no checkpoints in {checkpoints.directory}")
    if step is not None:
        if step not in steps:
            raise NoUsableCheckpoint(f"no checkpoint of step {step} in {checkpoints.directory} (have {steps})")
        steps = [s for s in steps if s <= step]
    used, read_ = [], []
    for s in reversed(steps):
        if len(used) == average_last:
            break
        try:
            read_.insert(0, read(s))
            used.insert(0, s)
        except UnusableCheckpoint as err:
            if s == step:  # the one asked for by name: no silent substitute
                raise NoUsableCheckpoint(f"{err}: choose another --step (have {steps})") from None
            _stderr(f"warning: skipped checkpoint step {s} in {checkpoints.directory}: {err.reason}")
    if not used:
        raise NoUsableCheckpoint(f"none of the checkpoints in {checkpoints.directory} can be restored (see above)")
    return read_, used


def load_model_params(workdir: str, like_params: Any, average_last: int = 1,
                      step: int | None = None) -> tuple[Any, list[int]]:
    """The parameters of a run's checkpoint at `step` (default the newest usable one), or the average
    of its last `average_last` usable checkpoints, in the structure of `like_params`. Only the
    parameters are read, so a checkpoint whose optimizer or loop state has another layout (a run of
    an older version of this library) still gives its model. Returns (params, the steps used)."""
    checkpoints = Checkpoints(workdir, keep=10**9)
    try:
        trees, used = _usable_steps(checkpoints, step, average_last,
                                    lambda s: _fit_params(like_params, checkpoints.restore_params(s), s))
    finally:
        checkpoints.close()
    return jax.tree.map(jax.numpy.asarray, average_params(trees)), used


def load_params(workdir: str, like: Any, average_last: int = 1, step: int | None = None) -> tuple[Any, list[int]]:
    """The train state of a run's checkpoint at `step` (default the newest usable one), or the
    average of the parameters of its last `average_last` usable checkpoints (`average_states`).
    Returns (train state, the steps used)."""
    checkpoints = Checkpoints(workdir, keep=10**9)
    try:
        states, used = _usable_steps(checkpoints, step, average_last, lambda s: checkpoints.restore(s, like)[0])
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
