#!/usr/bin/env python
"""The masked-LM training step with logits at the chosen positions only (the default cap,
`MLMConfig.predictions_per_row`) against logits at every position (a cap of the row length): the
value and gradient of the objective under jax.jit, median of --steps after one compiling call.

    python benchmarks/mlm_step.py --rows 64 --length 64 --d_model 256 --d_ff 1024 --h 4 --N 4 --vocab_size 8000
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--d_ff", type=int, default=1024)
    parser.add_argument("--h", type=int, default=4)
    parser.add_argument("--N", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from transformer.config import TransformerConfig
    from transformer.data.tokenizer import BOS_ID, PAD_ID
    from transformer.models.transformer import TransformerMLM
    from transformer.tasks.mlm import FIRST_ORDINARY_ID, MLMConfig, mlm_objective

    config = TransformerConfig.tiny(d_model=args.d_model, d_ff=args.d_ff, h=args.h, N=args.N,
                                    vocab_size=args.vocab_size, max_len=args.length, dropout_rate=0.1)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(FIRST_ORDINARY_ID, args.vocab_size, (args.rows, args.length)).astype(np.int32))
    batch = {"tokens": tokens, "segments": jnp.ones_like(tokens),
             "positions": jnp.broadcast_to(jnp.arange(args.length), tokens.shape)}
    for name, mlm_config in (("chosen positions only", MLMConfig()),
                             ("every position", MLMConfig(max_predictions=args.length))):
        objective = mlm_objective(mlm_config, 0.1, PAD_ID, BOS_ID, args.vocab_size)
        graphdef, params = nnx.split(TransformerMLM(config, rngs=nnx.Rngs(0)))

        def loss(params, key, objective=objective, graphdef=graphdef):
            sums = objective.fn(nnx.merge(graphdef, params), batch, deterministic=False,
                                rngs=nnx.Rngs(dropout=key, data=key))
            return sums["loss_sum"] / sums["tokens"]

        step = jax.jit(jax.value_and_grad(loss))
        jax.block_until_ready(step(params, jax.random.key(0)))  # compiles
        times = []
        for i in range(args.steps):
            start = time.perf_counter()
            jax.block_until_ready(step(params, jax.random.key(i + 1)))
            times.append(time.perf_counter() - start)
        print(f"{name}: {mlm_config.predictions_per_row(args.length)} logits a row, median step "
              f"{np.median(times) * 1000:.0f} ms ({args.rows} rows x {args.length} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
