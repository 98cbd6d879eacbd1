#!/usr/bin/env python
"""One validation metric of several train.py runs against step, in one PNG (e.g. a classifier
trained from scratch beside one fine-tuned from a pre-trained run):

    python benchmarks/plot_runs.py --run "from scratch=runs/sst2" --run "mlm pre-trained=runs/sst2-mlm" \\
        --metric accuracy --out benchmarks/sst2_pretraining.png
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from transformer.run.metrics import plot_comparison  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=WORKDIR",
                        help="a run's label and work dir; give one --run per curve")
    parser.add_argument("--metric", default="accuracy", help="a field of the runs' metrics.jsonl records")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args()
    runs = {}
    for item in args.run:
        label, sep, workdir = item.partition("=")
        if not sep or not label or not workdir:
            parser.error(f"--run {item!r}: give LABEL=WORKDIR")
        if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
            parser.error(f"--run {item!r}: {workdir} has no metrics.jsonl (is it a train.py work dir?)")
        runs[label] = workdir
    try:
        print(plot_comparison(runs, args.out, args.metric, args.split))
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
