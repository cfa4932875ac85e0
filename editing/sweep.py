"""``python -m editing.sweep``: ROME at each candidate layer over CounterFact-style cases (the command line of
:mod:`editing.evaluation.sweep`).

Example::

    python -m editing.sweep --cases assets/counterfact_smollm2_tune.json --limit 30 --every 3 --json out/sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tracing.cli import Column, add_common_args, load_from_args, model_options, start, table
from tracing.workers import add_ray_args, pool_from_args

from .evaluation.evaluate import read_cases
from .evaluation.sweep import sweep_cases, sweep_layers
from .hparams import load_hparams
from .stats import StatsSpec, ensure_stats

COLUMNS = (Column("layer", 5, "d"), Column("effect", 9, ".4f"), Column("ES", 7), Column("PS", 7), Column("NS", 7),
           Column("S", 7), Column("rewrite", 9), Column("para", 7), Column("took", 7), Column("s", 6, ".1f"))
KEYS = ("layer", "effect", "ES", "PS", "NS", "S", "rewrite_score", "paraphrase_score", "took", "seconds")


def format_table(result: dict) -> str:
    """Per-layer means of a :func:`~editing.evaluation.sweep.sweep_cases` result, then the correlations."""
    lines = [f"{result['model']}: {result['n_cases']} cases",
             *table(COLUMNS, [[r[k] for k in KEYS] for r in result["per_layer"]])]
    corr = result["correlation"]
    fmt = lambda v: "-" if v is None else f"{v:+.3f}"  # noqa: E731
    for measure, c in corr.items():
        if isinstance(c, dict):
            lines.append(f"traced effect vs {measure}: pooled r {fmt(c['pooled_r'])} (R² {fmt(c['pooled_r2'])}, "
                         f"{c['pairs']} pairs); per case r mean {fmt(c['per_case_r_mean'])}, "
                         f"median {fmt(c['per_case_r_median'])} ({c['cases_with_r']} cases)")
    share = corr.get("traced_peak_is_best_layer")
    if share is not None:
        lines.append(f"the traced peak layer is the best edit layer in {share:.0%} of cases")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m editing.sweep",
        description="ROME at each candidate layer over CounterFact-style cases: per-layer ES/PS/NS and rewrite "
        "scores, each case's traced MLP effect per layer, and how well that effect predicts edit success.",
        epilog="Example: python -m editing.sweep --cases assets/counterfact_smollm2_tune.json --limit 30 "
        "--every 3 --json out/sweep.json",
    )
    p.add_argument("--cases", required=True, help="CounterFact-format JSON (e.g. assets/counterfact_smollm2_tune.json)")
    p.add_argument("--limit", type=int, default=None, help="the first N cases (default: all)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: every --every-th layer)")
    p.add_argument("--every", type=int, default=3, help="every k-th layer from 0 (default 3)")
    p.add_argument("--hparams", default=None, help="a ROME hyperparameter JSON (default: the model's)")
    add_ray_args(p)
    return add_common_args(p, device=False, json_out="file", quiet="no per-case lines")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start(args)
    try:
        lm = load_from_args(args)
        cases = read_cases(args.cases)[: args.limit]
        hp = load_hparams(lm, path=args.hparams) if args.hparams else load_hparams(lm)
        layers = [int(v) for v in args.layers.split(",") if v.strip()] if args.layers else None
        chosen = sweep_layers(lm.n_layers, args.every, layers)
        spec = StatsSpec.from_hparams(hp)
        ensure_stats(lm, chosen, spec)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()

    def on_case(i: int, record: dict) -> None:
        if not args.quiet:
            print(f"[{i + 1}/{len(cases)}] {time.perf_counter() - started:7.1f} s  {record['request']['prompt']!r} "
                  f"-> {record['request']['target']}: best layer {record['best']}", flush=True)

    result = sweep_cases(lm, cases, layers=chosen, hparams=hp, stats_spec=spec, on_case=on_case,
                         pool=pool_from_args(args, **model_options(args)))
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
