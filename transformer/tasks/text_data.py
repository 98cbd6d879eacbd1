"""What the text tasks (lm, mlm, classify) share: where their data comes from (a generated demo,
tensorflow-datasets, or local files given per split) and its options; and `DocumentTask`, what
the two tasks on unlabelled documents (lm, mlm) share."""

from __future__ import annotations

from typing import Iterable

from transformer import data as data_lib
from transformer.config import ConfigError
from transformer.data.tokenizer import CharTokenizer, Tokenizer
from transformer.tasks.base import Task
from transformer.training.loss import token_means

COUNTING = "counting"  # the generated documents of lm and mlm (`data.counting_documents`)


def check_sources(dataset: str, eval_dataset: str | None, generated: str) -> None:
    """A local training source needs its validation source: local files hold one split each."""
    from transformer.data.texts import LOCAL_SUFFIXES
    import os

    if dataset == generated:
        return
    parts = dataset.split(",")
    local = any(os.path.exists(p) or p.endswith(LOCAL_SUFFIXES) or p.startswith(("/", ".", "~")) for p in parts)
    if local and not eval_dataset:
        raise ConfigError(f"--dataset {dataset!r} is local data, which holds one split: name the validation data "
                          "with --eval_dataset (a file, a folder or a comma-separated list)")


class DocumentTask(Task):
    """A task on unlabelled documents (its Config has dataset, eval_dataset, text_feature and
    synthetic_examples): the documents of both splits, their tokenizer, and their batches, rows of
    `length` positions encoded as `kind` (`data.batching.LM` or `MLM`)."""

    example_name = "training documents"

    def load(self) -> None:
        config, train = self.config, self.train
        if config.dataset == COUNTING:
            self.docs = data_lib.counting_documents(config.synthetic_examples, seed=train.seed)
            self.eval_docs = data_lib.counting_documents(500, seed=train.seed + 10_000)
            return
        from transformer.data.texts import load_documents

        options = dict(text_feature=config.text_feature, tfds_data_dir=train.tfds_data_dir)
        self.docs = load_documents(config.dataset, train.train_split, **options)
        self.eval_docs = load_documents(config.eval_dataset or config.dataset, train.eval_split, **options)

    def fixed_tokenizer(self) -> Tokenizer | None:
        return CharTokenizer(data_lib.REVERSE_ALPHABET) if self.config.dataset == COUNTING else None

    def tokenizer_texts(self) -> Iterable[str]:
        return iter(self.docs)

    def document_plans(self, tokenizer: Tokenizer, multiple: int, length: int, kind: str, packing: bool):
        from transformer.data.batching import TextPlan, encode_documents

        train = self.train
        examples = encode_documents(self.docs, tokenizer, length, kind=kind)
        eval_examples = encode_documents(self.eval_docs, tokenizer, length, kind=kind)
        self.num_train_examples = len(self.docs)
        return (TextPlan(examples, train.batch_tokens, length, multiple, packing=packing, seed=train.seed),
                TextPlan(eval_examples, train.batch_tokens, length, multiple, packing=packing, shuffle=False))

    def summarize(self, sums):
        return token_means(sums)  # per predicted token: the next token (lm), the chosen positions (mlm)
