"""``python -m editing.stats``: precompute the key statistics C = E[k kᵀ] of the layers ROME and MEMIT edit.

Example::

    python -m editing.stats --layers all --threads 2
    python -m editing.stats --ship          # also ship the sampled corpus in assets/stats/
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Sequence

from tracing.assets import ROOT as ASSETS
from tracing.cli import add_common_args, load_from_args, start

from ..hparams import load_hparams
from . import StatsSpec, ensure_stats, shipped_corpus_path, stats_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m editing.stats", description=main.__doc__)
    parser.add_argument("--layers", nargs="*", default=None,
                        help="layers to compute (default: the model's edit layer); 'all' for every layer")
    parser.add_argument("--tokens", type=int, default=None, help="corpus size in tokens (default: hyperparameters)")
    parser.add_argument("--corpus", default=None, help="'model', 'file:PATH' or 'hf:NAME[:CONFIG]'")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--batch-rows", type=int, default=64)
    parser.add_argument("--ship", action="store_true",
                        help="also copy the sampled corpus into assets/stats/ to ship it with the project")
    return add_common_args(parser, dtype=True, threads=True)


def _layers(args: argparse.Namespace, lm, hp) -> list[int]:
    if args.layers is None or args.layers == []:
        return [hp.edit_layer(lm.n_layers)]
    if args.layers == ["all"]:
        return list(range(lm.n_layers))
    return [int(x) for x in args.layers]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m editing.stats``: precompute key statistics."""
    parser = _parser()
    args = parser.parse_args(argv)
    start(args, level=logging.INFO)
    lm = load_from_args(args)
    hp = load_hparams(lm)
    changes = {"batch_rows": args.batch_rows}
    for key, value in (("n_tokens", args.tokens), ("corpus", args.corpus), ("seed", args.seed)):
        if value is not None:
            changes[key] = value
    spec = StatsSpec.from_hparams(hp, **changes)
    shown = {"step": -1}

    def show(stage: str, fraction: float) -> None:
        percent = int(fraction * 100)
        if percent // 5 != shown["step"]:
            shown["step"] = percent // 5
            print(f"  {stage}: {percent:3d}%", flush=True)

    t0 = time.perf_counter()
    result = ensure_stats(lm, _layers(args, lm, hp), spec, progress=show)
    seconds = time.perf_counter() - t0
    for layer, stats in sorted(result.items()):
        print(f"layer {layer}: {stats.count} tokens, {stats.path}")
    print(f"done in {seconds:.1f} s (corpus {spec.corpus}, {spec.n_tokens} tokens)")
    if args.ship:
        if spec.corpus != "model":
            parser.error("--ship is for the sampled corpus ('model'); text corpora are not shipped")
        target = shipped_corpus_path(lm, spec)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stats_dir(lm, spec) / "corpus.safetensors", target)
        print(f"shipped the corpus as {target.relative_to(ASSETS.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
