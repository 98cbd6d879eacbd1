#!/usr/bin/env python
"""Translation speed of this library against CTranslate2 (an independent production decoder) on the
same weights, the same sentences and the same batches, side by side in one run. Writes a Markdown
table and JSON.

    python benchmarks/decode_vs_ctranslate2.py --workdir runs/X --input ../shared/data/multi30k/de.test.txt \
        [--batch_size 32] [--batch_tokens N] [--methods greedy beam4] [--repeats 2] [--compact_rows 0 8] [--out FILE]

The run is exported with `export.py`'s code (float32) into a temporary folder. Both engines get the
batches translate.py would decode (`decoding.text.plan_batches`: sorted by length, --batch_size
sentences or --batch_tokens source tokens each); each engine's time is the
best of --repeats passes over all of them after one warm-up pass (this library compiles there).
This library runs once per --compact_rows setting (0: batches decode whole; N: ended sentences are
dropped down to N rows, `search.COMPACT_ROWS`), each with its first pass's time, compilation included.
Outputs are compared token for token; for beam search, where the two rank hypotheses differently
(§6.1's ((5+|Y|)/6)^α against CTranslate2's |Y|^penalty), each differing sentence's two outputs are
scored under this library's objective, log P(Y|X) / lp(Y), by one forward pass of the model.
CTranslate2 runs with its defaults on this machine's cores; where it is not installed the script
says so and measures this library alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

METHODS = {"greedy": 1, "beam4": 4}


def _best_of(repeats: int, run) -> tuple[float, object, float]:
    """The best time of `repeats` runs after a warm-up, the output, and the warm-up's time."""
    start = time.perf_counter()
    run()  # warm-up (compilation)
    first = time.perf_counter() - start
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return best, out, first


def _objective(model, src_ids: list[list[int]], outputs: list[list[int]], alpha: float, bos: int, eos: int):
    """log P(Y|X) / ((5+|Y|)/6)^α of each output Y (its tokens, the end token added), teacher forced."""
    import jax
    import numpy as np

    from transformer.decoding import length_penalty

    scores = []
    for src, out in zip(src_ids, outputs):
        target = list(out) + [eos]
        logits = model(np.asarray([src], np.int32), np.asarray([[bos] + target[:-1]], np.int32))[0]
        log_p = jax.nn.log_softmax(logits.astype("float32"))
        total = float(sum(log_p[i, t] for i, t in enumerate(target)))
        scores.append(total / float(length_penalty(np.asarray(len(target)), alpha)))
    return scores


def main() -> int:
    import jax
    import numpy as np

    from transformer.data import read_text_lines
    from transformer.decoding import translate
    from transformer.decoding.text import encode_sources, plan_batches
    from transformer.run.workdir import load_run_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batch_tokens", type=int, default=None, help="source tokens per batch (translate.py's)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--alpha", type=float, default=0.6)
    parser.add_argument("--max_extra", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compact_rows", type=int, nargs="+", default=[0],
                        help="this library with each: 0 no compaction, N compaction down to N rows (`search.COMPACT_ROWS`)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N sentences (0: all)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "decode_vs_ctranslate2.json"))
    args = parser.parse_args()

    model, tokenizer, steps = load_run_model(args.workdir, attention_impl="reference")
    lines = read_text_lines(args.input)
    lines = lines[: args.limit] if args.limit else lines
    encoded = encode_sources(tokenizer, lines, model.config.max_len)
    # The batches translate.py decodes these sentences in (`plan_batches`): both engines get them.
    batches = plan_batches([len(e) for e in encoded], model.config.max_len, args.max_extra, args.batch_size,
                           args.batch_tokens)
    ids = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    pad = model.config.pad_id

    def ours(beam: int, compact_rows: int | None) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in lines]
        for width, extra, members, rows in batches:
            src = np.full((rows, width), pad, np.int32)
            for row, i in enumerate(members):
                src[row, : len(encoded[i])] = encoded[i]
            src[len(members):, 0] = tokenizer.eos_id
            hyps = np.asarray(jax.block_until_ready(translate(model, src, beam, args.alpha, extra, **ids,
                                                                         compact_rows=compact_rows)))
            for row, i in enumerate(members):
                seq = [int(t) for t in hyps[row]]
                out[i] = seq[: seq.index(tokenizer.eos_id)] if tokenizer.eos_id in seq else seq
        return out

    try:
        import ctranslate2
    except ImportError:
        ctranslate2 = None
        print("ctranslate2 is not installed (pip install ctranslate2): measuring this library alone", file=sys.stderr)

    translator, ct2_dir = None, None
    if ctranslate2 is not None:
        from transformer.export import tokenizer_file
        from transformer.export.ctranslate2 import export_ctranslate2

        ct2_dir = os.path.join(tempfile.mkdtemp(), "ct2")
        export_ctranslate2(model, tokenizer, tokenizer_file(args.workdir), ct2_dir, "float32")
        translator = ctranslate2.Translator(ct2_dir, device="cpu")
        pieces = [tokenizer.pieces(e[:-1]) for e in encoded]  # the export adds the end token itself
        piece_ids = {p: i for i, p in enumerate(tokenizer.pieces(range(tokenizer.vocab_size)))}

    def theirs(beam: int) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in lines]
        for _, _, members, _ in batches:
            # Its limit counts the output without the end token: the longest source's pieces + max_extra
            # is this library's (source with its end token) + max_extra, the end token forced last.
            width = max(len(pieces[i]) for i in members)
            results = translator.translate_batch(
                [pieces[i] for i in members], beam_size=beam, length_penalty=args.alpha,
                max_decoding_length=min(width + args.max_extra, model.config.max_len),
                suppress_sequences=[[tokenizer.pieces([pad])[0]], [tokenizer.pieces([tokenizer.bos_id])[0]]])
            for i, result in zip(members, results):
                out[i] = [piece_ids[p] for p in result.hypotheses[0]]
        return out

    device = jax.devices()[0]
    meta = {"device": f"{device.platform} {device.device_kind}", "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "jax": jax.__version__,
            "ctranslate2": None if ctranslate2 is None else ctranslate2.__version__,
            "sentences": len(lines), "batch_size": args.batch_size, "checkpoint_steps": steps,
            "d_model": model.config.d_model, "N": model.config.N, "vocab": model.config.vocab_size,
            "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv)}
    rows = []
    theirs_by_method: dict[str, tuple[float, list[list[int]]]] = {}  # CTranslate2 runs once per method
    for method, compact in [(m, c) for m in args.methods for c in args.compact_rows]:
        beam = METHODS[method]
        ours_s, ours_out, first_s = _best_of(args.repeats, lambda: ours(beam, compact or None))
        row = {"method": method, "compact_rows": compact or None, "ours_s": ours_s,
               "ours_sentences_per_s": len(lines) / ours_s, "ours_first_pass_s": first_s}
        if translator is not None:
            if method not in theirs_by_method:
                theirs_by_method[method] = _best_of(args.repeats, lambda: theirs(beam))[:2]
            theirs_s, theirs_out = theirs_by_method[method]
            same = [a == b for a, b in zip(ours_out, theirs_out)]
            row.update(theirs_s=theirs_s, theirs_sentences_per_s=len(lines) / theirs_s, identical=sum(same),
                       ratio=theirs_s / ours_s)
            differing = [i for i, s in enumerate(same) if not s]
            if beam > 1 and differing:
                a = _objective(model, [encoded[i] for i in differing], [ours_out[i] for i in differing], args.alpha,
                               tokenizer.bos_id, tokenizer.eos_id)
                b = _objective(model, [encoded[i] for i in differing], [theirs_out[i] for i in differing], args.alpha,
                               tokenizer.bos_id, tokenizer.eos_id)
                row["ours_scores_at_least_as_well"] = sum(x >= y - 1e-4 for x, y in zip(a, b))
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)

    print(f"# {meta['date']}: {meta['command']}")
    print(f"# {meta['sentences']} sentences in batches of {args.batch_size}, float32, {meta['cpu']} ({meta['cores']} cores), "
          f"JAX {meta['jax']}, CTranslate2 {meta['ctranslate2']}")
    print("| mode | compact_rows | identical outputs | this library (first pass, compiling) | CTranslate2 | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ours_cell = f"{r['ours_sentences_per_s']:.1f} sentences/s ({r['ours_first_pass_s']:.0f} s)"
        if "theirs_s" in r:
            note = "" if "ours_scores_at_least_as_well" not in r else (
                f" (this library's objective prefers its own output or ties in {r['ours_scores_at_least_as_well']} "
                f"of the {len(lines) - r['identical']} others)")
            print(f"| {r['method']} | {r['compact_rows'] or 'off'} | {r['identical']}/{len(lines)}{note} | {ours_cell} "
                  f"| {r['theirs_sentences_per_s']:.1f} sentences/s | {r['ratio']:.2f}× |")
        else:
            print(f"| {r['method']} | {r['compact_rows'] or 'off'} | | {ours_cell} | not measured | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
