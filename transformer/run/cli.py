"""Command-line plumbing shared by train.py, translate.py and average_checkpoints.py: every config
field becomes a flag, user mistakes end in one line on stderr with exit code 2 (no traceback), and
SIGTERM stops a program cleanly."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import signal
import sys
import typing

from transformer.config import ConfigError


class UserError(ValueError):
    """Something the user can fix; reported as one line, exit code 2."""


class RunStopped(RuntimeError):
    """A run that cannot go on (e.g. its loss became NaN); reported as one line, exit code 1."""


class Terminated(BaseException):
    """SIGTERM arrived: unwind (closing what was opened) and exit with `code` after one line.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, message: str = "stopped by SIGTERM", code: int = 128 + signal.SIGTERM):
        super().__init__(message)
        self.message, self.code = message, code


def raise_terminated(signum, frame):
    raise Terminated()


def disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, is "no space left on device"."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err):  # TensorStore reports it inside a ValueError
            return True
        err = err.__cause__ or err.__context__
    return False


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the whole usage first
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, title: str, skip=()) -> None:
    """One --flag per field of the dataclass `cls`, defaulting to None (= keep the preset's value)."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        hint = hints[field.name]
        kwargs: dict = {"default": None, "help": field.metadata.get("help", f"(default: {field.default!r})")}
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is typing.Literal:
            kwargs.update(choices=list(args), type=type(args[0]))
        elif hint is bool:
            kwargs.update(type=_parse_bool, metavar="{true,false}")
        elif hint in (int, float, str):
            kwargs.update(type=hint)
        elif origin is tuple:  # tuple[str, ...]: one or more values after the flag
            kwargs.update(nargs="+", type=args[0], metavar=field.name.upper())
        else:  # Optional[...]
            inner = [a for a in args if a is not type(None)]
            kwargs.update(type=inner[0] if inner else str)
        group.add_argument(f"--{field.name}", **kwargs)


def default_dtype(backend: str) -> str:
    """The compute dtype of a run given no --dtype: "bfloat16" on a TPU (the matrix units' own type;
    float32 matrix products take several bfloat16 passes there), "float32" on any other backend.
    Parameters and optimizer state stay float32 either way (README.md, "Precision")."""
    return "bfloat16" if backend == "tpu" else "float32"


def overrides_for(args: argparse.Namespace, cls) -> dict:
    return {f.name: tuple(value) if isinstance(value, list) else value
            for f in dataclasses.fields(cls) if (value := getattr(args, f.name, None)) is not None}


def run_main(prog: str, main) -> None:
    """Call main(); user mistakes become `prog: error: …` and exit code 2; SIGTERM raises
    `Terminated` (main may catch it to say more), which ends in one line and its exit code."""
    from transformer.data import DataError

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        code = main()
    except (UserError, ConfigError, DataError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Terminated as err:
        _exit_now(f"{prog}: {err.message}", err.code)
    except OSError as err:
        if not disk_full(err):
            raise
        print(f"{prog}: error: no space left on device ({err.filename or err}): free some space and run again",
              file=sys.stderr)
        sys.exit(2)
    except RunStopped as err:
        print(f"{prog}: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        _exit_now(f"{prog}: interrupted", 130)
    sys.exit(code or 0)


def _exit_now(line: str, code: int) -> None:
    """After a signal: what was opened is closed by now (the exception unwound through every
    `with`/`finally`). Skip the interpreter's teardown: a JAX call that the signal interrupted
    half-way can leave jaxlib in a state that crashes there (seen: SIGSEGV after SIGTERM during
    decoding)."""
    print(line, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
