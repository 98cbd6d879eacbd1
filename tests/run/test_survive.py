"""Runs that survive (README "Runs that survive"): several devices to the end, one live run per work
dir, resume checks, damaged config.json, a full disk, SIGTERM/SIGINT outside the training loop. Every
exit path is checked for a clean standard error: no traceback, no "Exception ignored" line."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_train_cli import FAST, _env, _write_folder, train

from transformer.run.cli import UserError


def assert_clean(stderr: str) -> None:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def error_lines(stderr: str, prog: str = "train.py") -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}:")]


def popen(*args, devices=1):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], env=_env(devices), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def wait_for_python_handler(proc, signum=signal.SIGTERM, timeout=30):
    """Until the process has installed a Python handler for `signum` (its first lines ran)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(f"/proc/{proc.pid}/status") as f:
            caught = int(next(l for l in f if l.startswith("SigCgt:")).split()[1], 16)
        if caught >> (signum - 1) & 1:
            return
        time.sleep(0.005)
    raise AssertionError("train.py never installed its SIGTERM handler")


def translate(workdir, input_file, *args):
    return subprocess.run([sys.executable, str(ROOT / "translate.py"), "--workdir", str(workdir), "--input",
                           str(input_file), *args], capture_output=True, text=True, env=_env(), timeout=120, cwd=ROOT)


# -- the state lives on the host outside Trainer.run: several devices finish ----------------------


def test_whole_train_py_on_two_devices_runs_to_the_end_with_its_scores(tmp_path):
    _write_folder(tmp_path / "data")
    result = train("--workdir", str(tmp_path / "run"), "--dataset_dir", str(tmp_path / "data"), "--src_lang", "de",
                   "--tgt_lang", "en", "--vocab_size", "40", "--num_train_steps", "10", "--beam_size", "2", *FAST,
                   "--checkpoint_every", "5", devices=2)
    assert result.returncode == 0, result.stderr
    assert_clean(result.stderr)
    assert "2 device(s)" in result.stdout
    assert "validation BLEU" in result.stdout and "finished step 10" in result.stdout
    # The same work dir then serves translate.py's checkpoint fallback (average_checkpoints.py goes
    # through the same load_params: tests/test_checkpoint.py): damage the newest checkpoint; it is
    # skipped, saying why, and step 5 is used.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "10" / "meta")
    translated = translate(tmp_path / "run", tmp_path / "data" / "de.validation.txt")
    assert translated.returncode == 0, translated.stderr
    assert_clean(translated.stderr)
    assert f"warning: skipped checkpoint step 10 in {tmp_path}/run/checkpoints: its meta/ folder is missing" \
        in translated.stderr
    assert "checkpoint step(s) [5]" in translated.stderr and len(translated.stdout.splitlines()) == 6
    assert (tmp_path / "run" / "checkpoints" / "10").is_dir()  # readers never move or delete


# -- one live run per work dir --------------------------------------------------------------------


def test_workdir_lock_names_the_holder_and_is_released():
    import tempfile

    from transformer.run.workdir import WorkdirLock

    with tempfile.TemporaryDirectory() as workdir:
        first = WorkdirLock(workdir)
        with pytest.raises(UserError, match=rf"is in use by a live train.py \(pid {os.getpid()} on host "):
            WorkdirLock(workdir)  # flock conflicts between two open files, even in one process
        first.release()
        WorkdirLock(workdir).release()


def test_a_second_run_on_a_live_work_dir_is_refused_and_a_killed_run_leaves_no_stale_lock(tmp_path):
    workdir = tmp_path / "run"
    args = ["--workdir", str(workdir), "--num_train_steps", "100000", *FAST]
    a, b = popen(*args), popen(*args)  # at the same moment, on a new work dir
    deadline = time.time() + 300
    while a.poll() is None and b.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    loser, winner = (a, b) if a.poll() is not None else (b, a)
    out, err = loser.communicate()
    assert loser.returncode == 2, err
    assert_clean(err)
    assert error_lines(err) == [f"train.py: error: work dir {str(workdir)!r} is in use by a live train.py "
                                f"(pid {winner.pid} on host {os.uname().nodename}): wait for it to end, stop it, "
                                "or choose another --workdir"], err
    wait_for(workdir / "checkpoints" / "10", winner)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[0] == 10
    winner.send_signal(signal.SIGKILL)
    winner.communicate()
    # The kernel dropped the lock with the process: the next run gets past it, to the resume checks.
    again = train(*args, "--seed", "7", timeout=120)
    assert again.returncode == 2 and "in use" not in again.stderr, again.stderr
    assert_clean(again.stderr)
    assert error_lines(again.stderr) == [
        f"train.py: error: work dir {str(workdir)!r} holds a run with other settings (--seed 0 -> 7): resume with "
        "its settings (see its config.json), or choose a new --workdir"], again.stderr


# -- resume checks --------------------------------------------------------------------------------


def _configs(*flags):
    """(model config, training recipe, task) as train.py makes them from `flags`."""
    import train as train_script

    return train_script.settings(train_script.parse_args(list(flags)))[:3]


def test_resume_refuses_changed_settings_and_names_them(tmp_path, capsys):
    from transformer.run.workdir import check_resume, write_config_json

    model, train_config, task = _configs("--vocab_size", "40", *FAST)
    import dataclasses

    write_config_json(str(tmp_path), dataclasses.replace(model, vocab_size=37), train_config, task,
                      requested_vocab_size=40)
    assert check_resume(str(tmp_path), model, train_config, task)["requested_vocab_size"] == 40
    # Allowed silently: length, bookkeeping, decoding.
    assert check_resume(str(tmp_path), *_configs("--vocab_size", "40", *FAST, "--num_train_steps", "9",
                                                 "--log_every", "3", "--checkpoint_every", "4", "--beam_size", "2"))
    assert capsys.readouterr().err == ""
    # Allowed, with a note: the learning-rate schedule (the remedy after a NaN).
    assert check_resume(str(tmp_path), *_configs("--vocab_size", "40", *FAST, "--lr_scale", "0.5"))
    assert capsys.readouterr().err == (f"note: resuming {str(tmp_path)!r} with a changed learning-rate schedule "
                                       "(--lr_scale 2.0 -> 0.5)\n")
    # Under the linear schedule the step count is where the decay ends: allowed, with a note.
    model, linear, task = _configs("--vocab_size", "40", *FAST, "--schedule", "linear", "--learning_rate", "1e-3")
    (tmp_path / "linear").mkdir()
    write_config_json(str(tmp_path / "linear"), model, linear, task, requested_vocab_size=40)
    longer = dataclasses.replace(linear, num_train_steps=linear.num_train_steps + 5)
    assert check_resume(str(tmp_path / "linear"), model, longer, task)
    assert capsys.readouterr().err == (
        f"note: resuming {str(tmp_path / 'linear')!r} with a changed learning-rate schedule (--num_train_steps "
        f"{linear.num_train_steps} -> {longer.num_train_steps}: the linear decay now reaches 0 at step "
        f"{longer.num_train_steps})\n")
    # Refused: the tokenizer's size (the old spm.model would be reused), data, batching, seed, the model.
    with pytest.raises(UserError) as refused:
        check_resume(str(tmp_path), *_configs("--vocab_size", "60", *FAST, "--seed", "3", "--batch_tokens", "512",
                                              "--d_ff", "48"))
    assert str(refused.value) == (
        f"work dir {str(tmp_path)!r} holds a run with other settings (--vocab_size 40 -> 60, --d_ff 32 -> 48, "
        "--batch_tokens 256 -> 512, --seed 0 -> 3): resume with its settings (see its config.json), or choose a new "
        "--workdir (it has no checkpoint yet: delete it to start afresh)")


@pytest.mark.parametrize("content", ['{"model": {"d_model": 16', "", '["not", "a", "run"]'])
def test_a_damaged_config_json_is_one_line_for_train_and_translate(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    from transformer.run.workdir import load_run_config

    with pytest.raises(UserError, match=f"{tmp_path}/config.json cannot be read .*: it is damaged"):
        load_run_config(str(tmp_path))
    if content:  # the subprocesses once: their one line, exit code 2
        return
    for prog, args in (("train.py", FAST), ("translate.py", ["--input", "-"])):
        result = subprocess.run([sys.executable, str(ROOT / prog), "--workdir", str(tmp_path), *args],
                                capture_output=True, text=True, env=_env(), timeout=120, cwd=ROOT, input="")
        assert result.returncode == 2, result.stderr
        assert_clean(result.stderr)
        lines = error_lines(result.stderr, prog)
        assert len(lines) == 1 and "config.json cannot be read (Expecting value" in lines[0], result.stderr


# -- NaN: the newest checkpoint that is really good ----------------------------------------------


def test_after_a_nan_the_named_checkpoint_is_finite_and_resumes_with_sane_settings(tmp_path, capsys):
    from transformer.run.checkpoint import Checkpoints, non_finite_leaf
    from transformer.run.trainer import Trainer

    import jax

    huge = ["--lr_scale", "1e9", "--warmup_steps", "1000"]  # the state goes to inf within ~10 steps
    result = train("--workdir", str(tmp_path), "--num_train_steps", "50", *FAST, "--checkpoint_every", "1", *huge)
    assert result.returncode == 1, result.stderr
    assert_clean(result.stderr)
    [line] = error_lines(result.stderr)
    bad = int(line.split(" at step ")[1].split(";")[0])
    good = bad - 2
    assert f"checkpoint step {bad - 1}, which led to it, was moved to {tmp_path}/skipped_checkpoints/{bad - 1}" in line
    assert f"the newest good checkpoint is step {good} in {tmp_path}/checkpoints" in line
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == good
    # The checkpoint that led to the NaN is kept aside, with the reason.
    assert (tmp_path / "skipped_checkpoints" / str(bad - 1) / "WHY_SKIPPED.txt").read_text().endswith(f"({bad})\n")
    # Resume with a sane learning rate: it trains on, finite. (In-process, one device, and no final
    # decoding, to keep the test short.)
    model, config, task = _configs(*FAST, "--num_train_steps", str(good + 3), "--checkpoint_every", "1",
                                   "--lr_scale", "1", "--warmup_steps", "1000")
    with Trainer(model, config, str(tmp_path), task=task, show_progress=False, devices=jax.devices()[:1]) as trainer:
        assert trainer.resumed_from == good
        summary = trainer.run()
        assert summary["step"] == good + 3 and non_finite_leaf(trainer.state) is None
    checkpoints = Checkpoints(str(tmp_path))
    assert checkpoints.latest_step() == good + 3
    checkpoints.close()
    # A damaged newest checkpoint when a run resumes: skipped, saying why, and set aside (the run
    # holds the lock); the saves after it are tests/test_checkpoint.py's.
    os.remove(tmp_path / "checkpoints" / str(good + 3) / "state" / "_METADATA")
    capsys.readouterr()
    with Trainer(model, config, str(tmp_path), task=task, show_progress=False, devices=jax.devices()[:1]) as trainer:
        assert trainer.resumed_from == good + 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"warning: skipped checkpoint step {good + 3} in {tmp_path}/checkpoints: state/_METADATA is missing; "
        f"moved to {tmp_path}/skipped_checkpoints/{good + 3}")
    assert (tmp_path / "skipped_checkpoints" / str(good + 3) / "meta").is_dir()


# -- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode}): the full-disk case "
                    "needs root and mount")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_checkpointing_is_one_line_and_earlier_checkpoints_stay_usable(small_disk, tmp_path):
    workdir = small_disk / "run"
    # Only checkpoints write during training here (logging and evaluation come later than the end).
    proc = popen("--workdir", str(workdir), "--num_train_steps", "100000", *FAST, "--log_every", "100000",
                 "--eval_every", "100000", "--checkpoint_every", "10")
    wait_for(workdir / "checkpoints" / "10", proc)
    proc.send_signal(signal.SIGSTOP)
    try:
        with open(small_disk / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    except OSError:
        pass
    finally:
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert_clean(err)
    [line] = [l for l in err.splitlines() if l.strip()]
    assert line.startswith("train.py: error: no space left on device while saving checkpoint step "), err
    good = int(line.split("the newest good checkpoint is step ")[1].split()[0])
    assert line.endswith(f"in {workdir}/checkpoints: free some space and run again to resume from it")
    os.remove(small_disk / "filler")
    (tmp_path / "src.txt").write_text("abc\nhello\n")
    translated = translate(workdir, tmp_path / "src.txt")
    assert translated.returncode == 0, translated.stderr
    assert_clean(translated.stderr)
    assert f"checkpoint step(s) [{good}]" in translated.stderr and len(translated.stdout.splitlines()) == 2


# -- SIGTERM and SIGINT outside the training loop --------------------------------------------------


def test_sigterm_and_sigint_during_start_up_and_the_final_scoring_exit_cleanly(tmp_path):
    workdir = tmp_path / "run"
    args = ["--workdir", str(workdir), "--num_train_steps", "10", *FAST]
    # Start-up of a new run: nothing saved, so not a success.
    proc = popen(*args)
    wait_for_python_handler(proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert_clean(err)
    assert [l for l in err.splitlines() if l.strip()] == ["train.py: SIGTERM during start-up: stopped before "
                                                          "training began"]
    # The final scoring (decoding 1000 held-out strings): the last checkpoint exists, so exit code 0.
    proc = popen(*args)
    wait_for(workdir / "checkpoints" / "10", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert_clean(err)
    assert err.strip().splitlines()[-1] == (f"train.py: SIGTERM during the final scoring: stopped; the checkpoint of "
                                            f"step 10 is in {workdir}/checkpoints (run again with the same --workdir "
                                            "to go on)")
    assert "finished step" not in out
    # Start-up of a run that has a checkpoint: exit code 0.
    proc = popen(*args)
    wait_for_python_handler(proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert_clean(err)
    assert error_lines(err) and error_lines(err)[-1].startswith("train.py: SIGTERM during start-up: stopped")
    # SIGINT (Ctrl-C) during start-up.
    proc = popen(*args)
    wait_for_python_handler(proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert_clean(err)
    assert error_lines(err) == ["train.py: interrupted"]
