"""Where a run's numbers go: metrics.jsonl (one JSON object per event, with `step` and `split`),
TensorBoard event files, and a PNG of the training and validation curves."""

from __future__ import annotations

import json
import os
import time


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self.tensorboard = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
                self.tensorboard.flush()  # the file header now: nothing may be left to write at close
            except ImportError:  # TensorBoard events are optional; metrics.jsonl is always written
                self.tensorboard = None

    def write(self, step: int, split: str, **values) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{split}/{name}", value, step)
            self.tensorboard.flush()

    def close(self) -> None:
        """Stop TensorBoard's writer threads (left running, they fail at interpreter shutdown)."""
        tensorboard, self.tensorboard = self.tensorboard, None
        if tensorboard is None:
            return
        try:
            tensorboard.close()
        except OSError:
            _abandon(tensorboard)
            raise


def _abandon(tensorboard) -> None:
    """After a failed close (a full disk), stop tensorboardX's threads and mark its files closed
    without writing, or its exit hook tries again and prints a traceback at interpreter shutdown."""
    for writer in (tensorboard.all_writers or {}).values():
        events = getattr(writer, "event_writer", None)
        if events is None or getattr(events, "_closed", True):
            continue
        try:
            events._worker.stop()
            events._event_queue.close()
        except Exception:  # a tensorboardX without these internals: its own hook will report
            continue
        events._closed = True


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(workdir: str, filename: str = "curves.png") -> str | None:
    """Training and validation loss (and validation accuracy) against step, as a PNG."""
    records = read_metrics(workdir)
    train = [r for r in records if r["split"] == "train" and "loss" in r]
    valid = [r for r in records if r["split"] == "validation" and "loss" in r]
    if not train and not valid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for rows, label in ((train, "train"), (valid, "validation")):
        if rows:
            ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label, marker="." if label == "validation" else None)
            ax_acc.plot([r["step"] for r in rows], [r["accuracy"] for r in rows], label=label)
    # The task's own loss and accuracy: per token (translate, lm), per masked position (mlm) or per
    # example (classify); metrics.jsonl's first record names the task.
    ax_loss.set(xlabel="step", ylabel="loss (the task's objective)", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(workdir, filename)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_comparison(runs: dict[str, str], path: str, metric: str = "accuracy", split: str = "validation") -> str:
    """One metric of several runs against step, in one PNG: `runs` maps a label to a work dir.
    Raises ValueError naming a run that has no such record."""
    curves = {}
    for label, workdir in runs.items():
        rows = [r for r in read_metrics(workdir) if r.get("split") == split and metric in r]
        if not rows:
            raise ValueError(f"{workdir} has no {split} {metric} in its metrics.jsonl")
        curves[label] = rows
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in curves.items():
        ax.plot([r["step"] for r in rows], [r[metric] for r in rows], label=label, marker=".")
    ax.set(xlabel="step", ylabel=f"{split} {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
