"""Translation (§6.1), the paper's task: sentence pairs from tensorflow-datasets, a local folder
or the generated reverse task; batches of source and shifted target; the label-smoothed token
loss (§5.4); BLEU (or, on the generated task, exact match) at the end."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np

from transformer import data as data_lib
from transformer.config import ConfigError
from transformer.data.tokenizer import CharTokenizer, Tokenizer
from transformer.models.transformer import Transformer
from transformer.tasks.base import RunView, Task
from transformer.training.loss import loss_and_metrics, token_means
from transformer.training.step import Objective


@dataclasses.dataclass(frozen=True)
class TranslateConfig:
    """The data and the decoding of a translation run."""

    dataset: str = "reverse"  # "reverse" (generated, no download) or a tfds name, e.g. wmt14_translate/de-en
    dataset_dir: str | None = None  # a folder of {lang}.{split}.txt files (tfds.TranslateFolder layout)
    src_lang: str = "en"  # the paper translates English -> German
    tgt_lang: str = "de"
    synthetic_examples: int = 50_000  # size of the generated training set of the "reverse" task
    # §6.1 inference.
    beam_size: int = 4
    length_penalty: float = 0.6
    max_decode_extra: int = 50  # output length limit = input length + 50
    bleu_examples: int = 0  # 0 = score the whole eval/test split at the end

    def __post_init__(self):
        for name in ("synthetic_examples", "beam_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("bleu_examples", "max_decode_extra"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.length_penalty < 0:
            raise ConfigError(f"length_penalty must be >= 0, got {self.length_penalty!r}")
        if self.src_lang == self.tgt_lang:
            raise ConfigError(f"src_lang and tgt_lang are both {self.src_lang!r}: choose two languages")

    @property
    def generated(self) -> bool:
        return self.dataset == "reverse" and not self.dataset_dir


_MODEL_INPUTS = ("src_positions", "tgt_positions", "src_segments", "tgt_segments")


def translation_objective(label_smoothing: float, pad_id: int) -> Objective:
    """§5.4: the label-smoothed cross-entropy of the target tokens, summed over the real ones
    (`loss_and_metrics`), with the batch's real source tokens counted for throughput."""

    def fn(model, batch, *, deterministic: bool, rngs):
        # Batches are right-padded (data.batching): padding reaches attention as per-row lengths,
        # the form the cuDNN and Pallas kernels take.
        logits = model(batch["src"], batch["tgt_in"], **{k: batch[k] for k in _MODEL_INPUTS if k in batch},
                       right_padded=True, deterministic=deterministic, rngs=rngs)
        weights = (batch["tgt_out"] != pad_id).astype(jnp.float32)
        sums = loss_and_metrics(logits, batch["tgt_out"], weights, label_smoothing)
        sums["src_tokens"] = (batch["src"] != pad_id).sum().astype(jnp.float32)
        return sums

    return Objective(fn, count="tokens")


class TranslateTask(Task):
    name = "translate"
    Config = TranslateConfig
    PRESETS = {"tiny": {"task": dict(synthetic_examples=20_000, beam_size=1)}}
    RESUME_MAY_CHANGE = ("beam_size", "length_penalty", "max_decode_extra", "bleu_examples")
    throughput = ("tokens", "src_tokens")
    example_name = "training pairs"

    def load(self) -> None:
        """Sentence pairs of the train / eval / (optional) test splits."""
        config, train = self.config, self.train
        self.test = None
        if config.dataset_dir:
            def load(split):
                return data_lib.load_folder_pairs(config.dataset_dir, split, config.src_lang, config.tgt_lang)
            has_test = os.path.exists(os.path.join(config.dataset_dir, f"{config.src_lang}.{train.test_split}.txt"))
        elif config.generated:
            self.train_pairs = data_lib.reverse_task_pairs(config.synthetic_examples, seed=train.seed)
            self.eval_pairs = data_lib.reverse_task_pairs(1000, seed=train.seed + 10_000)
            return
        else:
            def load(split):
                return data_lib.load_tfds_pairs(config.dataset, split, config.src_lang, config.tgt_lang,
                                                train.tfds_data_dir)
            has_test = True
        if has_test:
            try:
                self.test = load(train.test_split)
            except data_lib.DataError:
                self.test = None  # a dataset without a test split is scored on validation only
        self.train_pairs, self.eval_pairs = load(train.train_split), load(train.eval_split)

    def fixed_tokenizer(self) -> Tokenizer | None:
        return CharTokenizer(data_lib.REVERSE_ALPHABET) if self.config.generated else None

    def tokenizer_texts(self) -> Iterable[str]:
        return (text for pair in self.train_pairs for text in pair)

    def plans(self, tokenizer: Tokenizer, multiple: int):
        train = self.train
        train_examples = data_lib.encode_pairs(self.train_pairs, tokenizer, train.max_length)
        eval_examples = data_lib.encode_pairs(self.eval_pairs, tokenizer, train.max_length)
        self.num_train_examples = len(train_examples)
        return (data_lib.BatchPlan(train_examples, train.batch_tokens, train.max_length, multiple,
                                   packing=train.packing, seed=train.seed),
                data_lib.BatchPlan(eval_examples, train.batch_tokens, train.max_length, multiple,
                                   packing=False, shuffle=False))

    def model_cls(self):
        return Transformer

    def objective(self, model_config) -> Objective:
        return translation_objective(self.train.label_smoothing, model_config.pad_id)

    def summarize(self, sums):
        return token_means(sums)

    # -- the end of a run ----------------------------------------------------------------------
    def translate_texts(self, run: RunView, texts, beam_size: int | None = None, batch_size: int = 64,
                        progress: bool = False) -> list[str]:
        from transformer.decoding import translate_batches

        config = self.config
        return translate_batches(run.model, run.tokenizer, texts, beam_size or config.beam_size,
                                 config.length_penalty, config.max_decode_extra, batch_size, progress=progress)

    def finish(self, run: RunView) -> dict[str, Any]:
        """Exact match on the generated task, sacreBLEU on real data (validation and test)."""
        config = self.config
        results: dict[str, Any] = {}
        if config.generated:
            pairs = self.eval_pairs
            hypotheses = self.translate_texts(run, [s for s, _ in pairs])
            exact = float(np.mean([h == t for h, (_, t) in zip(hypotheses, pairs)]))
            results["exact_match"] = exact
            results["examples"] = [(s, h) for (s, _), h in list(zip(pairs, hypotheses))[:5]]
            run.write("validation", exact_match=exact)
            return results
        from transformer.decoding.bleu import corpus_bleu

        for split, pairs in (("validation", self.eval_pairs), ("test", self.test)):
            if not pairs:
                continue
            if config.bleu_examples:
                pairs = pairs[: config.bleu_examples]
            hypotheses = self.translate_texts(run, [s for s, _ in pairs], progress=run.show_progress)
            score = corpus_bleu(hypotheses, [t for _, t in pairs])
            results[f"{split}_bleu"] = score.score
            results[f"{split}_bleu_signature"] = score.signature
            results.setdefault("examples", [(s, h) for (s, _), h in list(zip(pairs, hypotheses))[:5]])
            run.write(split, bleu=score.score, bleu_signature=score.signature)
        return results

    def report_lines(self, results):
        lines = []
        if "exact_match" in results:
            lines.append(f"held-out exact-match accuracy: {results['exact_match']:.4f}")
        for split in ("validation", "test"):
            if f"{split}_bleu" in results:
                lines.append(f"{split} BLEU {results[f'{split}_bleu']:.2f}  ({results[f'{split}_bleu_signature']})")
        lines += [f"  {source}  ->  {hypothesis}" for source, hypothesis in results.get("examples", [])]
        return lines
