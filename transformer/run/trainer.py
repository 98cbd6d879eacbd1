"""A whole run of any task (`transformer/tasks/`): the task's data and tokenizer, its model, the
jitted/pmapped/mesh train step of its objective, the training loop (`training/loop.py`) with this
run's hooks (metrics, evaluation, checkpoints that resume exactly), and the task's report at the
end. train.py only parses flags and drives a `Trainer`; nothing here names a task.

Where the state lives (`parallel/layout.py`): `Trainer.state` is always one copy (what is
checkpointed, scored and handed to decoding): host-side arrays under pmap, global arrays sharded
over the mesh in mesh mode. Under pmap only `Trainer.run` holds a copy per device; it takes it from
`self.state` on entry and puts one copy back on exit.

One live run per work dir: `WorkdirLock`. A resumed run must use the run's settings: `check_resume`."""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Sequence

import jax
from flax import nnx

from transformer import data as data_lib
from transformer.config import TransformerConfig
from transformer.data.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer
from transformer.nn.attention import resolve_attention_impl
from transformer.parallel.layout import MeshLayout, PmapLayout
from transformer.parallel.mesh import ParallelConfig, check_model_fits, make_mesh
from transformer.run.checkpoint import Checkpoints, NonFiniteState
from transformer.run.cli import RunStopped, UserError, disk_full
from transformer.run.metrics import MetricsWriter, plot_curves
from transformer.run.workdir import WorkdirLock, check_resume, check_workdir, write_config_json
from transformer.tasks.base import RunView, Task
from transformer.training import (
    LoopHooks, TrainConfig, TrainLoop, compile_mesh_steps, compile_steps, create_train_state, make_optimizer,
)


class NonFiniteLoss(RunStopped):
    pass


def make_tokenizer(config: TrainConfig, task: Task, vocab_size: int, workdir: str, resume: bool = False) -> Tokenizer:
    """On resume, the work dir's tokenizer; else a new one saved there (replacing any tokenizer a
    run that failed before writing config.json left behind: nothing was trained with it): the
    task's own vocabulary if it has one, else SentencePiece trained on the task's texts."""
    if resume:
        tokenizer = load_tokenizer(workdir)
        if tokenizer is None:
            raise UserError(f"work dir {workdir!r} has config.json but no tokenizer (spm.model or chars.json): "
                            "put it back or choose a new --workdir")
        return tokenizer
    tokenizer = task.fixed_tokenizer()
    if tokenizer is not None:
        tokenizer.save(workdir)
        return tokenizer
    texts = task.tokenizer_texts()
    try:
        return SentencePieceTokenizer.train(texts, vocab_size, workdir, model_type=config.tokenizer_type)
    except RuntimeError as err:  # SentencePiece's trainer reports bad input as RuntimeError("INTERNAL: …")
        # With character_coverage=1.0 every character of the text must be a piece of its own, and the
        # special tokens need theirs: SentencePiece names that minimum ("… required_chars. 20 vs 52.").
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(err))
        if needed:
            raise data_lib.DataError(
                f"--vocab_size {vocab_size} is too small for the training text: its distinct characters and the "
                f"special tokens need at least {needed.group(1)} pieces; use --vocab_size {needed.group(1)} or more"
            ) from None
        detail = " ".join(str(err).split())
        raise data_lib.DataError(f"SentencePiece could not train a tokenizer on the training text ({detail})") from None


def _all_processes_reach(point: str) -> None:
    """A barrier between the processes of a multi-process run (nothing for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(point)


class Trainer:
    """A run in a work dir. It holds the work dir's lock, a checkpoint manager and a metrics writer
    (with TensorBoard's background thread): use it as a context manager, or call `close()`, so that
    they are released on every way out (finish, NaN, SIGTERM, SIGINT, an error)."""

    def __init__(self, model_config: TransformerConfig, train_config: TrainConfig, workdir: str, *, task: Task,
                 show_progress: bool = True, devices: Sequence | None = None,
                 parallel: ParallelConfig | None = None):
        self.task = task
        self.parallel = parallel or ParallelConfig()
        self.requested_devices = devices
        self.is_main_process = jax.process_index() == 0  # writes metrics, prints, holds the work dir's lock
        self.show_progress = show_progress and self.is_main_process
        self.workdir = workdir
        self.train_config = train_config
        self.lock: WorkdirLock | None = None
        self.checkpoints: Checkpoints | None = None
        self.metrics: MetricsWriter | None = None
        try:
            self._start(model_config, train_config)
        except BaseException:
            self.close()
            raise

    def _start(self, model_config: TransformerConfig, train_config: TrainConfig) -> None:
        workdir, task = self.workdir, self.task
        check_workdir(workdir)
        if jax.process_index() == 0:  # the other hosts of a multi-host run share process 0's work dir
            self.lock = WorkdirLock(workdir)
        saved = check_resume(workdir, model_config, train_config, task)
        if saved is not None:
            task.info = dict(saved.get("task_info", {}))
        _all_processes_reach("the work dir's settings are read")  # before process 0 writes any of them
        source = None
        if saved is None and train_config.init_from:  # a new run from another run's parameters
            from transformer.run import init_from

            source = init_from.Source(train_config.init_from)
        task.load()
        if saved is None and source is not None and jax.process_index() == 0:
            source.copy_tokenizer(workdir)  # the source's tokenizer, in this run's own work dir
        if saved is None and jax.process_index() > 0:  # process 0 makes the run's tokenizer; the others load it
            _all_processes_reach("the tokenizer is saved")
            self.tokenizer = make_tokenizer(train_config, task, model_config.vocab_size, workdir, resume=True)
        else:
            self.tokenizer = make_tokenizer(train_config, task, model_config.vocab_size, workdir,
                                            saved is not None or source is not None)
            if saved is None:
                _all_processes_reach("the tokenizer is saved")
        requested_vocab_size = model_config.vocab_size
        model_config = dataclasses.replace(model_config, vocab_size=self.tokenizer.vocab_size, pad_id=self.tokenizer.pad_id)
        if saved is not None and saved["model"]["vocab_size"] != model_config.vocab_size:
            raise UserError(f"the tokenizer in {workdir!r} has {model_config.vocab_size} pieces but its config.json "
                            f"says {saved['model']['vocab_size']}: put back the run's tokenizer or choose a new --workdir")
        cfg = train_config
        if jax.process_index() == 0:  # new run: the settings; resume: the ones allowed to change, updated
            write_config_json(workdir, model_config, train_config, task,
                              saved.get("requested_vocab_size", requested_vocab_size) if saved else requested_vocab_size)
        self.model_config = model_config
        model_cls = task.model_cls()
        objective = task.objective(model_config)
        # The optimizer, built once: its schedule is also the one the logs report.
        abstract = nnx.state(nnx.eval_shape(lambda: model_cls(self.model_config, rngs=nnx.Rngs(0))), nnx.Param)
        tx, self.schedule, frozen = make_optimizer(cfg.optimizer, self.model_config.d_model, cfg.num_train_steps,
                                                   abstract)
        if frozen and saved is None and self.is_main_process:
            print(f"frozen ({len(frozen)} parameters): " + ", ".join(frozen))
        made: dict = {}

        def init():
            made["graphdef"], state, made["tx"] = create_train_state(self.model_config, cfg, model_cls, tx)
            return state

        if self.parallel.parallel == "mesh":
            mesh = make_mesh(self.parallel, self.requested_devices)
            check_model_fits(self.model_config, mesh)
            self.layout = MeshLayout(mesh, jax.eval_shape(init))
            # Created where it lives, each device computing only its shards: it may not fit one device.
            state = jax.jit(init, out_shardings=self.layout.state_shardings)()
            self.graphdef, self.tx = made["graphdef"], made["tx"]
            self.train_step, self.eval_step = compile_mesh_steps(
                self.graphdef, self.tx, objective, cfg, self.layout.state_shardings,
                self.layout.batch_sharding, self.layout.replicated)
        else:
            state = init()
            self.graphdef, self.tx = made["graphdef"], made["tx"]
            self.layout = PmapLayout(self.requested_devices)
            self.train_step, self.eval_step = compile_steps(self.graphdef, self.tx, objective, cfg,
                                                            self.layout.n_devices)
        self.devices, self.n_devices = self.layout.devices, self.layout.n_devices
        self.train_plan, self.eval_plan = task.plans(self.tokenizer, self.layout.batch_multiple)
        # What computes attention in the training step (for attention_impl="auto", the choice made for
        # this run's batches: packed rows' segment masks go to XLA except on a TPU, where the Pallas
        # kernel takes their segment ids; the decoding step always goes to XLA).
        self.attention_impl = resolve_attention_impl(self.model_config, dense_mask=cfg.packing, segment_ids=cfg.packing)
        self.checkpoints = Checkpoints(workdir, keep=cfg.keep_checkpoints)
        self.metrics = MetricsWriter(workdir, enabled=jax.process_index() == 0)
        self.state = state  # one copy; see the module docstring
        self.resumed_from = None
        self.data_position = 0  # micro-batches of the training stream already consumed
        # Only the lock holder of a one-process run moves unusable checkpoints aside; others just skip them.
        newest = self.checkpoints.restore_newest(state, set_aside=self._may_set_aside())
        if newest is not None:
            self.resumed_from, self.state, meta = newest
            self.data_position = int(meta["data_position"])
        elif source is not None:  # never on resume: a checkpoint of this run holds what it learned since
            self.state = self.state.replace(params=source.load_into(self.state.params, workdir,
                                                                    say=print if self.is_main_process else None))
        self.metrics.write(self.resumed_from or 0, "run", task=task.name, attention_impl=self.attention_impl,
                           attention_impl_asked=self.model_config.attention_impl, platform=self.devices[0].platform,
                           parallel=self.layout.mode, devices=self.n_devices, processes=jax.process_count(),
                           mesh=dict(self.layout.mesh.shape) if self.layout.mode == "mesh" else None)

    def _may_set_aside(self) -> bool:
        return self.lock is not None and jax.process_count() == 1

    def close(self) -> None:
        """Release the metrics writer, the checkpoint manager and the lock; safe to call twice."""
        for resource in (self.metrics, self.checkpoints):
            if resource is not None:
                try:
                    resource.close()
                except Exception as err:  # keep closing the rest; the run's own outcome is reported elsewhere
                    print(f"warning: closing {type(resource).__name__} failed: {err}", file=sys.stderr)
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------------------

    def _host_batches(self, plan: data_lib.BatchPlan, start: int, epochs=None):
        yield from plan.batches(start, epochs, rows=self.layout.process_rows)

    def evaluate(self, params, max_batches: int = 0, replicated: bool = False) -> dict[str, float]:
        """Validation metrics of `params` (`Trainer.state.params`, or, with `replicated`, the
        parameters as the step takes them: one copy per device under pmap)."""
        if not replicated and self.layout.mode == "pmap":
            params = self.layout.to_devices(params)
        place = self.layout.placer()
        totals: dict[str, float] = {}
        for n, (_, batch) in enumerate(self._host_batches(self.eval_plan, 0, epochs=1)):
            if max_batches and n >= max_batches:
                break
            metrics = self.layout.one_copy(jax.device_get(self.eval_step(params, place(batch))))
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return self.task.summarize(totals)

    def model(self, params=None):
        """The model with `params` (default: a host copy of the run's current parameters)."""
        return nnx.merge(self.graphdef, self.layout.host_copy(self.state.params) if params is None else params)

    def _newest_good(self) -> str:
        latest = self.checkpoints.latest_step()
        if latest is None:
            return "no good checkpoint is left"
        return f"the newest good checkpoint is step {latest} in {self.checkpoints.directory}"

    def save(self, state, step: int) -> None:
        """Checkpoint `state` (per-device copies inside `run`, else host) as `step`."""
        host_state = self.layout.one_copy(state)
        try:
            self.checkpoints.save(step, host_state, {"data_position": int(host_state.micro_step), "step": step})
        except NonFiniteState as err:
            raise NonFiniteLoss(self._non_finite(f"the state became non-finite ({err}; not saved)", step)) from None
        except Exception as err:
            if not disk_full(err):
                raise
            raise UserError(f"no space left on device while saving checkpoint step {step} in "
                            f"{self.checkpoints.directory}; {self._newest_good()}: free some space and run "
                            "again to resume from it") from None

    # -- the loop (training/loop.py) with this run's hooks --------------------------------------

    def run(self) -> dict:
        """Train from the newest checkpoint (or the start) to num_train_steps; SIGTERM saves and returns."""
        cfg = self.train_config
        start_micro = self.data_position
        batches = data_lib.prefetch(self._host_batches(self.train_plan, start_micro), self.layout.placer())
        loop = TrainLoop(self.train_step, dataclasses.replace(cfg.loop, throughput=self.task.throughput), self._hooks(),
                         show_progress=self.show_progress)
        try:
            result = loop.run(self.layout.to_devices(self.state), (batch for _, batch in batches), start_micro,
                              vouch_first=self.resumed_from is not None)
        finally:
            batches.close()  # stops the prefetch thread, which would otherwise wait on a full queue
            try:  # back to one copy (see the module docstring), also when the loop ended in an error
                if loop.state is not None:
                    self.state = self.layout.one_copy(loop.state)
                    self.data_position = int(self.state.micro_step)
            except RuntimeError:  # its buffers went to a step that never finished (the error on the way out says why)
                pass
        summary: dict = {"resumed_from": self.resumed_from, "step": int(self.state.step)}
        if result.evaluation is not None:
            summary["validation"] = result.evaluation
        if result.stopped_by_signal:
            summary["stopped_by_signal"] = True
        return summary

    def _hooks(self) -> LoopHooks:
        def evaluate(step: int, state) -> dict[str, float]:
            metrics = self.evaluate(state.params, self.train_config.eval_batches, replicated=True)
            self.metrics.write(step, "validation", **metrics)
            return metrics

        def save(step: int, state) -> str:
            self.save(state, step)
            return self.checkpoints.directory

        return LoopHooks(log=lambda step, metrics: self.metrics.write(step, "train", **metrics), evaluate=evaluate,
                         save=save, non_finite=lambda what, step: NonFiniteLoss(self._non_finite(what, step)),
                         one_copy=self.layout.one_copy, learning_rate=self._learning_rate,
                         summarize=self.task.summarize)

    def _non_finite(self, what: str, step: int) -> str:
        """The message of a NaN/inf at `step`. It came from the state of step - 1: a checkpoint of
        step - 1 is poisoned (finite, yet it fails again at once), so it is moved aside (never
        deleted) and the message names the newest one that is really good."""
        poisoned = ""
        if step - 1 in self.checkpoints.all_steps() and self._may_set_aside():
            where = self.checkpoints.set_aside(step - 1, f"{what} at the next step ({step})")
            poisoned = f"checkpoint step {step - 1}, which led to it, was moved to {where}; "
        latest = self.checkpoints.latest_step()
        how = "and run again to resume from it" if latest is not None else "and run again"
        return (f"{what} at step {step}; stopping ({poisoned}{self._newest_good()}). "
                f"Lower --lr_scale or raise --warmup_steps {how}")

    def _learning_rate(self, step: int) -> float:
        """The rate of update `step` (counted from 1): the optimizer's own schedule at count step - 1."""
        return float(self.schedule(max(step - 1, 0)))

    # -- the end of a run: the task's report ---------------------------------------------------

    def finish(self) -> dict:
        """The task's end-of-run scores and examples (written into metrics.jsonl), and the curves' plot."""
        step = int(self.state.step)
        view = RunView(model=self.model(), tokenizer=self.tokenizer, step=step, workdir=self.workdir,
                       write=lambda split, **values: self.metrics.write(step, split, **values),
                       show_progress=self.show_progress)
        results = self.task.finish(view)
        results["plot"] = plot_curves(self.workdir) if jax.process_index() == 0 else None
        return results
