#!/usr/bin/env python
"""Export a train.py run for serving: a CTranslate2 model, or the forward pass as StableHLO.

    python export.py --workdir runs/X --format ctranslate2 --output runs/X-ct2                  # float32
    python export.py --workdir runs/X --format ctranslate2 --quantization int8 --output runs/X-ct2-int8
    python export.py --workdir runs/X --format stablehlo --output runs/X-stablehlo
    python export.py --workdir runs/X --average_last 5 --format ctranslate2 --output runs/X-avg5-ct2

--output must be a new (or empty) folder; it gets the model and a copy of the run's tokenizer
(spm.model). README.md, "Exporting for serving", says how to use them and what differs.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> int:
    from transformer.export import FORMATS
    from transformer.export.ctranslate2 import QUANTIZATIONS
    from transformer.export.stablehlo import DEFAULT_PLATFORMS
    from transformer.run.cli import OneLineParser, UserError

    parser = OneLineParser(prog="export.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the work dir of a train.py run")
    parser.add_argument("--format", required=True, choices=FORMATS, help="ctranslate2 or stablehlo")
    parser.add_argument("--output", required=True, help="a new folder for the exported model")
    parser.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                        help="CTranslate2 weights: float32 (default) or int8")
    parser.add_argument("--platforms", default=None,
                        help=f"StableHLO: comma-separated platforms to lower for (default: {','.join(DEFAULT_PLATFORMS)})")
    parser.add_argument("--average_last", type=int, default=1, help="average the last K checkpoints (§6.1)")
    parser.add_argument("--step", type=int, default=None, help="use the checkpoint of this step (default: latest)")
    args = parser.parse_args()
    if args.average_last < 1:
        raise UserError("--average_last must be a positive integer")
    if args.quantization is not None and args.format != "ctranslate2":
        raise UserError("--quantization applies to --format ctranslate2 only")
    if args.platforms is not None and args.format != "stablehlo":
        raise UserError("--platforms applies to --format stablehlo only")
    platforms = DEFAULT_PLATFORMS
    if args.platforms is not None:
        platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
        allowed = ("cpu", "cuda", "rocm", "tpu")
        if not platforms or any(p not in allowed for p in platforms):
            raise UserError(f"--platforms {args.platforms!r}: give some of {', '.join(allowed)}, comma-separated")

    # Everything that can be checked without the model first: a mistake costs no checkpoint load,
    # and nothing is written.
    from transformer.export import load_run_model, tokenizer_file
    from transformer.run.workdir import check_new_folder

    check_new_folder(args.output)
    if args.format == "ctranslate2":
        from transformer.export.ctranslate2 import import_ctranslate2

        import_ctranslate2()
    model, tokenizer, used = load_run_model(args.workdir, args.average_last, args.step)
    print(f"checkpoint step(s) {used}", file=sys.stderr)
    if args.format == "ctranslate2":
        from transformer.export.ctranslate2 import export_ctranslate2

        export_ctranslate2(model, tokenizer, tokenizer_file(args.workdir), args.output, args.quantization or "float32")
    else:
        from transformer.export.stablehlo import export_stablehlo

        export_stablehlo(model, tokenizer, tokenizer_file(args.workdir), args.output, platforms)
    print(f"wrote a {args.format} model to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from transformer.run.cli import run_main

    run_main("export.py", main)
