#!/usr/bin/env python
"""Decoding speed: generated tokens per second for greedy and beam 4, with and without the KV
cache, at a few batch sizes and output lengths. Prints a table and writes JSON.

    python benchmarks/decode.py [--config tiny|base|big] [--batch 16 64] [--lengths 16 32 64]
                                [--methods greedy greedy_no_cache beam4 beam4_no_cache] [--out FILE]

The model is randomly initialised and EOS is never chosen (its logit is masked off by forcing the
output length), so every sequence runs to the requested length: timings measure the decoder, not
when an untrained model happens to stop.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

METHODS = {  # key: (name, beam size, KV cache)
    "greedy": ("greedy (cache)", 1, True),
    "greedy_no_cache": ("greedy (no cache)", 1, False),
    "beam4_no_cache": ("beam 4 (no cache)", 4, False),
    "beam4": ("beam 4 (cache)", 4, True),
}


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from transformer import Transformer, TransformerConfig
    from transformer.decoding import beam_search, greedy_decode
    from transformer.data.tokenizer import BOS_ID, EOS_ID

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="tiny", choices=["tiny", "base", "big"])
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--d_model", type=int, default=None)
    parser.add_argument("--d_ff", type=int, default=None)
    parser.add_argument("--h", type=int, default=None)
    parser.add_argument("--N", type=int, default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[16])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--src_len", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "decode_results.json"))
    args = parser.parse_args()

    sizes = {k: getattr(args, k) for k in ("d_model", "d_ff", "h", "N") if getattr(args, k) is not None}
    config = TransformerConfig.preset(args.config, vocab_size=args.vocab_size, dtype=args.dtype, max_len=1024, **sizes)
    model = Transformer(config, rngs=nnx.Rngs(0))
    # A zero EOS embedding gives EOS the logit 0 while thousands of other tokens score above it, so
    # outputs run to the length limit; the measured lengths are checked and reported below.
    E = model.src_embed.token_embedding.embedding
    E[...] = E[...].at[EOS_ID].set(0.0)
    ids = dict(bos_id=BOS_ID, eos_id=EOS_ID)
    device = jax.devices()[0]
    meta = {"device": device.device_kind if device.device_kind == device.platform else f"{device.platform} {device.device_kind}", "host": platform.processor() or platform.machine(),
            "config": args.config, "d_model": config.d_model, "N": config.N, "vocab": args.vocab_size,
            "dtype": args.dtype, "src_len": args.src_len, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
            "command": "python " + " ".join(sys.argv)}
    rows, failures = [], []

    def save():  # after every case, so that a run cut short keeps what it measured
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "failures": failures}, f, indent=2)

    for batch, length in itertools.product(args.batch, args.lengths):
        if length <= args.src_len:
            continue
        src = jnp.asarray(np.random.default_rng(0).integers(4, args.vocab_size, (batch, args.src_len)), jnp.int32)
        src = src.at[:, -1].set(EOS_ID)
        for key in args.methods:
            name, beam, use_cache = METHODS[key]
            if beam == 1:
                fn = lambda n: greedy_decode(model, src, n - args.src_len, use_cache=use_cache, **ids)[0]  # noqa: E731
            else:
                fn = lambda n: beam_search(model, src, beam, 0.6, n - args.src_len, use_cache=use_cache, **ids)[0]  # noqa: E731
            try:
                rows.append(measure(fn, name, batch, length, args.repeats))
            except Exception as err:  # out of memory, a backend's failure: reported, and the other cases go on
                lines = str(err).strip().splitlines()
                failures.append({"case": f"{name}, batch {batch}, length {length}",
                                 "error": f"{type(err).__name__}: {lines[0][:300] if lines else ''}"})
                print(f"  {failures[-1]['case']}: FAILED ({failures[-1]['error']})", flush=True)
            save()
    print(f"# {meta['date']}: {meta['command']}")
    print(f"# decoding, {meta['device']}, {args.config} (d_model {config.d_model}, N {config.N}), "
          f"source length {args.src_len}, {args.dtype}")
    print("| method | batch | length limit | mean output length | median s | output tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['batch']} | {r['output_len']} | {r['mean_output_len']:.1f} | {r['median_s']:.4f} "
              f"| {r['tokens_per_s']:.0f} |")
    save()
    sys.exit(1 if failures else 0)


def measure(fn, name: str, batch: int, length: int, repeats: int) -> dict:
    """The first call (compilation included) apart, then the median of `repeats` calls."""
    import jax
    import numpy as np

    from transformer.data.tokenizer import EOS_ID

    start = time.perf_counter()
    out = np.asarray(jax.block_until_ready(fn(length)))
    compile_s = time.perf_counter() - start
    out = out[:, 0] if out.ndim == 3 else out  # beams: the best hypothesis
    generated = float(np.mean([(list(r).index(EOS_ID) + 1) if EOS_ID in r else len(r) for r in out]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(length))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tokens = batch * generated  # output tokens of the best hypotheses, EOS included
    print(f"  {name:18s} batch {batch:4d} length {length:4d} (generated {generated:.1f}): {median:.4f} s, "
          f"{tokens / median:.0f} tokens/s", flush=True)
    return {"method": name, "output_len": length, "batch": batch, "median_s": median, "mean_output_len": generated,
            "first_call_s": compile_s, "tokens_per_s": tokens / median}

if __name__ == "__main__":
    main()
