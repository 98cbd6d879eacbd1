#!/usr/bin/env python
"""Per-device memory of the training step under pmap and on a mesh, from XLA's compiled memory
analysis, without allocating a single parameter.

    python benchmarks/memory.py                                   # base and big; pmap, fsdp=8, tensor=8
    python benchmarks/memory.py --models big --modes pmap fsdp=8 data=2,fsdp=4 --dtype bfloat16
    python benchmarks/memory.py --largest --output benchmarks/memory_cpu.json
    python benchmarks/memory.py --dtype bfloat16 --largest --budget_gb 16 32 95   # TPU v5e / v4 / v5p HBM per chip

Every input is abstract: the model is built under `nnx.eval_shape`, the Adam state by
`jax.eval_shape(tx.init, …)`, and the step is lowered on `jax.ShapeDtypeStruct`s and compiled; only
the compiled executable's `memory_analysis()` is read. Per device (pmap's executable is one
replica's program, so its figures are per device too):

    arguments  the state (parameters, Adam's two moments, step, key) and the batch rows it gets
    outputs    the new state and the metrics; donated, so all but a few bytes alias the arguments
    temp       XLA's peak temporaries: activations kept for the backward pass, gradients, Adam's
               intermediates, all-gathered parameters (fsdp), collective buffers
    peak       arguments + outputs − aliased + temp: what the step needs at once

Modes: "pmap" (every device a full copy of the state, the batch rows split), or a mesh spec of
`transformer/parallel/mesh.py` ("fsdp=8", "tensor=8", "data=2,fsdp=4", ...), which runs the same
step under `jax.jit` with the state sharded as `transformer/parallel/rules.py` declares.

`--largest` also finds, for every mode, the largest model of one family whose peak stays under
`--budget_gb` per device: N=6 layers per side, d_model = 512·k, d_ff = 4·d_model,
h = d_model / 64 (d_k = 64), the paper's 37,000-token shared vocabulary and the same batch: k=1 is
the base model's shape and k=2 exactly the big model. (The width is scaled, not N: compile time
grows with N, not with d_model.) It compiles k = 2, 4, 8, fits peak(d) = a·d² + b·d + c through
them, and walks from the predicted k one step at a time until k fits and k+1 does not, so the
answer is always two compiles that bracket it, never the fit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time


def _devices_flag(argv) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--devices", type=int, default=8)
    return pre.parse_known_args(argv)[0].devices


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only the CPU backend reads it: --devices fake host devices, so that 8-device layouts compile here.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_devices_flag(sys.argv[1:])}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from transformer.config import ConfigError, TransformerConfig  # noqa: E402
from transformer.tasks.translate import translation_objective
from transformer.models.transformer import Transformer  # noqa: E402
from transformer.parallel import rules  # noqa: E402
from transformer.parallel.mesh import ParallelConfig, check_model_fits, make_mesh  # noqa: E402
from transformer.training import TrainConfig, TrainState, compile_mesh_steps, compile_steps, make_optimizer  # noqa: E402

GB = 1e9  # decimal gigabytes throughout (an "80 GB" H100 has 80 GiB = 85.9 GB physically)
MODELS = {
    "tiny": lambda **kw: TransformerConfig.tiny(**kw),  # a smoke test of the script
    "base": lambda **kw: TransformerConfig.base(**kw),
    "big": lambda **kw: TransformerConfig.big(**kw),
}
WIDTH_STEP = 512  # d_model = 512·k: h = d_model / 64 is then a multiple of 8, so tensor=8 divides it


def family(k: int, n_layers: int, **overrides) -> TransformerConfig:
    """The scaled family of --largest: the big model's recipe at d_model = 512·k."""
    d = WIDTH_STEP * k
    return TransformerConfig.big(**{"d_model": d, "d_ff": 4 * d, "h": d // 64, "N": n_layers, **overrides})


def abstract_state(config: TransformerConfig, train_config: TrainConfig):
    """(graphdef, TrainState of ShapeDtypeStructs, tx): `create_train_state` without its arrays."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(params=train_config.seed)))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(train_config.optimizer, config.d_model, train_config.num_train_steps, params)[0]
    opt_state = jax.eval_shape(tx.init, params)
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=train_config.rng_impl)))
    counter = jax.ShapeDtypeStruct((), jnp.int32)
    state = TrainState(step=counter, micro_step=counter, params=params, opt_state=opt_state, rng=rng)
    return graphdef, state, tx


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def _with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying `shardings` (a tree of NamedShardings where `tree` has Variables)."""
    return jax.tree.map(
        lambda s, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub),
        shardings, tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def _held_bytes(tree) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs, sharded where they carry a sharding)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += _nbytes(shape, x.dtype)
    return total


def analyse(config: TransformerConfig, mode: str, rows: int, length: int, n_devices: int,
            train_config: TrainConfig) -> dict:
    """Compile the train step for `mode` on abstract inputs; per-device bytes from XLA."""
    graphdef, state, tx = abstract_state(config, train_config)
    devices = jax.devices()[:n_devices]
    batch_shape = (rows, length)
    objective = translation_objective(train_config.label_smoothing, config.pad_id)
    if mode == "pmap":
        if rows % n_devices:
            raise ConfigError(f"{rows} rows cannot be split across {n_devices} devices")
        train, _ = compile_steps(graphdef, tx, objective, train_config, n_devices)
        stack = lambda x: jax.ShapeDtypeStruct((n_devices, *x.shape), x.dtype)  # noqa: E731
        args = (jax.tree.map(stack, state),
                {k: jax.ShapeDtypeStruct((n_devices, rows // n_devices, length), jnp.int32)
                 for k in ("src", "tgt_in", "tgt_out")})
        held_params, held_opt = _held_bytes(state.params), _held_bytes(state.opt_state)
        rows_per_device = rows // n_devices
        mesh_sizes = None
    else:
        mesh = make_mesh(ParallelConfig(parallel="mesh", mesh=mode), devices)
        check_model_fits(config, mesh)
        shardings = rules.state_shardings(state, mesh)
        batch_sharding = rules.batch_sharding(mesh)
        split = math.prod(mesh.shape[a] for a in rules.RULES[rules.BATCH])
        if rows % split:
            raise ConfigError(f"{rows} rows cannot be split {split} ways (mesh {mode})")
        train, _ = compile_mesh_steps(graphdef, tx, objective, train_config, shardings, batch_sharding,
                                      rules.replicated(mesh))
        sharded = _with_shardings(state, shardings)
        args = (sharded, {k: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=batch_sharding)
                          for k in ("src", "tgt_in", "tgt_out")})
        held_params, held_opt = _held_bytes(sharded.params), _held_bytes(sharded.opt_state)
        rows_per_device = rows // split
        mesh_sizes = dict(mesh.shape)
    start = time.perf_counter()
    compiled = train.lower(*args).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(f"this backend ({jax.default_backend()}) gives no memory analysis")
    argument, output = stats.argument_size_in_bytes, stats.output_size_in_bytes
    alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    return {
        "d_model": config.d_model, "d_ff": config.d_ff, "h": config.h, "N": config.N,
        "vocab_size": config.vocab_size, "dtype": config.dtype, "remat": config.remat, "parameters": n_params,
        "mode": mode, "mesh": mesh_sizes, "devices": n_devices, "rows": rows, "length": length,
        "rows_per_device": rows_per_device,
        "params_bytes": held_params, "opt_state_bytes": held_opt,
        "argument_bytes": argument, "output_bytes": output, "alias_bytes": alias, "temp_bytes": temp,
        "peak_bytes": argument + output - alias + temp,
        "generated_code_bytes": stats.generated_code_size_in_bytes,
        "compile_s": round(compile_s, 1),
    }


def largest(mode, rows, length, n_devices, train_config, budget, n_layers, overrides, cache, log):
    """The largest k whose family(k) peak fits `budget` bytes per device, bracketed by two compiles."""

    def peak(k):
        key = (mode, k)
        if key not in cache:
            config = family(k, n_layers, **overrides)
            cache[key] = analyse(config, mode, rows, length, n_devices, train_config)
            log(cache[key])
        return cache[key]["peak_bytes"]

    ks = [2, 4, 8]
    ds = np.array([WIDTH_STEP * k for k in ks], dtype=np.float64)
    a, b, c = np.polyfit(ds, [peak(k) for k in ks], 2)
    roots = [r.real for r in np.roots([a, b, c - budget]) if abs(r.imag) < 1e-9 and r.real > 0]
    k = max(1, int(max(roots) // WIDTH_STEP)) if roots else 1
    tried = []
    while True:  # walk to the bracket: k fits, k+1 does not
        fits = peak(k) <= budget
        tried.append(k)
        if fits and peak(k + 1) > budget:
            break
        if fits:
            k += 1
        elif k == 1:
            k = 0
            break
        else:
            k -= 1
    return {"mode": mode, "k": k, "d_model": WIDTH_STEP * k,
            "fit": {"a": a, "b": b, "c": c, "predicted_d_model": max(roots) if roots else None},
            "fits": cache.get((mode, k)), "next": cache.get((mode, k + 1)),
            "compiled_k": sorted(k for (m, k) in cache if m == mode)}


def fmt_gb(x):
    return f"{x / GB:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["base", "big"], choices=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=["pmap", "fsdp=8", "tensor=8"],
                        help="'pmap' or a mesh spec such as fsdp=8, tensor=8, data=2,fsdp=4")
    parser.add_argument("--devices", type=int, default=8,
                        help="devices per layout; on CPU this many host devices are forced")
    parser.add_argument("--tokens", type=int, default=25000, help="tokens per side per batch (§5.1: ~25000)")
    parser.add_argument("--length", type=int, default=64, help="sentence length; rows = tokens // length, "
                        "rounded down to a multiple of --devices")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype; parameters and Adam state are float32 either way")
    parser.add_argument("--remat", default="none", choices=["none", "full", "dots"],
                        help="activation rematerialisation per layer (TransformerConfig.remat)")
    parser.add_argument("--largest", action="store_true",
                        help="also find the largest d_model of the family (module docstring) under --budget_gb")
    parser.add_argument("--budget_gb", type=float, nargs="+", default=[80.0],
                        help="per-device budget(s), 10^9 bytes; several (e.g. 16 32 95, TPU v5e / v4 / v5p HBM) "
                        "share their compiles")
    parser.add_argument("--largest_N", type=int, default=6, help="layers per side of the scaled family")
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    if len(jax.devices()) < args.devices:
        parser.error(f"--devices {args.devices} but this backend has {len(jax.devices())}")
    rows = max(args.tokens // args.length // args.devices, 1) * args.devices
    train_config = TrainConfig()
    print(f"batch: {rows} rows x {args.length} tokens per side ({rows * args.length} tokens), "
          f"{args.devices} {jax.devices()[0].platform} devices, compute {args.dtype}, remat {args.remat}", flush=True)

    def log(r):
        print(f"  compiled d_model={r['d_model']:5d} N={r['N']} {r['mode']:>12s}: peak {fmt_gb(r['peak_bytes'])} GB "
              f"(args {fmt_gb(r['argument_bytes'])}, temp {fmt_gb(r['temp_bytes'])}) in {r['compile_s']} s",
              flush=True)

    overrides = {"dtype": args.dtype, "remat": args.remat, "max_len": max(args.length, 1024)}
    results, skipped = [], []
    for name in args.models:
        config = MODELS[name](**overrides)
        for mode in args.modes:
            try:
                r = analyse(config, mode, rows, args.length, args.devices, train_config)
            except ConfigError as err:
                print(f"{name} {mode}: skipped ({err})", flush=True)
                skipped.append({"model": name, "mode": mode, "reason": str(err)})
                continue
            r["model"] = name
            results.append(r)
            log(r)

    searches = []
    if args.largest:
        cache = {}
        for r in results:  # the big model at the default N is the family's k=2: reuse its compile
            if r["model"] == "big" and args.largest_N == 6:
                cache[(r["mode"], 2)] = r
        for budget_gb in args.budget_gb:
            for mode in args.modes:
                print(f"largest model under {budget_gb:g} GB per device, {mode}:", flush=True)
                search = largest(mode, rows, args.length, args.devices, train_config, budget_gb * GB,
                                 args.largest_N, overrides, cache, log)
                searches.append({**search, "budget_gb": budget_gb})

    print()
    print(f"Per-device bytes (GB = 10^9) of the training step, {rows}x{args.length} tokens per side, "
          f"compute {args.dtype}, remat {args.remat}, float32 parameters and Adam state, {args.devices} {jax.devices()[0].platform} "
          f"devices; XLA compiled memory analysis")
    print()
    print("| model | mode | rows/device | params | Adam state | arguments | temp | outputs − aliased | peak | compile (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['model']} | {r['mode']} | {r['rows_per_device']} | {fmt_gb(r['params_bytes'])} | "
              f"{fmt_gb(r['opt_state_bytes'])} | {fmt_gb(r['argument_bytes'])} | {fmt_gb(r['temp_bytes'])} | "
              f"{fmt_gb(r['output_bytes'] - r['alias_bytes'])} | **{fmt_gb(r['peak_bytes'])}** | {r['compile_s']} |")
    if searches:
        print()
        print(f"Largest of the family N={args.largest_N}, d_model=512·k, d_ff=4·d_model, h=d_model/64 under "
              f"each budget per device:")
        print()
        print("| budget (GB) | mode | largest d_model | parameters | its peak | next (d_model + 512) peak | compiled d_model |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for s in searches:
            fit, nxt = s["fits"], s["next"]
            print(f"| {s['budget_gb']:g} | {s['mode']} | **{s['d_model']}** | {fit['parameters'] / 1e6:.0f} M | {fmt_gb(fit['peak_bytes'])} | "
                  f"{fmt_gb(nxt['peak_bytes'])} | {', '.join(str(WIDTH_STEP * k) for k in s['compiled_k'])} |"
                  if fit else f"| {s['budget_gb']:g} | {s['mode']} | none (d_model 512 does not fit) | | | | |")
    if args.output:
        device = jax.devices()[0]
        meta = {"device": f"{device.platform} {device.device_kind}", "devices": args.devices,
                "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "jax": jax.__version__,
                "backend": jax.default_backend(), "date": time.strftime("%Y-%m-%d"),
                "command": "python " + " ".join(sys.argv), "gb": GB,
                "budget_gb": args.budget_gb[0] if len(args.budget_gb) == 1 else args.budget_gb}
        with open(args.output, "w") as f:
            json.dump({"meta": meta, "rows": results, "skipped": skipped, "largest": searches}, f, indent=2,
                      default=float)


if __name__ == "__main__":
    main()
