"""The training loop on its own, with a step that is no Transformer (the loop knows no model): when
it logs, evaluates and saves, gradient accumulation's counting, resume = uninterrupted, NaN/inf
stops naming the step, checkpoints vouched for by the next step, SIGTERM."""

import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer.training import LoopConfig, LoopHooks, NonFinite, TrainLoop


@jax.jit
def step(state, batch):
    """A stand-in step: adds the batch to `w` and counts micro-steps; its "loss" is the batch."""
    x = batch["x"]
    metrics = {"loss_sum": x, "nll_sum": x, "correct": jnp.float32(1.0), "tokens": jnp.float32(2.0),
               "src_tokens": jnp.float32(3.0)}
    return {"w": state["w"] + x, "step": state["step"] + 1}, metrics


def stream(values, start=0, on_yield=None):
    for i in range(start, len(values)):
        if on_yield is not None:
            on_yield(i)
        yield {"x": jnp.float32(values[i])}


class Recorder:
    """Hooks that write down when they were called."""

    def __init__(self):
        self.logs, self.evals, self.saves = [], [], []

    def hooks(self, **kw):
        return LoopHooks(log=lambda s, m: self.logs.append((s, m)),
                         evaluate=lambda s, state: self.evals.append(s) or {"loss": float(s), "accuracy": 0.5},
                         save=lambda s, state: self.saves.append((s, int(state["step"]), float(state["w"]))) or "/ckpt",
                         **kw)


def start_state(w=0.0):
    return {"w": jnp.float32(w), "step": jnp.int32(0)}


def test_when_it_logs_evaluates_and_saves_with_accumulation():
    values = np.arange(1, 15, dtype=np.float32)  # 14 micro-batches; 7 updates of 2
    rec = Recorder()
    config = LoopConfig(num_steps=7, grad_accum_steps=2, log_every=3, eval_every=4, checkpoint_every=5)
    loop = TrainLoop(step, config, rec.hooks(learning_rate=lambda s: 0.1 * s), show_progress=False)
    result = loop.run(start_state(), stream(values))
    assert [s for s, _ in rec.logs] == [3, 6, 7]  # every log_every updates, and the last
    assert rec.evals == [4, 7]
    # Saved after the update's last micro-batch: state step counts micro-batches, w their sum.
    assert rec.saves == [(5, 10, float(values[:10].sum())), (7, 14, float(values.sum()))]
    assert result.step == 7 and not result.stopped_by_signal
    assert result.evaluation == {"loss": 7.0, "accuracy": 0.5}
    # The first log covers micro-batches 0..5: mean loss = sum / tokens (2 per micro-batch).
    first = rec.logs[0][1]
    assert first["loss"] == pytest.approx(values[:6].sum() / 12)
    assert first["accuracy"] == pytest.approx(6 / 12)
    assert first["learning_rate"] == pytest.approx(0.3)
    assert first["tokens_per_s"] > 0
    assert float(loop.state["w"]) == float(values.sum())


def test_resume_equals_uninterrupted():
    values = np.linspace(0.5, 3.0, 12).astype(np.float32)
    config = LoopConfig(num_steps=6, grad_accum_steps=2, log_every=1, eval_every=100, checkpoint_every=2)
    whole = Recorder()
    TrainLoop(step, config, whole.hooks(), show_progress=False).run(start_state(), stream(values))
    first, second = Recorder(), Recorder()
    loop = TrainLoop(step, dataclasses.replace(config, num_steps=2), first.hooks(), show_progress=False)
    loop.run(start_state(), stream(values))
    TrainLoop(step, config, second.hooks(), show_progress=False).run(loop.state, stream(values, start=4), start_micro=4)
    assert first.saves + second.saves == whole.saves
    assert [s for s, _ in first.logs + second.logs] == [s for s, _ in whole.logs]
    for (_, a), (_, b) in zip(first.logs + second.logs, whole.logs):
        assert a["loss"] == pytest.approx(b["loss"])


def test_a_nan_loss_stops_naming_its_step_and_is_never_saved():
    values = [1.0] * 10
    values[5] = float("nan")  # micro-batch 5 = update 6
    rec = Recorder()
    config = LoopConfig(num_steps=10, log_every=100, eval_every=100, checkpoint_every=8)
    loop = TrainLoop(step, config, rec.hooks(), show_progress=False)
    with pytest.raises(NonFinite) as err:
        loop.run(start_state(), stream(values))
    assert err.value.step == 6 and "the loss became nan" in err.value.what
    assert rec.saves == []  # the metrics are fetched before step 8's save, which never happens
    assert int(loop.state["step"]) == 8  # the newest state stays with the loop for the caller


def test_the_step_after_a_checkpoint_vouches_for_it():
    # A finite checkpoint whose next update overflows: w = 3e38 + 3e38 = inf, with a finite "loss"
    # of 3e38 (the stand-in's loss is the batch). The run stops at that next update.
    values = [1.0, 1.0, 3e38, 3e38, 1.0, 1.0]
    rec = Recorder()
    made = []
    config = LoopConfig(num_steps=6, log_every=100, eval_every=100, checkpoint_every=3)
    hooks = rec.hooks(non_finite=lambda what, s: made.append((what, s)) or RuntimeError(f"{what} @ {s}"))
    with pytest.raises(RuntimeError, match="@ 4"):
        TrainLoop(step, config, hooks, show_progress=False).run(start_state(), stream(values))
    assert made == [("the parameters or optimizer moments became NaN or inf", 4)]
    assert [s for s, *_ in rec.saves] == [3]
    # Resuming from a poisoned state: the first update vouches for it.
    with pytest.raises(NonFinite, match="at step 4"):
        TrainLoop(step, config, LoopHooks(), show_progress=False).run(
            start_state(float("inf")), stream(values, start=3), start_micro=3, vouch_first=True)


def test_sigterm_finishes_the_update_saves_and_returns():
    values = [1.0] * 20
    rec = Recorder()
    config = LoopConfig(num_steps=10, grad_accum_steps=2, log_every=100, eval_every=100, checkpoint_every=100)

    def term(i):
        if i == 5:  # mid-update 3 (micro-batches 4, 5)
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    result = TrainLoop(step, config, rec.hooks(), show_progress=False).run(start_state(), stream(values, on_yield=term))
    assert result.stopped_by_signal and result.step == 3
    assert rec.saves == [(3, 6, 6.0)]  # the whole update, then saved
    assert signal.getsignal(signal.SIGTERM) is before  # the loop's handler is gone again


def test_loop_config_rejects_nonpositive_counts():
    with pytest.raises(ValueError, match="log_every must be a positive integer"):
        LoopConfig(num_steps=1, log_every=0)
