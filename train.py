#!/usr/bin/env python
"""Train the Transformer of "Attention Is All You Need".

    python train.py                      # embedded task (reverse letter strings), no download, minutes on a CPU
    python train.py --config base --dataset wmt14_translate/de-en     # the paper's base model
    python train.py --config base --dataset_dir ../shared/data/multi30k --src_lang de --tgt_lang en

A run started again with the same --workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def build_parser():
    from transformer.cli import OneLineParser, add_dataclass_flags
    from transformer.config import TransformerConfig
    from transformer.training import TrainConfig

    parser = OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", choices=["tiny", "base", "big"],
                        help="model preset and its training defaults (default: tiny, the embedded demo)")
    parser.add_argument("--workdir", default=None, help="checkpoints, metrics and tokenizer (default: a new runs/<time>)")
    parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize (multi-host)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_flags(parser, TransformerConfig, "model (TransformerConfig)", skip=("pad_id",))  # the tokenizer's
    add_dataclass_flags(parser, TrainConfig, "training (TrainConfig)")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    from transformer.cli import overrides_for
    from transformer.config import TransformerConfig
    from transformer.trainer import Trainer, maybe_initialize_distributed
    from transformer.training import TRAIN_PRESETS, TrainConfig

    maybe_initialize_distributed(args.distributed)
    model_config = TransformerConfig.preset(args.config, **overrides_for(args, TransformerConfig))
    train_config = TrainConfig(**{**TRAIN_PRESETS[args.config], **overrides_for(args, TrainConfig)})
    workdir = args.workdir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    started = time.time()
    trainer = Trainer(model_config, train_config, workdir, show_progress=not args.quiet)
    print(f"work dir {workdir}; {trainer.n_devices} device(s) ({trainer.devices[0].platform}); "
          f"{len(trainer.train_examples)} training pairs; vocabulary {trainer.model_config.vocab_size}"
          + (f"; resuming from step {trainer.resumed_from}" if trainer.resumed_from else ""))
    summary = trainer.run()
    if summary.get("stopped_by_signal"):
        return 0
    results = trainer.finish()
    print(f"finished step {summary['step']} in {time.time() - started:.0f} s")
    if "validation" in summary:
        v = summary["validation"]
        print(f"validation: loss {v['loss']:.4f}, token accuracy {v['accuracy']:.4f}, perplexity {v['perplexity']:.2f}")
    if "exact_match" in results:
        print(f"held-out exact-match accuracy: {results['exact_match']:.4f}")
    for split in ("validation", "test"):
        if f"{split}_bleu" in results:
            print(f"{split} BLEU {results[f'{split}_bleu']:.2f}  ({results[f'{split}_bleu_signature']})")
    for source, hypothesis in results.get("examples", []):
        print(f"  {source}  ->  {hypothesis}")
    if results.get("plot"):
        print(f"curves: {results['plot']}")
    return 0


if __name__ == "__main__":
    from transformer.cli import run_main

    run_main("train.py", main)
