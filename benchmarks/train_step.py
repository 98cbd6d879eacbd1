#!/usr/bin/env python
"""Training-step throughput and MFU, this library side by side with what users would pick instead.

    python benchmarks/train_step.py                      # CPU default: the small config, 4k tokens
    python benchmarks/train_step.py --presets base big --batch_shapes 25000x64 --dtypes bfloat16 \\
        --attention reference xla cudnn --baselines flax torch --bucketed 25000  # on a GPU
    python benchmarks/train_step.py --devices all --parallel pmap mesh --mesh data=-1 --baselines  # pmap vs jit on a mesh
    python benchmarks/train_step.py --family lm --lm_batch_shapes 4096x1024   # the decoder-only model, 1k context

--family picks the models timed, one or both: "translate" (default), the encoder-decoder
(`Transformer`, the translation objective) on --batch_shapes, beside Flax stock NNX layers and
PyTorch's nn.Transformer; "lm", the decoder-only model (`TransformerLM`, the LM task's objective)
on --lm_batch_shapes, beside the same Flax stock layers under a causal mask and PyTorch's
nn.TransformerEncoder under a causal mask (benchmarks/baselines.py). Every row says its family.

For each case: compile time apart (this library's step is compiled ahead of time, and XLA's memory
analysis of the compiled step gives its bytes per device); the median of --steps step times after
--warmup steps, each step bracketed by block_until_ready; tokens/s counts source + target tokens
for the translate family and each row's tokens once for the lm family (the synthetic batches have
no padding; each row's `tokens_counted` says which); model FLOPs per step from
transformer.models.flops (README.md of this folder); MFU against the device's peak for the dtype
(or --peak_tflops). Writes JSON (--out) and a PNG bar chart beside it.

--parallel picks how this library's step uses the devices of --devices: "jit" (`jax.jit` on one
device), "pmap" (`jax.pmap`, every device a full copy of the state; also on one device) or "mesh"
(`jax.jit` over a `jax.sharding.Mesh` of those devices shaped by --mesh, the state sharded as
transformer/parallel/rules.py declares). Several may be given; the baselines always run on one device.

--bucketed TOKENS adds a translate-family pass of length-bucketed batches, made as train.py makes them
(`data.BatchPlan` over synthetic sentence lengths), estimated from its most frequent shapes
(`bench_bucketed` says how).
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
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from transformer.nn.attention import resolve_attention_impl  # noqa: E402
from transformer.tasks.lm import lm_objective  # noqa: E402
from transformer.tasks.translate import translation_objective  # noqa: E402
from transformer.config import ATTENTION_IMPLS, ConfigError, TransformerConfig  # noqa: E402
from transformer.models.flops import forward_flops, lm_forward_flops, lm_train_flops, peak_flops, train_flops  # noqa: E402
from transformer.models.transformer import Transformer, TransformerLM  # noqa: E402
from transformer.training import TrainConfig, compile_steps, create_train_state  # noqa: E402
from transformer.training.step import Objective  # noqa: E402

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


def synthetic_lm_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows as `data.TextPlan` collates language-model pieces of length + 1 random tokens, one per
    row (no padding): tokens_in the piece but its last token, tokens_out but its first, positions
    0 … length - 1, segments 1."""
    piece = np.random.default_rng(seed).integers(4, vocab, (rows, length + 1)).astype(np.int32)
    return {"tokens_in": piece[:, :-1].copy(), "tokens_out": piece[:, 1:].copy(),
            "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
            "segments": np.ones((rows, length), np.int32)}


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family timed here: this library's model and its task's objective, the forward pass
    timed, the synthetic batch, the FLOPs, what tokens/s counts, and the PyTorch baseline's name
    (benchmarks/baselines.py builds both baselines of each family)."""

    model_cls: Callable[..., Any]
    objective: Callable[[float, int], Objective]  # (label_smoothing, pad_id) -> the task's objective
    logits: Callable[[Any, dict], jax.Array]  # (model, batch) -> logits, the forward pass timed
    batch: Callable[[int, int, int], dict[str, np.ndarray]]  # (rows, length, vocab)
    forward_flops: Callable[[TransformerConfig, int, int], float]  # (config, rows, length)
    train_flops: Callable[[TransformerConfig, int, int], float]
    sides: int  # sequences of `length` tokens per row that tokens/s counts
    tokens_counted: str  # what tokens/s counts, said in every row and printed line
    torch_name: str


FAMILIES = {
    # The encoder-decoder on sentence pairs: a row is a source and a target of `length` tokens each.
    "translate": Family(Transformer, translation_objective, lambda m, b: m(b["src"], b["tgt_in"]), synthetic_batch,
                        lambda c, rows, n: forward_flops(c, rows, n, n), lambda c, rows, n: train_flops(c, rows, n, n),
                        2, "source + target", "torch nn.Transformer"),
    # The decoder-only language model: a row is one sequence of `length` tokens.
    "lm": Family(TransformerLM, lm_objective,
                 lambda m, b: m(b["tokens_in"], positions=b["positions"], segments=b["segments"]),
                 synthetic_lm_batch, lm_forward_flops, lm_train_flops, 1, "each row's tokens once",
                 "torch nn.TransformerEncoder"),
}


def bucketed_plan(tokens: int, max_length: int, vocab: int, multiple: int, pairs: int = 40_000, seed: int = 0):
    """Synthetic sentence pairs batched as train.py batches them (`data.BatchPlan`: buckets of 8
    tokens, about `tokens` tokens per side per batch, rows a multiple of `multiple`). Lengths: source
    log-normal with median 24 tokens (a BPE-tokenised WMT sentence has about 25–30), target the
    source's times a log-normal factor, both with EOS and cut at max_length - 1. Returns the plan
    and its epoch's batch plans (length, rows, members)."""
    from transformer.data import BatchPlan, Examples

    rng = np.random.default_rng(seed)
    src_len = np.clip(np.round(rng.lognormal(np.log(24), 0.55, pairs)), 2, max_length - 1).astype(int)
    tgt_len = np.clip(np.round(src_len * rng.lognormal(0.0, 0.15, pairs)), 2, max_length - 1).astype(int)
    ids = lambda n: rng.integers(4, vocab, n).astype(np.int32)  # noqa: E731
    examples = Examples([ids(n) for n in src_len], [ids(n) for n in tgt_len], pad_id=0, bos_id=2)
    plan = BatchPlan(examples, tokens, max_length, multiple, seed=seed)
    return plan, plan.epoch(0)


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


@dataclasses.dataclass
class Timing:
    compile_s: float  # this library: lowering + compiling the step; baselines: the first call
    step_s: float  # median of the timed steps
    forward_s: float | None = None  # median forward pass to logits (no loss)
    step_memory_gib: float | None = None  # per device: XLA's analysis of the compiled step, or torch's peak


def peak_memory(device) -> float | None:
    """The allocator's peak so far in this process (all cases run in it until now), GiB."""
    try:
        stats = device.memory_stats()
    except Exception:  # not every backend reports memory
        return None
    return stats.get("peak_bytes_in_use") / 2**30 if stats and "peak_bytes_in_use" in stats else None


def compile_ahead(train, state, batch):
    """(compiled step, seconds, GiB per device): XLA's memory analysis of the compiled step, peak =
    arguments + outputs - aliased (the donated state) + temporaries, as benchmarks/memory.py."""
    start = time.perf_counter()
    compiled = train.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    try:
        stats = compiled.memory_analysis()
    except Exception:  # a backend without the analysis
        stats = None
    gib = None if stats is None else (stats.argument_size_in_bytes + stats.output_size_in_bytes
                                      - stats.alias_size_in_bytes + stats.temp_size_in_bytes) / 2**30
    return compiled, seconds, gib


def prepare_ours(config, devices, train_config, parallel, mesh_spec=None, family="translate"):
    """This library's step for `family` (FAMILIES: its model, trained on its task's objective) on
    `devices`: parallel "jit" (one device), "pmap" (`jax.pmap`, also on one device) or "mesh"
    (`jax.jit` over a mesh shaped by `mesh_spec`, the state sharded as transformer/parallel/rules.py
    declares). Returns (train, state, place(batch), forward)."""
    from flax import nnx

    family = FAMILIES[family]
    graphdef, state, tx = create_train_state(config, train_config, model_cls=family.model_cls)
    objective = family.objective(train_config.label_smoothing, config.pad_id)
    logits = lambda p, b: family.logits(nnx.merge(graphdef, p), b)  # noqa: E731
    if parallel == "jit":
        if len(devices) != 1:
            raise ConfigError(f"--parallel jit runs on one device, not {len(devices)}")
        train, _ = compile_steps(graphdef, tx, objective, train_config, 1)
        return train, jax.device_put(state, devices[0]), lambda b: jax.device_put(b, devices[0]), jax.jit(logits)
    if parallel == "pmap":
        from transformer.parallel.devices import put_on_devices, replicate_on_devices, shard_for_devices

        train, _ = compile_steps(graphdef, tx, objective, train_config, len(devices), pmap=True)
        return (train, replicate_on_devices(state, devices),
                lambda b: put_on_devices(shard_for_devices(b, len(devices)), devices), jax.pmap(logits))
    from transformer.parallel.mesh import ParallelConfig, check_model_fits, make_mesh
    from transformer.parallel.rules import batch_sharding, place, replicated, state_shardings
    from transformer.training import compile_mesh_steps

    mesh = make_mesh(ParallelConfig(parallel="mesh", mesh=mesh_spec), devices)
    check_model_fits(config, mesh)
    shardings = state_shardings(state, mesh)
    train, _ = compile_mesh_steps(graphdef, tx, objective, train_config, shardings, batch_sharding(mesh), replicated(mesh))
    forward = jax.jit(logits, in_shardings=(shardings.params, batch_sharding(mesh)))
    return train, place(state, shardings), lambda b: place(b, batch_sharding(mesh)), forward


def bench_ours(config, batches, devices, rng_impl, warmup, steps, parallel, mesh_spec=None, forward=True,
               family="translate"):
    """A Timing per batch in `batches` (one shape each, compiled ahead of time), the state carried
    from one to the next; the forward pass is timed on the first batch only when `forward`."""
    train, state, place_batch, forward_fn = prepare_ours(config, devices, TrainConfig(rng_impl=rng_impl), parallel,
                                                         mesh_spec, family)
    holder = {"state": state}
    timings = []
    for batch in batches:
        batch = place_batch(batch)
        compiled, compile_s, gib = compile_ahead(train, holder["state"], batch)

        def step():
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics

        _, median = timed(step, warmup, steps)
        forward_median = None
        if forward and not timings:
            _, forward_median = timed(lambda: forward_fn(holder["state"].params, batch), warmup, steps)
        timings.append(Timing(compile_s, median, forward_median, gib))
    return timings


def mesh_label(spec: str, n_devices: int) -> str:
    """'data=-1' on 8 devices -> 'data=8' (axes of size 1 left out)."""
    from transformer.parallel.mesh import ParallelConfig

    sizes = ParallelConfig(parallel="mesh", mesh=spec).axis_sizes(n_devices)
    return ",".join(f"{k}={v}" for k, v in sizes.items() if v > 1) or "1 device"


def bench_flax_stock(config, rows, length, warmup, steps, family="translate"):
    from baselines import flax_stock_step

    model, optimizer, train_step, forward_step = flax_stock_step(config, family)
    batch = jax.device_put(FAMILIES[family].batch(rows, length, config.vocab_size))
    first, median = timed(lambda: train_step(model, optimizer, batch), warmup, steps)
    _, forward_median = timed(lambda: forward_step(model, batch), warmup, steps)
    return Timing(first, median, forward_median)


def bench_torch(config, rows, length, compile, warmup, steps, family="translate"):
    from baselines import torch_step

    made = torch_step(config, compile, family)
    if made is None:
        return None
    import torch

    train_step, forward_step = made
    batch = FAMILIES[family].batch(rows, length, config.vocab_size)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def run(fn):
        def call():
            out = fn(batch)
            sync()
            return out
        return call

    try:
        first, median = timed(run(train_step), warmup, steps)
        memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        _, forward_median = timed(run(forward_step), warmup, steps)
    finally:
        del made, train_step, forward_step
        if cuda:  # PyTorch's caching allocator would keep this memory from the cases after it
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    return Timing(first, median, forward_median, memory)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", default=["translate"], choices=list(FAMILIES),
                        help="translate: the encoder-decoder (--batch_shapes); lm: the decoder-only model "
                             "(--lm_batch_shapes)")
    parser.add_argument("--presets", nargs="+", default=["small"], choices=list(PRESETS))
    parser.add_argument("--batch_shapes", nargs="*", default=["4096x32"],
                        help="translate family, TOKENSxLENGTH: tokens per side per batch and sentence length "
                             "(none: only --bucketed)")
    parser.add_argument("--lm_batch_shapes", nargs="*", default=["4096x1024"],
                        help="lm family, TOKENSxLENGTH: tokens per batch (a row's tokens, one side) and row length")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--attention", nargs="+", default=["reference"], choices=list(ATTENTION_IMPLS),
                        help="attention_impl values; 'auto' is reported with what it resolved to")
    parser.add_argument("--devices", nargs="+", default=["1"], choices=["1", "all"])
    parser.add_argument("--parallel", nargs="+", default=["jit"], choices=["jit", "pmap", "mesh"],
                        help="this library's step: jit (one device), pmap (also on one device), jit over a mesh")
    parser.add_argument("--mesh", default="data=-1",
                        help="mesh axis sizes for --parallel mesh, e.g. data=8 or data=2,fsdp=4 (-1: what is left)")
    parser.add_argument("--rng_impl", default="rbg", help="dropout random numbers for this library's step")
    parser.add_argument("--baselines", nargs="*", default=["flax", "torch"], choices=["flax", "torch"])
    parser.add_argument("--bucketed", type=int, default=0, metavar="TOKENS",
                        help="also time a pass of length-bucketed batches of TOKENS per side, as train.py batches "
                             "them (translate family, this library, one device, jit, --bucketed_attention)")
    parser.add_argument("--bucketed_max_length", type=int, default=128)
    parser.add_argument("--bucketed_shapes", type=int, default=6,
                        help="time the most frequent batch shapes of the pass, at most this many")
    parser.add_argument("--bucketed_attention", default="auto", choices=list(ATTENTION_IMPLS))
    parser.add_argument("--dropout_rate", type=float, default=None, help="default: the preset's")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's peak, for MFU")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step_results.json"))
    args = parser.parse_args()
    if args.bucketed and "translate" not in args.family:
        parser.error("--bucketed times the translate family: add --family translate")
    # (family, shape) in the order given: each family with its own shapes.
    cases = [(family, shape) for family in args.family
             for shape in (args.batch_shapes if family == "translate" else args.lm_batch_shapes)]

    device = jax.local_devices()[0]
    meta = {"device": device.device_kind if device.device_kind == device.platform else f"{device.platform} {device.device_kind}", "device_count": jax.local_device_count(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv)}
    rows_out: list[dict] = []
    failures: list[dict] = []  # cases that raised: reported, and the other cases go on

    def save():
        """The JSON after every case, so that a run cut short keeps what it measured."""
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows_out, "ratios": ratios(rows_out), "failures": failures}, f, indent=2)

    def attempt(what: str, fn):
        """fn(), or None: a case this device or model cannot take is skipped (ConfigError); any other
        error (out of memory, a backend's failure) is reported and recorded."""
        try:
            return fn()
        except ConfigError as err:
            print(f"{what}: skipped ({err})", flush=True)
        except Exception as err:
            lines = str(err).strip().splitlines()
            message = f"{type(err).__name__}: {lines[0][:300] if lines else ''}"
            print(f"{what}: FAILED ({message})", flush=True)
            failures.append({"case": what, "error": message})
            save()
        return None

    for preset in args.presets:
        for dtype in args.dtypes:
            peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device.device_kind, dtype)
            if args.bucketed:  # first: the baselines' allocators keep what they reserved
                row = attempt(f"{preset} {dtype} bucketed ({args.bucketed_attention})",
                              lambda: bench_bucketed(preset, dtype, args, peak, device))
                if row is not None:
                    rows_out.append(row)
                    save()
            for family_name, shape in cases:
                family = FAMILIES[family_name]
                tokens, length = (int(x) for x in shape.lower().split("x"))
                base_config = make_config(preset, dtype, length, args.dropout_rate)
                case = f"{family_name} {preset} {shape} {dtype}"

                def record(impl, devices_used, rows, timing, parallel="jit", mesh=None):
                    if timing is None:
                        return
                    flops = family.train_flops(base_config, rows, length)
                    counted = family.sides * rows * length
                    row = {
                        "family": family_name, "preset": preset, "tokens_per_batch": tokens, "length": length,
                        "rows": rows, "dtype": dtype,
                        "impl": impl, "devices": devices_used, "parallel": parallel, "mesh": mesh,
                        "compile_s": round(timing.compile_s, 3),
                        "step_s": timing.step_s, "tokens_per_s": counted / timing.step_s,
                        "forward_tokens_per_s": counted / timing.forward_s,
                        "tokens_counted": family.tokens_counted,
                        "train_flops_per_step": flops,
                        "tflops_per_s": flops / timing.step_s / 1e12,
                        "mfu": (flops / timing.step_s / (peak * devices_used)) if peak else None,
                        "forward_mfu": (family.forward_flops(base_config, rows, length) / timing.forward_s
                                        / (peak * devices_used)) if peak else None,
                        "step_memory_gib": timing.step_memory_gib,
                        "peak_memory_gib": peak_memory(device),
                    }
                    rows_out.append(row)
                    print_row(row, shape)
                    save()

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
                        batch = family.batch(rows, length, config.vocab_size)
                        for parallel in args.parallel:
                            if parallel == "jit" and len(devices) > 1:
                                continue  # jit is the one-device case; several devices take pmap or mesh
                            label = mesh_label(args.mesh, len(devices)) if parallel == "mesh" else None
                            name = f"ours ({attention}" + (f", mesh {label})" if label else f", {parallel})")
                            timings = attempt(f"{case} {name}, {len(devices)} device(s)",
                                              lambda: bench_ours(config, [batch], devices, args.rng_impl, args.warmup,
                                                                 args.steps, parallel, args.mesh, family=family_name))
                            if timings:
                                record(name, len(devices), rows, timings[0], parallel, label)
                rows = max(tokens // length, 1)
                if "flax" in args.baselines:
                    record("flax stock nnx", 1, rows, attempt(f"{case} flax stock nnx",
                                                              lambda: bench_flax_stock(base_config, rows, length,
                                                                                       args.warmup, args.steps,
                                                                                       family_name)))
                if "torch" in args.baselines and not (dtype == "bfloat16" and jax.default_backend() == "cpu"):
                    for compile in (False, True):
                        name = family.torch_name + (" compile" if compile else " eager")
                        record(name, 1, rows, attempt(f"{case} {name}",
                                                      lambda: bench_torch(base_config, rows, length, compile,
                                                                          args.warmup, args.steps, family_name)))

    save()
    for r in ratios(rows_out):
        print(f"{r['family']} {r['preset']} {r['shape']} {r['dtype']}: {r['ours']} / {r['vs']} = "
              f"{r['train_ratio']:.2f}x train, {r['forward_ratio']:.2f}x forward")
    if failures:
        print(f"{len(failures)} case(s) failed: " + "; ".join(f["case"] for f in failures))
    chart(rows_out, args.out.rsplit(".", 1)[0] + ".png", meta)
    sys.exit(1 if failures else 0)


def ratios(rows: list[dict]) -> list[dict]:
    """This library on one device under jit against each baseline on the same batch: the same
    family, preset, shape and dtype."""
    out = []
    for row in rows:
        if row["impl"].startswith("ours") and row["devices"] == 1 and row["parallel"] == "jit" and row["length"]:
            for other in rows:
                same = all(other[k] == row[k] for k in ("family", "preset", "tokens_per_batch", "length", "dtype"))
                if same and not other["impl"].startswith("ours"):
                    out.append({"ours": row["impl"], "vs": other["impl"], "family": row["family"],
                                "preset": row["preset"], "dtype": row["dtype"],
                                "shape": f"{row['tokens_per_batch']}x{row['length']}",
                                "train_ratio": row["tokens_per_s"] / other["tokens_per_s"],
                                "forward_ratio": row["forward_tokens_per_s"] / other["forward_tokens_per_s"]})
    return out


def make_config(preset: str, dtype: str, length: int, dropout_rate: float | None) -> TransformerConfig:
    overrides = {"dtype": dtype, "max_len": max(length, 1024)}
    if dropout_rate is not None:
        overrides["dropout_rate"] = dropout_rate
    return PRESETS[preset](**overrides)


def print_row(row: dict, shape: str) -> None:
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
    forward = f"fwd {row['forward_tokens_per_s']:10.0f} tok/s  " if row.get("forward_tokens_per_s") else ""
    print(f"{row['family']:9s} {row['preset']:5s} {shape:>10s} {row['dtype']:8s} {row['impl']:28s} "
          f"dev={row['devices']} step {row['step_s'] * 1e3:8.1f} ms  {row['tokens_per_s']:10.0f} tok/s  {forward}"
          f"MFU {mfu}  compile {row['compile_s']:.1f} s  (tok/s counts {row['tokens_counted']})", flush=True)


def bench_bucketed(preset, dtype, args, peak, device) -> dict | None:
    """One epoch of length-bucketed batches (`bucketed_plan`), estimated from the most frequent
    shapes: each is compiled and timed; the pass's time is the sum over its batches of their shape's
    median step, over the batches whose shape was timed (the row says which share that is).
    tokens/s counts real (non-padding) source + target tokens; MFU counts the FLOPs of the padded
    shapes, which is what the device computes."""
    config = make_config(preset, dtype, args.bucketed_max_length, args.dropout_rate)
    try:
        config = dataclasses.replace(config, attention_impl=args.bucketed_attention)
        resolved = resolve_attention_impl(config)
    except ConfigError as err:
        print(f"bucketed ({args.bucketed_attention}): skipped ({err})")
        return None
    plan, plans = bucketed_plan(args.bucketed, args.bucketed_max_length, config.vocab_size, 1)
    frequency: dict[tuple[int, int], int] = {}
    for length, rows, _ in plans:
        frequency[(length, rows)] = frequency.get((length, rows), 0) + 1
    shapes = sorted(frequency, key=lambda s: -frequency[s])[: args.bucketed_shapes]
    batches = [plan.collate(next(p for p in plans if (p[0], p[1]) == s)) for s in shapes]
    timings = bench_ours(config, batches, jax.local_devices()[:1], args.rng_impl, args.warmup, args.steps, "jit",
                         forward=False)
    median = dict(zip(shapes, (t.step_s for t in timings)))
    timed_plans = [p for p in plans if (p[0], p[1]) in median]
    seconds = sum(median[(length, rows)] for length, rows, _ in timed_plans)
    real = sum(len(plan.examples.src[i]) + len(plan.examples.tgt[i]) for _, _, members in timed_plans for i in members)
    padded = sum(2 * length * rows for length, rows, _ in timed_plans)
    flops = sum(train_flops(config, rows, length, length) for length, rows, _ in timed_plans)
    impl = args.bucketed_attention if args.bucketed_attention != "auto" else f"auto: {resolved}"
    row = {
        "family": "translate", "preset": preset, "tokens_per_batch": args.bucketed, "length": None, "rows": None,
        "dtype": dtype,
        "impl": f"ours ({impl}, jit), bucketed", "devices": 1, "parallel": "jit", "mesh": None,
        "bucketed": {"max_length": args.bucketed_max_length, "batches_in_pass": len(plans),
                     "batches_timed": len(timed_plans),
                     "shapes": [{"length": s[0], "rows": s[1], "batches": frequency[s], "step_s": median[s],
                                 "compile_s": t.compile_s, "step_memory_gib": t.step_memory_gib}
                                for s, t in zip(shapes, timings)],
                     "padding_fraction": 1 - real / padded,  # of the timed batches
                     "pass_padding_fraction": 1 - sum(len(plan.examples.src[i]) + len(plan.examples.tgt[i])
                                                      for _, _, members in plans for i in members)
                     / sum(2 * length * rows for length, rows, _ in plans)},
        "compile_s": round(sum(t.compile_s for t in timings), 3),
        "step_s": seconds / len(timed_plans), "tokens_per_s": real / seconds, "forward_tokens_per_s": None,
        "tokens_counted": "real source + target",
        "train_flops_per_step": flops / len(timed_plans), "tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / peak if peak else None, "forward_mfu": None,
        "step_memory_gib": max((t.step_memory_gib for t in timings if t.step_memory_gib is not None), default=None),
        "peak_memory_gib": peak_memory(device),
    }
    print_row(row, "bucketed")
    print(f"      {len(timed_plans)} of the pass's {len(plans)} batches have a timed shape "
          f"(rows × length: {', '.join(f'{r}×{n}' for n, r in shapes)}); padding {row['bucketed']['padding_fraction']:.1%} "
          f"of the timed batches, {row['bucketed']['pass_padding_fraction']:.1%} of the pass", flush=True)
    return row


def chart(rows, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    labels = [f"{r['family']} {r['preset']} {r['dtype']}\n{r['impl']}" + (f" ×{r['devices']}" if r["devices"] > 1 else "")
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.2), 4))
    colors = ["tab:blue" if r["impl"].startswith("ours") else "tab:gray" for r in rows]
    ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
    counted = list(dict.fromkeys((r["family"], r["tokens_counted"]) for r in rows))
    title = f"training throughput, {meta['device']}, {meta['date']}"
    if len(counted) == 1:
        ax.set_ylabel(f"training tokens/s ({counted[0][1]})")
    else:  # too long for the axis: under the title
        ax.set_ylabel("training tokens/s")
        title += "\ntokens/s counts " + "; ".join(f"{family}: {what}" for family, what in counted)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
