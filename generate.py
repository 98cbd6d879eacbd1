#!/usr/bin/env python
"""Continue text with a train.py --task lm run: each line of a file (or standard input) is a
prompt; its continuation is printed as its tokens come.

    python generate.py --workdir runs/lm --input prompts.txt --max_new_tokens 40
    echo "a man in a red shirt" | python generate.py --workdir runs/lm --temperature 0.8 --top_p 0.9 --seed 1

Greedy by default (temperature 0); with --temperature > 0 tokens are sampled, from the --top_k most
likely and/or the --top_p nucleus. The same --seed gives the same text. --beam_size K searches
instead, as translation does (§6.1: K hypotheses, length penalty --alpha), and prints each
continuation once it is found.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> int:
    from transformer.run.cli import OneLineParser, UserError

    parser = OneLineParser(prog="generate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the work dir of a train.py --task lm run")
    parser.add_argument("--input", default="-", help="file of prompts, one per line (default: stdin)")
    parser.add_argument("--max_new_tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--top_p", type=float, default=1.0, help="sample from the nucleus of this probability (1 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beam_size", type=int, default=1, help="beam search of this width (1 = no beam; default)")
    parser.add_argument("--alpha", type=float, default=0.6, help="the beam's length penalty (default: 0.6)")
    parser.add_argument("--average_last", type=int, default=1, help="average the last K checkpoints")
    parser.add_argument("--step", type=int, default=None, help="use the checkpoint of this step (default: latest)")
    args = parser.parse_args()
    if args.max_new_tokens < 1 or args.average_last < 1:
        raise UserError("--max_new_tokens and --average_last must be positive")
    if not args.temperature >= 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top_k must be >= 0 (0 = no limit), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.beam_size < 1:
        raise UserError(f"--beam_size must be >= 1 (1 = no beam), got {args.beam_size}")
    if args.beam_size > 1 and (args.temperature > 0 or args.top_k or args.top_p < 1):
        raise UserError("--beam_size > 1 searches, it does not sample: drop --temperature, --top_k and --top_p")
    if not 0 <= args.alpha < float("inf"):
        raise UserError(f"--alpha (the length penalty's exponent) must be a number >= 0, got {args.alpha}")
    if args.input != "-" and not os.path.isfile(args.input):
        raise UserError(f"--input {args.input!r} is not a file")

    from transformer.data import read_text_lines
    from transformer.decoding.text import continue_texts
    from transformer.run.workdir import load_run_model

    prompts = read_text_lines(args.input)
    model, tokenizer, used = load_run_model(args.workdir, args.average_last, args.step, task="lm")
    print(f"checkpoint step(s) {used}", file=sys.stderr)
    for n, prompt in enumerate(prompts):
        room = model.config.max_len - len(tokenizer.encode(prompt)) - 1
        if room < 1:
            raise UserError(f"prompt line {n + 1} fills the model's {model.config.max_len} positions: shorten it")
        print(prompt, end="", flush=True)

        def show(text: str) -> None:
            print(text, end="", flush=True)

        continue_texts(model, tokenizer, [prompt], min(args.max_new_tokens, room), args.temperature, args.top_k,
                       args.top_p, args.seed + n, on_text=show, beam_size=args.beam_size, alpha=args.alpha)
        print(flush=True)
    return 0


if __name__ == "__main__":
    from transformer.run.cli import run_main

    run_main("generate.py", main)
