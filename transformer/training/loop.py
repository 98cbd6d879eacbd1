"""The training loop: micro-batches in, updates out, for any model whose train step is
`(state, batch) -> (state, metrics)`. What a run does around the steps (write metrics, evaluate,
save checkpoints, choose the error to raise) comes in as `LoopHooks`; the loop knows no model, no
task, no files and no parallel mode.

What it does itself:
- counts micro-batches against updates (gradient accumulation: `grad_accum_steps` micro-batches
  make one step);
- keeps the step's metrics on the device until a log, so that dispatch runs ahead of the device;
- stops on a non-finite loss, naming the step, and never saves a state whose loss went non-finite;
- vouches for each checkpoint with the step after it (see `_vouch`);
- answers SIGTERM: finishes the step, saves, returns. With several processes a SIGTERM to any of
  them stops all of them at the same step (JAX's preemption sync point).

The step's metrics must hold `loss_sum` (the summed loss, checked for NaN/inf) and the sums that
the hooks' `summarize` turns into means (one with "loss"; by default the token metrics of
`training/loss.py`); the keys of `LoopConfig.throughput` that are present are counted in
`tokens_per_s`.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from transformer.training.config import LoopConfig
from transformer.training.loss import token_means

State = Any  # the train state as the step holds it (one copy per device under pmap)
Metrics = dict[str, jax.Array]


class NonFinite(RuntimeError):
    """The default error of a NaN/inf loss or state: `what` happened at `step`."""

    def __init__(self, what: str, step: int):
        super().__init__(f"{what} at step {step}")
        self.what, self.step = what, step


def _nothing(*args) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class LoopHooks:
    """What a run does around the steps. Every hook is called on every process of a multi-process
    run (saving and evaluating are collective there); each decides for itself who writes."""

    log: Callable[[int, dict[str, float]], None] = _nothing  # (step, train metrics since the last log)
    evaluate: Callable[[int, State], dict[str, float] | None] = _nothing  # (step, state) -> metrics
    save: Callable[[int, State], str | None] = _nothing  # (step, state) -> where it was saved
    non_finite: Callable[[str, int], BaseException] = NonFinite  # (what, step) -> the error to raise
    one_copy: Callable[[Any], Any] = lambda tree: tree  # the step's per-device results -> one copy
    learning_rate: Callable[[int], float] | None = None  # step -> the rate its update used
    summarize: Callable[[dict[str, float]], dict[str, float]] = token_means  # summed metrics -> means (with "loss")


@dataclasses.dataclass
class LoopResult:
    step: int  # updates done
    stopped_by_signal: bool = False
    train: dict[str, float] | None = None  # the last logged train metrics
    evaluation: dict[str, float] | None = None  # the last evaluation's metrics


@jax.jit
def _all_finite(tree) -> jax.Array:
    """Whether every floating-point array of `tree` is free of NaN and inf (on the device)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


class _StopRequest:
    """SIGTERM while training: one process sets a flag from its own handler; several processes ask
    JAX's preemption service (whose SIGTERM handler a Python one would replace) at every micro-step,
    and it answers True on all of them at the same one."""

    def __init__(self):
        self.several = jax.process_count() > 1
        self.signal: int | None = None
        self._previous = None

    def __enter__(self) -> "_StopRequest":
        if not self.several:
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "signal", signum))
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def requested(self, micro_step: int) -> bool:
        if self.several:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(micro_step):
                self.signal = signal.SIGTERM
        return self.signal is not None


class TrainLoop:
    """Runs `train_step` over `batches` from micro-step `start_micro` to `config.num_steps` updates.

    `self.state` is the newest state the step returned, also after an error (or KeyboardInterrupt)
    ends `run` early: the caller keeps it, or not."""

    def __init__(self, train_step: Callable[[State, Any], tuple[State, Metrics]], config: LoopConfig,
                 hooks: LoopHooks = LoopHooks(), show_progress: bool = True):
        self.train_step, self.config, self.hooks = train_step, config, hooks
        self.is_main_process = jax.process_index() == 0  # one report per run: process 0's
        self.show_progress = show_progress and self.is_main_process
        self.state: State = None

    def run(self, state: State, batches: Iterator, start_micro: int = 0, vouch_first: bool = False) -> LoopResult:
        """`batches` yields the batches, placed as the step takes them, from micro-step
        `start_micro` on (closing it is the caller's business). With `vouch_first` the first update vouches for the checkpoint it started from."""
        from tqdm import tqdm

        cfg, hooks = self.config, self.hooks
        accum = cfg.grad_accum_steps
        self.state = state
        result = LoopResult(step=start_micro // accum)
        bar = tqdm(total=cfg.num_steps, initial=start_micro // accum, disable=not self.show_progress,
                   desc="train", unit="step", dynamic_ncols=True)
        self.say = bar.write if self.is_main_process else _nothing
        self._pending: list[tuple[int, Metrics]] = []  # (micro-step, metrics still on the device)
        self._last_log = time.perf_counter()
        # The step after a checkpoint vouches for it (see _vouch).
        vouch_step = start_micro // accum + 1 if vouch_first else None
        try:
            with _StopRequest() as stop:
                micro = start_micro
                while micro < cfg.num_steps * accum:
                    batch = next(batches)
                    self.state, metrics = self.train_step(self.state, batch)
                    self._pending.append((micro, metrics))
                    micro += 1
                    stopping = stop.requested(micro)  # every micro-step: all processes must ask at each
                    if micro % accum:
                        continue
                    step = result.step = micro // accum
                    last = step == cfg.num_steps
                    bar.update(1)
                    if step == vouch_step:
                        self._vouch([m for _, m in self._pending[-accum:]], step)
                    if step % cfg.log_every == 0 or last:
                        result.train = self._flush(step)
                        hooks.log(step, result.train)
                        bar.set_postfix(loss=f"{result.train['loss']:.3f}", tok_s=f"{result.train['tokens_per_s']:.0f}",
                                        **({"lr": f"{result.train['learning_rate']:.2e}"}
                                           if "learning_rate" in result.train else {}))
                    if step % cfg.eval_every == 0 or last:
                        evaluation = hooks.evaluate(step, self.state)
                        if evaluation is not None:
                            result.evaluation = evaluation
                            self.say(f"step {step}: validation " + ", ".join(
                                f"{k} {evaluation[k]:.4f}" for k in ("loss", "accuracy", "perplexity") if k in evaluation))
                        self._last_log = time.perf_counter()  # evaluating is not training time
                    if step % cfg.checkpoint_every == 0 or last or stopping:
                        self._flush(step)  # never save a state whose loss went non-finite
                        where = hooks.save(step, self.state)
                        vouch_step = step + 1
                    if stopping:
                        self.say(f"SIGTERM: saved a checkpoint at step {step}" + (f" in {where}" if where else "")
                                 + "; exiting")
                        result.stopped_by_signal = True
                        break
        finally:
            bar.close()
        return result

    def _flush(self, step: int) -> dict[str, float] | None:
        """Fetch the pending metrics: their means since the last flush, or an error at the first
        non-finite loss, naming its step."""
        if not self._pending:
            return None
        accum = self.config.grad_accum_steps
        pending, self._pending = self._pending, []
        totals: dict[str, float] = {}
        for (micro, _), metrics in zip(pending, jax.device_get([m for _, m in pending])):
            metrics = self.hooks.one_copy(metrics)
            if not math.isfinite(float(metrics["loss_sum"])):
                raise self.hooks.non_finite(f"the loss became {float(metrics['loss_sum'])}", micro // accum + 1)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        now = time.perf_counter()
        elapsed, self._last_log = now - self._last_log, now
        means = self.hooks.summarize(totals)
        means["tokens_per_s"] = sum(totals.get(k, 0.0) for k in self.config.throughput) / max(elapsed, 1e-9)
        if self.hooks.learning_rate is not None:
            means["learning_rate"] = float(self.hooks.learning_rate(step))
        return means

    def _vouch(self, step_metrics: list[Metrics], step: int) -> None:
        """A checkpoint counts as good once the step after it ran to a finite loss and a finite state.
        A finite checkpoint can still be poisoned: parameters of 1e8 whose next loss or gradient
        overflows, so that even a resume with a sane learning rate fails at once. This costs one
        small device-to-host transfer per checkpoint."""
        for metrics in jax.device_get(step_metrics):
            loss = float(self.hooks.one_copy(metrics)["loss_sum"])
            if not math.isfinite(loss):
                raise self.hooks.non_finite(f"the loss became {loss}", step)
        if not bool(_all_finite(self.state)):
            raise self.hooks.non_finite("the parameters or optimizer moments became NaN or inf", step)
