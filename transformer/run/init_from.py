"""Starting a new run from another run's parameters (fine-tuning): `--init_from WORKDIR[@STEP]`.

The source run's checkpoint is read without building its model (`read_params`): its parameters are
matched by path against the new model's (`load_matching`), with the encoder-decoder's embedding
names read as the single-stack families' (`DEFAULT_ALIASES`). What was loaded, what is new, what
was skipped for its shape and what of the source went unused is reported (`format_report`), and kept
in the new run's work dir as init_from.txt (`write_report`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

import jax
import numpy as np
from flax import nnx
from jaxtyping import Shaped

from transformer.run.checkpoint import Checkpoints, UnusableCheckpoint
from transformer.run.cli import UserError
from transformer.training.optimizer import parameter_paths, path_name

REPORT_FILE = "init_from.txt"  # in the new run's work dir


def parse_source(text: str) -> tuple[str, int | None]:
    """(work dir, checkpoint step or None for the newest) from `WORKDIR` or `WORKDIR@STEP`.

    The text after the last "@" is the step when it is a number; a text whose "@" is not followed by
    a number is a work dir only if such a folder exists (a folder named like `runs/a@b`), else a
    UserError."""
    workdir, at, step = text.rpartition("@")
    if not at:
        return text, None
    if step.isdigit() and workdir:
        return workdir, int(step)
    if os.path.isdir(text):
        return text, None
    raise UserError(f"--init_from {text!r}: the step after '@' must be a checkpoint's step number "
                    "(write WORKDIR or WORKDIR@STEP, e.g. runs/base@100000)")


def read_params(workdir: str, step: int | None = None) -> tuple[dict[str, Shaped[np.ndarray, "..."]], int]:
    """({path: host array}, step) of the parameters in a train.py run's checkpoint: `step`, or the
    newest one that can be used, older ones tried in turn when newer ones cannot (each skipped with a
    line on standard error, as transformer/run/checkpoint.py decides). Read without building the
    source model (`Checkpoints.restore_params`); the paths are those `parameter_paths` gives for
    the nnx.State of a live model. What cannot give parameters raises UserError."""
    if not os.path.isdir(workdir):
        raise UserError(f"--init_from {workdir!r} is not a folder: give the work dir of a train.py run")
    # Checked first: Checkpoints would create checkpoints/ in a folder that is not a run.
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise UserError(f"no checkpoints/ folder in {workdir!r}: --init_from needs the work dir of a train.py run "
                        "that saved a checkpoint")
    checkpoints = Checkpoints(workdir, keep=10**9)  # never rotates anything away
    try:
        steps = checkpoints.all_steps()
        if not steps:
            raise UserError(f"no checkpoint in {checkpoints.directory}: --init_from needs a run that saved one")
        if step is not None:
            if step not in steps:
                raise UserError(f"no checkpoint of step {step} in {checkpoints.directory} (it has {steps}): "
                                "choose one of those, or leave out @STEP for the newest")
            try:
                return parameter_paths(checkpoints.restore_params(step)), step
            except UnusableCheckpoint as err:  # the one asked for by name: no silent substitute
                raise UserError(f"{err} ({checkpoints.directory}): choose another step (it has {steps})") from None
        for s in reversed(steps):
            try:
                return parameter_paths(checkpoints.restore_params(s)), s
            except UnusableCheckpoint as err:
                print(f"warning: skipped checkpoint step {s} in {checkpoints.directory}: {err.reason}",
                      file=sys.stderr, flush=True)
        raise UserError(f"none of the checkpoints in {checkpoints.directory} can be read (see above): "
                        "choose another --init_from")
    finally:
        checkpoints.close()


@dataclasses.dataclass(frozen=True)
class Alias:
    """For a target model with a parameter under `when`: a target path `target + rest` is also looked
    up in the source as `s + rest`, for each s of `sources` in order (see `load_matching`)."""

    target: str
    sources: tuple[str, ...]
    when: str


# The single-stack families name their one embedding `embed/`; the encoder-decoder has two.
DEFAULT_ALIASES = (
    # An encoder (classifier, masked LM) reads the encoder's embedding.
    Alias(target="embed/", sources=("src_embed/",), when="encoder/"),
    # A decoder (LM) reads the decoder's. With share_embeddings (§3.4) the one matrix is stored
    # under src_embed/ only, so src_embed/ comes second; it is never reached for anything else, as
    # tgt_embed/ holds every other parameter src_embed/ holds (its own position table, if learned).
    Alias(target="embed/", sources=("tgt_embed/", "src_embed/"), when="decoder/"),
)


@dataclasses.dataclass(frozen=True)
class InitReport:
    """What `load_matching` did, by target path (source paths for `unused`)."""

    source: str  # the source run's work dir (or what the caller named the source)
    step: int | None  # its checkpoint step, when known
    loaded: tuple[str, ...]  # target paths given the source's values
    aliased: dict[str, str]  # of those, the ones read under another path: target path -> source path
    new: tuple[str, ...]  # target paths the source has no parameter for: as initialised
    skipped: dict[str, str]  # target path -> why not loaded ("shape (a, b) in source, (c, d) here")
    unused: tuple[str, ...]  # source paths no target path matched (a skipped one is under `skipped` only)


def load_matching(
    target: nnx.State,
    source: dict[str, Shaped[np.ndarray, "..."]],
    aliases: tuple[Alias, ...] = DEFAULT_ALIASES,
    *,
    source_name: str = "the source run",
) -> tuple[nnx.State, InitReport]:
    """`target` (an nnx.State of parameters) with each parameter the source has replaced by the
    source's value, bit for bit, in the target's dtype (and sharding); the others as they were.

    A target path P is looked up in `source` as P, then, for each alias whose `target` prefix starts
    P and whose `when` prefix starts some target path, as P with that prefix replaced by each of the
    alias's `sources`. The first of these the source has decides: loaded when the shapes are equal,
    else skipped (the names matched, so no other candidate is tried). No candidate: new.
    Nothing loaded raises UserError."""
    target_paths = parameter_paths(target)
    aliases = [alias for alias in aliases if any(p.startswith(alias.when) for p in target_paths)]
    values, aliased, skipped, new, used = {}, {}, {}, [], set()
    for path, leaf in target_paths.items():
        candidates = [path]
        for alias in aliases:
            if path.startswith(alias.target):
                candidates += [prefix + path[len(alias.target):] for prefix in alias.sources]
        found = next((c for c in candidates if c in source), None)
        if found is None:
            new.append(path)
            continue
        used.add(found)
        have, want = tuple(np.shape(source[found])), tuple(np.shape(leaf))
        if have != want:
            skipped[path] = f"shape {have} in source, {want} here"
            continue
        values[path] = np.asarray(source[found]).astype(leaf.dtype)
        if found != path:
            aliased[path] = found
    if not values:
        if skipped:
            path, why = next(iter(skipped.items()))
            detail = f"{len(skipped)} have a parameter's name but another shape, e.g. {path}: {why}"
        else:
            detail = f"the names differ (the source has {_examples(source)}; this model {_examples(target_paths)})"
        raise UserError(f"no parameter of {source_name} matches this model: {detail}")

    def replace(key_path, leaf):
        value = values.get(path_name(key_path))
        if value is None:
            return leaf
        if isinstance(leaf, jax.Array):  # placed as the target's array was (a mesh's shards included)
            return jax.make_array_from_callback(value.shape, leaf.sharding, lambda index: value[index])
        return value

    report = InitReport(source=source_name, step=None, loaded=tuple(values), aliased=aliased, new=tuple(new),
                        skipped=skipped, unused=tuple(p for p in source if p not in used))
    return jax.tree_util.tree_map_with_path(replace, target), report


def _examples(paths, n: int = 3) -> str:
    names = list(paths)
    return ", ".join(names[:n]) + (", …" if len(names) > n else "")


def init_params(target: nnx.State, text: str) -> tuple[nnx.State, InitReport]:
    """`load_matching(target, …)` from the run `text` names (`WORKDIR` or `WORKDIR@STEP`)."""
    workdir, step = parse_source(text)
    source, step = read_params(workdir, step)
    state, report = load_matching(target, source, source_name=workdir)
    return state, dataclasses.replace(report, step=step)


# -- the report -------------------------------------------------------------------------------------

_LAYER = re.compile(r"layers/(\d+)/")


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 4] -> "0-2, 4"."""
    runs, numbers = [], sorted(set(numbers))
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _summarise(lines: list[str]) -> list[str]:
    """Lines that differ only in their layer number (every `layers/<n>/` of the line the same n)
    become one, `layers/*/` and the layers' numbers; the first line of a group sets its place."""
    groups: dict[str, list[int]] = {}
    for line in lines:
        numbers = {int(n) for n in _LAYER.findall(line)}
        if len(numbers) == 1:
            groups.setdefault(_LAYER.sub("layers/*/", line), []).append(numbers.pop())
        else:
            groups.setdefault(line, [])
    out = []
    for key, numbers in groups.items():
        if len(numbers) == 1:
            out.append(key.replace("layers/*/", f"layers/{numbers[0]}/"))
        else:
            out.append(f"{key}  (layers {_ranges(numbers)})" if numbers else key)
    return out


def format_report(report: InitReport) -> str:
    """The report as text: where from, the counts, then each list (one line per parameter, those of
    several layers on one line)."""
    where = report.source + (f", checkpoint step {report.step}" if report.step is not None else "")
    text = [f"Parameters from {where}:",
            f"  {len(report.loaded)} loaded, {len(report.new)} new (as initialised here), "
            f"{len(report.skipped)} skipped (another shape), {len(report.unused)} of the source unused"]
    sections = (
        ("Loaded", [f"{p} <- {report.aliased[p]}" if p in report.aliased else p for p in report.loaded]),
        ("New", list(report.new)),
        ("Skipped", [f"{p}: {why}" for p, why in report.skipped.items()]),
        ("Unused", list(report.unused)),
    )
    for title, lines in sections:
        if lines:
            text.append(f"{title}:")
            text += [f"  {line}" for line in _summarise(lines)]
    return "\n".join(text) + "\n"


def write_report(workdir: str, report: InitReport) -> str:
    """Write `format_report(report)` to <workdir>/init_from.txt (atomically: a rename); its path."""
    path = os.path.join(workdir, REPORT_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(format_report(report))
    os.replace(path + ".tmp", path)
    return path


# -- a new run from a source run (train.py --init_from) ----------------------------------------------

def source_model_config(text: str, flags: dict):
    """The model config of a run started from `text` (WORKDIR[@STEP]): the source run's, with `flags`
    (the model flags given) over it. A flag that contradicts the source's tokenizer (vocab_size,
    pad_id) is refused in one line; other changes of shape just leave those parameters new."""
    from transformer.run.workdir import load_run_config

    workdir, _ = parse_source(text)
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise UserError(f"--init_from {workdir!r} has no config.json: give the work dir of a train.py run")
    source, _, _ = load_run_config(workdir)
    if "vocab_size" in flags and flags["vocab_size"] != source.vocab_size:
        raise UserError(f"--vocab_size {flags['vocab_size']} contradicts the tokenizer of --init_from {workdir} "
                        f"({source.vocab_size} pieces), which this run takes: leave --vocab_size out")
    return dataclasses.replace(source, **flags)


class Source:
    """The run a new run starts from: its tokenizer goes into the new work dir (`copy_tokenizer`),
    its matching parameters into the new model (`load_into`)."""

    def __init__(self, text: str):
        self.text = text
        self.workdir, self.step = parse_source(text)
        if not os.path.isdir(self.workdir):
            raise UserError(f"--init_from {self.workdir!r} is not a folder: give the work dir of a train.py run")

    def copy_tokenizer(self, workdir: str) -> None:
        """The source's tokenizer files (spm.* or chars.json), into `workdir`."""
        import shutil

        names = [n for n in os.listdir(self.workdir) if n.startswith("spm.") or n == "chars.json"]
        if not names:
            raise UserError(f"--init_from {self.workdir!r} has no tokenizer (spm.model or chars.json): give the work "
                            "dir of a train.py run")
        for name in names:
            shutil.copy(os.path.join(self.workdir, name), os.path.join(workdir, name))

    def load_into(self, params: nnx.State, workdir: str, say=None) -> nnx.State:
        """`params` with the source's matching parameters loaded; the report printed (with `say`) and
        written to <workdir>/init_from.txt."""
        params, report = init_params(params, self.text)
        path = write_report(workdir, report) if say is not None else None
        if say is not None:
            lines = format_report(report).splitlines()
            say("\n".join(lines[:2]) + f" (the lists: {path})")
        return params
