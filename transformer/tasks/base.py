"""What a task is: the one home of everything specific to it (its corpus reader, batches, loss and
metrics, evaluation and end-of-run report), behind the small interface `Task` below. The run's
plumbing (`transformer/run/`: work dir, lock, config.json, resume checks, checkpoints, metrics,
pmap and mesh, gradient accumulation, SIGTERM/NaN) takes a `Task` and names none.

A task's batches are dicts of NumPy arrays whose first axis is the rows (what the parallel layouts
split over devices); its plans give them in a deterministic order (`batches(start, epochs, rows)`,
as `transformer.data.BatchPlan` does), so that a resumed run sees the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable, Iterator, Protocol

import numpy as np
from flax import nnx

from transformer.config import TransformerConfig
from transformer.data.tokenizer import Tokenizer
from transformer.training.config import TrainConfig
from transformer.training.step import Objective


class Plan(Protocol):
    """One split's batches, deterministic in (seed, epoch)."""

    def batches(self, start: int = 0, epochs: int | None = None,
                rows: Callable[[int], slice] | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]: ...


@dataclasses.dataclass
class RunView:
    """What a task's end-of-run report may use of the run: the trained model, the tokenizer, where
    to write its figures (`write(split, **values)` into the run's metrics), and the update count."""

    model: nnx.Module
    tokenizer: Tokenizer
    write: Callable[..., None]
    step: int
    workdir: str
    show_progress: bool = False


class Task:
    """The interface the run's plumbing calls, in this order: `load` (read the corpora), the
    tokenizer (`fixed_tokenizer`, else SentencePiece trained on `tokenizer_texts`), `plans` (encode
    and batch), `model_cls` and `objective` (what the train step minimises), `summarize` (metric
    sums -> means, each log and evaluation), `finish` (the end-of-run report) and `report_lines`.

    `Config` is the task's own frozen config dataclass (its data options and evaluation settings);
    `PRESETS` maps a train.py --config name to the TrainConfig and task-config defaults that go
    with it (e.g. "tiny": the offline demo); `RESUME_MAY_CHANGE` are the task-config fields a
    resumed run may change (evaluation settings, never the data or the model).
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    PRESETS: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}
    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = ()
    throughput: ClassVar[tuple[str, ...]] = ("tokens",)  # summed counts behind tokens_per_s

    def __init__(self, config, train: TrainConfig):
        self.config, self.train = config, train
        self.info: dict[str, Any] = {}  # what the model needs from the data (e.g. class names); kept in config.json

    # -- data ----------------------------------------------------------------------------------
    def load(self) -> None:
        """Read the training, validation (and test, where there is one) data."""
        raise NotImplementedError

    def fixed_tokenizer(self) -> Tokenizer | None:
        """A generated task's own vocabulary; None: train SentencePiece on `tokenizer_texts`."""
        return None

    def tokenizer_texts(self) -> Iterable[str]:
        raise NotImplementedError

    def plans(self, tokenizer: Tokenizer, multiple: int) -> tuple[Plan, Plan]:
        """The training and validation plans, with batches whose row count is a multiple of `multiple`."""
        raise NotImplementedError

    num_train_examples: int = 0
    example_name: ClassVar[str] = "examples"  # what train.py's first line counts ("training pairs")

    # -- model and loss ------------------------------------------------------------------------
    def model_cls(self) -> Callable[..., nnx.Module]:
        """`model_cls(model_config, rngs=…)` builds this task's model family (from `self.info`)."""
        raise NotImplementedError

    def objective(self, model_config: TransformerConfig) -> Objective:
        raise NotImplementedError

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Metric sums (added over batches and devices) -> the means logged and printed; with "loss"."""
        raise NotImplementedError

    # -- the end of a run ----------------------------------------------------------------------
    def finish(self, run: RunView) -> dict[str, Any]:
        """Scores and examples at the end of training (written into the run's metrics by `run.write`)."""
        return {}

    def report_lines(self, results: dict[str, Any]) -> list[str]:
        """train.py's closing lines for `finish`'s results."""
        return []
