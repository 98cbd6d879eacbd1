"""Input pipeline: parallel text from tensorflow-datasets, a local folder or a generated task
(`corpus`); tokenizers (`tokenizer`); token-bounded, length-bucketed, optionally packed batches
(`batching`); and batches placed on the devices ahead of the step (`prefetch`). It knows no model."""

from transformer.data.batching import (
    BUCKET_STEP, BatchPlan, Examples, encode_pairs, rows_per_batch,
)
from transformer.data.corpus import (
    REVERSE_ALPHABET, DataError, Pair, check_translate_folder, load_folder_pairs, load_tfds_pairs,
    read_text_lines, reverse_task_pairs,
)
from transformer.data.prefetch import prefetch

__all__ = ["BUCKET_STEP", "BatchPlan", "DataError", "Examples", "Pair", "REVERSE_ALPHABET", "check_translate_folder",
           "encode_pairs", "load_folder_pairs", "load_tfds_pairs", "prefetch", "read_text_lines",
           "reverse_task_pairs", "rows_per_batch"]
