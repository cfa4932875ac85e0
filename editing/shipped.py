"""``python -m editing.shipped``: compute and write the shipped preset results, or time loading them (the command
line of :mod:`editing.presets.shipped`).

Example::

    python -m editing.shipped            # the default model and its shipped presets, about 10 minutes
    python -m editing.shipped --time     # what a first click costs after a restart
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tracing.cli import add_common_args, load_from_args, start
from tracing.models import LoadedModel
from tracing.result import TraceConfig

from .edit import EditRequest
from .hparams import load_hparams
from .presets import PRESETS_PATH, load_presets
from .presets.shipped import EDITS, PAGE_EDIT, RESULTS, compute_shipped, shipped_comparison, shipped_trace


def _time_loading(lm: LoadedModel, presets: Sequence, path: Path) -> int:
    """Seconds to load each preset's trace and edit comparison (what a first click costs after a restart)."""
    hp = load_hparams(lm)
    seconds, missing = [], []
    for p in presets:
        started = time.perf_counter()
        results = shipped_trace(lm, p.prompt, p.subject, p.attribute, TraceConfig(), path=path)
        comparison = shipped_comparison(
            lm, EditRequest(p.subject, p.rewrite_prompt, p.counterfactual, p.attribute),
            layer=hp.edit_layer(lm.n_layers), hparams=hp, paraphrases=p.paraphrases, neighbours=p.neighbours,
            path=path, **PAGE_EDIT)
        seconds.append(time.perf_counter() - started)
        if results is None or comparison is None:
            missing.append(p.label)
    print(f"{len(presets)} presets: trace and edit loaded in {min(seconds):.3f}-{max(seconds):.3f} s "
          f"(median {sorted(seconds)[len(seconds) // 2]:.3f} s); {path.stat().st_size / 1024:.0f} KB + "
          f"{path.with_name(EDITS.name).stat().st_size / 1024:.0f} KB")
    if missing:
        print(f"not shipped for this model and the page's settings: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: compute and write the shipped preset results (default model, its shipped presets)."""
    parser = argparse.ArgumentParser(prog="python -m editing.shipped", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=str(PRESETS_PATH), help="presets file (default: assets/presets.json)")
    parser.add_argument("--out", default=str(RESULTS), help="the JSON to write; the edits go next to it")
    parser.add_argument("--time", action="store_true",
                        help="compute nothing: time loading every preset's shipped trace and edit, as a first click")
    parser.add_argument("--keep-traces", action="store_true",
                        help="reuse the traces already shipped that still fit (same weights, settings, prompts): "
                        "after a change of edit settings only the edits are computed")
    args = add_common_args(parser, device=False, threads=True).parse_args(argv)
    start(args, level=logging.INFO)
    lm = load_from_args(args)
    shipped = load_presets(args.presets)
    if shipped.model != lm.name:
        print(f"error: {args.presets} holds presets of {shipped.model}, not {lm.name}; pass --presets for this model "
              "(python -m editing.presets --model ... --out ...).", file=sys.stderr)
        return 2
    if args.time:
        return _time_loading(lm, shipped.presets, Path(args.out))
    started = time.perf_counter()
    path = compute_shipped(lm, shipped.presets, path=args.out, keep_traces=args.keep_traces)
    edits = path.with_name(EDITS.name)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB) and {edits} ({edits.stat().st_size / 1024:.0f} KB) "
          f"for {len(shipped.presets)} presets in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
