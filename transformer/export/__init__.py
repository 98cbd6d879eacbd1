"""Export a train.py run for serving outside this library: a CTranslate2 model (`ctranslate2.py`:
the C++ inference engine's own format, float32 or int8 weights) or a StableHLO program of the forward
pass (`stablehlo.py`: `jax.export`, for any XLA runtime). export.py drives both.

What is shared lives here: the model of a work dir, rebuilt so that it loads on any machine, and
the rule for the output folder (a new or empty one, written whole or not at all)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

FORMATS = ("ctranslate2", "stablehlo")


def load_run_model(workdir: str, average_last: int = 1, step: int | None = None):
    """(model, tokenizer, steps used) of a train.py work dir, with attention computed by the reference
    formula: config.json records how the run computed attention, and "cudnn" cannot be built
    without a GPU, while an exporter must load the run on whatever machine it runs on. The
    parameters and the function are the same whatever the implementation
    (transformer/nn/attention.py); the reference formula is also what lowers to plain StableHLO on
    every platform (no cuDNN custom call), and it takes d_k != d_v as it is."""
    from transformer.run.workdir import load_run_model as load

    return load(workdir, average_last, step, attention_impl="reference")


def tokenizer_file(workdir: str) -> str:
    """The tokenizer file of a work dir (spm.model, or chars.json for the character task)."""
    from transformer.data.tokenizer import CharTokenizer, SentencePieceTokenizer

    for name in (SentencePieceTokenizer.FILE, CharTokenizer.FILE):
        if os.path.exists(os.path.join(workdir, name)):
            return os.path.join(workdir, name)
    raise FileNotFoundError(f"no tokenizer file in {workdir}")


@contextlib.contextmanager
def new_output_dir(output: str):
    """Yield a temporary folder beside `output`; on success it becomes `output` (one rename), on any
    error it is removed. So a failed or interrupted export leaves no half-written model behind."""
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", suffix=".partial", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private (0700); the model is an ordinary folder
    try:
        yield staging
        if os.path.isdir(output):
            os.rmdir(output)  # empty (run.workdir.check_new_folder); rmdir refuses anything else
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
