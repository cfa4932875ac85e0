"""``python -m editing.presets``: choose preset facts the model knows and write them as JSON.

Example::

    python -m editing.presets --out assets/presets.json
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from tracing.cli import add_common_args, load_from_args, start

from .facts import PRESETS_PATH, find_presets, save_presets


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: choose presets for a model and write them as JSON."""
    parser = argparse.ArgumentParser(prog="python -m editing.presets",
                                     description="Pick known facts (with counterfactuals) for the app's presets.")
    parser.add_argument("--n", type=int, default=12, help="how many presets (default 12)")
    parser.add_argument("--min-probability", type=float, default=0.2, help="least p(answer) of a chosen fact")
    parser.add_argument("--max-tokens", type=int, default=12, help="longest prompt, in tokens")
    parser.add_argument("--max-corrupted-ratio", type=float, default=0.5,
                        help="skip facts whose corrupted p(answer) exceeds this fraction of the clean one")
    parser.add_argument("--out", default=str(PRESETS_PATH), help="where to write the JSON")
    args = add_common_args(parser, device=False).parse_args(argv)
    start(args, level=logging.INFO)
    lm = load_from_args(args)
    presets = find_presets(lm, n=args.n, min_probability=args.min_probability, max_tokens=args.max_tokens,
                           max_corrupted_ratio=args.max_corrupted_ratio)
    path = save_presets(presets, lm, args.out)
    for p in presets:
        print(f"{p.probability:5.2f} -> {p.corrupted:5.2f}  {p.prompt!r} -> {p.attribute!r}; edit to {p.counterfactual!r}")
    print(f"Wrote {len(presets)} presets to {path}")


if __name__ == "__main__":
    main()
