"""What the text tasks (lm, mlm, classify) share: where their data comes from (a generated demo,
tensorflow-datasets, or local files given per split) and its options."""

from __future__ import annotations

from transformer.config import ConfigError


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
