"""Speed of the fast causal-trace engine against the per-cell oracle, on one prompt.

    .venv/bin/python benchmarks/trace_speed.py                 # default model, CPU or GPU
    .venv/bin/python benchmarks/trace_speed.py --device cuda --bf16-oracle

Runs every phase in its own process (so peak memory is that phase's own):
the oracle and the fast engine in fp32, then the fast engine in bf16 (and the
oracle in bf16 with --bf16-oracle; it is on by default on GPUs, since on a
CPU without bf16 instructions it takes hours). Prints seconds, the speed-up
measured in this run, the largest absolute difference from the fp32 oracle,
and peak memory (process RSS on CPU, allocated GPU memory on GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


def run_phase(args) -> None:
    """One measurement, in this process; writes scores and figures to args.out."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from tracing import TraceConfig, load_model, trace, trace_reference

    lm = load_model(args.model, device=args.device, dtype=args.precision)
    config = TraceConfig(samples=args.samples, window=args.window)
    engine = trace if args.phase == "fast" else trace_reference
    on_gpu = lm.device.type != "cpu"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(lm.device)
        torch.cuda.synchronize(lm.device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    results = engine(lm, args.prompt, args.subject, config=config)
    if on_gpu:
        torch.cuda.synchronize(lm.device)
    seconds = time.perf_counter() - started
    if on_gpu:
        peak = torch.cuda.max_memory_allocated(lm.device) / 2**20
        peak_kind = "GPU MiB allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_kind = f"MiB RSS (model loaded: {rss_before:.0f})"
    out = {
        "seconds": seconds,
        "peak": peak,
        "peak_kind": peak_kind,
        "device": str(lm.device),
        "high": results[0].high_score,
        "low": results[0].low_score,
        "scores": {r.kind: np.asarray(r.scores).tolist() for r in results},
    }
    Path(args.out).write_text(json.dumps(out))


def spawn(phase: str, precision: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [
        sys.executable, __file__, "--phase", phase, "--precision", precision, "--out", out,
        "--samples", str(args.samples), "--window", str(args.window), "--prompt", args.prompt, "--subject", args.subject,
    ]
    if args.model:
        cmd += ["--model", args.model]
    if args.device:
        cmd += ["--device", args.device]
    print(f"running {phase} engine in {precision} ...", flush=True)
    subprocess.run(cmd, check=True)
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    return data


def max_diff(a: dict, b: dict) -> float:
    import numpy as np

    return max(float(np.nanmax(np.abs(np.array(a["scores"][k]) - np.array(b["scores"][k])))) for k in a["scores"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--device", default=None)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--subject", default=SUBJECT)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--bf16-oracle", action="store_true", help="also time the oracle in bf16 (default on GPUs only)")
    p.add_argument("--skip-bf16", action="store_true", help="fp32 only")
    p.add_argument("--phase", choices=["fast", "oracle"], help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        run_phase(args)
        return

    oracle = spawn("oracle", "fp32", args)
    fast = spawn("fast", "fp32", args)
    rows = [("oracle", "fp32", oracle, None), ("fast", "fp32", fast, oracle["seconds"] / fast["seconds"])]
    on_gpu = oracle["device"] != "cpu"
    if not args.skip_bf16:
        oracle16 = spawn("oracle", "bf16", args) if (args.bf16_oracle or on_gpu) else None
        fast16 = spawn("fast", "bf16", args)
        if oracle16:
            rows.append(("oracle", "bf16", oracle16, None))
        base = oracle16["seconds"] if oracle16 else oracle["seconds"]
        rows.append(("fast", "bf16", fast16, base / fast16["seconds"]))

    print()
    print(f"prompt: {args.prompt!r}  subject: {args.subject!r}  samples {args.samples}, window {args.window}, "
          f"kinds hidden+mlp+attn, device {oracle['device']}, torch threads {os.cpu_count()} cores")
    print(f"clean p(answer) {oracle['high']:.4f}, corrupted {oracle['low']:.4f}")
    print(f"{'engine':<8}{'dtype':<7}{'seconds':>9}{'speed-up':>10}{'max |diff| vs fp32 oracle':>28}   peak memory")
    for name, dtype, data, ratio in rows:
        ratio_text = f"{ratio:.1f}x" if ratio else "1.0x" if name == "oracle" and dtype == "fp32" else "-"
        print(f"{name:<8}{dtype:<7}{data['seconds']:>9.1f}{ratio_text:>10}{max_diff(data, oracle):>28.2e}   "
              f"{data['peak']:.0f} {data['peak_kind']}")
    if not args.skip_bf16 and not (args.bf16_oracle or on_gpu):
        print("(bf16 speed-up is against the fp32 oracle: on this CPU the oracle in bf16 would take hours)")


if __name__ == "__main__":
    main()
