"""A whole training run: data, tokenizer, model, the jitted/pmapped train step, evaluation,
checkpoints that resume exactly, metrics, and scoring at the end. train.py only parses flags
and calls `train`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from transformer import data as data_lib
from transformer.checkpoint import Checkpoints
from transformer.cli import RunStopped, UserError
from transformer.config import TransformerConfig
from transformer.metrics import MetricsWriter, plot_curves
from transformer.tokenizer import CharTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer
from transformer.training import TrainConfig, TrainState, compile_steps, create_train_state, summarize


class NonFiniteLoss(RunStopped):
    pass


@dataclasses.dataclass
class Corpus:
    train: list
    eval: list
    test: list | None


def load_corpus(config: TrainConfig) -> Corpus:
    """Sentence pairs of the train / eval / (optional) test splits."""
    if config.dataset_dir:
        def load(split):
            return data_lib.load_folder_pairs(config.dataset_dir, split, config.src_lang, config.tgt_lang)
        has_test = os.path.exists(os.path.join(config.dataset_dir, f"{config.src_lang}.{config.test_split}.txt"))
    elif config.dataset == "reverse":
        return Corpus(data_lib.reverse_task_pairs(config.synthetic_examples, seed=config.seed),
                      data_lib.reverse_task_pairs(1000, seed=config.seed + 10_000), None)
    else:
        def load(split):
            return data_lib.load_tfds_pairs(config.dataset, split, config.src_lang, config.tgt_lang, config.tfds_data_dir)
        has_test = True
    test = None
    if has_test:
        try:
            test = load(config.test_split)
        except data_lib.DataError:
            test = None  # a dataset without a test split is scored on validation only
    return Corpus(load(config.train_split), load(config.eval_split), test)


def make_tokenizer(config: TrainConfig, corpus: Corpus, vocab_size: int, workdir: str) -> Tokenizer:
    """The work dir's tokenizer if it has one (resume), else a new one saved there."""
    tokenizer = load_tokenizer(workdir)
    if tokenizer is not None:
        return tokenizer
    if config.dataset == "reverse" and not config.dataset_dir:
        tokenizer = CharTokenizer(data_lib.REVERSE_ALPHABET)
        tokenizer.save(workdir)
        return tokenizer
    texts = (text for pair in corpus.train for text in pair)
    try:
        return SentencePieceTokenizer.train(texts, vocab_size, workdir, model_type=config.tokenizer_type)
    except RuntimeError as err:  # SentencePiece's trainer reports bad input as RuntimeError("INTERNAL: …")
        # With character_coverage=1.0 every character of the text must be a piece of its own, and the
        # special tokens need theirs: SentencePiece names that minimum ("… required_chars. 20 vs 52.").
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(err))
        if needed:
            raise data_lib.DataError(
                f"--vocab_size {vocab_size} is too small for the training text: its distinct characters and the "
                f"special tokens need at least {needed.group(1)} pieces; use --vocab_size {needed.group(1)} or more"
            ) from None
        detail = " ".join(str(err).split())
        raise data_lib.DataError(f"SentencePiece could not train a tokenizer on the training text ({detail})") from None


def _check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise UserError(f"cannot write to work dir {workdir!r} ({err.strerror}): choose another --workdir") from None


def _saved_configs(workdir: str, model_config: TransformerConfig, train_config: TrainConfig) -> TransformerConfig:
    """Write config.json on a new run; on resume, insist on the same model."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        saved_model = TransformerConfig(**saved["model"])
        changed = [k for k, v in dataclasses.asdict(saved_model).items() if dataclasses.asdict(model_config)[k] != v]
        if changed:
            raise UserError(
                f"work dir {workdir!r} holds a run of a different model ({', '.join(changed)} differ): "
                "resume with the same settings or choose a new --workdir"
            )
        return saved_model
    with open(path, "w") as f:
        json.dump({"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(train_config)}, f, indent=2)
    return model_config


def load_run_config(workdir: str) -> tuple[TransformerConfig, TrainConfig]:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{path} not found: --workdir must be the folder of a train.py run")
    with open(path) as f:
        saved = json.load(f)
    return TransformerConfig(**saved["model"]), TrainConfig(**saved["train"])


def maybe_initialize_distributed(requested: bool) -> None:
    """Multi-host: jax.distributed.initialize when asked, or when a coordinator is configured."""
    if requested or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()


def _replicate(tree, devices):
    return data_lib.replicate_on_devices(tree, devices) if len(devices) > 1 else tree


def _unreplicate(tree, n_devices):
    return jax.tree.map(lambda x: x[0], tree) if n_devices > 1 else tree


class Trainer:
    def __init__(self, model_config: TransformerConfig, train_config: TrainConfig, workdir: str,
                 show_progress: bool = True, devices: Sequence | None = None):
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.n_devices = len(self.devices)
        self.show_progress = show_progress and jax.process_index() == 0
        self.workdir = workdir
        self.train_config = train_config
        _check_workdir(workdir)
        self.corpus = load_corpus(train_config)
        self.tokenizer = make_tokenizer(train_config, self.corpus, model_config.vocab_size, workdir)
        model_config = dataclasses.replace(model_config, vocab_size=self.tokenizer.vocab_size, pad_id=self.tokenizer.pad_id)
        self.model_config = _saved_configs(workdir, model_config, train_config)
        cfg = train_config
        self.train_examples = data_lib.encode_pairs(self.corpus.train, self.tokenizer, cfg.max_length)
        self.eval_examples = data_lib.encode_pairs(self.corpus.eval, self.tokenizer, cfg.max_length)
        multiple = self.n_devices * jax.process_count()
        self.train_plan = data_lib.BatchPlan(self.train_examples, cfg.batch_tokens, cfg.max_length, multiple,
                                             packing=cfg.packing, seed=cfg.seed)
        self.eval_plan = data_lib.BatchPlan(self.eval_examples, cfg.batch_tokens, cfg.max_length, multiple,
                                            packing=False, shuffle=False)
        self.graphdef, state, self.tx = create_train_state(self.model_config, cfg)
        self.train_step, self.eval_step = compile_steps(self.graphdef, self.tx, self.model_config, cfg, self.n_devices)
        self.checkpoints = Checkpoints(workdir, keep=cfg.keep_checkpoints)
        self.metrics = MetricsWriter(workdir, enabled=jax.process_index() == 0)
        self.state = state
        latest = self.checkpoints.latest_step()
        self.resumed_from = None
        self.data_position = 0  # micro-batches of the training stream already consumed
        if latest is not None:
            self.state, meta = self.checkpoints.restore(latest, state)
            self.resumed_from, self.data_position = latest, int(meta["data_position"])

    # -- helpers -------------------------------------------------------------------------------

    def _host_batches(self, plan: data_lib.BatchPlan, start: int, epochs=None):
        for position, batch in plan.batches(start, epochs):
            yield position, data_lib.host_shard(batch, jax.process_index(), jax.process_count())

    def evaluate(self, params, max_batches: int = 0, replicated: bool = False) -> dict[str, float]:
        """Validation metrics of `params` (one copy, or one per device if `replicated`)."""
        if self.n_devices > 1 and not replicated:
            params = _replicate(params, self.devices)
        totals: dict[str, float] = {}
        for n, (_, batch) in enumerate(self._host_batches(self.eval_plan, 0, epochs=1)):
            if max_batches and n >= max_batches:
                break
            if self.n_devices > 1:
                batch = data_lib.shard_for_devices(batch, self.n_devices)
            metrics = jax.device_get(self.eval_step(params, batch))
            metrics = _unreplicate(metrics, self.n_devices)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        return summarize(totals)

    def model(self, params=None):
        from flax import nnx

        params = _unreplicate(self.state.params, self.n_devices) if params is None else params
        return nnx.merge(self.graphdef, params)

    def save(self, state, step: int) -> None:
        host_state = _unreplicate(state, self.n_devices)
        self.checkpoints.save(step, host_state, {"data_position": int(host_state.step), "step": step})

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.train_config
        accum = cfg.grad_accum_steps
        total_micro = cfg.num_train_steps * accum
        start_micro = self.data_position
        state = _replicate(self.state, self.devices)
        stop = {"signal": None}
        previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
        batches = data_lib.prefetch_to_devices(self._host_batches(self.train_plan, start_micro), self.devices)

        from tqdm import tqdm

        bar = tqdm(total=cfg.num_train_steps, initial=start_micro // accum, disable=not self.show_progress,
                   desc="train", unit="step", dynamic_ncols=True)
        pending: list[tuple[int, dict]] = []  # per-step metrics still on the device
        last_log = time.perf_counter()
        summary: dict = {"resumed_from": self.resumed_from}
        last_good_saved = self.resumed_from

        def flush(micro_step: int) -> dict | None:
            """Fetch pending metrics; stop on a non-finite loss, naming the step."""
            nonlocal pending, last_log
            if not pending:
                return None
            fetched = jax.device_get([m for _, m in pending])
            steps = [s for s, _ in pending]
            pending = []
            totals: dict[str, float] = {}
            for s, m in zip(steps, fetched):
                m = _unreplicate(m, self.n_devices)
                if not math.isfinite(float(m["loss_sum"])):
                    kept = (f"the last good checkpoint (step {last_good_saved}) is kept in {self.checkpoints.directory}"
                            if last_good_saved is not None else "no checkpoint had been saved yet")
                    raise NonFiniteLoss(
                        f"the loss became {float(m['loss_sum'])} at step {s // accum + 1}; stopping ({kept}). "
                        "Lower --lr_scale or raise --warmup_steps"
                    )
                for k, v in m.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
            now = time.perf_counter()
            elapsed, last_log = now - last_log, now
            result = summarize(totals)
            result["tokens_per_s"] = (totals["tokens"] + totals["src_tokens"]) / max(elapsed, 1e-9)
            result["learning_rate"] = float(self._learning_rate(micro_step // accum))
            return result

        try:
            micro = start_micro
            while micro < total_micro:
                _, batch = next(batches)
                state, metrics = self.train_step(state, batch)
                pending.append((micro, metrics))
                micro += 1
                if micro % accum:
                    continue
                step = micro // accum
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.num_train_steps:
                    logged = flush(micro)
                    self.metrics.write(step, "train", **logged)
                    bar.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{logged['learning_rate']:.2e}",
                                    tok_s=f"{logged['tokens_per_s']:.0f}")
                if step % cfg.eval_every == 0 or step == cfg.num_train_steps:
                    ev = self.evaluate(state.params, cfg.eval_batches, replicated=True)
                    self.metrics.write(step, "validation", **ev)
                    summary["validation"] = ev
                    bar.write(f"step {step}: validation loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.4f}, "
                              f"perplexity {ev['perplexity']:.2f}")
                    last_log = time.perf_counter()
                if step % cfg.checkpoint_every == 0 or step == cfg.num_train_steps or stop["signal"]:
                    flush(micro)  # never save a state whose loss went non-finite
                    self.save(state, step)
                    last_good_saved = step
                if stop["signal"]:
                    bar.write(f"SIGTERM: saved a checkpoint at step {step} in {self.checkpoints.directory}; exiting")
                    summary["stopped_by_signal"] = True
                    break
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, previous_handler)
            self.state = _unreplicate(state, self.n_devices)
            self.data_position = int(self.state.step)
        summary["step"] = int(self.state.step) // accum
        return summary

    def _learning_rate(self, step: int) -> float:
        from transformer.schedule import transformer_schedule

        schedule = transformer_schedule(self.model_config.d_model, self.train_config.warmup_steps,
                                        self.train_config.lr_scale)
        return float(schedule(max(step - 1, 0)))

    # -- the end of a run: translations and scores ---------------------------------------------

    def translate_texts(self, texts: Sequence[str], beam_size: int | None = None, batch_size: int = 64,
                        progress: bool = False) -> list[str]:
        from transformer.decoding import translate_batches

        cfg = self.train_config
        return translate_batches(self.model(), self.tokenizer, texts, beam_size or cfg.beam_size,
                                 cfg.length_penalty, cfg.max_decode_extra, batch_size, progress=progress)

    def finish(self) -> dict:
        """Final scores: exact match on the generated task, sacreBLEU on real data; and the plot."""
        cfg = self.train_config
        results: dict = {}
        if cfg.dataset == "reverse" and not cfg.dataset_dir:
            pairs = self.corpus.eval
            hypotheses = self.translate_texts([s for s, _ in pairs])
            exact = float(np.mean([h == t for h, (_, t) in zip(hypotheses, pairs)]))
            results["exact_match"] = exact
            results["examples"] = [(s, h) for (s, _), h in list(zip(pairs, hypotheses))[:5]]
            self.metrics.write(int(self.state.step) // cfg.grad_accum_steps, "validation", exact_match=exact)
        else:
            from transformer.bleu import corpus_bleu

            for split, pairs in (("validation", self.corpus.eval), ("test", self.corpus.test)):
                if not pairs:
                    continue
                if cfg.bleu_examples:
                    pairs = pairs[: cfg.bleu_examples]
                hypotheses = self.translate_texts([s for s, _ in pairs], progress=self.show_progress)
                score = corpus_bleu(hypotheses, [t for _, t in pairs])
                results[f"{split}_bleu"] = score.score
                results[f"{split}_bleu_signature"] = score.signature
                results.setdefault("examples", [(s, h) for (s, _), h in list(zip(pairs, hypotheses))[:5]])
                self.metrics.write(int(self.state.step) // cfg.grad_accum_steps, split, bleu=score.score,
                                   bleu_signature=score.signature)
        results["plot"] = plot_curves(self.workdir) if jax.process_index() == 0 else None
        self.metrics.close()
        self.checkpoints.close()
        return results
