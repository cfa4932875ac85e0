"""Speed of causal traces: the fast engine against the per-cell oracle, per precision, first run and steady.

    .venv/bin/python benchmarks/trace_speed.py                       # default model: oracle and fast, fp32
    .venv/bin/python benchmarks/trace_speed.py --random-weights --model gpt-j-6b --device cuda \\
        --engines fast --precisions bf16 fp32 --json gptj.json      # "how long would GPT-J take on my GPU?"
    .venv/bin/python benchmarks/trace_speed.py --random-weights --engines fast --kinds hidden --samples 2 \\
        --device cpu --json out.json                                 # seconds, no weights loaded
    .venv/bin/python benchmarks/trace_speed.py --engines oracle fast baseline --baseline e18e2cd --rounds 2
        # the oracle, this engine and the engine of an earlier commit, fast and baseline alternating
    .venv/bin/python benchmarks/trace_speed.py --engines fast baseline --baseline 8c05d34 --count --no-profile
        # the operations of one trace of each, planned as a 24 GiB GPU would (on this CPU)

Every (engine, precision) runs in its own process, so its peak memory is its
own and its first trace is the first after loading. Each process loads the
model (or, with ``--random-weights``, builds it from a shape: a shipped name
such as ``gpt2-xl``, ``gpt-j-6b``, ``llama-3-8b``, a local folder or a
``config.json``; by default the embedded model's shape), runs one trace
(``first``), then ``--repeats`` more (``steady``: their median). Printed and
written with ``--json``: seconds (first, steady, and when each kind's heatmap
was ready), peak memory (allocated GPU memory, or process RSS on a CPU),
device, dtype, torch version, and the largest difference from the first
engine's first precision, and the speed-up over the oracle. ``--batching
token`` with ``LOCATE_EDIT_ATTENTION=torch`` reproduces the engine's previous
plan (one pass per kind and token, PyTorch's own attention backends).

``baseline`` is the fast engine of another commit (``--baseline``: its
``tracing/`` is extracted with ``git archive`` and run from a temporary
folder), so old and new are measured in one run; ``--rounds N`` runs the
fast and baseline engines N times each, alternating, and reports each one's
best (least disturbed) run. CPU seconds (this process, all threads) are
reported next to wall seconds: on a shared machine they vary less. After its
timed trace the fast engine's run profiles one more trace per stage
(``tracing.trace.trace_profile``: block calls, attention, MLP, the rest of
the blocks, unembedding, base runs, bookkeeping), printed and in the JSON.

``--count`` runs one more fast (or baseline) trace under ``torch.profiler``,
in every thread, and counts its linear calls, its block calls (direct and
inside the model's own forward passes) and its aten operations that launch a
kernel: every aten op except views, aliases, allocations and wrappers whose
kernels are counted under them (``linear`` -> ``mm``, ``to`` -> ``copy_``;
see ``NO_KERNEL``). ``--count gpu`` (the default) plans that trace's passes
as a GPU of ``--gpu-memory`` GiB (24) would -- its batching, cost figures and
memory for restored rows -- wherever it runs, so that a CPU counts what a
GPU would launch; ``--count device`` counts this device's own plan. On a
CUDA device the counted trace also reports the GPU's busy share: the
kernels' summed time over the trace's wall time (profiler overhead included,
so a lower bound). A CPU splits a few ops that a GPU runs as one kernel
(``mean`` is ``sum`` and ``div_`` there), so its counts are slightly high.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


def load(args):
    """The model of this phase: loaded, or built with random weights from a shape."""
    from tracing import load_model

    dtype = "fp32" if args.precision == "tf32" else args.precision
    if args.random_weights:
        from tracing.shapes import random_model

        return random_model(args.model, device=args.device, dtype=dtype, seed=args.seed)
    return load_model(args.model, device=args.device, dtype=dtype)


# Operations that launch no kernel of their own: views and aliases, allocations and metadata, and wrappers
# that launch nothing when there is nothing to do (a .to() to the same dtype). Every other aten op counts,
# unless an op under it counts (a wrapper's kernels are counted once, under it: linear -> mm, to -> copy_).
NO_KERNEL = frozenset("aten::" + name for name in (
    "as_strided", "view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "expand_as", "slice", "select",
    "narrow", "unsqueeze", "squeeze", "transpose", "t", "permute", "unbind", "split", "split_with_sizes", "chunk",
    "flatten", "unflatten", "unfold", "alias", "detach", "detach_", "view_as", "movedim", "lift_fresh",
    "resolve_conj", "resolve_neg", "numpy_T", "diagonal", "empty", "empty_strided", "empty_like", "new_empty",
    "new_empty_strided", "resize_", "result_type", "is_nonzero", "item", "set_", "to", "_to_copy", "contiguous",
    "clone", "linear", "matmul", "scaled_dot_product_attention", "dropout", "type_as", "repeat",
))


def gpu_budget_mib(lm, memory_gib: float) -> int:
    """The memory for restored rows that the engine takes on a GPU of ``memory_gib``: a quarter of what the
    weights leave free, at least 1 GiB (tracing.passes.Target.gpu; written out here so that a baseline commit
    without it is counted with the same budget)."""
    weights = sum(p.numel() for p in lm.model.parameters()) * lm.dtype.itemsize
    return max(1024, (int(memory_gib * 2**30) - weights) // 4 // 2**20)


def count_ops(lm, args, kinds, config) -> dict:
    """Operations of one more trace, counted with torch.profiler in every thread: linear calls, block calls
    (direct and inside the model's forward passes), aten ops that launch a kernel (see NO_KERNEL) and all aten
    ops. ``--count gpu`` plans the passes as a GPU of ``--gpu-memory`` GiB would, wherever this runs."""
    import dataclasses
    from collections import Counter

    import torch
    from torch.profiler import ProfilerActivity, profile

    from tracing import iter_trace

    kwargs, plan = {}, "this device's"
    if args.count == "gpu":
        plan = f"a {args.gpu_memory:g} GiB GPU's"
        budget = gpu_budget_mib(lm, args.gpu_memory)
        config = dataclasses.replace(config, memory_mb=budget,
                                     batching="all" if config.batching == "auto" else config.batching)
        os.environ["LOCATE_EDIT_TRACE_WORKERS"] = "1"  # a GPU runs one pass at a time
        try:
            from tracing.passes import Target
        except ImportError:  # a baseline commit from before tracing.passes: its own GPU figures
            engine = sys.modules["tracing.trace"]
            cpu_speed = engine._speed
            engine._speed = lambda device, dtype, tf32: cpu_speed(torch.device("cuda"), dtype, tf32)
        else:
            kwargs["target"] = Target.gpu(lm, args.gpu_memory)
    block_type = type(lm.block(0))
    blocks = [0]

    def count_block(module, inputs, output):  # after the call: a run stopped at block 0 is not a call
        if type(module) is block_type:
            blocks[0] += 1

    try:  # every thread's operations (the CPU plan runs passes in worker threads)
        from torch._C._profiler import _ExperimentalConfig

        every_thread = {"experimental_config": _ExperimentalConfig(profile_all_threads=True)}
    except (ImportError, TypeError):  # an older torch: this thread's only
        every_thread = {}
    on_gpu = lm.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    handle = torch.nn.modules.module.register_module_forward_hook(count_block)
    try:
        with profile(activities=activities, **every_thread) as prof:
            if on_gpu:
                torch.cuda.synchronize(lm.device)
            started = time.perf_counter()
            results = list(iter_trace(lm, args.prompt, args.subject, kinds=kinds, config=config, **kwargs))
            if on_gpu:
                torch.cuda.synchronize(lm.device)
            wall = time.perf_counter() - started
    finally:
        handle.remove()
    events = prof.events()
    names = Counter(e.name for e in events)
    kernels: Counter = Counter()
    counted: dict[int, bool] = {}

    def visit(event) -> bool:  # whether this op or one under it launches a kernel
        if id(event) not in counted:
            below = [visit(child) for child in event.cpu_children]
            own = event.name.startswith("aten::") and event.name not in NO_KERNEL and not any(below)
            if own:
                kernels[event.name] += 1
            counted[id(event)] = own or any(below)
        return counted[id(event)]

    for event in events:
        if event.cpu_parent is None:
            visit(event)
    busy = None
    if on_gpu:  # kernels' own time (one stream: they do not overlap) over the trace's wall time
        device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in prof.key_averages())
        busy = device_us / 1e6 / wall if wall > 0 else None
    return {
        "plan": plan,
        "seconds_profiled": wall,
        "gpu_busy_share": busy,
        "batching": results[-1].settings.get("batching"),
        "passes": results[-1].settings.get("passes"),
        "memory_mib": config.memory_mb,
        "linear_calls": names["aten::linear"],
        "block_calls": blocks[0],
        "kernel_ops": sum(kernels.values()),
        "aten_ops": sum(n for name, n in names.items() if name.startswith("aten::")),
        "threads": len({e.thread for e in events}),
        "top_kernel_ops": dict(kernels.most_common(12)),
    }


def run_phase(args) -> None:
    """One (engine, precision) measurement in this process; writes its figures to args.out."""
    sys.path.insert(0, args.root or str(ROOT))
    import numpy as np
    import torch
    import transformers

    from tracing import TraceConfig, iter_trace, trace_reference

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    lm = load(args)
    on_gpu = lm.device.type == "cuda"

    def sync():
        if on_gpu:
            torch.cuda.synchronize(lm.device)

    sync()
    load_seconds = time.perf_counter() - started
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    config = TraceConfig(samples=args.samples, window=args.window, precision=args.precision, batching=args.batching,
                         memory_mb=args.memory_mb)

    def one_trace():
        """(results, seconds, {kind: seconds until its heatmap was ready})."""
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        ready = {}
        if args.phase in ("fast", "baseline"):
            results = []
            for result in iter_trace(lm, args.prompt, args.subject, kinds=kinds, config=config):
                sync()
                ready[result.kind] = time.perf_counter() - t0
                results.append(result)
        else:

            def progress(done, total):  # the oracle counts cells, kind after kind
                per_kind = total // len(kinds)
                if done % per_kind == 0:
                    ready[kinds[done // per_kind - 1]] = time.perf_counter() - t0

            results = trace_reference(lm, args.prompt, args.subject, kinds=kinds, config=config, progress=progress)
        sync()
        return results, time.perf_counter() - t0, ready, time.process_time() - c0

    if on_gpu:
        torch.cuda.reset_peak_memory_stats(lm.device)
    first, first_s, ready, first_cpu = one_trace()
    steady = [one_trace()[1] for _ in range(args.repeats)]
    profile = None
    if args.phase == "fast" and not args.no_profile:
        from tracing.trace import trace_profile

        profile = trace_profile(lm, args.prompt, args.subject, kinds=kinds, config=config)
    counts = count_ops(lm, args, kinds, config) if args.count and args.phase in ("fast", "baseline") else None
    if on_gpu:
        peak, peak_kind = torch.cuda.max_memory_allocated(lm.device) / 2**20, "GPU MiB allocated"
        device_name = torch.cuda.get_device_name(lm.device)
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MiB process RSS"
        device_name = platform.processor() or platform.machine()
    out = {
        "engine": args.phase,
        "precision": args.precision,
        "dtype": first[0].settings.get("dtype", str(lm.dtype)),
        "model": lm.name,
        "parameters": lm.n_params,
        "layers": lm.n_layers,
        "tokens": len(first[0].tokens),
        "device": str(lm.device),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attention": first[0].settings.get("attention", "cpu" if not on_gpu else "torch"),
        "batching": first[0].settings.get("batching", "-"),
        "passes": first[-1].settings.get("passes"),
        "load_s": load_seconds,
        "first_s": first_s,
        "first_cpu_s": first_cpu,
        "profile": profile,
        "counts": counts,
        "steady_s": statistics.median(steady) if steady else None,
        "steady_all_s": steady,
        "kinds_ready_s": ready,
        "peak_mib": peak,
        "peak_kind": peak_kind,
        "high": first[0].high_score,
        "low": first[0].low_score,
        "scores": {r.kind: np.asarray(r.scores).tolist() for r in first},
    }
    Path(args.out).write_text(json.dumps(out))


def baseline_root(commit: str, folder: Path) -> Path:
    """The ``tracing/`` package of ``commit`` extracted into ``folder`` (with this checkout's assets)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "tracing"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "assets").symlink_to(ROOT / "assets")
    return folder


def spawn(phase: str, precision: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [
        sys.executable, __file__, "--phase", phase, "--precision", precision, "--out", out,
        "--samples", str(args.samples), "--window", str(args.window), "--prompt", args.prompt, "--subject", args.subject,
        "--kinds", args.kinds, "--repeats", str(args.repeats), "--batching", args.batching, "--seed", str(args.seed),
    ]
    for flag, value in (("--model", args.model), ("--device", args.device), ("--memory-mb", args.memory_mb),
                        ("--threads", args.threads)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.random_weights:
        cmd.append("--random-weights")
    if args.no_profile:
        cmd.append("--no-profile")
    if args.count:
        cmd += ["--count", args.count, "--gpu-memory", str(args.gpu_memory)]
    if phase == "baseline":
        cmd += ["--root", str(args.baseline_root)]
    print(f"running the {phase} engine in {precision} ...", flush=True)
    subprocess.run(cmd, check=True)
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    return data


def max_diff(a: dict, b: dict) -> float:
    import numpy as np

    return max(float(np.nanmax(np.abs(np.array(a["scores"][k]) - np.array(b["scores"][k])))) for k in a["scores"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M (its shape with --random-weights)")
    p.add_argument("--random-weights", action="store_true",
                   help="build --model from its shape with random weights (a shipped name, a folder or a config.json)")
    p.add_argument("--device", default=None)
    p.add_argument("--engines", nargs="+", choices=["fast", "oracle", "both", "baseline"], default=["both"],
                   help="oracle, fast (this checkout's engine), baseline (--baseline's); both = oracle fast")
    p.add_argument("--baseline", default=None, metavar="COMMIT", help="the commit whose fast engine is 'baseline'")
    p.add_argument("--rounds", type=int, default=1, help="runs of the fast and baseline engines, alternating")
    p.add_argument("--no-profile", action="store_true", help="skip the per-stage profile of the fast engine")
    p.add_argument("--count", nargs="?", const="gpu", choices=["gpu", "device"], default=None,
                   help="count the operations of one more fast/baseline trace (linear calls, block calls, aten ops "
                        "that launch a kernel) with torch.profiler: 'gpu' (the default) plans the passes as a GPU "
                        "of --gpu-memory GiB would, so that a CPU counts what a GPU would run; 'device' as this "
                        "device does")
    p.add_argument("--gpu-memory", type=float, default=24.0, help="GiB of the GPU that --count gpu plans for")
    p.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "bf16", "fp16", "tf32"],
                   help="default: fp32 on a CPU, fp32 and bf16 on a GPU")
    p.add_argument("--skip-bf16", action="store_true", help="fp32 only (same as --precisions fp32)")
    p.add_argument("--kinds", default="hidden,mlp,attn")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--subject", default=SUBJECT)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--repeats", type=int, default=None, help="traces after the first (default: 3 on a GPU, 0 on a CPU)")
    p.add_argument("--batching", default="auto", choices=["auto", "token", "kind", "all"])
    p.add_argument("--memory-mb", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", metavar="OUT", default=None, help="write every figure as JSON")
    p.add_argument("--phase", choices=["fast", "oracle", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        run_phase(args)
        return

    import torch

    gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.repeats is None:
        args.repeats = 3 if gpu else 0
    precisions = ["fp32"] if args.skip_bf16 else args.precisions or (["fp32", "bf16"] if gpu else ["fp32"])
    engines = [e for name in args.engines for e in (["oracle", "fast"] if name == "both" else [name])]
    engines = list(dict.fromkeys(engines))
    if "baseline" in engines and not args.baseline:
        p.error("--engines baseline needs --baseline COMMIT")
    with tempfile.TemporaryDirectory(prefix="trace-baseline-") as folder:
        if args.baseline:
            args.baseline_root = baseline_root(args.baseline, Path(folder))
        runs = []
        for precision in precisions:
            if "oracle" in engines:
                runs.append(spawn("oracle", precision, args))
            repeated = [e for e in engines if e != "oracle"]
            tries = {e: [] for e in repeated}
            for _ in range(max(1, args.rounds)):
                for engine in repeated:
                    tries[engine].append(spawn(engine, precision, args))
            for engine in repeated:
                best = min(tries[engine], key=lambda run: run["first_s"])
                best["rounds_s"] = [run["first_s"] for run in tries[engine]]
                best["rounds_cpu_s"] = [run["first_cpu_s"] for run in tries[engine]]
                if best.get("counts") is None:
                    best["counts"] = next((run["counts"] for run in tries[engine] if run.get("counts")), None)
                if best.get("profile") is None:
                    best["profile"] = next((run["profile"] for run in tries[engine] if run.get("profile")), None)
                runs.append(best)
    base = runs[0]

    print()
    print(f"prompt: {args.prompt!r}  subject: {args.subject!r}  samples {args.samples}, window {args.window}, "
          f"kinds {args.kinds}, {base['model']} ({base['parameters'] / 1e6:.0f}M parameters, {base['layers']} layers)")
    print(f"device {base['device']} ({base['device_name']}), torch {base['torch']}, transformers {base['transformers']}, "
          f"{base['threads']} threads; clean p(answer) {base['high']:.4f}, corrupted {base['low']:.4f}")
    oracle = {run["precision"]: run for run in runs if run["engine"] == "oracle"}
    print(f"{'engine':<9}{'asked':<6}{'ran in':<27}{'first s':>9}{'CPU s':>8}{'steady s':>10}{'load s':>8}"
          f"{'passes':>8}{'max |diff|':>12}{'speed-up':>10}   peak memory")
    for run in runs:
        steady = f"{run['steady_s']:.3f}" if run["steady_s"] is not None else "-"
        ref = oracle.get(run["precision"])
        run["speedup"] = ref["first_s"] / run["first_s"] if ref else None
        speedup = f"{run['speedup']:.2f}x" if run["speedup"] else "-"
        print(f"{run['engine']:<9}{run['precision']:<6}{run['dtype']:<27}{run['first_s']:>9.3f}"
              f"{run['first_cpu_s']:>8.1f}{steady:>10}{run['load_s']:>8.1f}"
              f"{str(run['passes'] or '-'):>8}{max_diff(run, base):>12.2e}{speedup:>10}   "
              f"{run['peak_mib']:.0f} {run['peak_kind']}")
        if len(run.get("rounds_s", [])) > 1:
            print(f"{'':<9}rounds: " + ", ".join(f"{w:.1f} s ({c:.1f} CPU s)"
                                                 for w, c in zip(run["rounds_s"], run["rounds_cpu_s"])))
    print(f"(max |diff| against {base['engine']} in {base['dtype']}; speed-up: the oracle's first trace over this "
          f"one's; steady: median of {args.repeats} after the first)")
    stages = ("total", "blocks", "attention", "mlp", "rest_of_blocks", "unembedding", "base_runs", "bookkeeping")
    for run in runs:
        if run.get("profile"):
            prof = run["profile"]
            print(f"profile of one more {run['engine']} trace in {run['dtype']} ({prof['block_calls']} block calls, "
                  f"{prof['passes']} passes; timers included):")
            for suffix, label in (("", "wall s"), ("_cpu", "CPU s")):
                print(f"  {label:<7}" + ", ".join(f"{k} {prof[k + suffix]:.2f}" for k in stages))
    for run in runs:
        if run.get("counts"):
            c = run["counts"]
            print(f"operations of one {run['engine']} trace, passes planned as {c['plan']} "
                  f"({c['batching']} batching, {c['passes']} passes, {c['memory_mib']} MiB of rows per pass): "
                  f"{c['linear_calls']} linear calls, {c['block_calls']} block calls, {c['kernel_ops']} aten ops "
                  f"that launch a kernel ({c['aten_ops']} with views and aliases; {c['threads']} threads)"
                  + (f"; GPU busy {c['gpu_busy_share']:.0%} of {c['seconds_profiled']:.3f} s profiled"
                     if c.get("gpu_busy_share") is not None else ""))
            print("  most frequent: " + ", ".join(f"{k.removeprefix('aten::')} {v}"
                                                  for k, v in c["top_kernel_ops"].items()))
    if args.json:
        report = {"prompt": args.prompt, "subject": args.subject, "samples": args.samples, "window": args.window,
                  "kinds": args.kinds.split(","), "random_weights": args.random_weights,
                  "attention_env": os.environ.get("LOCATE_EDIT_ATTENTION"),
                  "runs": [{**{k: v for k, v in run.items() if k != "scores"}, "max_diff": max_diff(run, base)}
                           for run in runs],
                  "scores": {f"{run['engine']}-{run['precision']}": run["scores"] for run in runs}}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
