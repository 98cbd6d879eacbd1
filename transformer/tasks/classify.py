"""Text classification (sentiment and the like) with the encoder-only family
(`TransformerClassifier`): labelled texts from tensorflow-datasets (`glue/sst2`, `imdb_reviews`), a
TSV/CSV file or a folder of class subfolders, or the generated majority task; the class count and
names come from the training data. Cross-entropy per example; accuracy, macro-F1 and the confusion
matrix on the validation (and test) data at the end."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from transformer import data as data_lib
from transformer.config import ConfigError
from transformer.data.tokenizer import CharTokenizer, Tokenizer
from transformer.models.transformer import TransformerClassifier
from transformer.tasks.base import RunView, Task
from transformer.tasks.text_data import check_sources
from transformer.training.step import Objective

GENERATED = "majority"


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
    """The data of a classification run (rows of at most TrainConfig.max_length tokens)."""

    # "majority" (generated), a tfds name (glue/sst2, imdb_reviews: --train_split/--eval_split/--test_split),
    # a .tsv/.csv file with a header, or a folder with one subfolder per class.
    dataset: str = GENERATED
    eval_dataset: str | None = None  # the validation data when --dataset is local
    test_dataset: str | None = None  # local test data (optional)
    text_feature: str = "text"
    label_feature: str = "label"
    synthetic_examples: int = 20_000

    def __post_init__(self):
        if not isinstance(self.synthetic_examples, int) or self.synthetic_examples <= 0:
            raise ConfigError(f"synthetic_examples must be a positive integer, got {self.synthetic_examples!r}")
        check_sources(self.dataset, self.eval_dataset, GENERATED)


def classify_objective(label_smoothing: float, pad_id: int) -> Objective:
    """Cross-entropy of each example's label (label-smoothed as §5.4 if asked), summed over the real
    rows (`weights`; filler rows weigh 0)."""

    def fn(model, batch, *, deterministic: bool, rngs):
        # Rows are right-padded (TextPlan): padding as per-row lengths.
        logits = model(batch["tokens"], right_padded=True, deterministic=deterministic, rngs=rngs)  # [b, classes]
        labels, weights = batch["labels"], batch["weights"]
        log_p = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
        loss = (1 - label_smoothing) * nll - label_smoothing * log_p.mean(axis=-1)
        correct = (logits.argmax(-1) == labels).astype(jnp.float32)
        return {"loss_sum": (loss * weights).sum(), "nll_sum": (nll * weights).sum(),
                "correct": (correct * weights).sum(), "examples": weights.sum(),
                "tokens": ((batch["tokens"] != pad_id).sum(axis=1) * weights).sum()}

    return Objective(fn, count="examples")


def confusion_matrix(labels: Int[Array, "n"], predictions: Int[Array, "n"], num_classes: int) -> np.ndarray:
    """[true class, predicted class] counts."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def macro_f1(matrix: np.ndarray) -> float:
    """The mean over classes of F1 = 2·precision·recall / (precision + recall), from a confusion
    matrix; a class never predicted nor present scores 0 (as scikit-learn's zero_division=0)."""
    true_positives = np.diag(matrix).astype(np.float64)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    denominator = predicted + actual  # F1 = 2·TP / (predicted + actual)
    f1 = np.where(denominator > 0, 2 * true_positives / np.maximum(denominator, 1), 0.0)
    return float(f1.mean())


@functools.partial(jax.jit, static_argnames="graphdef")
def _probabilities(graphdef, params, tokens):
    from flax import nnx

    return jax.nn.softmax(nnx.merge(graphdef, params)(tokens), axis=-1)


def class_probabilities(model, tokenizer: Tokenizer, texts: list[str], max_length: int,
                        batch_size: int = 64) -> Float[Array, "n c"]:
    """P(class | text) for each text (ids + end token, cut to max_length), in batches of rows
    padded to the longest text of the batch (rounded up to 8 positions: few compiled shapes)."""
    from flax import nnx

    graphdef, params = nnx.split(model)
    out = []
    for start in range(0, len(texts), batch_size):
        encoded = [ids[: max_length - 1] + [tokenizer.eos_id] for ids in tokenizer.encode_batch(texts[start : start + batch_size])]
        length = -(-max(map(len, encoded)) // 8) * 8
        rows = np.full((batch_size, length), tokenizer.pad_id, np.int32)
        for r, ids in enumerate(encoded):
            rows[r, : len(ids)] = ids
        out.append(np.asarray(_probabilities(graphdef, params, jnp.asarray(rows)))[: len(encoded)])
    return np.concatenate(out) if out else np.zeros((0, model.classifier.out_features), np.float32)


class ClassifyTask(Task):
    name = "classify"
    Config = ClassifyConfig
    PRESETS = {"tiny": {"train": dict(num_train_steps=500, batch_tokens=2048, max_length=16, warmup_steps=100,
                                      lr_scale=2.0, label_smoothing=0.0, log_every=100, eval_every=250,
                                      checkpoint_every=250)}}
    throughput = ("tokens",)
    example_name = "training examples"

    def load(self) -> None:
        config, train = self.config, self.train
        self.test = None
        if config.dataset == GENERATED:
            texts, labels = data_lib.majority_examples(config.synthetic_examples, seed=train.seed)
            eval_texts, eval_labels = data_lib.majority_examples(1000, seed=train.seed + 10_000)
            from transformer.data.texts import LabelledTexts

            self.data = LabelledTexts(texts, labels, list(data_lib.MAJORITY_CLASSES))
            self.eval_data = LabelledTexts(eval_texts, eval_labels, list(data_lib.MAJORITY_CLASSES))
        else:
            from transformer.data.texts import load_labelled

            options = dict(text_feature=config.text_feature, label_feature=config.label_feature,
                           tfds_data_dir=train.tfds_data_dir)
            self.data = load_labelled(config.dataset, train.train_split, **options)
            self.eval_data = load_labelled(config.eval_dataset or config.dataset, train.eval_split,
                                           class_names=self.data.class_names, **options)
            if config.test_dataset:
                self.test = load_labelled(config.test_dataset, train.test_split, class_names=self.data.class_names,
                                          **options)
        names = self.info.get("class_names")
        if names is not None and names != self.data.class_names:  # a resumed run: its classes, in its order
            raise data_lib.DataError(f"the training data now has classes {self.data.class_names} but the run was "
                                     f"started with {names}: resume with the run's data, or choose a new --workdir")
        self.info["class_names"] = list(self.data.class_names)

    def fixed_tokenizer(self) -> Tokenizer | None:
        return CharTokenizer(data_lib.REVERSE_ALPHABET) if self.config.dataset == GENERATED else None

    def tokenizer_texts(self):
        return iter(self.data.texts)

    def plans(self, tokenizer: Tokenizer, multiple: int):
        from transformer.data.batching import TextPlan, encode_labelled

        train = self.train
        examples = encode_labelled(self.data.texts, self.data.labels, tokenizer, train.max_length)
        eval_examples = encode_labelled(self.eval_data.texts, self.eval_data.labels, tokenizer, train.max_length)
        self.num_train_examples = len(examples)
        return (TextPlan(examples, train.batch_tokens, train.max_length, multiple, seed=train.seed),
                TextPlan(eval_examples, train.batch_tokens, train.max_length, multiple, shuffle=False))

    def model_cls(self):
        return functools.partial(TransformerClassifier, num_classes=len(self.info["class_names"]))

    def objective(self, model_config) -> Objective:
        return classify_objective(self.train.label_smoothing, model_config.pad_id)

    def summarize(self, sums):
        examples = max(sums["examples"], 1.0)
        return {"loss": sums["loss_sum"] / examples, "nll": sums["nll_sum"] / examples,
                "accuracy": sums["correct"] / examples}

    def evaluate_texts(self, model, tokenizer, data) -> dict[str, Any]:
        """Accuracy, macro-F1 and the confusion matrix of `model` on labelled texts."""
        probabilities = class_probabilities(model, tokenizer, data.texts, self.train.max_length)
        matrix = confusion_matrix(data.labels, probabilities.argmax(-1), len(self.info["class_names"]))
        return {"accuracy": float(np.trace(matrix) / max(matrix.sum(), 1)), "macro_f1": macro_f1(matrix),
                "confusion": matrix.tolist()}

    def finish(self, run: RunView) -> dict[str, Any]:
        results: dict[str, Any] = {"class_names": self.info["class_names"]}
        for split, data in (("validation", self.eval_data), ("test", self.test)):
            if data is None or not len(data):
                continue
            scores = self.evaluate_texts(run.model, run.tokenizer, data)
            results[split] = scores
            run.write(split, **scores)
        return results

    def report_lines(self, results):
        lines = []
        names = results.get("class_names", [])
        for split in ("validation", "test"):
            if split not in results:
                continue
            scores = results[split]
            lines.append(f"{split}: accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f}; "
                         "confusion matrix (rows: true class, columns: predicted):")
            width = max(map(len, names + ["class"])) + 2
            lines.append(" " * width + "".join(f"{n:>{width}}" for n in names))
            for name, row in zip(names, scores["confusion"]):
                lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}}" for v in row))
        return lines
