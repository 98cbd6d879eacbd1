#!/usr/bin/env python
"""Translate with a train.py run: lines from a file (or standard input) to standard output.

    python translate.py --workdir runs/X --input src.txt > out.txt
    python translate.py --workdir runs/X --input src.txt --reference ref.txt --average_last 5
    echo "Ein Hund läuft." | python translate.py --workdir runs/X
    python translate.py --workdir runs/X --input src.txt --plot_attention attention.png --layer 5

With --reference, sacreBLEU's corpus BLEU and signature are printed on standard error. With
--plot_attention, one sentence's attention maps (encoder self-attention, decoder self-attention,
encoder-decoder attention; the paper's Figures 3-5) are drawn from one teacher-forced pass of the
model over its translation.
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
    parser.add_argument("--batch_size", type=int, default=64, help="sentences per batch, at most (default: 64)")
    parser.add_argument("--batch_tokens", type=int, default=None,
                        help="at most this many source tokens a batch, padding included, in a power of two of rows "
                             "that --batch_size caps (default: --batch_size rows a batch)")
    parser.add_argument("--compact_rows", type=int, default=None,
                        help="drop ended sentences from a batch as it decodes, down to this many rows (faster "
                             "decoding, longer compilation: for large batches; default: off)")
    parser.add_argument("--attention_impl", default=None, choices=["reference", "xla", "cudnn", "auto"],
                        help="how attention is computed (default: the run's, or 'auto' where this device cannot run it)")
    parser.add_argument("--plot_attention", default=None, metavar="FILE.png",
                        help="draw the attention maps of one input line (--plot_line) into this PNG")
    parser.add_argument("--plot_line", type=int, default=1, help="which input line to draw (default: 1, the first)")
    parser.add_argument("--layer", type=int, default=None, help="layer to draw, 1 to N (default: N, the last)")
    parser.add_argument("--head", type=int, default=None, help="head to draw, 1 to h (default: all, in a grid)")
    args = parser.parse_args()
    if args.average_last < 1 or args.batch_size < 1 or (args.beam_size is not None and args.beam_size < 1):
        raise UserError("--average_last, --batch_size and --beam_size must be positive")
    if args.compact_rows is not None and args.compact_rows < 1:
        raise UserError(f"--compact_rows (the fewest rows of a compacted batch) must be positive, got {args.compact_rows}")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise UserError(f"--batch_tokens (source tokens per batch) must be positive, got {args.batch_tokens}")
    if args.alpha is not None and not 0 <= args.alpha < float("inf"):  # NaN fails too
        raise UserError(f"--alpha (the length penalty's exponent, §6.1) must be a number >= 0, got {args.alpha}")
    if args.max_extra is not None and args.max_extra < 0:
        raise UserError(f"--max_extra (output length limit = input length + max_extra) must be >= 0, got {args.max_extra}")

    if args.plot_attention is not None:
        if not args.plot_attention.lower().endswith(".png"):
            raise UserError(f"--plot_attention {args.plot_attention!r} must name a .png file")
        folder = os.path.dirname(os.path.abspath(args.plot_attention))
        if not os.path.isdir(folder):
            raise UserError(f"--plot_attention {args.plot_attention!r}: folder {folder!r} does not exist")
    elif args.layer is not None or args.head is not None:
        raise UserError("--layer and --head choose what --plot_attention draws: add --plot_attention FILE.png")

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
    if args.plot_attention is not None and not 1 <= args.plot_line <= len(lines):
        raise UserError(f"--plot_line {args.plot_line} is not a line of the input (it has {len(lines)})")

    from transformer.decoding import translate_batches
    from transformer.decoding.bleu import corpus_bleu
    from transformer.run.workdir import load_run_config, load_run_model

    # The model's sizes first: --layer and --head are checked before a checkpoint is read.
    model_config, _, task = load_run_config(args.workdir, args.attention_impl)
    if task.name != "translate":
        raise UserError(f"{args.workdir} holds a {task.name} run: translate.py translates with translate runs "
                        f"(for an lm run use generate.py, for classify classify.py)")
    decode_config = task.config
    layers, heads = model_config.N, model_config.h
    if args.layer is not None and not 1 <= args.layer <= layers:
        raise UserError(f"--layer {args.layer} is not a layer of this model: choose 1 to {layers}")
    if args.head is not None and not 1 <= args.head <= heads:
        raise UserError(f"--head {args.head} is not a head of this model: choose 1 to {heads}")
    model, tokenizer, used = load_run_model(args.workdir, args.average_last, args.step, model_config.attention_impl)

    print(f"checkpoint step(s) {used}", file=sys.stderr)
    hypotheses = translate_batches(
        model, tokenizer, lines,
        beam_size=args.beam_size or decode_config.beam_size,
        alpha=decode_config.length_penalty if args.alpha is None else args.alpha,
        max_extra=decode_config.max_decode_extra if args.max_extra is None else args.max_extra,
        batch_size=args.batch_size, batch_tokens=args.batch_tokens, progress=args.input != "-",
        compact_rows=args.compact_rows,
    )
    for h in hypotheses:
        print(h)
    if references is not None:
        score = corpus_bleu(hypotheses, references)
        print(f"BLEU {score.score:.2f}  {score.signature}", file=sys.stderr)
    if args.plot_attention is not None:
        from transformer.decoding.text import translation_attention
        from transformer.models.attention_maps import layer_maps, plot_attention

        decoding = dict(beam_size=args.beam_size or decode_config.beam_size,
                        alpha=decode_config.length_penalty if args.alpha is None else args.alpha,
                        max_extra=decode_config.max_decode_extra if args.max_extra is None else args.max_extra)
        _, pieces, maps = translation_attention(model, tokenizer, lines[args.plot_line - 1], **decoding)
        layer = layers if args.layer is None else args.layer
        src, tgt = pieces["source"], pieces["target"]
        plot_attention(layer_maps(maps, layer - 1),
                       {"encoder": (src, src), "decoder": (tgt, tgt), "cross": (tgt, src)},
                       args.plot_attention, heads=None if args.head is None else [args.head - 1],
                       title=f"line {args.plot_line}, layer {layer} of {layers} (rows: queries; decoder rows: "
                             "its input, the output shifted right)")
        print(f"attention maps of line {args.plot_line}, layer {layer}: {args.plot_attention}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from transformer.run.cli import run_main

    run_main("translate.py", main)
