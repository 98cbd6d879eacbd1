"""Two train.py processes on this machine, joined by JAX's multi-controller runtime (a localhost
coordinator; gloo collectives between the CPUs): they train together, survive being killed or one
of them being sent SIGTERM, and end with the parameters of one process that has all the devices."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT

from transformer.run.checkpoint import Checkpoints
from transformer.run.workdir import load_run_config, run_state_like
from transformer.training import create_train_state

# Every layout splits this model: h and d_ff by tensor=2, d_model by fsdp=2. No dropout: pmap draws a
# key per device and the mesh one key for the global batch, so only without it do they agree.
RUN = ["--d_model", "16", "--d_ff", "32", "--h", "4", "--N", "1", "--dropout_rate", "0", "--vocab_size", "40",
       "--batch_tokens", "256", "--num_train_steps", "10", "--log_every", "5", "--eval_every", "10",
       "--checkpoint_every", "5", "--eval_batches", "1", "--bleu_examples", "4", "--beam_size", "1",
       "--warmup_steps", "20", "--quiet"]


GLOO_WORDS = set("Rank is connected to peer ranks. Expected number of connected peer ranks is :".split())

def _folder(root):
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("validation", 8)):
        words = [" ".join(rng.choice(list("abcdefgh"), rng.integers(2, 6))) for _ in range(n)]
        (root / f"de.{split}.txt").write_text("\n".join(words) + "\n")
        (root / f"en.{split}.txt").write_text("\n".join(w[::-1] for w in words) + "\n")
    return ["--dataset_dir", str(root), "--src_lang", "de", "--tgt_lang", "en"]


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir, args, processes=2, devices_each=4):
    port = _free_port()
    joined = [] if processes == 1 else ["--coordinator_address", f"localhost:{port}", "--num_processes",
                                        str(processes)]
    return [subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--workdir", str(workdir), *args, *joined,
                              *([] if processes == 1 else ["--process_id", str(i)])],
                             env=_env(devices_each), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]


def _finish(procs, timeout=300):
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert "Traceback" not in err and "Exception ignored" not in err, err
    return outputs


def _final_params(workdir):
    _, like = run_state_like(*load_run_config(str(workdir)))
    checkpoints = Checkpoints(str(workdir))
    try:
        state, meta = checkpoints.restore(checkpoints.latest_step(), like)
    finally:
        checkpoints.close()
    return jax.device_get(state.params), meta


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One process with all 8 devices: the run the two-process runs must reproduce."""
    root = tmp_path_factory.mktemp("one")
    data = _folder(root / "data")
    _finish(_start(root / "run", [*RUN, *data, "--parallel", "mesh", "--mesh", "data=8"], processes=1, devices_each=8))
    return data, _final_params(root / "run")


@pytest.mark.parametrize("layout, stop", [
    (["--parallel", "mesh", "--mesh", "data=2,fsdp=2,tensor=2"], "SIGTERM to process 1"),
    (["--parallel", "pmap"], "SIGKILL to both"),
], ids=["mesh-sigterm", "pmap-sigkill"])
def test_two_processes_stopped_and_resumed_end_as_one_process_with_all_devices(tmp_path, one_process, layout, stop):
    data, (expected, expected_meta) = one_process
    workdir = tmp_path / "run"
    # A checkpoint every step, so that the stop lands mid-run (the interval may change on resume).
    procs = _start(workdir, [*RUN, *data, *layout, "--checkpoint_every", "1"])
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "2").is_dir():  # Orbax renames a finished save's folder to its step
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.time() < deadline, "no checkpoint of step 2 appeared"
        time.sleep(0.02)
    if stop == "SIGKILL to both":  # both hosts lost at once
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
    else:  # one host preempted: every host saves the same step and ends cleanly
        procs[1].send_signal(signal.SIGTERM)
        (out0, _), _ = _finish(procs)
        saved = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
        assert saved[-1] < 10, saved  # 8 steps, each with a checkpoint, were left when the signal came
        assert f"SIGTERM: saved a checkpoint at step {saved[-1]}" in out0
    (out0, _), (out1, _) = _finish(_start(workdir, [*RUN, *data, *layout]))
    assert "resuming from step" in out0 and "in 2 processes" in out0
    # One report per run, process 0's. gloo itself prints its connections to standard output
    # ("[Gloo] Rank 1 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"),
    # and its threads may cut or join each other's lines anywhere ("…is : 0[Gloo] Rank 1…"), so what
    # is checked is that process 1 wrote no word but gloo's.
    words = out1.replace("[Gloo]", " ").split()
    assert [word for word in words if not word.isdigit() and word not in GLOO_WORDS] == []
    got, meta = _final_params(workdir)
    assert meta["step"] == expected_meta["step"] == 10
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=2e-6)
