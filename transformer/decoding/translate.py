"""Text in, text out: tokenise, decode in batches of few shapes, detokenise."""

from __future__ import annotations

from transformer.decoding.search import translate


def translate_batches(model, tokenizer, texts, beam_size: int = 4, alpha: float = 0.6, max_extra: int = 50,
                      batch_size: int = 64, progress: bool = False) -> list[str]:
    """Translate raw sentences: tokenise, sort by length (less padding), decode in batches of fixed
    shape (rows padded to batch_size, lengths to multiples of 8, so few compilations), detokenise,
    and return the translations in input order.

    A sentence's translation depends on that sentence alone, never on the others of its batch: its
    output has at most (its length + max_extra) tokens (§6.1), or max_len where that is fewer (the
    longest sequence the model takes). A sentence longer than max_len - 1 tokens (the end token
    makes max_len) is cut to that, with a warning on standard error naming its line (1 = texts[0]).
    """
    import sys

    import numpy as np
    from tqdm import tqdm

    from transformer.data import BUCKET_STEP

    if max_extra < 0:
        raise ValueError(f"max_extra must be >= 0, got {max_extra}")
    max_len = model.config.max_len
    texts = list(texts)
    encoded = []
    for line, ids in enumerate(tokenizer.encode_batch(texts), start=1):
        if len(ids) > max_len - 1:
            print(f"warning: line {line} has {len(ids)} tokens but the model takes at most {max_len - 1} (max_len "
                  f"{max_len}, with the end token): only its first {max_len - 1} are translated", file=sys.stderr)
        encoded.append(list(ids[: max_len - 1]) + [tokenizer.eos_id])
    # The decoders give every row of a batch the same max_extra and stop each row at its own length +
    # max_extra, over src.shape[1] + max_extra decoder positions. Rows whose limit fits in max_len
    # (length <= fits) are padded to at most `fits`, so that no row's limit is ever lowered for the
    # batch; a row whose limit max_len cuts shares a batch only with rows of its own length, padded to
    # exactly that length and decoded with max_extra = max_len - length.
    fits = max_len - max_extra
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    groups: dict[int | None, list[int]] = {}  # None: limits that fit; n: rows of length n that max_len cuts
    for i in order:
        groups.setdefault(None if len(encoded[i]) <= fits else len(encoded[i]), []).append(i)
    batches = []  # (padded length, max_extra, members)
    for key, rows in groups.items():
        for start in range(0, len(rows), batch_size):
            members = rows[start : start + batch_size]
            if key is None:
                length = min(-(-len(encoded[members[-1]]) // BUCKET_STEP) * BUCKET_STEP, fits)
                batches.append((length, max_extra, members))
            else:
                batches.append((key, max_len - key, members))
    out: list[str] = [""] * len(texts)
    for length, extra, members in tqdm(batches, desc="translate", unit="batch", disable=not progress):
        src = np.full((batch_size, length), model.config.pad_id, np.int32)
        for row, i in enumerate(members):
            src[row, : len(encoded[i])] = encoded[i]
        src[len(members):, 0] = tokenizer.eos_id  # padding rows: an empty sentence
        hyps = np.asarray(translate(model, src, beam_size, alpha, extra, bos_id=tokenizer.bos_id,
                                    eos_id=tokenizer.eos_id))
        for row, i in enumerate(members):
            out[i] = tokenizer.decode(hyps[row])
    return out
