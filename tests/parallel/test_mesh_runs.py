"""Whole runs in mesh mode: a checkpoint saved under one mesh resumes under another mesh and under
pmap, with or without rematerialisation, and ends where one uninterrupted run ends."""

import dataclasses

import jax
import numpy as np

from transformer.config import TransformerConfig
from transformer.tasks import TranslateConfig, TranslateTask
from transformer.parallel.mesh import ParallelConfig
from transformer.run.checkpoint import Checkpoints
from transformer.run.trainer import Trainer
from transformer.training import TrainConfig

# h and d_ff divisible by tensor=4, d_model by fsdp=2; no dropout, so that pmap (a key per device)
# and the mesh (one key for the global batch) take the same steps.
MODEL = TransformerConfig.tiny(d_model=16, d_ff=32, h=4, N=1, vocab_size=60, dropout_rate=0.0)


def _train(workdir, steps, parallel, remat="none"):
    config = TrainConfig(num_train_steps=steps, batch_tokens=256, max_length=16,
                         log_every=5, eval_every=100, checkpoint_every=5, eval_batches=1, warmup_steps=20)
    model = dataclasses.replace(MODEL, remat=remat)
    task = TranslateTask(TranslateConfig(synthetic_examples=400), config)
    with Trainer(model, config, str(workdir), task=task, show_progress=False, parallel=parallel) as trainer:
        summary = trainer.run()
        params = trainer.layout.host_copy(trainer.state.params)
        return summary, params, trainer


def test_a_run_resumed_under_another_mesh_and_under_pmap_ends_as_one_uninterrupted_run(tmp_path):
    _, straight, trainer = _train(tmp_path / "a", 15, ParallelConfig(parallel="mesh", mesh="data=8"))
    assert trainer.layout.mode == "mesh" and dict(trainer.layout.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    # Rematerialisation changes how, not what, a step computes: a resumed run may change it.
    _train(tmp_path / "b", 5, ParallelConfig(parallel="mesh", mesh="fsdp=2,tensor=4"), remat="full")
    summary, _, trainer = _train(tmp_path / "b", 10, ParallelConfig(parallel="mesh", mesh="data=2,fsdp=4"))
    assert summary["resumed_from"] == 5
    # The sharded state really was sharded (fsdp=4 splits d_model-sized axes four ways).
    w_q = trainer.state.params["encoder"]["layers"][0]["self_attention"]["w_q"][...]
    assert len(w_q.sharding.device_set) == 8 and w_q.addressable_shards[0].data.shape == (4, 4, 4)
    summary, resumed, _ = _train(tmp_path / "b", 15, ParallelConfig(parallel="pmap"), remat="dots")
    assert summary["resumed_from"] == 10
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(a, b, atol=2e-6)
    checkpoints = Checkpoints(str(tmp_path / "b"))
    try:
        assert checkpoints.all_steps() == [5, 10, 15]
    finally:
        checkpoints.close()
