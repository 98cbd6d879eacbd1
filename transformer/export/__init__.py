"""Export a train.py run for serving outside this library: a CTranslate2 model (`ctranslate2.py`:
the C++ inference engine's own format, float32 or int8 weights) or a StableHLO program of the forward
pass (`stablehlo.py`: `jax.export`, for any XLA runtime). export.py drives both.

What is shared lives here: the model of a work dir, rebuilt so that it loads on any machine, and
the rule for the output folder (a new or empty one, written whole or not at all)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile

FORMATS = ("ctranslate2", "stablehlo")


def portable_config(config):
    """`config` with attention computed by the reference formula.

    config.json records how the run computed attention, and "cudnn" cannot be built without a GPU
    (ConfigError): an exporter must load the run on whatever machine it runs on. The parameters and
    the function are the same whatever the implementation (transformer/nn/attention.py); the
    reference formula is also what lowers to plain StableHLO on every platform (no cuDNN custom call),
    and it takes d_k != d_v as it is."""
    return dataclasses.replace(config, attention_impl="reference")


def load_run_model(workdir: str, average_last: int = 1, step: int | None = None):
    """(model, tokenizer, steps used) of a train.py work dir: its newest checkpoint (or `step`), or the
    average of its last `average_last`, as translate.py loads them, with `portable_config`.
    A work dir that is not one raises UserError."""
    from flax import nnx

    from transformer.data.tokenizer import load_tokenizer
    from transformer.run.checkpoint import load_params
    from transformer.run.cli import UserError
    from transformer.run.workdir import load_run_config
    from transformer.training import create_train_state

    if not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir!r} is not a folder: give the work dir of a train.py run")
    model_config, train_config = load_run_config(workdir)
    tokenizer = load_tokenizer(workdir)
    if tokenizer is None:
        raise UserError(f"no tokenizer in {workdir}: --workdir must be the folder of a train.py run")
    model_config = portable_config(model_config)
    graphdef, like, _ = create_train_state(model_config, train_config)
    try:
        state, used = load_params(workdir, like, average_last, step)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    return nnx.merge(graphdef, state.params), tokenizer, used


def tokenizer_file(workdir: str) -> str:
    """The tokenizer file of a work dir (spm.model, or chars.json for the character task)."""
    from transformer.data.tokenizer import CharTokenizer, SentencePieceTokenizer

    for name in (SentencePieceTokenizer.FILE, CharTokenizer.FILE):
        if os.path.exists(os.path.join(workdir, name)):
            return os.path.join(workdir, name)
    raise FileNotFoundError(f"no tokenizer file in {workdir}")


def check_output_dir(output: str) -> None:
    """Refuse (UserError) an --output that is a file, a folder that holds something, or that cannot be
    made: an export never writes into, nor over, anything that exists."""
    from transformer.run.cli import UserError

    if os.path.isfile(output):
        raise UserError(f"--output {output!r} is a file: give the name of a new folder")
    if os.path.isdir(output) and os.listdir(output):
        raise UserError(f"--output {output!r} is a folder that is not empty: give the name of a new folder")
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"--output {output!r} cannot be made under {parent}: choose a folder you can write to")


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
            os.rmdir(output)  # empty (check_output_dir); rmdir refuses anything else
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
