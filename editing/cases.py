"""``python -m editing.cases``: write a CounterFact-style set of facts the model knows (the command line of
:mod:`editing.evaluation.cases`).

Example::

    python -m editing.cases --out assets/counterfact_smollm2.json --n 60
    python -m editing.cases --out assets/counterfact_smollm2_all.json --n 0 \\
        --split assets/counterfact_smollm2_tune.json assets/counterfact_smollm2_heldout.json
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from tracing.cli import add_common_args, load_from_args, start

from .evaluation.cases import DEFAULT_FACTS, build_cases, read_facts, split_cases


def _write(path: str, cases: list[dict]) -> None:
    Path(path).write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m editing.cases``: write a CounterFact-style set of facts the model knows."""
    parser = argparse.ArgumentParser(prog="python -m editing.cases", description=main.__doc__)
    parser.add_argument("--out", required=True, help="output JSON file")
    parser.add_argument("--facts", default=str(DEFAULT_FACTS), help="known facts JSON (known_1000.json format)")
    parser.add_argument("--n", type=int, default=60, help="number of cases (0: every fact the model knows that can "
                                                          "be made a case)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", nargs=2, default=None, metavar=("TUNE", "HELDOUT"),
                        help="also write the cases split by subject into a tuning and a held-out file")
    parser.add_argument("--tune-fraction", type=float, default=0.5, help="share of subjects in the tuning part")
    parser.add_argument("--split-seed", type=int, default=0)
    args = add_common_args(parser, device=False, threads=True).parse_args(argv)
    start(args, level=logging.INFO)
    if args.split and not 0.0 < args.tune_fraction < 1.0:
        parser.error("--tune-fraction must lie strictly between 0 and 1")
    lm = load_from_args(args)
    facts = read_facts(args.facts)
    cases = build_cases(lm, facts, args.n if args.n > 0 else len(facts), seed=args.seed)
    _write(args.out, cases)
    relations = len({c["requested_rewrite"]["relation_id"] for c in cases})
    print(f"wrote {len(cases)} cases over {relations} relations to {args.out}")
    if args.split:
        for path, part in zip(args.split, split_cases(cases, args.tune_fraction, seed=args.split_seed)):
            _write(path, part)
            print(f"wrote {len(part)} cases ({len({c['requested_rewrite']['subject'] for c in part})} subjects) "
                  f"to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
