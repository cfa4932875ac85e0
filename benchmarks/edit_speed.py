"""Seconds per ROME edit on this machine (statistics cached), and the one-time statistics cost.

Example::

    .venv/bin/python benchmarks/edit_speed.py                      # fp32, default layer, 5 edits
    .venv/bin/python benchmarks/edit_speed.py --dtypes fp32 bf16 --threads 1 2 --edits 3
    .venv/bin/python benchmarks/edit_speed.py --random-weights --model gpt2-xl --device cuda --json xl.json

The one-time cost is the time recorded when the cached statistics were
computed (or, with ``--measure-stats N``, a fresh N-token corpus sampled into a
temporary cache now, with its throughput). bf16 runs reuse the fp32 model's
statistics and report whether the edits still take (p(new) > p(old)).

``--random-weights`` builds ``--model`` from its shape (a shipped name such as
``gpt2-xl``, ``gpt-j-6b``, ``llama-3-8b``, a folder or a ``config.json``; by
default the embedded model's shape) with random weights: an edit's time does
not depend on the weights. Its statistics are sampled from the random model
(``--stats-tokens``, 4,096 by default: the size of the corpus changes the
one-time cost, not an edit's) into a temporary cache. Whether such edits
"take" means nothing. ``--kernel-policy`` runs each edit under
``tracing.backends.kernel_policy`` (the attention backends traces use on CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from editing import applied, compute_edit, load_hparams, score_edit  # noqa: E402
from editing.evaluation.evaluate import read_cases, request_of  # noqa: E402
from editing.stats import StatsSpec, ensure_stats, stats_path  # noqa: E402
from tracing.backends import kernel_policy  # noqa: E402
from tracing.models import DEFAULT_MODEL  # noqa: E402
from tracing.loading import load_model
from tracing.shapes import random_model  # noqa: E402


def stats_cost(lm, layer, spec) -> tuple[float, str]:
    """Seconds the cached statistics took to compute (from their file), computing them now if missing."""
    path = stats_path(lm, layer, spec)
    if not path.exists():
        t0 = time.perf_counter()
        ensure_stats(lm, [layer], spec)
        return time.perf_counter() - t0, "measured now"
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    return float(meta.get("seconds", "nan")), f"recorded in {path.name} when computed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--edits", type=int, default=5, help="edits per setting (cases from the CounterFact set)")
    parser.add_argument("--cases", default=str(ROOT / "assets" / "counterfact_smollm2.json"))
    parser.add_argument("--dtypes", nargs="+", default=["fp32"])
    parser.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    parser.add_argument("--measure-stats", type=int, default=0, metavar="TOKENS",
                        help="also sample a fresh corpus of this many tokens in a temporary cache and time it")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    parser.add_argument("--random-weights", action="store_true",
                        help="build --model from its shape with random weights (no download, no GGUF)")
    parser.add_argument("--stats-tokens", type=int, default=None,
                        help="statistics corpus size (default: the hyperparameters'; 4096 with --random-weights)")
    parser.add_argument("--kernel-policy", action="store_true", help="run edits under tracing.backends.kernel_policy")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not args.random_weights:
        return run(args)
    with tempfile.TemporaryDirectory() as tmp:  # statistics of random weights must not land in the user's cache
        os.environ["LOCATE_EDIT_CACHE"] = tmp
        return run(args)


def load(args, dtype: str):
    if args.random_weights:
        return random_model(args.model, device=args.device, dtype=dtype)
    return load_model(args.model, device=args.device, dtype=dtype)


def run(args) -> int:
    base = load(args, "fp32")
    # A random model's name says "random weights"; its hyperparameters are those of the shape's own name.
    hp = load_hparams(args.model or DEFAULT_MODEL) if args.random_weights else load_hparams(base)
    layer = args.layer if args.layer is not None else hp.edit_layer(base.n_layers)
    tokens = args.stats_tokens or (4096 if args.random_weights else None)
    spec = StatsSpec.from_hparams(hp, model_key=base.fingerprint, **({"n_tokens": tokens} if tokens else {}))
    seconds, how = stats_cost(base, layer, spec)
    on_gpu = base.device.type == "cuda"
    device_name = torch.cuda.get_device_name(base.device) if on_gpu else (platform.processor() or platform.machine())
    report = {"model": base.name, "layer": layer, "cpu_count": os.cpu_count(), "device": str(base.device),
              "device_name": device_name, "torch": torch.__version__, "kernel_policy": args.kernel_policy,
              "random_weights": args.random_weights,
              "stats": {"tokens": spec.n_tokens, "seconds": seconds, "source": how}, "runs": []}
    print(f"{base.name}, layer {layer}, {os.cpu_count()} CPU(s), {base.device} ({device_name}), torch {torch.__version__}")
    print(f"one-time statistics: {seconds:.0f} s for {spec.n_tokens} sampled tokens ({how})")

    if args.measure_stats:
        with tempfile.TemporaryDirectory() as tmp:
            old = os.environ.get("LOCATE_EDIT_CACHE")
            os.environ["LOCATE_EDIT_CACHE"] = tmp
            try:
                fresh = StatsSpec.from_hparams(hp, n_tokens=args.measure_stats)
                t0 = time.perf_counter()
                ensure_stats(base, [layer], fresh)
                took = time.perf_counter() - t0
            finally:
                if old is None:
                    os.environ.pop("LOCATE_EDIT_CACHE")
                else:
                    os.environ["LOCATE_EDIT_CACHE"] = old
        rate = args.measure_stats / took
        report["stats"]["fresh"] = {"tokens": args.measure_stats, "seconds": took, "tokens_per_s": rate,
                                    "threads": torch.get_num_threads()}
        print(f"fresh corpus now: {args.measure_stats} tokens in {took:.1f} s ({rate:.0f} tokens/s, "
              f"{torch.get_num_threads()} thread(s)) -> {spec.n_tokens / rate:.0f} s for {spec.n_tokens}")

    cases = read_cases(args.cases)[: args.edits]
    requests = [request_of(c) for c in cases]
    models = {"fp32": base}
    for dtype in args.dtypes:
        if dtype not in models:
            models[dtype] = load(args, dtype)

    def edit_of(lm, request):
        with kernel_policy(lm.device, dtype=lm.dtype) if args.kernel_policy else contextlib.nullcontext():
            return compute_edit(lm, request, layer=layer, hparams=hp, stats_spec=spec)

    def sync(lm):
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)

    print(f"\n{'dtype':<6}{'threads':>8}{'edits':>6}{'first s':>9}{'mean s':>9}{'median s':>10}{'steps':>7}{'took':>7}"
          f"{'peak MiB':>10}")
    for dtype in args.dtypes:
        lm = models[dtype]
        for threads in args.threads:
            torch.set_num_threads(threads)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(lm.device)
            t0 = time.perf_counter()
            edit_of(lm, requests[0])  # warm-up (templates, caches)
            sync(lm)
            first = time.perf_counter() - t0
            times, steps, took = [], [], 0
            for request in requests:
                t0 = time.perf_counter()
                edit = edit_of(lm, request)
                sync(lm)
                times.append(time.perf_counter() - t0)
                steps.append(edit.info["steps"])
                with applied(lm, [edit]):
                    after = score_edit(lm, request)
                took += int(after.efficacy == 1.0)
            if on_gpu:
                peak = torch.cuda.max_memory_allocated(lm.device) / 2**20
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            run = {"dtype": dtype, "threads": threads, "edits": len(times), "first_s": first,
                   "mean_s": statistics.mean(times), "median_s": statistics.median(times),
                   "steps": statistics.mean(steps), "took": took, "times": times, "peak_mib": peak,
                   "peak_kind": "GPU MiB allocated" if on_gpu else "MiB process RSS"}
            report["runs"].append(run)
            print(f"{dtype:<6}{threads:>8}{len(times):>6}{first:>9.2f}{run['mean_s']:>9.2f}{run['median_s']:>10.2f}"
                  f"{run['steps']:>7.1f}{took:>5}/{len(times)}{peak:>10.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
