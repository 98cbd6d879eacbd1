"""Text in, text out: tokenise, decode in batches of few shapes, detokenise; the attention maps of
one sentence's translation (the paper's Figures 3-5); and a language model's continuations of text."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from transformer.decoding.families import translate


def encode_sources(tokenizer, texts, max_len: int) -> list[list[int]]:
    """Each text's token ids and the end token, cut to the max_len the model takes (a line longer than
    max_len - 1 tokens keeps its first max_len - 1, with a warning on standard error naming the line,
    1 = texts[0])."""
    import sys

    encoded = []
    for line, ids in enumerate(tokenizer.encode_batch(list(texts)), start=1):
        if len(ids) > max_len - 1:
            print(f"warning: line {line} has {len(ids)} tokens but the model takes at most {max_len - 1} (max_len "
                  f"{max_len}, with the end token): only its first {max_len - 1} are translated", file=sys.stderr)
        encoded.append(list(ids[: max_len - 1]) + [tokenizer.eos_id])
    return encoded


def _power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def plan_batches(lengths: Sequence[int], max_len: int, max_extra: int, batch_size: int = 64,
                 batch_tokens: int | None = None) -> list[tuple[int, int, list[int], int]]:
    """The batches `translate_batches` decodes sentences of these token lengths (end token
    included, at most max_len) in: (padded length, max_extra, members, rows) each, members being
    indices into `lengths`, shortest sentences first, each sentence in exactly one batch, and rows
    the batch's row count (its members, then empty rows).

    A row whose limit (length + max_extra) fits in max_len is padded to its length rounded up to a
    multiple of BUCKET_STEP, or to max_len - max_extra where that is less; a row whose limit max_len
    cuts shares a batch only with rows of its own length, unpadded, decoded with max_extra =
    max_len - length. Without batch_tokens, a batch holds the next batch_size sentences by length
    (padded to its longest's length) in batch_size rows. With batch_tokens, a batch holds sentences
    of one padded length only, in rows = the largest power of two with rows x length <=
    batch_tokens (1 where even one row is longer), at most batch_size, and at most the power of two
    at or above that length's count of sentences (no batch of empty rows for a few short
    sentences). Powers of two, because each batch shape compiles the decoder anew: one call has at
    most one shape per padded length, and calls together only the powers of two up to batch_size
    (and batch_size) as row counts of each."""
    from transformer.data import BUCKET_STEP

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_tokens is not None and batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    if max_extra < 0:
        raise ValueError(f"max_extra must be >= 0, got {max_extra}")
    # The decoders give every row of a batch the same max_extra and stop each row at its own length +
    # max_extra, over src.shape[1] + max_extra decoder positions. Rows whose limit fits in max_len
    # (length <= fits) are padded to at most `fits`, so that no row's limit is ever lowered for the
    # batch; a row whose limit max_len cuts shares a batch only with rows of its own length, padded to
    # exactly that length and decoded with max_extra = max_len - length.
    fits = max_len - max_extra
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    # Sentences of one batch: all those whose limit fits together (None), or one length that max_len
    # cuts; with batch_tokens, one padded length of those that fit too (rows depend on the length).
    groups: dict[tuple[int | None, int], list[int]] = {}
    for i in order:
        n = lengths[i]
        if n > fits:
            key = (n, n)
        else:
            key = (None, 0 if batch_tokens is None else min(-(-n // BUCKET_STEP) * BUCKET_STEP, fits))
        groups.setdefault(key, []).append(i)
    batches = []
    for (cut, padded), members in groups.items():
        rows = batch_size
        if batch_tokens is not None:
            rows = min(batch_size, _power_of_two_at_most(max(1, batch_tokens // padded)),
                       1 << (len(members) - 1).bit_length())
        for start in range(0, len(members), rows):
            batch = members[start : start + rows]
            if cut is not None:
                batches.append((cut, max_len - cut, batch, rows))
            else:
                length = min(-(-lengths[batch[-1]] // BUCKET_STEP) * BUCKET_STEP, fits)
                batches.append((length, max_extra, batch, rows))
    return batches


def translate_batches(model, tokenizer, texts, beam_size: int = 4, alpha: float = 0.6, max_extra: int = 50,
                      batch_size: int = 64, progress: bool = False, batch_tokens: int | None = None,
                      compact_rows: int | None = None) -> list[str]:
    """Translate raw sentences: tokenise, sort by length (less padding), decode in batches of few
    shapes (`plan_batches`: batch_size rows, or with batch_tokens as many rows of one padded length
    as fit that many source tokens, a power of two; lengths padded to multiples of 8), detokenise,
    and return the translations in input order. compact_rows: drop ended sentences from a batch as
    it decodes (`greedy_decode`).

    A sentence's translation depends on that sentence alone, never on the others of its batch: its
    output has at most (its length + max_extra) tokens (§6.1), or max_len where that is fewer (the
    longest sequence the model takes). A sentence longer than max_len - 1 tokens (the end token
    makes max_len) is cut to that, with a warning on standard error naming its line (1 = texts[0]).
    """
    from tqdm import tqdm

    max_len = model.config.max_len
    texts = list(texts)
    encoded = encode_sources(tokenizer, texts, max_len)
    batches = plan_batches([len(ids) for ids in encoded], max_len, max_extra, batch_size, batch_tokens)
    out: list[str] = [""] * len(texts)
    for length, extra, members, rows in tqdm(batches, desc="translate", unit="batch", disable=not progress):
        src = np.full((rows, length), model.config.pad_id, np.int32)
        for row, i in enumerate(members):
            src[row, : len(encoded[i])] = encoded[i]
        src[len(members):, 0] = tokenizer.eos_id  # padding rows: an empty sentence
        hyps = np.asarray(translate(model, src, beam_size, alpha, extra, bos_id=tokenizer.bos_id,
                                    eos_id=tokenizer.eos_id, compact_rows=compact_rows))
        for row, i in enumerate(members):
            out[i] = tokenizer.decode(hyps[row])
    return out


def translation_attention(model, tokenizer, text: str, beam_size: int = 4, alpha: float = 0.6,
                          max_extra: int = 50) -> tuple[str, dict[str, list[str]], dict]:
    """Translate one sentence, then run the model once over its source and the decoded output
    (teacher forced: the target shifted right, as in training) recording every attention map.

    Returns the translation, the token pieces {"source": [...], "target": [...]} (the target being
    the decoder's input positions: the begin token, then the output tokens; the end token is
    predicted at the last of them), and {module path: float32 [h, queries, keys]}
    (`models.attention_maps.attention_maps`). The translation is the one `translate_batches`
    gives for this sentence (a sentence's output does not depend on its batch)."""
    import numpy as np

    from transformer.decoding.search import check_decode_length
    from transformer.models.attention_maps import attention_maps

    max_len = model.config.max_len
    src_ids = encode_sources(tokenizer, [text], max_len)[0]
    extra = min(max_extra, max_len - len(src_ids))
    check_decode_length(model.config, len(src_ids), extra)
    src = np.asarray([src_ids], np.int32)
    out = [int(i) for i in np.asarray(translate(model, src, beam_size, alpha, extra, bos_id=tokenizer.bos_id,
                                                eos_id=tokenizer.eos_id))[0]]
    out = out[: out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else [i for i in out if i != model.config.pad_id]
    tgt_in = np.asarray([[tokenizer.bos_id] + out], np.int32)
    _, maps = attention_maps(model, src, tgt_in, right_padded=True)  # one row, no padding
    pieces = {"source": tokenizer.pieces(src_ids), "target": tokenizer.pieces(tgt_in[0].tolist())}
    return tokenizer.decode(out), pieces, {path: np.asarray(w[0]) for path, w in maps.items()}


_streaming: list[Callable[[np.ndarray], None]] = []  # the handler of the continuation being streamed


def _stream_tokens(tokens: np.ndarray) -> None:
    # One function for every streamed continuation: `generate` compiles its loop once per callback.
    _streaming[-1](tokens)


def continue_texts(lm, tokenizer, prompts: Sequence[str], max_new_tokens: int = 50, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                   on_text: Callable[[str], None] | None = None, beam_size: int = 1,
                   alpha: float = 0.6) -> list[str]:
    """Continue text prompts with a `TransformerLM` (`families.generate` on the begin token and the
    prompt's ids; prompts of different lengths share a batch). With `on_text` (one prompt only) the
    new text is handed over piece by piece as the tokens are chosen (what the prompt's ids and the
    new ones decode to, beyond what the prompt's ids decode to); a beam search (beam_size > 1)
    hands it over whole once found."""
    from flax import nnx

    from transformer.decoding.families import generate

    if on_text is not None and len(prompts) != 1:
        raise ValueError("on_text streams one prompt's continuation: pass one prompt")
    encoded = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    rows = np.full((len(encoded), max(map(len, encoded))), tokenizer.pad_id, np.int32)
    for r, ids in enumerate(encoded):
        rows[r, : len(ids)] = ids
    streaming = on_text is not None and beam_size == 1  # a beam's tokens are known only at its end
    if streaming:
        sofar = encoded[0][1:]

        def handle(tokens: np.ndarray) -> None:
            token = int(tokens[0])
            if token in (tokenizer.eos_id, tokenizer.pad_id):
                return
            before = tokenizer.decode(sofar)
            sofar.append(token)
            on_text(tokenizer.decode(sofar)[len(before):])

        _streaming.append(handle)
    try:
        out = generate(lm, rows, max_new_tokens, temperature, top_k, nnx.Rngs(sample=seed), bos_id=tokenizer.bos_id,
                       eos_id=tokenizer.eos_id, top_p=top_p, on_token=_stream_tokens if streaming else None,
                       beam_size=beam_size, alpha=alpha)
        out = np.asarray(out)
        if streaming:
            # The loop's callbacks run asynchronously to this thread: the handler stays installed
            # until the last of them has run.
            jax.effects_barrier()
    finally:
        if streaming:
            _streaming.pop()
    texts = [tokenizer.decode(list(row)) for row in out]
    if on_text is not None and not streaming:  # what streaming would have handed over, at once
        prompt_ids = encoded[0][1:]
        new_ids = [int(t) for t in out[0] if int(t) not in (tokenizer.eos_id, tokenizer.pad_id)]
        on_text(tokenizer.decode(prompt_ids + new_ids)[len(tokenizer.decode(prompt_ids)):])
    return texts
