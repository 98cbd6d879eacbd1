"""train.py end to end: resume after SIGKILL, SIGTERM, NaN, data sources, and one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT

FAST = ["--d_model", "16", "--d_ff", "32", "--h", "2", "--N", "1", "--synthetic_examples", "400",
        "--batch_tokens", "256", "--log_every", "5", "--eval_every", "10", "--checkpoint_every", "10", "--quiet"]


def _env(devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def train(*args, devices=1, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          env=_env(devices), timeout=timeout, cwd=ROOT)


def _final_params(workdir):
    from transformer.run.checkpoint import Checkpoints
    from transformer.run.workdir import load_run_config, run_state_like

    _, like = run_state_like(*load_run_config(str(workdir)))
    checkpoints = Checkpoints(str(workdir))
    state, meta = checkpoints.restore(checkpoints.latest_step(), like)
    checkpoints.close()
    return state, meta


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    steps = ["--num_train_steps", "40", *FAST]
    straight = train("--workdir", str(tmp_path / "a"), *steps)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--workdir", str(tmp_path / "b"), *steps],
                            env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "b" / "checkpoints" / "10").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = train("--workdir", str(tmp_path / "b"), *steps)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step" in resumed.stdout
    a, meta_a = _final_params(tmp_path / "a")
    b, meta_b = _final_params(tmp_path / "b")
    assert meta_a == meta_b == {"data_position": 40, "step": 40}
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--workdir", str(tmp_path),
                             "--num_train_steps", "100000", *FAST],
                            env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "10").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "SIGTERM: saved a checkpoint at step" in out + err
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] > 10 and saved[-1] < 100000


def test_nan_loss_stops_with_the_step_and_sets_aside_the_checkpoint_that_led_to_it(tmp_path):
    result = train("--workdir", str(tmp_path), "--num_train_steps", "50", *FAST, "--checkpoint_every", "1",
                   "--lr_scale", "1e9", "--warmup_steps", "1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "the loss became nan at step" in line or "the loss became inf at step" in line
    bad_step = int(line.split(" at step ")[1].split(";")[0])
    # The checkpoint of the step before held the parameters that gave the NaN: poisoned, so it is
    # moved aside (tests/test_survive.py resumes from the newest good one of a later NaN).
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert (tmp_path / "skipped_checkpoints" / str(bad_step - 1)).is_dir()
    assert saved == list(range(1, bad_step - 1))[-5:]
    assert line.endswith("no good checkpoint is left). Lower --lr_scale or raise --warmup_steps and run again"
                         if not saved else "and run again to resume from it")


def _write_folder(root, n_de=6, n_en=6):
    root.mkdir(exist_ok=True)
    words = ["ein hund", "zwei katzen", "der mann", "die frau", "ein kind spielt", "das haus ist rot"]
    english = ["a dog", "two cats", "the man", "the woman", "a child plays", "the house is red"]
    for split in ("train", "validation"):
        (root / f"de.{split}.txt").write_text("\n".join((words * 20)[:n_de * (10 if split == "train" else 1)]) + "\n")
        (root / f"en.{split}.txt").write_text("\n".join((english * 20)[:n_en * (10 if split == "train" else 1)]) + "\n")


def test_folder_dataset_trains_and_reports_bleu(tmp_path):
    _write_folder(tmp_path / "data")
    result = train("--workdir", str(tmp_path / "run"), "--dataset_dir", str(tmp_path / "data"), "--src_lang", "de",
                   "--tgt_lang", "en", "--vocab_size", "40", "--num_train_steps", "10", "--beam_size", "2", *FAST,
                   "--checkpoint_every", "5", "--attention_impl", "auto")
    assert result.returncode == 0, result.stderr
    # attention_impl="auto" resolves to XLA's attention on a CPU; the run says so and logs it.
    assert "attention xla (auto)" in result.stdout
    assert (tmp_path / "run" / "spm.model").exists()
    assert "validation BLEU" in result.stdout and "nrefs:1" in result.stdout  # sacreBLEU's signature
    assert (tmp_path / "run" / "curves.png").exists()
    records = [l for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any('"split": "train"' in r for r in records) and any('"split": "validation"' in r for r in records)
    run_record = json.loads(next(r for r in records if '"split": "run"' in r))
    assert run_record["attention_impl"] == "xla" and run_record["attention_impl_asked"] == "auto"
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    # The translate command: a file in, translations out, BLEU against a reference, averaged checkpoints.
    translated = subprocess.run(
        [sys.executable, str(ROOT / "translate.py"), "--workdir", str(tmp_path / "run"), "--input",
         str(tmp_path / "data" / "de.validation.txt"), "--reference", str(tmp_path / "data" / "en.validation.txt"),
         "--average_last", "2"], capture_output=True, text=True, env=_env(), timeout=120, cwd=ROOT)
    assert translated.returncode == 0, translated.stderr
    assert len(translated.stdout.splitlines()) == 6
    assert "checkpoint step(s) [5, 10]" in translated.stderr and "BLEU" in translated.stderr
    assert "nrefs:1" in translated.stderr
    # The same average written as a new work dir translates the same way.
    averaged = subprocess.run([sys.executable, str(ROOT / "average_checkpoints.py"), "--workdir", str(tmp_path / "run"),
                               "--last", "2", "--output", str(tmp_path / "avg")],
                              capture_output=True, text=True, env=_env(), timeout=120, cwd=ROOT)
    assert averaged.returncode == 0, averaged.stderr
    for done in (result, translated, averaged):  # every program closed what it opened
        assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    again = subprocess.run([sys.executable, str(ROOT / "translate.py"), "--workdir", str(tmp_path / "avg"), "--input",
                            str(tmp_path / "data" / "de.validation.txt")],
                           capture_output=True, text=True, env=_env(), timeout=120, cwd=ROOT)
    assert again.returncode == 0, again.stderr
    assert again.stdout == translated.stdout
    _check_attention_plot(tmp_path, tmp_path / "data" / "de.validation.txt")


def _check_attention_plot(tmp_path, sources):
    """translate.py --plot_attention: the maps of line 2 in one teacher-forced pass, all heads of the
    (only) layer, a PNG of the grid's size; in-process, the same call's axes carry the pieces."""
    import struct

    from flax import nnx

    from transformer.data.tokenizer import load_tokenizer
    from transformer.decoding.text import translation_attention
    from transformer.models.attention_maps import figure_pixels, layer_maps, plot_attention
    from transformer.run.checkpoint import load_params
    from transformer.run.workdir import load_run_config, run_state_like

    png = tmp_path / "attention.png"
    plotted = subprocess.run(
        [sys.executable, str(ROOT / "translate.py"), "--workdir", str(tmp_path / "run"), "--input", str(sources),
         "--plot_attention", str(png), "--plot_line", "2", "--beam_size", "2"],
        capture_output=True, text=True, env=_env(), timeout=120, cwd=ROOT)
    assert plotted.returncode == 0, plotted.stderr
    assert "Traceback" not in plotted.stderr and f"attention maps of line 2, layer 1: {png}" in plotted.stderr
    with open(png, "rb") as f:
        width, height = struct.unpack(">II", f.read(24)[16:24])

    model_config, train_config, task = load_run_config(str(tmp_path / "run"))
    tokenizer = load_tokenizer(str(tmp_path / "run"))
    graphdef, like = run_state_like(model_config, train_config, task)
    state, _ = load_params(str(tmp_path / "run"), like, 1, None)
    model = nnx.merge(graphdef, state.params)
    line = sources.read_text().splitlines()[1]
    text, pieces, maps = translation_attention(model, tokenizer, line, beam_size=2, alpha=0.6, max_extra=50)
    assert text == plotted.stdout.splitlines()[1]  # the translation translate.py printed for that line
    assert pieces["source"] == tokenizer.pieces(tokenizer.encode(line)) + ["</s>"]
    assert pieces["target"][0] == "<s>" and tokenizer.processor.decode_pieces(pieces["target"][1:]) == text
    longest = max(len(pieces["source"]), len(pieces["target"]))
    assert (width, height) == figure_pixels(3, model_config.h, longest)  # 3 kinds × h = 2 heads
    src, tgt = pieces["source"], pieces["target"]
    fig = plot_attention(layer_maps(maps, 0), {"encoder": (src, src), "decoder": (tgt, tgt), "cross": (tgt, src)},
                         str(tmp_path / "again.png"))
    cross = fig.axes[2 * model_config.h]  # row 3: encoder-decoder attention, head 1
    assert [t.get_text() for t in cross.get_xticklabels()] == src
    assert [t.get_text() for t in cross.get_yticklabels()] == tgt


_MOCK_TFDS_RUN = """
import json, sys
import tensorflow_datasets as tfds
from transformer.config import TransformerConfig
from transformer.run.trainer import Trainer
from transformer.tasks import TranslateConfig, TranslateTask
from transformer.training import TrainConfig

model = TransformerConfig.tiny(d_model=16, d_ff=32, h=2, N=1, vocab_size=60)
train_config = TrainConfig(num_train_steps=3, batch_tokens=512, max_length=32,
                           log_every=1, eval_every=3, checkpoint_every=3, eval_batches=1)
task = TranslateTask(TranslateConfig(dataset="wmt14_translate/de-en"), train_config)
with tfds.testing.mock_data(num_examples=40):
    with Trainer(model, train_config, sys.argv[1], task=task, show_progress=False) as trainer:
        summary = trainer.run()
print(json.dumps({"step": summary["step"], "loss": summary["validation"]["loss"],
                  "train_examples": len(task.train_pairs)}))
"""


def test_tfds_dataset_through_mock_data(tmp_path):
    # In a process of its own: TensorFlow, which tfds loads, stays out of the test workers' processes.
    result = subprocess.run([sys.executable, "-c", _MOCK_TFDS_RUN, str(tmp_path / "run")], capture_output=True,
                            text=True, env=_env(), timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step"] == 3 and np.isfinite(summary["loss"])
    assert summary["train_examples"] == 40


@pytest.mark.parametrize(
    "args, devices, message",
    [
        (["--dataset", "wmt14_translate/de-en", "--tfds_data_dir", "{tmp}/tfds"], 1, "tfds build wmt14_translate/de-en"),
        (["--no_such_field", "3"], 1, "unrecognized arguments: --no_such_field"),
        (["--d_model", "30", "--h", "4"], 1, "d_model=30 is not divisible by h=4"),
        (["--dropout_rate", "1.5"], 1, "dropout_rate must be in [0, 1)"),
        (["--num_train_steps", "abc"], 1, "invalid int value"),
        (["--workdir", "/proc/forbidden/run"], 1, "cannot write to work dir"),
        (["--batch_tokens", "40", "--max_length", "16"], 8, "8 devices cannot divide"),
        (["--dataset_dir", "{tmp}/uneven", "--src_lang", "de", "--tgt_lang", "en"], 1, "differ in length"),
        (["--parallel", "mesh", "--mesh", "data=3"], 8, "--mesh data=3,fsdp=1,tensor=1 needs 3 devices but there are 8"),
        (["--parallel", "mesh", "--mesh", "data=2,tensor=4", "--d_model", "24", "--h", "6"], 8,
         "tensor=4 does not divide h=6"),
        (["--mesh", "data=2,pipeline=4"], 1, "NAME one of data, fsdp, tensor"),
        (["--coordinator_address", "nohost", "--num_processes", "2", "--process_id", "0"], 1, "must be HOST:PORT"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, args, devices, message):
    _write_folder(tmp_path / "uneven", n_de=6, n_en=5)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--workdir" not in args:
        args = ["--workdir", str(tmp_path / "run"), *args]
    result = train(*args, devices=devices, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("train.py")]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_short_multi30k_run_lowers_validation_loss(tmp_path, multi30k_dir):
    from transformer.config import TransformerConfig
    from transformer.run.trainer import Trainer
    from transformer.tasks import TranslateConfig, TranslateTask
    from transformer.training import TrainConfig

    model = TransformerConfig.tiny(d_model=64, d_ff=128, h=4, N=1, dropout_rate=0.1, vocab_size=1000)
    config = TrainConfig(num_train_steps=60,
                         batch_tokens=2048, max_length=48, warmup_steps=30, lr_scale=2.0, log_every=20,
                         eval_every=60, checkpoint_every=60, eval_batches=10)
    task = TranslateTask(TranslateConfig(dataset_dir=str(multi30k_dir), src_lang="de", tgt_lang="en"), config)
    trainer = Trainer(model, config, str(tmp_path), task=task, show_progress=False)
    before = trainer.evaluate(trainer.state.params, max_batches=10)
    summary = trainer.run()
    after = summary["validation"]
    assert after["loss"] < before["loss"] - 0.5, (before, after)
