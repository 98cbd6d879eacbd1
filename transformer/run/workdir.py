"""The work dir of a run: one live run per work dir (`WorkdirLock`), its settings in config.json,
and a resumed run held to them (`check_resume`)."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import sys
import time

from transformer.config import ConfigError, TransformerConfig
from transformer.nn.attention import resolve_attention_impl
from transformer.run.cli import UserError
from transformer.tasks.base import Task
from transformer.training.config import TrainConfig


def check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write to work dir {workdir!r} ({err.strerror}): choose another --workdir") from None


class WorkdirLock:
    """One live train.py per work dir: an exclusive OS lock (flock) on <workdir>/run.lock. The
    kernel drops it when the process ends in any way, SIGKILL included, so a killed run never
    leaves it stuck; the file names the holder (pid, host) for the error of a second run. The
    file itself stays (deleting it would let two runs lock two different files)."""

    NAME = "run.lock"

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, self.NAME)
        try:
            self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot write to work dir {workdir!r} ({err.strerror}): choose another --workdir") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            self.release()
            raise UserError(f"work dir {workdir!r} is in use by a live train.py ({holder}): wait for it to end, "
                            "stop it, or choose another --workdir") from None
        except OSError as err:  # a file system without locks (some network mounts)
            print(f"warning: cannot lock work dir {workdir!r} ({err.strerror}); make sure no other run uses it",
                  file=sys.stderr)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())

    def _holder(self) -> str:
        for _ in range(40):  # the holder writes its name just after taking the lock
            with open(self.path) as f:
                text = f.read().strip()
            if text:
                return text
            time.sleep(0.05)
        return "a process that has not written its pid yet"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


# TrainConfig fields a resumed run may change. Everything else (data, batching, optimizer, seed,
# random-number generator, label smoothing, accumulation) must stay, or the run would silently become
# a different one. lr_scale and warmup_steps are the remedy after a NaN, so they may change, with a note.
# init_from only matters at a run's start: a resumed run never reloads it. num_train_steps shapes the
# "linear" schedule (its decay ends there), so changing it under that schedule gets the note too.
RESUME_MAY_CHANGE = ("num_train_steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                     "keep_checkpoints", "eval_split", "test_split", "tfds_data_dir", "init_from")
RESUME_MAY_CHANGE_WITH_NOTE = ("lr_scale", "warmup_steps")
# TransformerConfig fields that change how the same model is computed, not what it computes.
MODEL_MAY_CHANGE = ("attention_impl", "remat")


def _checkpoint_steps(workdir: str) -> list[int]:
    """Step folders under <workdir>/checkpoints (a listing only; whether they restore is another matter)."""
    try:
        return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    except OSError:
        return []


def _read_config_json(workdir: str) -> dict:
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict) or not isinstance(saved.get("train"), dict):
            raise ValueError("it lacks the model and train sections")
        return saved
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise UserError(f"{path} cannot be read ({reason}): it is damaged; put back a good copy, "
                        "or choose a new --workdir") from None


def _settings_from_json(saved: dict, path: str) -> tuple[TransformerConfig, TrainConfig, Task]:
    """The model config, the training recipe and the task (its config and what it learned from the
    data) that config.json records. A config.json of the versions before tasks (one "train" section
    that held translation's options too) reads as a translation run."""
    from transformer.tasks import TASKS

    train = dict(saved["train"])
    name = saved.get("task", "translate")
    if name not in TASKS:
        raise UserError(f"{path} names task {name!r}, which this version does not have ({', '.join(TASKS)})")
    task_cls = TASKS[name]
    task_fields = saved.get("task_config")
    if task_fields is None:  # before tasks: translation's fields were in "train"
        own = {f.name for f in dataclasses.fields(task_cls.Config)}
        task_fields = {k: train.pop(k) for k in list(train) if k in own}
    try:
        train_config = TrainConfig(**train)
        task = task_cls(task_cls.Config(**task_fields), train_config)
        task.info = dict(saved.get("task_info", {}))
        return TransformerConfig(**saved["model"]), train_config, task
    except TypeError as err:  # unknown or missing fields
        raise UserError(f"{path} does not describe a run of this version ({err}): choose a new --workdir") from None


def check_resume(workdir: str, model_config: TransformerConfig, train_config: TrainConfig, task: Task) -> dict | None:
    """On resume (config.json exists), refuse settings that differ from the saved run's (the task,
    the model, the training recipe and the task's config), except RESUME_MAY_CHANGE and the task's
    own `RESUME_MAY_CHANGE` (silently) and RESUME_MAY_CHANGE_WITH_NOTE (with a line on stderr). The
    requested --vocab_size counts too: the tokenizer would otherwise be silently reused."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    saved = _read_config_json(workdir)
    saved_model, saved_train, saved_task = _settings_from_json(saved, path)
    if saved_task.name != task.name:
        raise UserError(f"work dir {workdir!r} holds a {saved_task.name} run, not {task.name}: resume it with "
                        f"--task {saved_task.name}, or choose a new --workdir")
    differ = []
    for field, old in dataclasses.asdict(saved_model).items():
        new = getattr(model_config, field)
        if field == "vocab_size":
            old = saved.get("requested_vocab_size", new)  # older config.json files did not record it
        if new != old and field not in MODEL_MAY_CHANGE:
            differ.append(f"--{field} {old} -> {new}")
    noted = []
    for field, old in dataclasses.asdict(saved_train).items():
        new = getattr(train_config, field)
        if new != old and field not in RESUME_MAY_CHANGE:
            (noted if field in RESUME_MAY_CHANGE_WITH_NOTE else differ).append(f"--{field} {old} -> {new}")
        elif new != old and field == "num_train_steps" and train_config.schedule == "linear":
            noted.append(f"--num_train_steps {old} -> {new}: the linear decay now reaches 0 at step {new}")
    for field, old in dataclasses.asdict(saved_task.config).items():
        new = getattr(task.config, field)
        if new != old and field not in task.RESUME_MAY_CHANGE:
            differ.append(f"--{field} {old} -> {new}")
    if differ:
        fresh = "" if _checkpoint_steps(workdir) else " (it has no checkpoint yet: delete it to start afresh)"
        raise UserError(
            f"work dir {workdir!r} holds a run with other settings ({', '.join(differ)}): resume with its settings "
            f"(see its config.json), or choose a new --workdir{fresh}"
        )
    if noted:
        print(f"note: resuming {workdir!r} with a changed learning-rate schedule ({', '.join(noted)})", file=sys.stderr)
    return saved


def write_config_json(workdir: str, model_config: TransformerConfig, train_config: TrainConfig, task: Task,
                      requested_vocab_size: int) -> None:
    """Atomically (a rename), so that a run stopped half-way never leaves a truncated file."""
    path = os.path.join(workdir, "config.json")
    record = {"task": task.name, "model": dataclasses.asdict(model_config), "train": dataclasses.asdict(train_config),
              "task_config": dataclasses.asdict(task.config), "task_info": task.info,
              "requested_vocab_size": requested_vocab_size}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)


def load_run_config(workdir: str, attention_impl: str | None = None) -> tuple[TransformerConfig, TrainConfig, Task]:
    """The run's configs and task, its model config set to run on this machine: `attention_impl` if
    given, else the run's where this device can run it, else "auto" with a note on standard error (a
    run trained with cuDNN attention on a GPU is used on a CPU). The implementation changes how
    attention is computed, not the parameters (MODEL_MAY_CHANGE)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{path} not found: --workdir must be the folder of a train.py run")
    model_config, train_config, task = _settings_from_json(_read_config_json(workdir), path)
    if attention_impl is not None:
        return dataclasses.replace(model_config, attention_impl=attention_impl), train_config, task
    try:
        resolve_attention_impl(model_config)
    except ConfigError as err:
        print(f"note: the run's attention_impl={model_config.attention_impl!r} cannot run here ({err}); "
              f"using 'auto'", file=sys.stderr)
        model_config = dataclasses.replace(model_config, attention_impl="auto")
    return model_config, train_config, task


def run_state_like(model_config: TransformerConfig, train_config: TrainConfig, task: Task):
    """(graphdef, a freshly initialised TrainState of the run's structure) — what a checkpoint of the
    run restores into."""
    from transformer.training import create_train_state

    graphdef, like, _ = create_train_state(model_config, train_config, task.model_cls())
    return graphdef, like


def load_run_model(workdir: str, average_last: int = 1, step: int | None = None, attention_impl: str | None = None,
                   task: str | None = None):
    """(model, tokenizer, checkpoint steps used) of a train.py work dir: its newest usable checkpoint
    (or `step`), or the average of its last `average_last` (§6.1), the model config as
    `load_run_config` makes it for this machine; the model is the run's task's family. With `task`,
    a run of another task is refused in one line (translate.py takes translation runs only). What
    is not a run's work dir raises UserError."""
    from flax import nnx

    from transformer.data.tokenizer import load_tokenizer
    from transformer.run.checkpoint import load_model_params

    if not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir!r} is not a folder: give the work dir of a train.py run")
    model_config, train_config, run_task = load_run_config(workdir, attention_impl)
    if task is not None and run_task.name != task:
        raise UserError(f"{workdir} holds a {run_task.name} run, not a {task} run: give the work dir of a "
                        f"train.py --task {task} run")
    tokenizer = load_tokenizer(workdir)
    if tokenizer is None:
        raise UserError(f"no tokenizer in {workdir}: --workdir must be the folder of a train.py run")
    # The model's structure alone (no arrays, no optimizer state): what the saved parameters fill.
    abstract = nnx.eval_shape(lambda: run_task.model_cls()(model_config, rngs=nnx.Rngs(params=train_config.seed)))
    graphdef, like_params = nnx.split(abstract, nnx.Param)
    try:
        params, used = load_model_params(workdir, like_params, average_last, step)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    return nnx.merge(graphdef, params), tokenizer, used


def check_new_folder(output: str) -> None:
    """Refuse (UserError) an --output that is a file, a folder that holds something, or that cannot be
    made: what a command writes as a new folder (an averaged run, an export) never goes into, nor over,
    anything that exists."""
    if os.path.isfile(output):
        raise UserError(f"--output {output!r} is a file: give the name of a new folder")
    if os.path.isdir(output) and os.listdir(output):
        raise UserError(f"--output {output!r} is a folder that is not empty: give the name of a new folder")
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"--output {output!r} cannot be made: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--output {output!r} cannot be made under {parent}: choose a folder you can write to")
