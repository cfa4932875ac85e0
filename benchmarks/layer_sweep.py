"""Choose a model's ROME edit layer: CounterFact-style scores of edits at each candidate layer.

Example::

    .venv/bin/python benchmarks/layer_sweep.py --layers 2 4 6 8 10 12 --limit 16 --json out/sweep.json
    .venv/bin/python benchmarks/layer_sweep.py --report out/sweep-a.json out/sweep-b.json   # merge and print

Every layer edits the same cases (the first ``--limit`` of the set) with the
same hyperparameters; the table shows post-edit ES, PS, NS, S, the pre-edit
NS for reference, the mean update norm and seconds per edit. Statistics for
all candidate layers are computed in one pass first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def table(rows: list[dict]) -> str:
    head = f"{'layer':>5}{'ES':>7}{'PS':>7}{'NS':>7}{'S':>7}{'NS pre':>8}{'|ΔW|':>8}{'steps':>7}{'s/edit':>8}"
    lines = [head]
    for r in sorted(rows, key=lambda r: r["layer"]):
        post, pre = r["post"], r["pre"]
        lines.append(f"{r['layer']:>5}{post['ES']:>7.3f}{post['PS']:>7.3f}{post['NS']:>7.3f}{post['S']:>7.3f}"
                     f"{pre['NS']:>8.3f}{r['norm']:>8.2f}{r['steps']:>7.1f}{r['seconds_per_edit']:>8.1f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--cases", default=str(ROOT / "assets" / "counterfact_smollm2.json"))
    parser.add_argument("--layers", nargs="+", type=int, default=None)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="hyperparameter override")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--report", nargs="+", default=None, help="print the merged table of earlier --json files")
    args = parser.parse_args()
    if args.report:
        rows = [row for path in args.report for row in json.loads(Path(path).read_text())["layers"]]
        print(table(rows))
        return 0

    import numpy as np
    import torch

    from editing import load_hparams
    from editing.evaluate import evaluate_cases, read_cases
    from editing.stats import StatsSpec, ensure_stats
    from tracing.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    overrides = {k: json.loads(v) for k, _, v in (item.partition("=") for item in args.set)}
    hp = load_hparams(lm, **overrides)
    layers = args.layers or list(range(1, lm.n_layers // 2 + 1))
    cases = read_cases(args.cases)[: args.limit]
    spec = StatsSpec.from_hparams(hp)
    t0 = time.perf_counter()
    ensure_stats(lm, layers, spec)
    print(f"statistics for layers {layers}: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for layer in layers:
        result = evaluate_cases(lm, cases, layer=layer, hparams=hp, stats_spec=spec)
        row = {"layer": layer, "pre": result["pre"], "post": result["post"],
               "norm": float(np.mean([c["norm"] for c in result["per_case"]])),
               "steps": float(np.mean([c["steps"] for c in result["per_case"]])),
               "seconds_per_edit": result["seconds_per_edit"], "per_case": result["per_case"]}
        rows.append(row)
        print(table([row]).split("\n")[1], flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"model": lm.name, "cases": len(cases), "hparams": hp.to_dict(),
                                                   "layers": rows}, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
