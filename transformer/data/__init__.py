"""Input pipeline: parallel text from tensorflow-datasets, a local folder or a generated task
(`corpus`); unlabelled and labelled text for the text tasks (`texts`); tokenizers (`tokenizer`);
token-bounded, length-bucketed, optionally packed batches (`batching`); and batches placed on the
devices ahead of the step (`prefetch`). It knows no model."""

from transformer.data.batching import (
    BUCKET_STEP, CLASSIFY, LM, MLM, BatchPlan, Examples, TextExamples, TextPlan, encode_documents, encode_labelled,
    encode_pairs, rows_per_batch,
)
from transformer.data.corpus import (
    MAJORITY_CLASSES, REVERSE_ALPHABET, DataError, Pair, check_translate_folder, counting_documents, load_folder_pairs,
    load_tfds_pairs, majority_examples, read_text_lines, reverse_task_pairs,
)
from transformer.data.prefetch import prefetch
from transformer.data.texts import LabelledTexts, load_documents, load_labelled

__all__ = ["BUCKET_STEP", "BatchPlan", "CLASSIFY", "DataError", "Examples", "LM", "LabelledTexts", "MAJORITY_CLASSES",
           "MLM", "Pair", "counting_documents", "majority_examples",
           "REVERSE_ALPHABET", "TextExamples", "TextPlan", "check_translate_folder", "encode_documents",
           "encode_labelled", "encode_pairs", "load_documents", "load_folder_pairs", "load_labelled",
           "load_tfds_pairs", "prefetch", "read_text_lines", "reverse_task_pairs", "rows_per_batch"]
