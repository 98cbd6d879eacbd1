#!/usr/bin/env python
"""Translate with a train.py run: lines from a file (or standard input) to standard output.

    python translate.py --workdir runs/X --input src.txt > out.txt
    python translate.py --workdir runs/X --input src.txt --reference ref.txt --average_last 5
    echo "Ein Hund läuft." | python translate.py --workdir runs/X

With --reference, sacreBLEU's corpus BLEU and signature are printed on standard error.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> int:
    from transformer.run.cli import OneLineParser, UserError

    parser = OneLineParser(prog="translate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the work dir of a train.py run")
    parser.add_argument("--input", default="-", help="file of source sentences, one per line (default: stdin)")
    parser.add_argument("--reference", default=None, help="reference translations: print sacreBLEU")
    parser.add_argument("--beam_size", type=int, default=None, help="default: the run's (4 in the paper)")
    parser.add_argument("--alpha", type=float, default=None, help="length penalty (default: the run's, 0.6)")
    parser.add_argument("--max_extra", type=int, default=None, help="output length limit = input length + this (50)")
    parser.add_argument("--average_last", type=int, default=1, help="average the last K checkpoints (§6.1: 5 base, 20 big)")
    parser.add_argument("--step", type=int, default=None, help="use the checkpoint of this step (default: latest)")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    if args.average_last < 1 or args.batch_size < 1 or (args.beam_size is not None and args.beam_size < 1):
        raise UserError("--average_last, --batch_size and --beam_size must be positive")
    if args.alpha is not None and not 0 <= args.alpha < float("inf"):  # NaN fails too
        raise UserError(f"--alpha (the length penalty's exponent, §6.1) must be a number >= 0, got {args.alpha}")
    if args.max_extra is not None and args.max_extra < 0:
        raise UserError(f"--max_extra (output length limit = input length + max_extra) must be >= 0, got {args.max_extra}")

    from transformer.data import read_text_lines

    # The inputs first: a mistake in them is reported before the checkpoint is loaded.
    if args.input != "-" and not os.path.isfile(args.input):
        raise UserError(f"--input {args.input!r} is not a file")
    lines = read_text_lines(args.input)  # line N of the output translates line N of the input
    references = None
    if args.reference:
        if not os.path.isfile(args.reference):
            raise UserError(f"--reference {args.reference!r} is not a file")
        references = read_text_lines(args.reference)
        if len(references) != len(lines):
            raise UserError(f"--reference has {len(references)} lines but --input has {len(lines)}: they must pair up")

    from flax import nnx

    from transformer.decoding.bleu import corpus_bleu
    from transformer.run.checkpoint import load_params
    from transformer.decoding import translate_batches
    from transformer.data.tokenizer import load_tokenizer
    from transformer.run.workdir import load_run_config
    from transformer.training import create_train_state

    model_config, train_config = load_run_config(args.workdir)
    tokenizer = load_tokenizer(args.workdir)
    if tokenizer is None:
        raise UserError(f"no tokenizer in {args.workdir}: --workdir must be the folder of a train.py run")
    graphdef, like, _ = create_train_state(model_config, train_config)
    try:
        state, used = load_params(args.workdir, like, args.average_last, args.step)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    model = nnx.merge(graphdef, state.params)

    print(f"checkpoint step(s) {used}", file=sys.stderr)
    hypotheses = translate_batches(
        model, tokenizer, lines,
        beam_size=args.beam_size or train_config.beam_size,
        alpha=train_config.length_penalty if args.alpha is None else args.alpha,
        max_extra=train_config.max_decode_extra if args.max_extra is None else args.max_extra,
        batch_size=args.batch_size, progress=args.input != "-",
    )
    for h in hypotheses:
        print(h)
    if references is not None:
        score = corpus_bleu(hypotheses, references)
        print(f"BLEU {score.score:.2f}  {score.signature}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from transformer.run.cli import run_main

    run_main("translate.py", main)
