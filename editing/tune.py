"""``python -m editing.tune``: choose ROME's hyperparameters on tuning cases (the command line of :mod:`editing.evaluation.tune`).

Example::

    python -m editing.tune --cases assets/counterfact_smollm2_tune.json --limit 30 \\
        --grid layer=0,1,2,4 --grid v_num_grad_steps=20,40 --json out/tune.json
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
from .evaluation.tune import FORMAT, cases_key, parse_grid, parse_settings, read_tuning, resumes, setting_text, tune

COLUMNS = (Column("ES", 7), Column("PS", 7), Column("PS 95 %", 14, ""), Column("NS", 7), Column("S", 7),
           Column("S 95 %", 14, ""), Column("ΔS vs ref (95 %)", 24, ""), Column("PM", 7), Column("miss", 5, "d"),
           Column("retry", 6, "d"), Column("steps", 7, ".1f"), Column("s/edit", 8, ".1f"), Column("  setting", 0, "", "<"))


def _cells(r: dict) -> tuple:
    post, ci = r["post"], r.get("ci95") or {}
    band = lambda m: f"{ci[m][0]:>7.3f}–{ci[m][1]:<6.3f}" if m in ci else None  # noqa: E731
    d = (r.get("vs_reference") or {}).get("S")
    return (post["ES"], post["PS"], band("PS"), post["NS"], post["S"], band("S"),
            f"{d[0]:+.3f} ({d[1]:+.3f} {d[2]:+.3f})" if d else "-", post["PM"], r["not_taken"], r["retried"],
            r["steps"], r["seconds_median"], "  " + setting_text(r["setting"]))


def format_table(result: dict) -> str:
    """The settings, best S first, then what each swept hyperparameter does to PS and S."""
    lines = [f"{result['model']}: {result['cases']} cases, {len(result['settings'])} settings"
             + (f" on top of {setting_text(result['base'])}" if result.get("base") else ""),
             *table(COLUMNS, map(_cells, result["settings"]))]
    if result.get("reference") is not None:
        lines.append(f"ref: {setting_text(result['reference'])}; a paired interval that excludes 0 is a real difference "
                     "on these cases")
    for key, entries in result.get("marginals", {}).items():
        lines.append(f"{key}: " + "; ".join(f"{e['value']}: PS {e['PS']:.3f} S {e['S']:.3f} ({e['settings']})"
                                          for e in entries))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m editing.tune",
        description="Choose ROME's hyperparameters: score every setting of a grid over the same tuning cases "
        "(ES/PS/NS/S with 95 % intervals, best first, and what each hyperparameter does to PS). "
        "A --json file that exists is resumed: its settings are not computed again.",
        epilog="Example: python -m editing.tune --cases assets/counterfact_smollm2_tune.json --limit 30 "
        "--grid layer=0,1,2 --grid kl_factor=0.0625,0.25 --json out/tune.json",
    )
    p.add_argument("--cases", required=True, help="CounterFact-format JSON (the tuning part, never the held-out one)")
    p.add_argument("--limit", type=int, default=None, help="the first N cases (default: all)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a hyperparameter and the values to try (repeat for a product of grids)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="a fixed override for every setting")
    p.add_argument("--hparams", default=None, help="a ROME hyperparameter JSON (default: the model's)")
    add_ray_args(p)
    return add_common_args(p, device=False, threads=True, json_out="file", quiet="no per-setting lines")


class _Saver:
    """Writes the rows scored so far after every setting, so that a stopped run resumes from there."""

    def __init__(self, args: argparse.Namespace, lm, cases: list[dict], previous: dict | None) -> None:
        self.args, self.lm, self.cases, self.previous = args, lm, cases, previous
        self.rows: list[dict] = []
        self.started = time.perf_counter()

    def save(self, result: dict) -> None:
        """The result plus the file's earlier settings that this grid did not score again."""
        scored = [r["hparams"] for r in result["settings"]]
        kept = [r for r in (self.previous or {}).get("settings", ()) if r["hparams"] not in scored]
        path = Path(self.args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "settings": result["settings"] + kept}, indent=1) + "\n",
                        encoding="utf-8")

    def on_setting(self, done: int, total: int, row: dict) -> None:
        self.rows.append(row)
        if self.args.json:
            self.save({"format": FORMAT, "model": self.lm.name, "fingerprint": self.lm.fingerprint,
                       "cases": len(self.cases), "cases_key": cases_key(self.cases), "settings": self.rows})
        if not self.args.quiet:
            post = row["post"]
            print(f"[{done}/{total}] {time.perf_counter() - self.started:7.1f} s  {setting_text(row['setting'])}: "
                  f"ES {post['ES']:.3f} PS {post['PS']:.3f} NS {post['NS']:.3f} S {post['S']:.3f}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start(args)
    try:
        grid, base = parse_grid(args.grid), parse_settings(args.set)
        cases = read_cases(args.cases)[: args.limit]
        previous = read_tuning(args.json) if args.json else None
        lm = load_from_args(args)
        if previous and not resumes(previous, lm, cases):
            raise ValueError(f"{args.json} was made with other weights or cases; choose another --json.")
        saver = _Saver(args, lm, cases, previous)
        result = tune(lm, cases, grid, base=base, hparams_path=args.hparams, previous=previous,
                      on_setting=saver.on_setting, pool=pool_from_args(args, **model_options(args)))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["command"] = "python -m editing.tune " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_table(result))
    if args.json:
        saver.save(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
