#!/usr/bin/env python
"""Everything the project measures on an accelerator, in one command that writes JSON, PNG and a
Markdown table into one folder.

    python benchmarks/gpu_suite.py --out_dir /tmp/suite --bundle $OUT --deadline_s 540   # on the GPU
    python benchmarks/gpu_suite.py --size cpu --out_dir /tmp/suite      # the same parts at CPU size (proves the suite)
    python benchmarks/gpu_suite.py --parts train_big parallel_base      # some of the parts
    python benchmarks/gpu_suite.py --parts multi30k                     # train.py on data/multi30k, to the test BLEU
    python benchmarks/gpu_suite.py --parts                              # only rebuild the summary

Parts, each a child process (one that fails leaves the others; each starts with an empty device),
the most wanted first (default order: train_base, decode, train_big, parallel_base, parallel_big):
- train_P, for each preset P of the size: `train_step.py` in bfloat16: a pass of length-bucketed
  batches as train.py makes them (25,000 tokens per side); then, at the paper's batch as rows of
  64, each attention implementation under jit beside Flax stock NNX layers and PyTorch
  `nn.Transformer` (bfloat16 autocast, eager and `torch.compile`) on the same batch.
- decode: greedy and beam 4 with the KV cache, base model, batch 64 and 256, up to 50 tokens past a
  32-token source (§6.1: max length = input + 50), bfloat16.
- parallel_P: the same step under `jax.pmap` and under `jax.jit` over a mesh (`data=-1`: every
  local device), with the attention that `auto` picks.
- multi30k (named only: about ten minutes by itself): train.py on German→English Multi30k from
  `data/multi30k`, a folder inside the checkout that git ignores
  (`mkdir -p data && cp -r ../shared/data/multi30k data/`), to sacreBLEU on the test split.

Within a part every case is guarded: one that fails (out of memory, a backend's error) is reported
in the part's JSON and the table, and the part goes on. A part is killed (its process group) after
--timeout_s, or when --deadline_s, the whole command's time, runs out; a part that would start with
under a minute left is skipped. After every part the summary is rewritten: DIR/suite.json (every
part's rows, command, exit code and time), DIR/suite.md (the tables, failures, and each target of
the GPU issue beside what was measured or "not measured") and DIR/suite.png; with --bundle, those
three and parts.tar.gz (the parts' JSON, logs and charts) are copied there too (a device machine
hands back only a few files). The summary covers every part found in DIR, so calls with the same
DIR on the same machine add up. JAX does not preallocate device memory in the children
(XLA_PYTHON_CLIENT_PREALLOCATE=false), so that PyTorch can allocate beside it; PyTorch's cache is
emptied after each of its cases.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MULTI30K_DIR = os.path.join(ROOT, "data", "multi30k")
MFU_TARGETS = {"base": 0.45, "big": 0.55}  # the GPU issue's targets, bfloat16, one H100
BASELINES = ["flax stock nnx", "torch nn.Transformer eager", "torch nn.Transformer compile"]  # as train_step.py names them

# Per size: the presets, and the flags of each kind of part.
SIZES = {
    "gpu": {
        "presets": ["base", "big"],
        "batch": ["--batch_shapes", "25000x64", "--dtypes", "bfloat16", "--warmup", "3", "--steps", "10"],
        "bucketed": ["--bucketed", "25000", "--bucketed_max_length", "128", "--bucketed_shapes", "4"],
        "decode": ["--config", "base", "--vocab_size", "37000", "--dtype", "bfloat16", "--batch", "64", "256",
                   "--src_len", "32", "--lengths", "82", "--methods", "greedy", "beam4", "--repeats", "3"],
        # Not yet run on a GPU: a first guess at a recipe that fits ten minutes (README.md says so).
        "multi30k": ["--config", "base", "--dtype", "bfloat16", "--attention_impl", "auto", "--vocab_size", "8000",
                     "--batch_tokens", "8000", "--dropout_rate", "0.3", "--num_train_steps", "2500",
                     "--warmup_steps", "1000", "--eval_every", "500", "--checkpoint_every", "2500",
                     "--keep_checkpoints", "1"],
    },
    "cpu": {
        "presets": ["tiny"],
        "batch": ["--batch_shapes", "2048x32", "--dtypes", "float32", "--warmup", "1", "--steps", "3"],
        "bucketed": ["--bucketed", "2048", "--bucketed_max_length", "64", "--bucketed_shapes", "3"],
        "decode": ["--config", "tiny", "--dtype", "float32", "--batch", "8", "16", "--src_len", "16",
                   "--lengths", "40", "--methods", "greedy", "beam4", "--repeats", "2"],
        "multi30k": ["--config", "tiny", "--vocab_size", "2000", "--batch_tokens", "2000", "--num_train_steps", "30",
                     "--eval_every", "30", "--checkpoint_every", "30", "--bleu_examples", "64"],
    },
}


def default_parts(size: str) -> list[str]:
    """Most wanted first: a run cut short by --deadline_s keeps those."""
    first, *rest = SIZES[size]["presets"]
    return ([f"train_{first}", "decode"] + [f"train_{p}" for p in rest]
            + [f"parallel_{p}" for p in (first, *rest)])


def all_parts(size: str) -> list[str]:
    return default_parts(size) + ["multi30k"]


def command(part: str, size: str, out_dir: str) -> list[str]:
    """The child's command line."""
    spec, python = SIZES[size], sys.executable
    if part == "decode":
        return [python, os.path.join(HERE, "decode.py"), *spec["decode"], "--out", os.path.join(out_dir, "decode.json")]
    if part == "multi30k":
        return [python, os.path.join(ROOT, "train.py"), *spec["multi30k"], "--dataset_dir", MULTI30K_DIR,
                "--src_lang", "de", "--tgt_lang", "en", "--workdir", os.path.join(out_dir, "multi30k_run"), "--quiet"]
    kind, preset = part.split("_", 1)
    if kind == "train":
        what = ["--attention", "reference", "xla", "cudnn", "--parallel", "jit", "--baselines", "flax", "torch",
                *spec["bucketed"]]
    else:
        what = ["--attention", "auto", "--devices", "all", "--parallel", "pmap", "mesh", "--mesh", "data=-1",
                "--baselines"]
    return [python, os.path.join(HERE, "train_step.py"), "--presets", preset, *spec["batch"], *what,
            "--out", os.path.join(out_dir, f"{part}.json")]


def run_part(part: str, size: str, out_dir: str, timeout_s: float) -> dict:
    """Run one part, its output teed to DIR/PART.log; killed (its whole process group) after
    timeout_s. Its exit code ("timeout" when killed) and time."""
    cmd = command(part, size, out_dir)
    if part == "multi30k" and not os.path.isdir(MULTI30K_DIR):
        print(f"== {part}: skipped: no corpus at {MULTI30K_DIR} (mkdir -p data && cp -r ../shared/data/multi30k data/)",
              flush=True)
        return {"part": part, "command": cmd, "returncode": None, "seconds": 0.0, "skipped": "no corpus"}
    # A part's results are its own JSON (or the Multi30k work dir), never an earlier call's.
    if part == "multi30k":
        shutil.rmtree(os.path.join(out_dir, "multi30k_run"), ignore_errors=True)
    for name in (f"{part}.json", f"{part}.png"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    print(f"== {part} (at most {timeout_s:.0f} s): {shown(cmd)}", flush=True)
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(os.path.join(out_dir, f"{part}.log"), "w") as log:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)  # its own process group, killed whole on timeout

        def tee():
            for line in child.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()

        reader = threading.Thread(target=tee, daemon=True)
        reader.start()
        try:
            returncode = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            returncode = "timeout"
        reader.join(timeout=10)
    seconds = time.perf_counter() - start
    print(f"== {part}: exit {returncode} after {seconds:.0f} s", flush=True)
    return {"part": part, "command": cmd, "returncode": returncode, "seconds": round(seconds, 1)}


def shown(cmd: list[str]) -> str:
    """A command as the tables show it: paths relative to the checkout, `python` for the interpreter."""
    return " ".join("python" if c == sys.executable else os.path.relpath(c, ROOT) if c.startswith(ROOT) else c
                    for c in cmd)


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def multi30k_scores(out_dir: str) -> dict | None:
    """The run's final scores from its metrics.jsonl (validation and test sacreBLEU, with signature)."""
    path = os.path.join(out_dir, "multi30k_run", "metrics.jsonl")
    if not os.path.exists(path):
        return None
    scores: dict = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "bleu" in record:
                scores[record["split"]] = {"bleu": record["bleu"], "signature": record.get("bleu_signature"),
                                           "step": record["step"]}
    return scores or None


def collect(out_dir: str, size: str, runs: list[dict]) -> dict:
    """Every part's results found in out_dir (this call's and earlier calls')."""
    previous = read_json(os.path.join(out_dir, "suite.json")) or {}
    done = {r["part"]: r for r in previous.get("runs", [])}
    done.update({r["part"]: r for r in runs})
    train, ratios, failures, meta = [], [], [], {}
    for part in all_parts(size):
        result = read_json(os.path.join(out_dir, f"{part}.json"))
        if result:
            train += [{**row, "part": part} for row in result.get("rows", []) if part != "decode"]
            ratios += result.get("ratios", [])
            failures += [{**f, "part": part} for f in result.get("failures", [])]
            meta = meta or result["meta"]
    decode = read_json(os.path.join(out_dir, "decode.json"))
    return {"size": size, "meta": meta, "runs": [done[p] for p in all_parts(size) if p in done],
            "train": train, "ratios": ratios, "failures": failures, "decode": decode,
            "multi30k": multi30k_scores(out_dir)}


def fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def markdown(suite: dict) -> str:
    meta = suite["meta"] or {}
    lines = [f"# Benchmark suite ({suite['size']} size)", "",
             f"Device: {meta.get('device', '?')} × {meta.get('device_count', '?')}; host {meta.get('cpu', '?')}, "
             f"{meta.get('cores', '?')} cores; JAX {meta.get('jax', '?')}; {meta.get('date', '?')}.", "",
             "| part | exit | seconds | command |", "| --- | --- | --- | --- |"]
    for r in suite["runs"]:
        lines.append(f"| {r['part']} | {r.get('skipped') or r['returncode']} | {r['seconds']} | `{shown(r['command'])}` |")
    fixed = [r for r in suite["train"] if r["length"]]
    if fixed:
        lines += ["", "## Training step (forward, backward, Adam update)", "",
                  "tokens/s: source + target tokens per second. MFU: model FLOPs (transformer/models/flops.py) per "
                  "second over the device's peak. Step memory: per device, XLA's analysis of the compiled step "
                  "(arguments + outputs − donated + temporaries), for PyTorch its allocator's peak.", "",
                  "| model | batch | dtype | implementation | devices | step ms | tokens/s | MFU | compile s | "
                  "step memory GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in fixed:
            lines.append(f"| {r['preset']} | {r['rows']}×{r['length']} | {r['dtype']} | {r['impl']} | {r['devices']} | "
                         f"{r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {fmt(r['mfu'], '.1%')} | "
                         f"{r['compile_s']:.1f} | {fmt(r['step_memory_gib'], '.2f')} |")
    if suite["ratios"]:
        lines += ["", "## This library against the baselines, same batch", "",
                  "| model | batch | ours | baseline | training ratio | forward ratio |", "| --- | --- | --- | --- | --- | --- |"]
        for r in suite["ratios"]:
            lines.append(f"| {r['preset']} | {r['shape']} | {r['ours']} | {r['vs']} | {r['train_ratio']:.2f}× | "
                         f"{r['forward_ratio']:.2f}× |")
    bucketed = [r for r in suite["train"] if r.get("bucketed")]
    if bucketed:
        lines += ["", "## A pass of length-bucketed batches (train.py's batching)", "",
                  "The pass's time is the sum, over its batches whose shape was timed, of that shape's median step. "
                  "tokens/s counts real (non-padding) tokens; MFU counts the FLOPs of the padded shapes.", "",
                  "| model | dtype | implementation | batches timed / in the pass | shapes (rows×length) | "
                  "padding: timed / pass | "
                  "real tokens/s | MFU | compile s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in bucketed:
            b = r["bucketed"]
            shapes = ", ".join(f"{s['rows']}×{s['length']}" for s in b["shapes"])
            lines.append(f"| {r['preset']} | {r['dtype']} | {r['impl']} | {b['batches_timed']} / {b['batches_in_pass']} | "
                         f"{shapes} | {b['padding_fraction']:.1%} / {fmt(b.get('pass_padding_fraction'), '.1%')} | {r['tokens_per_s']:,.0f} | {fmt(r['mfu'], '.1%')} | "
                         f"{r['compile_s']:.1f} |")
    if suite["decode"]:
        d = suite["decode"]["meta"]
        lines += ["", f"## Decoding ({d['config']}: d_model {d['d_model']}, N {d['N']}, vocabulary {d['vocab']}, "
                      f"{d['dtype']}, source length {d['src_len']})", "",
                  "| method | batch | length limit | mean output length | median s | output tokens/s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in suite["decode"]["rows"]:
            lines.append(f"| {r['method']} | {r['batch']} | {r['output_len']} | {r['mean_output_len']:.1f} | "
                         f"{r['median_s']:.4f} | {r['tokens_per_s']:,.0f} |")
    if suite["multi30k"]:
        lines += ["", "## Multi30k German→English (train.py)", "", "| split | step | sacreBLEU | signature |",
                  "| --- | --- | --- | --- |"]
        for split, s in suite["multi30k"].items():
            signature = str(s["signature"]).replace("|", "\\|")  # a bare | would split the table's cell
            lines.append(f"| {split} | {s['step']} | {s['bleu']:.2f} | {signature} |")
    if suite["failures"]:
        lines += ["", "## Cases that failed", "", "| part | case | error |", "| --- | --- | --- |"]
        for f in suite["failures"]:
            lines.append(f"| {f['part']} | {f['case']} | {f['error'].replace('|', '/')} |")
    lines += ["", "## Targets of the GPU issue", ""] + targets(suite)
    return "\n".join(lines) + "\n"


def targets(suite: dict) -> list[str]:
    """Each target of the GPU issue beside what this suite measured, or "not measured"."""
    out = []
    for preset, goal in MFU_TARGETS.items():
        mine = [r for r in suite["train"] if r["preset"] == preset and r["impl"].startswith("ours") and r["length"]
                and r["dtype"] == "bfloat16" and r["mfu"] is not None]
        if mine:
            best = max(mine, key=lambda r: r["mfu"])
            out.append(f"- {preset}: MFU ≥ {goal:.0%} in bfloat16: best {best['mfu']:.1%} ({best['impl']}): "
                       + ("met" if best["mfu"] >= goal else "not met"))
        else:
            out.append(f"- {preset}: MFU ≥ {goal:.0%} in bfloat16: not measured")
        ratios = [r for r in suite["ratios"] if r["preset"] == preset and r["dtype"] == "bfloat16"]
        missing = [b for b in BASELINES if b not in {r["vs"] for r in ratios}]
        if ratios:
            # This library's best implementation, judged by its ratio to the closest baseline.
            best_ours = max({r["ours"] for r in ratios},
                            key=lambda impl: min(r["train_ratio"] for r in ratios if r["ours"] == impl))
            closest = min((r for r in ratios if r["ours"] == best_ours), key=lambda r: r["train_ratio"])
            if closest["train_ratio"] <= 1:
                verdict = "not met"
            elif missing:
                verdict = "not shown: no figure for " + ", ".join(missing)
            else:
                verdict = "met"
            out.append(f"- {preset}: ahead of every baseline on the same batch: {best_ours} is "
                       f"{closest['train_ratio']:.2f}× the closest measured ({closest['vs']}): {verdict}")
        else:
            out.append(f"- {preset}: ahead of every baseline on the same batch: not measured")
    if suite["multi30k"] and "test" in suite["multi30k"]:
        bleu = suite["multi30k"]["test"]["bleu"]
        run = next((r for r in suite["runs"] if r["part"] == "multi30k"), None)
        took = f" in {run['seconds']:.0f} s (the whole command)" if run else ""
        out.append(f"- Multi30k de→en test sacreBLEU ≥ 37 within 10 minutes: {bleu:.2f}{took}: "
                   + ("met" if bleu >= 37 and run and run["seconds"] <= 600 else "not met"))
    else:
        out.append("- Multi30k de→en test sacreBLEU ≥ 37 within 10 minutes: not measured")
    return out


def chart(suite: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = suite["train"]
    decode = suite["decode"]["rows"] if suite["decode"] else []
    if not train and not decode:
        return
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 0.6 * (len(train) + len(decode)) + 4), 5),
                             gridspec_kw={"width_ratios": [max(len(train), 1), max(len(decode), 1)]})
    ax = axes[0]
    labels = [f"{r['preset']} {r['impl']}" + (f" ×{r['devices']}" if r["devices"] > 1 else "") for r in train]
    ax.bar(range(len(train)), [r["tokens_per_s"] for r in train],
           color=["tab:blue" if r["impl"].startswith("ours") else "tab:gray" for r in train])
    for i, r in enumerate(train):
        if r["mfu"] is not None:
            ax.annotate(f"{r['mfu']:.0%}", (i, r["tokens_per_s"]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(train)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("training tokens/s (source + target)")
    ax.set_title("training step (MFU above the bars)")
    ax = axes[1]
    ax.bar(range(len(decode)), [r["tokens_per_s"] for r in decode], color="tab:green")
    ax.set_xticks(range(len(decode)), [f"{r['method']}\nbatch {r['batch']}" for r in decode], rotation=60,
                  ha="right", fontsize=7)
    ax.set_ylabel("output tokens/s")
    ax.set_title("decoding")
    meta = suite["meta"] or {}
    fig.suptitle(f"{meta.get('device', '?')}, JAX {meta.get('jax', '?')}, {meta.get('date', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(out_dir: str, size: str, runs: list[dict], bundle: str | None) -> dict:
    """suite.json, suite.md and suite.png from every part found in out_dir; with `bundle`, those
    three and one archive of the parts' JSON, logs and charts copied there (a device machine hands
    back only a few files, at most two folders down)."""
    suite = collect(out_dir, size, runs)
    suite["suite_command"] = "python " + " ".join(sys.argv)
    suite["host"] = platform.node()
    with open(os.path.join(out_dir, "suite.json"), "w") as f:
        json.dump(suite, f, indent=2)
    with open(os.path.join(out_dir, "suite.md"), "w") as f:
        f.write(markdown(suite))
    chart(suite, os.path.join(out_dir, "suite.png"))
    if bundle:
        os.makedirs(bundle, exist_ok=True)
        for name in ("suite.json", "suite.md", "suite.png"):
            if os.path.exists(os.path.join(out_dir, name)):
                shutil.copy(os.path.join(out_dir, name), bundle)
        with tarfile.open(os.path.join(bundle, "parts.tar.gz"), "w:gz") as tar:
            for name in sorted(os.listdir(out_dir)):
                if name.endswith((".json", ".log", ".png")) and not name.startswith("suite."):
                    tar.add(os.path.join(out_dir, name), arcname=name)
            metrics = os.path.join(out_dir, "multi30k_run", "metrics.jsonl")
            if os.path.exists(metrics):
                tar.add(metrics, arcname="multi30k_metrics.jsonl")
    return suite


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="gpu", choices=list(SIZES), help="gpu: base and big; cpu: tiny, to prove the suite")
    parser.add_argument("--parts", nargs="*", default=None,
                        help="default: " + " ".join(default_parts("gpu")) + " (multi30k only when named); "
                             "none (--parts alone): only rebuild the summary from what out_dir holds")
    parser.add_argument("--out_dir", default=os.path.join(HERE, "suite"))
    parser.add_argument("--timeout_s", type=float, default=600, help="at most this long per part")
    parser.add_argument("--deadline_s", type=float, default=None,
                        help="the whole command's time: a part gets what is left, and none starts with under a minute "
                             "left (the summary is written after every part either way)")
    parser.add_argument("--bundle", default=None,
                        help="also copy suite.json/.md/.png and parts.tar.gz (the parts' JSON, logs, charts) here")
    args = parser.parse_args()
    parts = default_parts(args.size) if args.parts is None else args.parts
    unknown = [p for p in parts if p not in all_parts(args.size)]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)} for --size {args.size}: choose from "
                     f"{', '.join(all_parts(args.size))}")
    out_dir = os.path.abspath(args.out_dir)  # the children run in the checkout's root
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    runs: list[dict] = []
    for part in parts:
        left = args.timeout_s if args.deadline_s is None else args.deadline_s - (time.perf_counter() - start)
        if left < 60:
            print(f"== {part}: skipped: {left:.0f} s left of --deadline_s {args.deadline_s:.0f}", flush=True)
            runs.append({"part": part, "command": command(part, args.size, out_dir), "returncode": None,
                         "seconds": 0.0, "skipped": "deadline"})
            continue
        runs.append(run_part(part, args.size, out_dir, min(args.timeout_s, left)))
        write_summary(out_dir, args.size, runs, args.bundle)
    suite = write_summary(out_dir, args.size, runs, args.bundle)
    print(markdown(suite))
    print(f"suite: {len(runs)} part(s) in {time.perf_counter() - start:.0f} s; {out_dir}/suite.md, suite.json, suite.png"
          + (f"; bundle in {args.bundle}" if args.bundle else ""))
    failed = [r["part"] for r in runs if r["returncode"] not in (0, None)]
    if failed:
        print(f"suite: failed or cut short: {', '.join(failed)} (their logs are in {out_dir})")
    sys.exit(1 if failed else 0)

if __name__ == "__main__":
    main()
