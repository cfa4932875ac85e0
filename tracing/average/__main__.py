"""``python -m tracing.average``: causal traces averaged over the known facts a model recalls, printed and saved.

Example::

    python -m tracing.average --limit 20 --json out/average.json --html out/average.html
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..assets import known_facts
from ..cli import Column, add_common_args, cell, load_from_args, model_options, start, table
from ..plots import average_page
from ..recall import recalled_facts
from ..workers import add_ray_args, pool_from_args
from . import extend_averages, peaks, read_averages, ship_path

COLUMNS = (Column("kind", 7, "", "<"), Column("token group", 25, "", "<"), Column("n", 6, "d"),
           Column("peak layer", 12, "d"), Column("restored", 10, ".4f"), Column("+-95%", 8, ".4f"),
           Column("effect", 9, ".4f"))


def format_table(summary: dict) -> str:
    """The averages as text: clean/corrupted, then per kind and group the peak layer and its mean +- CI."""
    rows = []
    for kind, data in summary["kinds"].items():
        for g, name in enumerate(data["groups"]):
            mean = np.array(data["mean"][g], dtype=np.float64)
            if np.isnan(mean).all():
                rows.append((kind, name, data["n"][g], None))
                continue
            layer = int(np.nanargmax(mean))
            rows.append((kind, name, data["n"][g], layer, mean[layer], data["ci95"][g][layer],
                         mean[layer] - summary["corrupted"]))
    num = lambda v: cell(v, 0, ".4f")  # noqa: E731
    lines = [f"{summary['model']}: {summary['n_facts']} facts; clean {num(summary['clean'])} "
             f"(+-{num(summary['clean_ci95'])}), corrupted {num(summary['corrupted'])} "
             f"(+-{num(summary['corrupted_ci95'])})", *table(COLUMNS, rows)]
    for kind, p in peaks(summary).items():
        lines.append(f"peak {kind}: {p['group']}, layer {p['layer']}: {p['mean']:.4f} (effect {p['effect']:+.4f})")
    severed = summary.get("severed")
    if severed:
        lines.append(f"severed paths at the last subject token ({severed['n']} facts): restored hidden state, "
                     "unsevered - severed, per layer")
        for kind, gap in severed["gap"].items():
            lines.append(f"  {kind:<5}" + " ".join(f"{v:.3f}" if v is not None else "-" for v in gap["mean"]))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tracing.average",
        description="Causal traces averaged over the known facts a model recalls, by token group and layer "
        "(the paper's Fig. 2). Each fact's trace is cached, so an interrupted run resumes.",
        epilog="Example: python -m tracing.average --limit 20 --json out/average.json --html out/average.html",
    )
    p.add_argument("--limit", type=int, default=None, help="trace the first N recalled facts (default: all)")
    p.add_argument("--facts", default=None, help="a known-facts JSON file (default: the paper's, assets/known_facts.json)")
    p.add_argument("--cache", default=None, help="folder of per-fact traces (default: $LOCATE_EDIT_CACHE/traces)")
    p.add_argument("--html", metavar="OUT", default=None, help="write the figures as an HTML page")
    p.add_argument("--ship", action="store_true",
                   help="also write assets/averages/<model>.json, which the page shows (paper settings only)")
    p.add_argument("--merge", metavar="FILE", nargs="+", default=[],
                   help="averages of other facts (a shipped file, another machine's --json) to pool with this run; "
                   "the facts they hold are not traced again")
    p.add_argument("--no-sever", action="store_true", help="skip the severed paths (the paper's Fig. 3)")
    add_ray_args(p)
    return add_common_args(p, json_out="file", quiet="no per-fact progress lines")


def _write(path: str | Path, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start(args, level=logging.INFO)
    try:
        lm = load_from_args(args)
        facts = recalled_facts(lm, known_facts(args.facts) if args.facts else None)
        merged = [read_averages(path) for path in args.merge]
        pool = pool_from_args(args, **model_options(args))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()

    def progress(done: int, total: int, fact: dict) -> None:
        if not args.quiet:
            print(f"[{done}/{total}] {time.perf_counter() - started:7.1f} s  {fact['prompt']} -> {fact['attribute']}",
                  flush=True)

    try:
        summary = extend_averages(lm, facts[: args.limit] if args.limit is not None else facts, merged,
                                  cache=Path(args.cache) if args.cache else None, severed=not args.no_sever,
                                  progress=progress, pool=pool)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary["n_recalled"] = len(facts)
    summary["command"] = "python -m tracing.average " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_table(summary))
    if args.ship:
        _write(ship_path(lm), json.dumps(summary, indent=1) + "\n")
        print(f"shipped: {ship_path(lm)}")
    if args.json:
        _write(args.json, json.dumps(summary, indent=1))
    if args.html:
        _write(args.html, average_page(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
