"""Speed of causal traces: the fast engine against the per-cell oracle, per precision, first run and steady.

    .venv/bin/python benchmarks/trace_speed.py                       # default model: oracle and fast, fp32
    .venv/bin/python benchmarks/trace_speed.py --random-weights --model gpt-j-6b --device cuda \\
        --engines fast --precisions bf16 fp32 --json gptj.json      # "how long would GPT-J take on my GPU?"
    .venv/bin/python benchmarks/trace_speed.py --random-weights --engines fast --kinds hidden --samples 2 \\
        --device cpu --json out.json                                 # seconds, no weights loaded

Every (engine, precision) runs in its own process, so its peak memory is its
own and its first trace is the first after loading. Each process loads the
model (or, with ``--random-weights``, builds it from a shape: a shipped name
such as ``gpt2-xl``, ``gpt-j-6b``, ``llama-3-8b``, a local folder or a
``config.json``; by default the embedded model's shape), runs one trace
(``first``), then ``--repeats`` more (``steady``: their median). Printed and
written with ``--json``: seconds (first, steady, and when each kind's heatmap
was ready), peak memory (allocated GPU memory, or process RSS on a CPU),
device, dtype, torch version, and the largest difference from the first
engine's first precision. ``--batching token`` with
``LOCATE_EDIT_ATTENTION=torch`` reproduces the engine's previous plan (one
pass per kind and token, PyTorch's own attention backends).
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
    from tracing.shapes import random_model

    dtype = "fp32" if args.precision == "tf32" else args.precision
    if args.random_weights:
        return random_model(args.model, device=args.device, dtype=dtype, seed=args.seed)
    return load_model(args.model, device=args.device, dtype=dtype)


def run_phase(args) -> None:
    """One (engine, precision) measurement in this process; writes its figures to args.out."""
    sys.path.insert(0, str(ROOT))
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
        t0 = time.perf_counter()
        ready = {}
        if args.phase == "fast":
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
        return results, time.perf_counter() - t0, ready

    if on_gpu:
        torch.cuda.reset_peak_memory_stats(lm.device)
    first, first_s, ready = one_trace()
    steady = [one_trace()[1] for _ in range(args.repeats)]
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
    p.add_argument("--engines", choices=["fast", "oracle", "both"], default="both")
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
    p.add_argument("--phase", choices=["fast", "oracle"], help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        run_phase(args)
        return

    import torch

    gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.repeats is None:
        args.repeats = 3 if gpu else 0
    precisions = ["fp32"] if args.skip_bf16 else args.precisions or (["fp32", "bf16"] if gpu else ["fp32"])
    engines = ["oracle", "fast"] if args.engines == "both" else [args.engines]
    runs = [spawn(engine, precision, args) for precision in precisions for engine in engines]
    base = runs[0]

    print()
    print(f"prompt: {args.prompt!r}  subject: {args.subject!r}  samples {args.samples}, window {args.window}, "
          f"kinds {args.kinds}, {base['model']} ({base['parameters'] / 1e6:.0f}M parameters, {base['layers']} layers)")
    print(f"device {base['device']} ({base['device_name']}), torch {base['torch']}, transformers {base['transformers']}, "
          f"{base['threads']} threads; clean p(answer) {base['high']:.4f}, corrupted {base['low']:.4f}")
    print(f"{'engine':<7}{'asked':<6}{'ran in':<27}{'first s':>9}{'steady s':>10}{'load s':>8}{'passes':>8}"
          f"{'max |diff|':>12}   peak memory")
    for run in runs:
        steady = f"{run['steady_s']:.3f}" if run["steady_s"] is not None else "-"
        print(f"{run['engine']:<7}{run['precision']:<6}{run['dtype']:<27}{run['first_s']:>9.3f}{steady:>10}"
              f"{run['load_s']:>8.1f}"
              f"{str(run['passes'] or '-'):>8}{max_diff(run, base):>12.2e}   {run['peak_mib']:.0f} {run['peak_kind']}")
    print(f"(max |diff| against {base['engine']} in {base['dtype']}; steady: median of {args.repeats} after the first)")
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
