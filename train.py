#!/usr/bin/env python
"""Train the Transformer of "Attention Is All You Need": translation, or a language model, a
masked-LM encoder or a classifier built from the same layers (--task).

    python train.py                      # embedded task (reverse letter strings), no download, minutes on a CPU
    python train.py --task lm            # a decoder-only LM on generated text (also: --task mlm, --task classify)
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


def build_parser(task_name: str = "translate"):
    from transformer.run.cli import OneLineParser, add_dataclass_flags
    from transformer.config import TransformerConfig
    from transformer.parallel.distributed import DistributedConfig
    from transformer.parallel.mesh import ParallelConfig
    from transformer.tasks import TASKS
    from transformer.training import TRAIN_PRESETS, TrainConfig

    parser = OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="translate", choices=list(TASKS),
                        help="what to train (default: translate); each task adds its own flags (train.py --task T --help)")
    parser.add_argument("--config", default="tiny", choices=list(TRAIN_PRESETS), metavar="{tiny,base,big,A1,...,E1}",
                        help="model preset and its training defaults: tiny (the embedded demo, default), base, big, "
                             "or a line of the paper's Table 3 (A1-A4, B1-B2, C1-C7, D1-D4, E1)")
    parser.add_argument("--workdir", default=None, help="checkpoints, metrics and tokenizer (default: a new runs/<time>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_flags(parser, TransformerConfig, "model (TransformerConfig)", skip=("pad_id",))  # the tokenizer's
    add_dataclass_flags(parser, TrainConfig, "training (TrainConfig)")
    task = TASKS[task_name]
    add_dataclass_flags(parser, task.Config, f"the {task.name} task ({task.Config.__name__})")
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


def _task_name(argv: list[str]) -> str:
    """--task's value, read before the parser that depends on it is built (a bad one is the parser's to report)."""
    for i, arg in enumerate(argv):
        if arg == "--task" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1]
    return "translate"


def parse_args(argv: list[str]):
    from transformer.tasks import TASKS

    name = _task_name(argv)
    return build_parser(name if name in TASKS else "translate").parse_args(argv)


def settings(args, backend: str = "cpu"):
    """(model config, training recipe, task, work dir) from parsed flags: the preset's values, the
    task's defaults for that preset, then the flags. With --init_from (a new run), the model is the
    source run's, flags changing it where given."""
    from transformer.config import TransformerConfig
    from transformer.run.cli import default_dtype, overrides_for
    from transformer.tasks import TASKS
    from transformer.training import TRAIN_PRESETS, TrainConfig

    # An explicit --dtype wins; without one, bfloat16 on a TPU and float32 elsewhere.
    model_overrides = {"dtype": default_dtype(backend), **overrides_for(args, TransformerConfig)}
    task_cls = TASKS[args.task]
    presets = task_cls.PRESETS.get(args.config, {})
    flags = overrides_for(args, TrainConfig)
    fields = {**TRAIN_PRESETS[args.config], **presets.get("train", {}), **flags}
    if fields.get("schedule", "noam") != "noam" and "lr_scale" not in flags:
        fields.pop("lr_scale", None)  # a preset scales its noam schedule; the others take --learning_rate
    train_config = TrainConfig(**fields)
    task = task_cls(task_cls.Config(**{**presets.get("task", {}), **overrides_for(args, task_cls.Config)}), train_config)
    workdir = args.workdir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if train_config.init_from and not os.path.exists(os.path.join(workdir, "config.json")):
        from transformer.run.init_from import source_model_config

        model_config = source_model_config(train_config.init_from, model_overrides)
    else:
        model_config = TransformerConfig.preset(args.config, **model_overrides)
    return model_config, train_config, task, workdir


def main() -> int:
    args = parse_args(sys.argv[1:])
    from transformer.run.cli import Terminated, overrides_for
    from transformer.parallel import distributed
    from transformer.parallel.mesh import ParallelConfig
    from transformer.run.trainer import Trainer

    distributed.initialize(distributed.DistributedConfig(**overrides_for(args, distributed.DistributedConfig)))
    parallel = ParallelConfig(**overrides_for(args, ParallelConfig))
    import jax

    model_config, train_config, task, workdir = settings(args, jax.default_backend())
    started = time.time()
    phase, trainer = "start-up", None
    try:
        with Trainer(model_config, train_config, workdir, task=task, show_progress=not args.quiet,
                     parallel=parallel) as trainer:
            where = f"{trainer.n_devices} device(s) ({trainer.devices[0].platform})"
            if jax.process_count() > 1:
                where += f" in {jax.process_count()} processes"
            if trainer.layout.mode == "mesh":
                where += " on a mesh " + ",".join(f"{k}={v}" for k, v in trainer.layout.mesh.shape.items())
            print_main = print if trainer.is_main_process else (lambda *a, **k: None)
            print_main(f"{task.name} run in work dir {workdir}; {where}; {task.num_train_examples} {task.example_name}; "
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
            trainer.data_position // train_config.grad_accum_steps if trainer is not None else None)  # updates done
        if current in saved:
            raise Terminated(f"SIGTERM during {phase}: stopped; the checkpoint of step {current} is in "
                             f"{os.path.join(workdir, 'checkpoints')} (run again with the same --workdir to go on)",
                             code=0) from None
        raise Terminated(f"SIGTERM during {phase}: stopped before any checkpoint of step {current or 0} was saved") from None
    if not trainer.is_main_process:  # one report per run: process 0's
        return 0
    print(f"finished step {summary['step']} in {time.time() - started:.0f} s")
    if "validation" in summary:
        print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["validation"].items()))
    for line in task.report_lines(results):
        print(line)
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
