#!/usr/bin/env python
"""Classify lines of text with a train.py --task classify run: each line of a file (or standard
input) gets its predicted label and the class probabilities.

    python classify.py --workdir runs/sst2 --input reviews.txt          # TSV: label, then P(class) per class
    echo "a gripping , funny film" | python classify.py --workdir runs/sst2 --json
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> int:
    from transformer.run.cli import OneLineParser, UserError

    parser = OneLineParser(prog="classify.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the work dir of a train.py --task classify run")
    parser.add_argument("--input", default="-", help="file of texts, one per line (default: stdin)")
    parser.add_argument("--json", action="store_true", help="JSON lines ({label, probabilities}) instead of TSV")
    parser.add_argument("--average_last", type=int, default=1, help="average the last K checkpoints")
    parser.add_argument("--step", type=int, default=None, help="use the checkpoint of this step (default: latest)")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    if args.average_last < 1 or args.batch_size < 1:
        raise UserError("--average_last and --batch_size must be positive")
    if args.input != "-" and not os.path.isfile(args.input):
        raise UserError(f"--input {args.input!r} is not a file")

    from transformer.data import read_text_lines
    from transformer.run.workdir import load_run_config, load_run_model
    from transformer.tasks.classify import class_probabilities

    lines = read_text_lines(args.input)  # line N of the output classifies line N of the input
    _, train_config, task = load_run_config(args.workdir)
    if task.name != "classify":
        raise UserError(f"{args.workdir} holds a {task.name} run: classify.py takes the work dir of a "
                        "train.py --task classify run")
    model, tokenizer, used = load_run_model(args.workdir, args.average_last, args.step, task="classify")
    names = task.info["class_names"]
    print(f"checkpoint step(s) {used}; classes {names}", file=sys.stderr)
    probabilities = class_probabilities(model, tokenizer, lines, train_config.max_length, args.batch_size)
    if not args.json:
        print("label\t" + "\t".join(f"p({name})" for name in names))
    for p in probabilities:
        label = names[int(p.argmax())]
        if args.json:
            print(json.dumps({"label": label, "probabilities": {n: round(float(x), 6) for n, x in zip(names, p)}}))
        else:
            print(label + "\t" + "\t".join(f"{float(x):.6f}" for x in p))
    return 0


if __name__ == "__main__":
    from transformer.run.cli import run_main

    run_main("classify.py", main)
