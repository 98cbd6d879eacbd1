"""Language modelling with the decoder-only family (`TransformerLM`): documents from
tensorflow-datasets (`lm1b`, or any dataset with a text feature), local files, or the generated
counting task; packed into rows of `seq_len` positions with segment ids and positions restarting
per document (no attention across documents); next-token loss; validation loss, perplexity
(exp of the mean per-token NLL, without label smoothing) and token accuracy; at the end, greedy
continuations of validation prompts."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from transformer.config import ConfigError
from transformer.data.tokenizer import Tokenizer
from transformer.models.transformer import TransformerLM
from transformer.tasks.base import RunView
from transformer.tasks.text_data import COUNTING, DocumentTask, check_sources
from transformer.training.loss import loss_and_metrics
from transformer.training.step import Objective

GENERATED = COUNTING


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """The data and the end-of-run samples of a language-model run."""

    # "counting" (generated, no download), a tfds name (e.g. lm1b: its --train_split / --eval_split),
    # or local data: a .txt file (a document per line), a folder (a document per .txt file), a
    # .tsv/.csv file (the --text_feature column), or a comma-separated list of them.
    dataset: str = GENERATED
    eval_dataset: str | None = None  # the validation data when --dataset is local
    text_feature: str = "text"
    seq_len: int = 128  # positions per packed row
    synthetic_examples: int = 20_000  # documents of the generated task
    samples: int = 4  # validation prompts continued at the end
    sample_tokens: int = 32  # tokens generated per continuation

    def __post_init__(self):
        for name in ("seq_len", "synthetic_examples", "sample_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.samples, int) or self.samples < 0:
            raise ConfigError(f"samples must be a non-negative integer, got {self.samples!r}")
        check_sources(self.dataset, self.eval_dataset, GENERATED)


def lm_objective(label_smoothing: float, pad_id: int) -> Objective:
    """Next-token cross-entropy over the real targets (label-smoothed as §5.4 if asked; the NLL
    behind perplexity is not)."""

    def fn(model, batch, *, deterministic: bool, rngs):
        logits = model(batch["tokens_in"], positions=batch["positions"], segments=batch["segments"],
                       deterministic=deterministic, rngs=rngs)
        weights = (batch["tokens_out"] != pad_id).astype(jnp.float32)
        return loss_and_metrics(logits, batch["tokens_out"], weights, label_smoothing)

    return Objective(fn, count="tokens")


class LMTask(DocumentTask):
    name = "lm"
    Config = LMConfig
    PRESETS = {"tiny": {"train": dict(num_train_steps=600, batch_tokens=2048, warmup_steps=100, lr_scale=2.0,
                                      label_smoothing=0.0, log_every=100, eval_every=300, checkpoint_every=300),
                        "task": dict(seq_len=64)}}
    RESUME_MAY_CHANGE = ("samples", "sample_tokens")

    def plans(self, tokenizer: Tokenizer, multiple: int):
        from transformer.data.batching import LM

        return self.document_plans(tokenizer, multiple, self.config.seq_len, LM, packing=True)

    def model_cls(self):
        return TransformerLM

    def objective(self, model_config) -> Objective:
        return lm_objective(self.train.label_smoothing, model_config.pad_id)

    def finish(self, run: RunView) -> dict[str, Any]:
        """Greedy continuations of the first half of a few validation documents."""
        from transformer.decoding.text import continue_texts

        tokenizer = run.tokenizer
        prompts = []
        for doc in self.eval_docs[: self.config.samples]:
            ids = tokenizer.encode(doc)
            prompts.append(tokenizer.decode(ids[: max(1, len(ids) // 2)]))
        if not prompts:
            return {}
        max_new = min(self.config.sample_tokens, run.model.config.max_len - max(len(tokenizer.encode(p)) + 1 for p in prompts))
        continuations = continue_texts(run.model, tokenizer, prompts, max_new_tokens=max(max_new, 1))
        run.write("samples", examples=[[p, c] for p, c in zip(prompts, continuations)])
        return {"examples": list(zip(prompts, continuations))}

    def report_lines(self, results):
        return ["continuations of validation prompts (greedy):"] + [
            f"  {prompt}  ->  {continuation}" for prompt, continuation in results.get("examples", [])]
