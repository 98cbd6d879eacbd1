#!/usr/bin/env python
"""Train the Transformer of "Attention Is All You Need".

    python train.py                      # embedded task (reverse letter strings), no download, minutes on a CPU
    python train.py --config base --dataset wmt14_translate/de-en     # the paper's base model
    python train.py --config base --dataset_dir ../shared/data/multi30k --src_lang de --tgt_lang en
    python train.py --config B1 --dataset wmt14_translate/de-en         # a line of Table 3 (here d_k = 16)

A run started again with the same --workdir resumes from its latest usable checkpoint. SIGTERM
stops it cleanly at any time (exit code 0 once a checkpoint of the current step exists).
"""

from __future__ import annotations

import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def build_parser():
    from transformer.run.cli import OneLineParser, add_dataclass_flags
    from transformer.config import TransformerConfig
    from transformer.parallel.distributed import DistributedConfig
    from transformer.parallel.mesh import ParallelConfig
    from transformer.training import TRAIN_PRESETS, TrainConfig

    parser = OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", choices=list(TRAIN_PRESETS), metavar="{tiny,base,big,A1,...,E1}",
                        help="model preset and its training defaults: tiny (the embedded demo, default), base, big, "
                             "or a line of the paper's Table 3 (A1-A4, B1-B2, C1-C7, D1-D4, E1)")
    parser.add_argument("--workdir", default=None, help="checkpoints, metrics and tokenizer (default: a new runs/<time>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_flags(parser, TransformerConfig, "model (TransformerConfig)", skip=("pad_id",))  # the tokenizer's
    add_dataclass_flags(parser, TrainConfig, "training (TrainConfig)")
    add_dataclass_flags(parser, ParallelConfig, "devices (ParallelConfig): pmap, or jit over a data/fsdp/tensor mesh")
    add_dataclass_flags(parser, DistributedConfig, "several processes (DistributedConfig)")
    return parser


def _checkpoint_steps(workdir: str | None) -> list[int]:
    try:
        return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
    except (OSError, TypeError):
        return []


def _stop_while_loading(signum, frame):
    """SIGTERM in the seconds before run_main's handler is in place (while JAX and the rest import)."""
    argv = sys.argv[1:]
    workdir = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--workdir"),
                   next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), None))
    print("train.py: SIGTERM during start-up: stopped before training began", file=sys.stderr)
    raise SystemExit(0 if _checkpoint_steps(workdir) else 128 + signal.SIGTERM)


def main() -> int:
    args = build_parser().parse_args()
    from transformer.run.cli import Terminated, default_dtype, overrides_for
    from transformer.config import TransformerConfig
    from transformer.parallel import distributed
    from transformer.parallel.mesh import ParallelConfig
    from transformer.run.trainer import Trainer
    from transformer.training import TRAIN_PRESETS, TrainConfig

    distributed.initialize(distributed.DistributedConfig(**overrides_for(args, distributed.DistributedConfig)))
    parallel = ParallelConfig(**overrides_for(args, ParallelConfig))
    import jax

    # An explicit --dtype wins; without one, bfloat16 on a TPU and float32 elsewhere.
    model_overrides = {"dtype": default_dtype(jax.default_backend()), **overrides_for(args, TransformerConfig)}
    model_config = TransformerConfig.preset(args.config, **model_overrides)
    train_config = TrainConfig(**{**TRAIN_PRESETS[args.config], **overrides_for(args, TrainConfig)})
    workdir = args.workdir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    started = time.time()
    phase, trainer = "start-up", None
    try:
        with Trainer(model_config, train_config, workdir, show_progress=not args.quiet, parallel=parallel) as trainer:
            where = f"{trainer.n_devices} device(s) ({trainer.devices[0].platform})"
            if jax.process_count() > 1:
                where += f" in {jax.process_count()} processes"
            if trainer.layout.mode == "mesh":
                where += " on a mesh " + ",".join(f"{k}={v}" for k, v in trainer.layout.mesh.shape.items())
            print_main = print if trainer.is_main_process else (lambda *a, **k: None)
            print_main(f"work dir {workdir}; {where}; {len(trainer.train_examples)} training pairs; "
                  f"vocabulary {trainer.model_config.vocab_size}; attention {trainer.attention_impl}"
                  + (" (auto)" if trainer.model_config.attention_impl == "auto" else "")
                  + (f"; resuming from step {trainer.resumed_from}" if trainer.resumed_from else ""), flush=True)
            phase = "training"  # Trainer.run answers SIGTERM itself: it saves a checkpoint and returns
            summary = trainer.run()
            if summary.get("stopped_by_signal"):
                return 0
            phase = "the final scoring"
            results = trainer.finish()
    except Terminated:
        saved = _checkpoint_steps(workdir)
        current = saved[-1] if trainer is None and saved else (
            trainer.data_position // train_config.grad_accum_steps if trainer is not None else None)
        if current in saved:
            raise Terminated(f"SIGTERM during {phase}: stopped; the checkpoint of step {current} is in "
                             f"{os.path.join(workdir, 'checkpoints')} (run again with the same --workdir to go on)",
                             code=0) from None
        raise Terminated(f"SIGTERM during {phase}: stopped before any checkpoint of step {current or 0} was saved") from None
    if not trainer.is_main_process:  # one report per run: process 0's
        return 0
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
    signal.signal(signal.SIGTERM, _stop_while_loading)
    try:
        from transformer.run.cli import run_main
    except KeyboardInterrupt:
        print("train.py: interrupted", file=sys.stderr)
        sys.exit(130)

    run_main("train.py", main)
