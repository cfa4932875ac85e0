"""``python -m editing``: rewrite one fact (ROME, or ``--method``) and show generations and scores before and after.

Example::

    python -m editing --subject "The Eiffel Tower" --prompt "{} is located in the city of" --target "Rome" \\
        --generate "The Eiffel Tower is" "The Louvre is located in the city of" \\
        --paraphrase "Where is the Eiffel Tower? It is in the city of" \\
        --neighbour "The Louvre is located in the city of" --save out/eiffel.safetensors
    python -m editing --method memit --subject "The Eiffel Tower" --prompt "{} is located in the city of" \\
        --target "Rome"
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from tracing.cli import Column, add_common_args, load_from_args, start, table

from .compare import EditComparison, edit_and_compare
from .edit import EditRequest
from .applying import check_edits
from .edit_files import load_edits, save_edits
from .hparams import METHODS, VARIANTS, load_hparams
from .stats import StatsSpec

ROWS = (Column("prompt", 50, "", "<"), Column("p(new) before", 15, ".4f"), Column("p(new) after", 14, ".4f"),
        Column("p(old) before", 15, ".4f"), Column("p(old) after", 14, ".4f"))
SUMMARY = (Column("", 10, "", "<"), *(Column(k, 8) for k in ("ES", "PS", "NS", "S")))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m editing", description=__doc__.split("\n")[0])
    parser.add_argument("--subject", required=True)
    parser.add_argument("--prompt", required=True, help="relation prompt with {} for the subject")
    parser.add_argument("--target", required=True, help="the new object")
    parser.add_argument("--target-true", default=None, help="the old object (default: the model's own answer)")
    parser.add_argument("--generate", nargs="*", default=None,
                        help="prompts to continue before and after (default: the rewrite prompt)")
    parser.add_argument("--paraphrase", nargs="*", default=[], help="paraphrases of the rewrite prompt")
    parser.add_argument("--neighbour", nargs="*", default=[], help="prompts about other subjects that must keep the old object")
    parser.add_argument("--method", choices=METHODS, default="rome",
                        help="rome (default), ft, ft-l, kn or memit (a batch of one over MEMIT's layers)")
    parser.add_argument("--layer", type=int, default=None, help="edit layer (memit: the last of its range)")
    parser.add_argument("--variant", choices=VARIANTS, default=None, help="ROME's variant")
    parser.add_argument("--hparams", default=None, help="hyperparameter JSON file")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats-tokens", type=int, default=None, help="statistics corpus size (default: hyperparameters)")
    parser.add_argument("--load", nargs="*", default=[], help="edit files to apply first (sequential editing)")
    parser.add_argument("--save", default=None, help="write the loaded edits plus this one to a .safetensors file")
    return add_common_args(parser, dtype=True, threads=True, json_out="flag", verbose=True)


def _edit(args: argparse.Namespace) -> tuple[EditComparison, list]:
    """Load the model and the earlier edits, compute the edit and compare; the earlier edits come back too."""
    request = EditRequest(args.subject, args.prompt, args.target, args.target_true)
    request.validate()
    if args.variant and args.method != "rome":
        raise ValueError(f"--variant is ROME's; leave it out for --method {args.method}.")
    lm = load_from_args(args)
    hp = load_hparams(lm, path=args.hparams, method=args.method, **({"variant": args.variant} if args.variant else {}))
    spec = None
    if args.method in ("rome", "memit"):
        spec = StatsSpec.from_hparams(hp, **({"n_tokens": args.stats_tokens} if args.stats_tokens else {}))
    previous = [e for path in args.load for e in load_edits(path)]
    check_edits(lm, previous)
    shown: list[str] = []

    def progress(stage: str, fraction: float) -> None:
        if args.verbose and (not shown or shown[-1] != stage or fraction >= 1.0):
            print(f"  {stage} {fraction:4.0%}", file=sys.stderr)
            shown.append(stage)

    result = edit_and_compare(lm, request, layer=args.layer, hparams=hp, method=args.method,
                              paraphrases=args.paraphrase, neighbours=args.neighbour,
                              generate_prompts=args.generate if args.generate else [request.text],
                              max_new_tokens=args.max_new_tokens, sample=args.sample, seed=args.seed,
                              previous=previous, stats_spec=spec, progress=progress)
    return result, previous


def _text(result: EditComparison, prompts: Sequence[str]) -> list[str]:
    edit, before, after = result.edit, result.scores_before, result.scores_after
    lines = [f"Edit: {edit.describe()}", "      " + ", ".join(f"{k} {v:.2f} s" for k, v in edit.timings.items())]
    if edit.info.get("outlier_warning"):  # flagged when computed, before it was applied
        lines.append(f"warning: {edit.info['outlier_warning']}")
    if edit.info.get("warning"):
        lines.append(f"warning: {edit.info['warning']}")
    elif edit.info.get("retried"):
        lines.append(f"      (took on a second optimisation: {edit.info['retried']['steps']} steps)")
    lines.append("")
    for prompt, a, b in zip(prompts, result.before, result.after):
        lines += [f"{prompt!r}", f"  before: {a!r}", f"  after:  {b!r}"]
    lines.append("")
    rows = []
    for rb, ra in zip(before.rows(), after.rows()):
        label = f"[{rb['kind'][:5]}] {rb['prompt']}"
        rows.append((label if len(label) <= 48 else label[:45] + "...", rb["p_new"], ra["p_new"], rb["p_old"],
                     ra["p_old"]))
    lines += [*table(ROWS, rows), ""]
    sb, sa = before.summary(), after.summary()
    return lines + table(SUMMARY, [("before", *(sb[k] for k in ("ES", "PS", "NS", "S"))),
                                   ("after", *(sa[k] for k in ("ES", "PS", "NS", "S")))])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start(args)
    try:
        result, previous = _edit(args)
        if args.save:
            save_edits([*previous, result.edit], args.save)
    except (ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prompts = args.generate if args.generate else [result.request.text]
    if args.json:
        print(json.dumps({
            "edit": result.edit.metadata(),
            "generations": [{"prompt": p, "before": a, "after": b}
                            for p, a, b in zip(prompts, result.before, result.after)],
            "before": result.scores_before.to_dict(), "after": result.scores_after.to_dict(),
        }, indent=1, ensure_ascii=False))
        return 0
    print("\n".join(_text(result, prompts)))
    if args.save:
        print(f"\nsaved {len(previous) + 1} edit(s) to {args.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
