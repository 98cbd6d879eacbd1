"""The text tasks as a user runs them: train.py --task lm|mlm|classify killed and resumed, the
pre-train -> fine-tune -> use chain of commands, tfds datasets through the Trainer (mock_data), and
what train.py makes of a preset's values."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT

FAST = {
    "lm": ["--seq_len", "16", "--samples", "1", "--sample_tokens", "4"],
    "mlm": ["--max_length", "16"],
    "classify": ["--max_length", "16"],
}
COMMON = ["--d_model", "16", "--d_ff", "32", "--h", "2", "--N", "1", "--synthetic_examples", "300",
          "--batch_tokens", "256", "--log_every", "5", "--eval_every", "10", "--checkpoint_every", "10", "--quiet"]


def _env():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
                TF_CPP_MIN_LOG_LEVEL="3")


def command(script, *args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          input=stdin, env=_env(), timeout=timeout, cwd=ROOT)


def _params(workdir):
    """The parameters and metadata of a run's newest checkpoint."""
    from transformer.run.checkpoint import Checkpoints
    from transformer.run.workdir import load_run_config, run_state_like

    _, like = run_state_like(*load_run_config(str(workdir)))
    checkpoints = Checkpoints(str(workdir))
    state, meta = checkpoints.restore(checkpoints.latest_step(), like)
    checkpoints.close()
    return state.params, meta


def _clean(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr


@pytest.mark.parametrize("task", ["lm", "mlm", "classify"])
def test_a_task_killed_and_resumed_equals_an_uninterrupted_run(tmp_path, task):
    args = ["--task", task, "--num_train_steps", "20", *COMMON, *FAST[task]]
    _clean(command("train.py", "--workdir", str(tmp_path / "straight"), *args))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--workdir", str(killed), *args],
                            env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "10").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = command("train.py", "--workdir", str(killed), *args)
    _clean(resumed)
    assert "resuming from step" in resumed.stdout
    straight, meta_straight = _params(tmp_path / "straight")
    again, meta_again = _params(killed)
    assert meta_straight["step"] == meta_again["step"] == 20
    assert meta_straight == meta_again
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(again)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_pretrain_fine_tune_frozen_and_classify_then_lm_and_generate(tmp_path):
    mlm, clf, lm = tmp_path / "mlm", tmp_path / "clf", tmp_path / "lm"
    _clean(command("train.py", "--task", "mlm", "--workdir", str(mlm), "--num_train_steps", "10", *COMMON,
                   *FAST["mlm"]))

    tuned = command("train.py", "--task", "classify", "--workdir", str(clf), "--init_from", str(mlm),
                    "--freeze", "^embed/", "--schedule", "linear", "--learning_rate", "3e-3", "--warmup_steps", "2",
                    "--num_train_steps", "10", *COMMON, *FAST["classify"])
    _clean(tuned)
    report = (clf / "init_from.txt").read_text()
    assert "loaded" in report and "embed" in report and "new" in report
    # The source's tokenizer, copied (the synthetic task's is a character vocabulary, chars.json).
    assert (clf / "chars.json").read_bytes() == (mlm / "chars.json").read_bytes()
    source, _ = _params(mlm)
    target, meta = _params(clf)
    assert meta["step"] == 10
    # Frozen: the embedding is the pre-trained one, bit for bit, after 10 updates.
    frozen = list(zip(jax.tree.leaves(target["embed"]), jax.tree.leaves(source["embed"])))
    assert frozen
    for a, b in frozen:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Not frozen: the encoder's first layer moved away from what it was loaded with.
    moved = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(target["encoder"]), jax.tree.leaves(source["encoder"]))]
    assert any(moved)

    lines = "abcabcabc\nzzzyyyxxw\n"
    tsv = command("classify.py", "--workdir", str(clf), stdin=lines)
    _clean(tsv)
    rows = [line.split("\t") for line in tsv.stdout.strip().splitlines()]
    class_names = json.loads((clf / "config.json").read_text())["task_info"]["class_names"]
    as_json = command("classify.py", "--workdir", str(clf), "--json", stdin=lines)
    _clean(as_json)
    records = [json.loads(line) for line in as_json.stdout.strip().splitlines()]
    assert len(records) == 2 and len(rows) >= 2
    for record in records:
        probabilities = record["probabilities"]
        assert set(probabilities) == set(class_names) and record["label"] in class_names
        assert abs(sum(probabilities.values()) - 1) < 1e-5
        assert record["label"] == max(probabilities, key=probabilities.get)

    _clean(command("train.py", "--task", "lm", "--workdir", str(lm), "--num_train_steps", "10", *COMMON, *FAST["lm"]))
    prompts = "a c e\nb\n"
    first = command("generate.py", "--workdir", str(lm), "--max_new_tokens", "5", stdin=prompts)
    _clean(first)
    assert len(first.stdout.strip().splitlines()) == 2
    sampled = [command("generate.py", "--workdir", str(lm), "--max_new_tokens", "5", "--temperature", "1.0",
                       "--top_k", "3", "--seed", "4", stdin=prompts) for _ in range(2)]
    _clean(sampled[0])
    assert sampled[0].stdout == sampled[1].stdout  # a seed fixes the samples
    searched = command("generate.py", "--workdir", str(lm), "--max_new_tokens", "5", "--beam_size", "3", stdin=prompts)
    _clean(searched)
    lines = searched.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("a c e") and lines[1].startswith("b")


_MOCK_TFDS_RUNS = r"""
import json, sys
import tensorflow_datasets as tfds
from transformer.config import TransformerConfig
from transformer.run.trainer import Trainer
from transformer.tasks import TASKS
from transformer.training import TrainConfig

model = TransformerConfig.tiny(d_model=16, d_ff=32, h=2, N=1)
train = TrainConfig(num_train_steps=3, batch_tokens=256, max_length=16, log_every=1, eval_every=3,
                    checkpoint_every=3, eval_batches=1)
runs = {"lm": dict(dataset="lm1b", seq_len=16, samples=1, sample_tokens=3),
        "mlm": dict(dataset="lm1b"),
        "classify": dict(dataset="glue/sst2", text_feature="sentence")}
results = {}
with tfds.testing.mock_data(num_examples=30):
    for name, fields in runs.items():
        task = TASKS[name](TASKS[name].Config(**fields), train)
        with Trainer(model, train, f"{sys.argv[1]}/{name}", task=task, show_progress=False) as trainer:
            summary = trainer.run()
        results[name] = {"step": summary["step"], "loss": summary["validation"]["loss"],
                         "examples": task.num_train_examples, "info": task.info}
print(json.dumps(results))
"""


def test_each_task_trains_on_a_tfds_dataset_through_mock_data(tmp_path):
    # In a process of its own: TensorFlow, which tfds loads, stays out of the test workers' processes.
    result = subprocess.run([sys.executable, "-c", _MOCK_TFDS_RUNS, str(tmp_path)], capture_output=True, text=True,
                            env=_env(), timeout=300, cwd=ROOT)
    _clean(result)
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("lm", "mlm", "classify"):
        assert results[name]["step"] == 3 and np.isfinite(results[name]["loss"]), results
        assert 0 < results[name]["examples"] <= 30
    assert results["classify"]["info"]["class_names"] == ["negative", "positive"]  # glue/sst2's ClassLabel names


def _settings(*flags):
    import train as train_script

    return train_script.settings(train_script.parse_args(list(flags)))


def test_a_presets_noam_scale_gives_way_to_another_schedule():
    _, train, _, _ = _settings("--task", "classify", "--schedule", "linear", "--learning_rate", "5e-4")
    assert train.lr_scale == 1.0 and train.learning_rate == 5e-4 and train.schedule == "linear"
    _, train, _, _ = _settings("--task", "classify")
    assert train.lr_scale == 2.0 and train.schedule == "noam"  # the tiny preset's own recipe
    from transformer.config import ConfigError

    with pytest.raises(ConfigError, match="lr_scale scales the noam schedule only"):
        _settings("--task", "classify", "--schedule", "linear", "--learning_rate", "5e-4", "--lr_scale", "3")
