"""``python -m editing.batch``: write the facts of a CSV or JSON file as one MEMIT batch and show what changed.

Example::

    python -m editing.batch --requests facts.csv --save out/batch.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from tracing.cli import Column, add_common_args, load_from_args, start, table

from ..applying import check_edits
from ..edit_files import load_edits, save_edits
from ..hparams import load_hparams
from . import BatchResult, read_requests, write_batch

FACTS = (Column("fact", 52, "", "<"), Column("new", 14, "", "<"), Column("p(new) before", 14),
         Column("after", 8), Column("p(old) before", 15), Column("after", 8))
SUMMARY = (Column("", 10, "", "<"), *(Column(k, 8) for k in ("ES", "PS", "NS", "S")))


def format_result(result: BatchResult) -> str:
    """A plain-text table of a batch: one line per fact, then the scores and the health check."""
    rows = []
    for row in result.rows():
        text = row["prompt"].replace("{}", row["subject"], 1)
        rows.append((text if len(text) <= 50 else text[:47] + "...", row["target"][:13], row["p_new_before"],
                     row["p_new_after"], row["p_old_before"], row["p_old_after"]))
    scores = [(which, *(result.summary(which)[k] for k in ("ES", "PS", "NS", "S"))) for which in ("before", "after")]
    lines = [*table(FACTS, rows), "", *table(SUMMARY, scores),
             f"\n{len(result.items)} facts in one MEMIT edit at layers {', '.join(map(str, result.edit.layers))}, "
             f"|ΔW| {result.edit.norm:.3g}, {result.seconds:.1f} s"]
    if result.health is not None:
        lines.extend(["health: " + w for w in result.health.warnings] or ["health: nothing looks wrong"])
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m editing.batch", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", required=True,
                        help="CSV (subject,prompt,target[,old]) or JSON (facts, CounterFact cases or presets)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N facts")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="MEMIT's layers (default: hyperparameters)")
    parser.add_argument("--hparams", default=None, help="MEMIT hyperparameter JSON file")
    parser.add_argument("--project", action="store_true", help="keep the keys of --load's edits (AlphaEdit)")
    parser.add_argument("--load", nargs="*", default=[], help="edit files to apply first")
    parser.add_argument("--save", default=None, help="write the loaded edits plus this batch to a .safetensors file")
    parser.add_argument("--no-health", action="store_true", help="skip the health check")
    return add_common_args(parser, dtype=True, threads=True, json_out="flag", verbose=True)


def _write(args: argparse.Namespace) -> tuple[BatchResult, list]:
    """Read the facts, load the model and the earlier edits, and write the batch; the earlier edits come back too."""
    items = read_requests(args.requests, max_bytes=50_000_000)[: args.limit]
    if not items:
        raise ValueError(f"{args.requests} holds no facts.")
    lm = load_from_args(args)
    hp = load_hparams(lm, path=args.hparams, method="memit")
    previous = [e for path in args.load for e in load_edits(path)]
    check_edits(lm, previous)

    def progress(stage: str, fraction: float) -> None:
        if args.verbose and fraction in (0.0, 1.0):
            print(f"  {stage} {fraction:4.0%}", file=sys.stderr)

    result = write_batch(lm, items, hparams=hp, layers=args.layers, previous=previous, project=args.project,
                         check_health=not args.no_health, progress=progress)
    return result, previous


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the facts of a CSV or JSON file as one MEMIT batch and show what changed."""
    args = _parser().parse_args(argv)
    start(args)
    try:
        result, previous = _write(args)
        if args.save:
            save_edits([*previous, result.edit], args.save)
    except (ValueError, LookupError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=1, ensure_ascii=False))
    else:
        print(format_result(result))
        if args.save:
            print(f"\nsaved {len(previous) + 1} edit(s) to {args.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
