#!/usr/bin/env python
"""Training-step throughput and MFU, this library side by side with what users would pick instead.

    python benchmarks/train_step.py                      # CPU default: the small config, 4k tokens
    python benchmarks/train_step.py --presets base big --batch_shapes 25000x64 --dtypes bfloat16 \\
        --attention reference xla cudnn --baselines flax torch  # on a GPU
    python benchmarks/train_step.py --devices all --parallel pmap mesh --mesh data=-1 --baselines  # pmap vs jit on a mesh

For each case: compile time apart; the median of --steps step times after --warmup steps, each
step bracketed by block_until_ready; tokens/s counts source + target tokens (the synthetic batches
have no padding); model FLOPs per step from transformer.models.flops (README.md of this folder); MFU
against the device's peak for the dtype (or --peak_tflops); peak device memory where the backend
reports it. Writes JSON (--out) and a PNG bar chart beside it.

--parallel picks how this library's step uses the devices of --devices: "pmap" (plain `jax.jit` on
one device, `jax.pmap` over several, every device a full copy of the state) or "mesh" (`jax.jit`
over a `jax.sharding.Mesh` of those devices shaped by --mesh, the state sharded as
transformer/parallel/rules.py declares). Both may be given; the baselines always run on one device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from transformer.nn.attention import resolve_attention_impl  # noqa: E402
from transformer.config import ATTENTION_IMPLS, ConfigError, TransformerConfig  # noqa: E402
from transformer.models.flops import forward_flops, peak_flops, train_flops  # noqa: E402
from transformer.training import TrainConfig, compile_steps, create_train_state  # noqa: E402

# "small": the CPU comparison point of the benchmarks' targets (d_model 256, 3+3 layers).
PRESETS = {
    "small": lambda **kw: TransformerConfig(**{"d_model": 256, "d_ff": 1024, "h": 4, "N": 3, "vocab_size": 8000, **kw}),
    "tiny": lambda **kw: TransformerConfig.tiny(**{"vocab_size": 8000, **kw}),
    "base": lambda **kw: TransformerConfig.base(**kw),
    "big": lambda **kw: TransformerConfig.big(**kw),
}


def synthetic_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = lambda: rng.integers(4, vocab, (rows, length)).astype(np.int32)  # noqa: E731
    return {"src": tokens(), "tgt_in": tokens(), "tgt_out": tokens()}


def timed(fn, warmup: int, steps: int):
    """(first call seconds, median seconds of `steps` calls after `warmup`)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def peak_memory(device) -> float | None:
    try:
        stats = device.memory_stats()
    except Exception:  # not every backend reports memory
        return None
    return stats.get("peak_bytes_in_use") / 2**30 if stats and "peak_bytes_in_use" in stats else None


def bench_ours(config, rows, length, devices, rng_impl, warmup, steps, mesh_spec=None):
    """Step and forward timings of this library: pmap/jit over `devices`, or, with `mesh_spec`, jit
    over a mesh of them."""
    train_config = TrainConfig(rng_impl=rng_impl)
    graphdef, state, tx = create_train_state(config, train_config)
    if mesh_spec is not None:
        return bench_ours_mesh(config, rows, length, devices, train_config, graphdef, state, tx, mesh_spec,
                               warmup, steps)
    train, _ = compile_steps(graphdef, tx, config, train_config, len(devices))
    batch = synthetic_batch(rows, length, config.vocab_size)
    if len(devices) > 1:
        from transformer.parallel.devices import put_on_devices, replicate_on_devices, shard_for_devices

        state = replicate_on_devices(state, devices)
        batch = put_on_devices(shard_for_devices(batch, len(devices)), devices)
    else:
        batch = jax.device_put(batch, devices[0])
    holder = {"state": state}

    def step():
        holder["state"], metrics = train(holder["state"], batch)
        return metrics

    first, median = timed(step, warmup, steps)
    # Inference: the model's forward pass to logits, as for the baselines (no loss).
    from flax import nnx

    params = holder["state"].params
    forward = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["src"], b["tgt_in"]))
    if len(devices) > 1:
        forward = jax.pmap(lambda p, b: nnx.merge(graphdef, p)(b["src"], b["tgt_in"]))
    _, forward_median = timed(lambda: forward(params, batch), warmup, steps)
    return first, median, forward_median


def bench_ours_mesh(config, rows, length, devices, train_config, graphdef, state, tx, mesh_spec, warmup, steps):
    from flax import nnx

    from transformer.parallel.mesh import ParallelConfig, check_model_fits, make_mesh
    from transformer.parallel.rules import batch_sharding, place, replicated, state_shardings
    from transformer.training import compile_mesh_steps

    mesh = make_mesh(ParallelConfig(parallel="mesh", mesh=mesh_spec), devices)
    check_model_fits(config, mesh)
    shardings = state_shardings(state, mesh)
    train, _ = compile_mesh_steps(graphdef, tx, config, train_config, shardings, batch_sharding(mesh), replicated(mesh))
    holder = {"state": place(state, shardings)}
    batch = place(synthetic_batch(rows, length, config.vocab_size), batch_sharding(mesh))

    def step():
        holder["state"], metrics = train(holder["state"], batch)
        return metrics

    first, median = timed(step, warmup, steps)
    forward = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["src"], b["tgt_in"]),
                      in_shardings=(shardings.params, batch_sharding(mesh)))
    _, forward_median = timed(lambda: forward(holder["state"].params, batch), warmup, steps)
    return first, median, forward_median


def mesh_label(spec: str, n_devices: int) -> str:
    """'data=-1' on 8 devices -> 'data=8' (axes of size 1 left out)."""
    from transformer.parallel.mesh import ParallelConfig

    sizes = ParallelConfig(parallel="mesh", mesh=spec).axis_sizes(n_devices)
    return ",".join(f"{k}={v}" for k, v in sizes.items() if v > 1) or "1 device"


def bench_flax_stock(config, rows, length, warmup, steps):
    from baselines import flax_stock_step

    model, optimizer, train_step, forward_step = flax_stock_step(config)
    batch = jax.device_put(synthetic_batch(rows, length, config.vocab_size))
    first, median = timed(lambda: train_step(model, optimizer, batch), warmup, steps)
    _, forward_median = timed(lambda: forward_step(model, batch), warmup, steps)
    return first, median, forward_median


def bench_torch(config, rows, length, compile, warmup, steps):
    from baselines import torch_step

    made = torch_step(config, compile)
    if made is None:
        return None
    import torch

    train_step, forward_step = made
    batch = synthetic_batch(rows, length, config.vocab_size)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def run(fn):
        def call():
            out = fn(batch)
            sync()
            return out
        return call

    first, median = timed(run(train_step), warmup, steps)
    _, forward_median = timed(run(forward_step), warmup, steps)
    return first, median, forward_median


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small"], choices=list(PRESETS))
    parser.add_argument("--batch_shapes", nargs="+", default=["4096x32"],
                        help="TOKENSxLENGTH: tokens per side per batch and sentence length")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--attention", nargs="+", default=["reference"], choices=list(ATTENTION_IMPLS),
                        help="attention_impl values; 'auto' is reported with what it resolved to")
    parser.add_argument("--devices", nargs="+", default=["1"], choices=["1", "all"])
    parser.add_argument("--parallel", nargs="+", default=["pmap"], choices=["pmap", "mesh"],
                        help="this library's step: pmap (jit on one device) and/or jit over a mesh")
    parser.add_argument("--mesh", default="data=-1",
                        help="mesh axis sizes for --parallel mesh, e.g. data=8 or data=2,fsdp=4 (-1: what is left)")
    parser.add_argument("--rng_impl", default="rbg", help="dropout random numbers for this library's step")
    parser.add_argument("--baselines", nargs="*", default=["flax", "torch"], choices=["flax", "torch"])
    parser.add_argument("--dropout_rate", type=float, default=None, help="default: the preset's")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's peak, for MFU")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step_results.json"))
    args = parser.parse_args()

    device = jax.local_devices()[0]
    rows_out = []
    for preset in args.presets:
        for shape in args.batch_shapes:
            tokens, length = (int(x) for x in shape.lower().split("x"))
            for dtype in args.dtypes:
                overrides = {"dtype": dtype, "max_len": max(length, 1024)}
                if args.dropout_rate is not None:
                    overrides["dropout_rate"] = args.dropout_rate
                base_config = PRESETS[preset](**overrides)
                peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device.device_kind, dtype)

                def record(impl, devices_used, rows, result, parallel="pmap", mesh=None):
                    if result is None:
                        return
                    first, median, forward_median = result
                    flops = train_flops(base_config, rows, length, length)
                    row = {
                        "preset": preset, "tokens_per_batch": tokens, "length": length, "rows": rows, "dtype": dtype,
                        "impl": impl, "devices": devices_used, "parallel": parallel, "mesh": mesh,
                        "compile_s": round(first, 3),
                        "step_s": median, "tokens_per_s": 2 * rows * length / median,
                        "forward_tokens_per_s": 2 * rows * length / forward_median,
                        "train_flops_per_step": flops,
                        "tflops_per_s": flops / median / 1e12,
                        "mfu": (flops / median / (peak * devices_used)) if peak else None,
                        "forward_mfu": (forward_flops(base_config, rows, length, length) / forward_median
                                        / (peak * devices_used)) if peak else None,
                        "peak_memory_gib": peak_memory(device),
                    }
                    rows_out.append(row)
                    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
                    print(f"{preset:5s} {shape:>10s} {dtype:8s} {impl:28s} dev={devices_used} "
                          f"step {median * 1e3:8.1f} ms  {row['tokens_per_s']:10.0f} tok/s  "
                          f"fwd {row['forward_tokens_per_s']:10.0f} tok/s  MFU {mfu}  compile {first:.1f} s", flush=True)

                for attention in args.attention:
                    try:
                        config = dataclasses.replace(base_config, attention_impl=attention)
                        resolved = resolve_attention_impl(config)
                    except ConfigError as err:  # e.g. cudnn without a GPU or in float32: skipped, said why
                        print(f"ours ({attention}): skipped ({err})")
                        continue
                    if attention == "auto":
                        attention = f"auto: {resolved}"
                    for devices_arg in args.devices:
                        devices = jax.local_devices() if devices_arg == "all" else jax.local_devices()[:1]
                        if devices_arg == "all" and len(devices) == 1 and "1" in args.devices:
                            continue  # "all" is the one device already measured
                        rows = max(tokens // length // len(devices), 1) * len(devices)
                        for parallel in args.parallel:
                            if parallel == "pmap":
                                record(f"ours ({attention})", len(devices), rows,
                                       bench_ours(config, rows, length, devices, args.rng_impl, args.warmup,
                                                  args.steps))
                                continue
                            try:
                                label = mesh_label(args.mesh, len(devices))
                                result = bench_ours(config, rows, length, devices, args.rng_impl, args.warmup,
                                                    args.steps, mesh_spec=args.mesh)
                            except ConfigError as err:  # a mesh these devices or this model cannot take
                                print(f"ours ({attention}, mesh {args.mesh}, {len(devices)} devices): skipped ({err})")
                                continue
                            record(f"ours ({attention}, mesh {label})", len(devices), rows, result, "mesh", label)
                rows = max(tokens // length, 1)
                if "flax" in args.baselines:
                    record("flax stock nnx", 1, rows, bench_flax_stock(base_config, rows, length, args.warmup, args.steps))
                if "torch" in args.baselines and not (dtype == "bfloat16" and jax.default_backend() == "cpu"):
                    for compile in (False, True):
                        name = "torch nn.Transformer" + (" compile" if compile else " eager")
                        try:
                            record(name, 1, rows, bench_torch(base_config, rows, length, compile, args.warmup, args.steps))
                        except Exception as err:  # a torch.compile that fails here is reported, not fatal
                            print(f"{name}: failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})")

    ratios = []
    for row in rows_out:
        if row["impl"].startswith("ours") and row["devices"] == 1 and row["parallel"] == "pmap":
            for other in rows_out:
                same = all(other[k] == row[k] for k in ("preset", "tokens_per_batch", "length", "dtype"))
                if same and not other["impl"].startswith("ours"):
                    ratios.append({"ours": row["impl"], "vs": other["impl"], "preset": row["preset"], "dtype": row["dtype"],
                                   "shape": f"{row['tokens_per_batch']}x{row['length']}",
                                   "train_ratio": row["tokens_per_s"] / other["tokens_per_s"],
                                   "forward_ratio": row["forward_tokens_per_s"] / other["forward_tokens_per_s"]})
    for r in ratios:
        print(f"{r['preset']} {r['shape']} {r['dtype']}: {r['ours']} / {r['vs']} = {r['train_ratio']:.2f}x train, "
              f"{r['forward_ratio']:.2f}x forward")
    meta = {"device": device.device_kind if device.device_kind == device.platform else f"{device.platform} {device.device_kind}", "device_count": jax.local_device_count(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv)}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows_out, "ratios": ratios}, f, indent=2)
    chart(rows_out, args.out.rsplit(".", 1)[0] + ".png", meta)


def chart(rows, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    labels = [f"{r['preset']} {r['dtype']}\n{r['impl']}" + (f" ×{r['devices']}" if r["devices"] > 1 else "") for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.2), 4))
    colors = ["tab:blue" if r["impl"].startswith("ours") else "tab:gray" for r in rows]
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("training tokens/s (source + target)")
    ax.set_title(f"training throughput, {meta['device']}, {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
