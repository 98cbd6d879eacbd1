"""Each text task through the run's plumbing: under pmap and over a mesh of 8 CPU devices, and a
run stopped and resumed ends with the parameters of one that ran through."""

import dataclasses

import jax
import numpy as np
import pytest

from transformer.config import TransformerConfig
from transformer.parallel.mesh import ParallelConfig
from transformer.run.trainer import Trainer
from transformer.tasks import TASKS
from transformer.training import TrainConfig

# No dropout: pmap (a key per device) and the mesh (one key for the global batch) then take the same
# steps, as long as the task draws nothing else (the masked LM draws its masks: it stays on the mesh).
MODEL = TransformerConfig.tiny(d_model=16, d_ff=32, h=2, N=1, dropout_rate=0.0)
TRAIN = TrainConfig(num_train_steps=6, batch_tokens=512, max_length=16, warmup_steps=10, label_smoothing=0.0,
                    log_every=3, eval_every=6, checkpoint_every=3, eval_batches=1)
TASK_CONFIG = {"lm": dict(seq_len=16, synthetic_examples=300, samples=0), "mlm": dict(synthetic_examples=300),
               "classify": dict(synthetic_examples=300)}
PMAP = ParallelConfig()
MESH = ParallelConfig(parallel="mesh", mesh="data=4,fsdp=2")


def _run(name, workdir, steps, parallel):
    train = dataclasses.replace(TRAIN, num_train_steps=steps)
    task = TASKS[name](TASKS[name].Config(**TASK_CONFIG[name]), train)
    with Trainer(MODEL, train, str(workdir), task=task, show_progress=False, parallel=parallel) as trainer:
        summary = trainer.run()
        return summary, trainer.layout.host_copy(trainer.state.params)


@pytest.mark.parametrize("name", ["lm", "mlm", "classify"])
def test_a_task_stopped_and_resumed_ends_as_one_uninterrupted_run(tmp_path, name):
    first = MESH if name == "mlm" else PMAP
    summary, _ = _run(name, tmp_path / "resumed", 3, first)
    assert summary["step"] == 3
    summary, resumed = _run(name, tmp_path / "resumed", 6, MESH)
    assert summary["step"] == 6 and np.isfinite(summary["validation"]["loss"])
    _, straight = _run(name, tmp_path / "straight", 6, MESH)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
