"""What the paper's evidence costs on this machine: one fact's full trace, its severed paths, its layer sweep.

    .venv/bin/python benchmarks/evidence_cost.py                         # 3 recalled facts, every 5th layer
    .venv/bin/python benchmarks/evidence_cost.py --facts 5 --every 3 --json out/evidence_cost.json

For each of the first ``--facts`` facts the model recalls (``tracing.recall``,
the order ``python -m tracing.average`` uses) it times, in this process and
without any cache:

* the full trace with the paper's settings (what ``tracing.average`` pays per
  fact: three kinds, every token, 10 samples, window 10);
* the severed paths at the last subject token (``tracing.sever``, unsevered,
  MLP severed and attention severed, every layer), and the one-layer-per-pass
  oracle for the first fact (``--no-oracle`` skips it);
* the layer sweep (``editing.evaluation.sweep.layer_sweep``: ROME at every ``--every``-th
  layer, each scored on the rewrite prompt), after computing the key
  statistics of those layers once (reported apart).

It prints seconds per fact and per item, the CPU and the thread count; the
ratios between items are what carry over to other machines.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--facts", type=int, default=3)
    p.add_argument("--every", type=int, default=5, help="layer sweep: every k-th layer (default 5)")
    p.add_argument("--no-oracle", action="store_true", help="skip the severed paths' oracle")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch

    from editing import EditRequest, load_hparams
    from editing.stats import StatsSpec, ensure_stats
    from editing.evaluation.sweep import layer_sweep, sweep_layers
    from tracing import load_model, trace
    from tracing.recall import recalled_facts
    from tracing.sever import sever, sever_reference

    lm = load_model(args.model)
    facts = recalled_facts(lm)[: args.facts]
    hp = load_hparams(lm)
    spec = StatsSpec.from_hparams(hp)
    layers = sweep_layers(lm.n_layers, args.every)
    started = time.perf_counter()
    ensure_stats(lm, layers, spec)
    stats_seconds = time.perf_counter() - started
    rows = []
    for i, fact in enumerate(facts):
        row = {"prompt": fact["prompt"], "subject": fact["subject"], "attribute": fact["attribute"]}
        t = time.perf_counter()
        results = trace(lm, fact["prompt"], fact["subject"], answer=fact["attribute"])
        row["trace_s"] = time.perf_counter() - t
        row["tokens"] = len(results[0].tokens)
        t = time.perf_counter()
        severed = sever(lm, fact["prompt"], fact["subject"], answer=fact["attribute"])
        row["sever_s"] = time.perf_counter() - t
        if i == 0 and not args.no_oracle:
            t = time.perf_counter()
            slow = sever_reference(lm, fact["prompt"], fact["subject"], answer=fact["attribute"])
            row["sever_oracle_s"] = time.perf_counter() - t
            row["sever_oracle_max_diff"] = float(max(abs(severed.unsevered - slow.unsevered).max(),
                                                     *(abs(severed.severed[k] - slow.severed[k]).max()
                                                       for k in severed.severed)))
        others = [f["attribute"] for f in facts if f["attribute"] != fact["attribute"]] or ["Antarctica"]
        request = EditRequest(fact["subject"], fact["prompt"].replace(fact["subject"], "{}", 1), others[0],
                              fact["attribute"])
        t = time.perf_counter()
        sweep = layer_sweep(lm, request, layers=layers, hparams=hp, stats_spec=spec)
        row["sweep_s"] = time.perf_counter() - t
        row["sweep_layers"] = len(layers)
        row["sweep_best"] = sweep["best"]
        rows.append(row)
        print(f"[{i + 1}/{len(facts)}] {row['tokens']:>3} tokens  trace {row['trace_s']:6.1f} s  "
              f"severed {row['sever_s']:5.1f} s" + (f" (oracle {row['sever_oracle_s']:.1f} s)" if "sever_oracle_s" in row
                                                   else "") + f"  sweep of {len(layers)} layers {row['sweep_s']:6.1f} s  "
              f"{fact['prompt']!r}", flush=True)
    summary = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "model": lm.name, "facts": len(rows),
        "stats_s": stats_seconds,
        "trace_s_median": statistics.median(r["trace_s"] for r in rows),
        "sever_s_median": statistics.median(r["sever_s"] for r in rows),
        "sweep_s_median": statistics.median(r["sweep_s"] for r in rows),
        "sweep_s_per_layer": statistics.median(r["sweep_s"] / r["sweep_layers"] for r in rows),
        "rows": rows,
    }
    if rows and "sever_oracle_s" in rows[0]:
        summary["sever_speedup_over_oracle"] = rows[0]["sever_oracle_s"] / rows[0]["sever_s"]
    print(f"{summary['cpu']}, {summary['threads']} threads, {lm.name}: per fact (median) trace "
          f"{summary['trace_s_median']:.1f} s, severed paths {summary['sever_s_median']:.1f} s, layer sweep "
          f"{summary['sweep_s_median']:.1f} s ({summary['sweep_s_per_layer']:.1f} s per layer); statistics for "
          f"{len(layers)} layers once: {stats_seconds:.1f} s")
    if "sever_speedup_over_oracle" in summary:
        print(f"severed paths, fast vs one-layer-per-pass oracle: {summary['sever_speedup_over_oracle']:.1f}x "
              f"(max difference {rows[0]['sever_oracle_max_diff']:.1e})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
