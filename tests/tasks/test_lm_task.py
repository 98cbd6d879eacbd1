"""The language-model task: packed rows, the loss and perplexity."""

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer.config import TransformerConfig
from transformer.data.batching import LM, TextPlan, encode_documents
from transformer.data.tokenizer import CharTokenizer
from transformer.models.transformer import TransformerLM
from transformer.tasks.lm import lm_objective
from transformer.training.loss import token_means

TOKENIZER = CharTokenizer("abcdefghijklmnopqrst")
DOCS = ["abcdefg", "hij", "klmnopqrstab", "cd", "efghijklm"]


def _model():
    config = TransformerConfig.tiny(d_model=16, d_ff=24, h=2, N=2, vocab_size=TOKENIZER.vocab_size, dropout_rate=0.0,
                                    pad_id=TOKENIZER.pad_id)
    return TransformerLM(config, rngs=nnx.Rngs(0))


def _sums(model, batch):
    objective = lm_objective(0.0, TOKENIZER.pad_id)
    return objective.fn(model, {k: jnp.asarray(v) for k, v in batch.items()}, deterministic=True, rngs=None)


def test_packed_rows_give_the_loss_of_the_documents_one_by_one():
    model = _model()
    examples = encode_documents(DOCS, TOKENIZER, 16, kind=LM)
    packed = next(TextPlan(examples, 64, 16, 1, packing=True, shuffle=False).batches(epochs=1))[1]
    assert (packed["segments"].max(axis=1) > 1).any()  # several documents share a row
    together = _sums(model, packed)
    alone = {"loss_sum": 0.0, "nll_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    for doc in DOCS:
        ids = [TOKENIZER.bos_id] + TOKENIZER.encode(doc) + [TOKENIZER.eos_id]
        row = {"tokens_in": np.array([ids[:-1]], np.int32), "tokens_out": np.array([ids[1:]], np.int32),
               "segments": np.ones((1, len(ids) - 1), np.int32), "positions": np.arange(len(ids) - 1)[None]}
        for k, v in _sums(model, row).items():
            alone[k] += float(v)
    assert float(together["tokens"]) == alone["tokens"] == sum(len(d) + 1 for d in DOCS)
    np.testing.assert_allclose(float(together["nll_sum"]), alone["nll_sum"], rtol=1e-5)
    assert float(together["correct"]) == alone["correct"]


def test_perplexity_is_exp_of_the_mean_token_nll_without_label_smoothing():
    # Hand-made logits: 3 real targets with p = 1/2, 1/4, 1 and one padded position.
    from transformer.training.loss import loss_and_metrics

    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [1e-30, 1e-30, 1.0], [1 / 3, 1 / 3, 1 / 3]]]))
    targets = jnp.array([[0, 1, 2, 0]])
    weights = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    sums = {k: float(v) for k, v in loss_and_metrics(logits, targets, weights, label_smoothing=0.1).items()}
    means = token_means(sums)
    expected_nll = (math.log(2) + math.log(4) + 0.0) / 3
    assert abs(means["nll"] - expected_nll) < 1e-6
    assert abs(means["perplexity"] - math.exp(expected_nll)) < 1e-5  # = 2: the geometric mean of 2, 4, 1
    assert means["loss"] > means["nll"]  # the smoothed loss is apart from the NLL behind perplexity
    assert means["accuracy"] == 2 / 3  # argmax right at the first and the third
