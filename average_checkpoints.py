#!/usr/bin/env python
"""Average the parameters of a run's last K checkpoints into a new work dir (§6.1: the paper
averages the last 5 checkpoints for base models and the last 20 for big ones).

    python average_checkpoints.py --workdir runs/X --last 5 --output runs/X-avg5
    python translate.py --workdir runs/X-avg5 --input src.txt
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> int:
    from transformer.run.cli import OneLineParser, UserError

    parser = OneLineParser(prog="average_checkpoints.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the work dir of a train.py run")
    parser.add_argument("--last", type=int, default=5, help="how many of the latest checkpoints (default 5)")
    parser.add_argument("--output", required=True, help="a new folder for the averaged checkpoint")
    args = parser.parse_args()
    if args.last < 1:
        raise UserError("--last must be a positive integer")
    from transformer.run.workdir import check_new_folder

    check_new_folder(args.output)  # averaging writes a new work dir, never into or over anything

    from transformer.run.checkpoint import average_into
    from transformer.run.workdir import load_run_config, run_state_like

    # Parameters do not depend on how attention is computed: the reference formula runs on any
    # device, so a run trained with cuDNN attention is averaged on a CPU too.
    _, like = run_state_like(*load_run_config(args.workdir, attention_impl="reference"))
    try:
        used = average_into(args.workdir, args.output, args.last, like)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    print(f"averaged the checkpoints of steps {used} into {args.output}")
    return 0


if __name__ == "__main__":
    from transformer.run.cli import run_main

    run_main("average_checkpoints.py", main)
