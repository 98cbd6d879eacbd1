"""Command-line plumbing shared by train.py and translate.py: every config field becomes a flag,
and user mistakes end in one line on stderr with exit code 2 (no traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from transformer.config import ConfigError


class UserError(ValueError):
    """Something the user can fix; reported as one line, exit code 2."""


class RunStopped(RuntimeError):
    """A run that cannot go on (e.g. its loss became NaN); reported as one line, exit code 1."""


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
        kwargs: dict = {"default": None, "help": f"(default: {field.default!r})"}
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is typing.Literal:
            kwargs.update(choices=list(args), type=type(args[0]))
        elif hint is bool:
            kwargs.update(type=_parse_bool, metavar="{true,false}")
        elif hint in (int, float, str):
            kwargs.update(type=hint)
        else:  # Optional[...]
            inner = [a for a in args if a is not type(None)]
            kwargs.update(type=inner[0] if inner else str)
        group.add_argument(f"--{field.name}", **kwargs)


def overrides_for(args: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def run_main(prog: str, main) -> None:
    """Call main(); user mistakes become `prog: error: …` and exit code 2."""
    from transformer.data import DataError

    try:
        code = main()
    except (UserError, ConfigError, DataError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunStopped as err:
        print(f"{prog}: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
