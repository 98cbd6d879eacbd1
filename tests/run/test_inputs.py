"""Bad inputs, as a new user makes them: one line and exit code 2, never a traceback; and a line's
translation that does not depend on the other lines of its batch."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from transformer.run.cli import UserError
from transformer.data import DataError, load_folder_pairs, read_text_lines

TINY = ["--d_model", "16", "--d_ff", "32", "--h", "2", "--N", "1", "--batch_tokens", "256", "--quiet"]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run(script, *args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          env=_env(), timeout=300, cwd=ROOT, input=stdin)


def assert_one_line_error(result, prog, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# ---------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------


def _folder(root, de: bytes, en: bytes):
    root.mkdir()
    for split in ("train", "validation"):
        (root / f"de.{split}.txt").write_bytes(de)
        (root / f"en.{split}.txt").write_bytes(en)
    return root


def test_folder_lines_are_split_at_newlines_only(tmp_path):
    # "\r\n" ends a line like "\n"; U+2028 (which str.splitlines splits at) stays inside its line.
    root = _folder(tmp_path / "d", "ein\u2028hund\r\nzwei\n".encode(), b"a dog\ntwo")
    assert load_folder_pairs(str(root), "train", "de", "en") == [("ein\u2028hund", "a dog"), ("zwei", "two")]


@pytest.mark.parametrize("de, en, message", [
    (b"", b"", "de.train.txt is empty"),
    (b"\n  \nein hund\n", b"a dog\n\n\n", "has text on both sides (all 3 are blank on one side or both)"),
    (b"ein hund\nzwei katzen\n", b"a dog\ntwo \xe9 cats\n", "en.train.txt line 2 is not valid UTF-8 (byte 0xe9 at byte 5"),
])
def test_unusable_data_files_are_refused_naming_the_file(tmp_path, de, en, message):
    root = _folder(tmp_path / "d", de, en)
    with pytest.raises(DataError) as err:
        load_folder_pairs(str(root), "train", "de", "en")
    assert message in str(err.value)
    if b"\xe9" in en:  # and through train.py: one line, exit code 2, nothing written
        result = run("train.py", "--workdir", str(tmp_path / "run"), "--dataset_dir", str(root), "--src_lang", "de",
                     "--tgt_lang", "en", "--num_train_steps", "2", *TINY)
        assert_one_line_error(result, "train.py", str(root / message))
        assert not (tmp_path / "run" / "config.json").exists()


def test_read_text_lines_names_the_line_of_a_bad_byte(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes("ä\nb\nc\xa0d\n".encode() + b"\x80e\n")  # line 4 starts with a lone continuation byte
    with pytest.raises(DataError) as err:
        read_text_lines(str(path))
    assert str(err.value).startswith(f"{path} line 4 is not valid UTF-8 (byte 0x80 at byte 1 of the line)")


@pytest.mark.parametrize("tokenizer_type", ["unigram", "bpe"])
def test_vocabulary_too_small_for_the_characters_names_the_minimum(tmp_path, tokenizer_type):
    from transformer.run.trainer import make_tokenizer
    from transformer.tasks import TranslateConfig, TranslateTask
    from transformer.training import TrainConfig

    # 26 + 12 + 9 distinct letters and the word-boundary piece "▁": 48 characters, + 4 special tokens.
    pairs = [("abcdefghijklmnopqrstuvwxyz", "zyxwvutsrqponmlkjih"), ("ABCDEFGHIJKL", "MNOPQRSTU")]
    config = TrainConfig(tokenizer_type=tokenizer_type)
    task = TranslateTask(TranslateConfig(dataset_dir=str(tmp_path)), config)
    task.train_pairs = pairs
    with pytest.raises(DataError) as err:
        make_tokenizer(config, task, 51, str(tmp_path / "a"))
    assert str(err.value) == ("--vocab_size 51 is too small for the training text: its distinct characters and the "
                              "special tokens need at least 52 pieces; use --vocab_size 52 or more")
    assert not (tmp_path / "a" / "spm.model").exists()
    assert make_tokenizer(config, task, 52, str(tmp_path / "b")).vocab_size == 52


def test_vocabulary_too_small_through_train_py(tmp_path):
    root = _folder(tmp_path / "d", b"abcdefgh\nijkl\n", b"hgfedcba\nlkji\n")  # 12 letters, "▁", 4 special
    result = run("train.py", "--workdir", str(tmp_path / "run"), "--dataset_dir", str(root), "--src_lang", "de",
                 "--tgt_lang", "en", "--vocab_size", "8", "--num_train_steps", "2", *TINY)
    assert_one_line_error(result, "train.py", "--vocab_size 8 is too small", "use --vocab_size 17 or more")


# ---------------------------------------------------------------------------------------------
# Command-line numbers and paths (checked before anything is loaded)
# ---------------------------------------------------------------------------------------------


def _main_of(script):
    spec = importlib.util.spec_from_file_location(script[: -len(".py")] + "_under_test", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("script, args, fragment", [
    ("translate.py", ["--alpha", "-1"], "--alpha (the length penalty's exponent, §6.1) must be a number >= 0, got -1.0"),
    ("translate.py", ["--alpha", "nan"], "must be a number >= 0, got nan"),
    ("translate.py", ["--max_extra", "-5"], "--max_extra (output length limit = input length + max_extra) must be >= 0"),
    ("translate.py", ["--batch_tokens", "0"], "--batch_tokens (source tokens per batch) must be positive, got 0"),
    ("translate.py", ["--input", "{bad}"], "bad.txt line 2 is not valid UTF-8 (byte 0xff at byte 1 of the line)"),
    ("translate.py", ["--input", "{file}", "--reference", "{bad}"], "bad.txt line 2 is not valid UTF-8"),
    ("translate.py", ["--plot_attention", "{file}.jpg"], "file.jpg' must name a .png file"),
    ("translate.py", ["--plot_attention", "{full}/no/such/a.png"], "does not exist"),
    ("translate.py", ["--layer", "2"], "--layer and --head choose what --plot_attention draws: add --plot_attention"),
    ("translate.py", ["--input", "{file}", "--plot_attention", "{full}/a.png", "--plot_line", "2"],
     "--plot_line 2 is not a line of the input (it has 1)"),
    ("average_checkpoints.py", ["--output", "{file}"], "is a file: give the name of a new folder"),
    ("average_checkpoints.py", ["--output", "{file}/avg"], "is a file, not a folder"),
    ("average_checkpoints.py", ["--output", "{full}"], "is a folder that is not empty"),
])
def test_bad_numbers_and_inputs_are_refused_before_the_run_is_read(tmp_path, monkeypatch, script, args, fragment):
    (tmp_path / "file").write_text("keep me\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me too\n")
    (tmp_path / "bad.txt").write_bytes(b"abc\n\xffabc\n")
    args = [a.format(file=tmp_path / "file", full=tmp_path / "full", bad=tmp_path / "bad.txt") for a in args]
    # The work dir does not exist: the error must come from the checks that run before it is read.
    monkeypatch.setattr(sys, "argv", [script, "--workdir", str(tmp_path / "no_run"), *args])
    with pytest.raises((UserError, DataError)) as err:
        _main_of(script)()
    assert fragment in str(err.value)
    assert (tmp_path / "file").read_text() == "keep me\n"
    assert os.listdir(tmp_path / "full") == ["notes.txt"]


@pytest.mark.parametrize("script, args, fragment", [
    ("translate.py", ["--max_extra", "-5"], "--max_extra (output length limit = input length + max_extra) must be >= 0"),
    ("translate.py", ["--batch_tokens", "-1"], "--batch_tokens (source tokens per batch) must be positive, got -1"),
    ("average_checkpoints.py", ["--output", "{file}"], "is a file: give the name of a new folder"),
])
def test_bad_numbers_and_outputs_end_in_one_line(tmp_path, script, args, fragment):
    (tmp_path / "file").write_text("keep me\n")
    result = run(script, "--workdir", str(tmp_path / "no_run"), *[a.format(file=tmp_path / "file") for a in args])
    assert_one_line_error(result, script, fragment)
    assert (tmp_path / "file").read_text() == "keep me\n"


def test_translate_py_warns_about_the_long_line_and_keeps_the_others(tmp_path):
    root = _folder(tmp_path / "d", "\n".join(["ein hund", "zwei katzen", "der mann"] * 4).encode(),
                   "\n".join(["a dog", "two cats", "the man"] * 4).encode())
    workdir = str(tmp_path / "run")
    trained = run("train.py", "--workdir", workdir, "--dataset_dir", str(root), "--src_lang", "de", "--tgt_lang", "en",
                  "--vocab_size", "30", "--max_len", "24", "--max_length", "16", "--num_train_steps", "2",
                  "--checkpoint_every", "2", *TINY)
    assert trained.returncode == 0, trained.stderr
    # train.py ends by translating the validation lines (in batches of short lines) with the final
    # checkpoint and prints the first ones: the translations that translate.py must give again.
    printed = dict(line.strip().split("  ->  ") for line in trained.stdout.splitlines() if "  ->  " in line)
    mixed = run("translate.py", "--workdir", workdir, stdin=f"ein hund\n{'zwei katzen ' * 20}\nder mann\n")
    assert mixed.returncode == 0, mixed.stderr
    out = mixed.stdout.splitlines()
    assert len(out) == 3 and [out[0], out[2]] == [printed["ein hund"], printed["der mann"]]
    warnings = [line for line in mixed.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: line 2 has ")
    assert warnings[0].endswith("tokens but the model takes at most 23 (max_len 24, with the end token): only its first "
                                "23 are translated")
    # A run trained with cuDNN attention (config.json says so) translates and averages on this CPU:
    # the implementation is chosen where the model runs ('auto' here, with a note).
    gpu_run = str(tmp_path / "gpu_run")
    shutil.copytree(workdir, gpu_run)
    with open(os.path.join(gpu_run, "config.json")) as f:
        record = json.load(f)
    record["model"].update(attention_impl="cudnn", dtype="bfloat16")  # as trained on a GPU
    with open(os.path.join(gpu_run, "config.json"), "w") as f:
        json.dump(record, f)
    on_cpu = run("translate.py", "--workdir", gpu_run, stdin="ein hund\nder mann\n")
    assert on_cpu.returncode == 0, on_cpu.stderr
    assert len(on_cpu.stdout.splitlines()) == 2
    assert "note: the run's attention_impl='cudnn' cannot run here" in on_cpu.stderr and "using 'auto'" in on_cpu.stderr
    averaged = run("average_checkpoints.py", "--workdir", gpu_run, "--last", "1", "--output", str(tmp_path / "avg"))
    assert averaged.returncode == 0, averaged.stderr
    assert "Traceback" not in on_cpu.stderr + averaged.stderr
    # --layer and --head are checked against the run's model before its checkpoint is read.
    for flag, value, fragment in (("--layer", "2", "--layer 2 is not a layer of this model: choose 1 to 1"),
                                  ("--head", "0", "--head 0 is not a head of this model: choose 1 to 2")):
        bad = run("translate.py", "--workdir", workdir, "--plot_attention", str(tmp_path / "a.png"), flag, value,
                  stdin="ein hund\n")
        assert_one_line_error(bad, "translate.py", fragment)
        assert not (tmp_path / "a.png").exists()
