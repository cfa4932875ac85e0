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
import logging
import sys
from collections.abc import Sequence


def _fmt(x) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from tracing.loading import load_model

    from . import EditRequest, check_edits, load_edits, load_hparams, save_edits
    from .compare import edit_and_compare
    from .hparams import METHODS, VARIANTS
    from .stats import StatsSpec

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
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats-tokens", type=int, default=None, help="statistics corpus size (default: hyperparameters)")
    parser.add_argument("--load", nargs="*", default=[], help="edit files to apply first (sequential editing)")
    parser.add_argument("--save", default=None, help="write the loaded edits plus this one to a .safetensors file")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        request = EditRequest(args.subject, args.prompt, args.target, args.target_true)
        request.validate()
        if args.variant and args.method != "rome":
            raise ValueError(f"--variant is ROME's; leave it out for --method {args.method}.")
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
        hp = load_hparams(lm, path=args.hparams, method=args.method,
                          **({"variant": args.variant} if args.variant else {}))
        spec = None
        if args.method in ("rome", "memit"):
            spec = StatsSpec.from_hparams(hp, **({"n_tokens": args.stats_tokens} if args.stats_tokens else {}))
        previous = [e for path in args.load for e in load_edits(path)]
        check_edits(lm, previous)
        prompts = args.generate if args.generate else [request.text]
        shown: list[str] = []

        def progress(stage: str, fraction: float) -> None:
            if args.verbose and (not shown or shown[-1] != stage or fraction >= 1.0):
                print(f"  {stage} {fraction:4.0%}", file=sys.stderr)
                shown.append(stage)

        result = edit_and_compare(lm, request, layer=args.layer, hparams=hp, method=args.method,
                                  paraphrases=args.paraphrase,
                                  neighbours=args.neighbour, generate_prompts=prompts,
                                  max_new_tokens=args.max_new_tokens, sample=args.sample, seed=args.seed,
                                  previous=previous, stats_spec=spec, progress=progress)
        edit, before, after = result.edit, result.scores_before, result.scores_after
        before_text, after_text = result.before, result.after
        if args.save:
            save_edits([*previous, edit], args.save)
    except (ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.json:
        print(json.dumps({
            "edit": edit.metadata(),
            "generations": [{"prompt": p, "before": a, "after": b} for p, a, b in zip(prompts, before_text, after_text)],
            "before": before.to_dict(), "after": after.to_dict(),
        }, indent=1, ensure_ascii=False))
        return 0
    print(f"Edit: {edit.describe()}")
    print("      " + ", ".join(f"{k} {v:.2f} s" for k, v in edit.timings.items()))
    if edit.info.get("outlier_warning"):  # flagged when computed, before it was applied
        print(f"warning: {edit.info['outlier_warning']}")
    if edit.info.get("warning"):
        print(f"warning: {edit.info['warning']}")
    elif edit.info.get("retried"):
        print(f"      (took on a second optimisation: {edit.info['retried']['steps']} steps)")
    print()
    for prompt, a, b in zip(prompts, before_text, after_text):
        print(f"{prompt!r}")
        print(f"  before: {a!r}")
        print(f"  after:  {b!r}")
    print()
    print(f"{'prompt':<50}{'p(new) before':>15}{'p(new) after':>14}{'p(old) before':>15}{'p(old) after':>14}")
    for rb, ra in zip(before.rows(), after.rows()):
        label = f"[{rb['kind'][:5]}] {rb['prompt']}"
        label = label if len(label) <= 48 else label[:45] + "..."
        print(f"{label:<50}{rb['p_new']:>15.4f}{ra['p_new']:>14.4f}{rb['p_old']:>15.4f}{ra['p_old']:>14.4f}")
    print()
    sb, sa = before.summary(), after.summary()
    print("          " + "".join(f"{k:>8}" for k in ("ES", "PS", "NS", "S")))
    print("before    " + "".join(f"{_fmt(sb[k]):>8}" for k in ("ES", "PS", "NS", "S")))
    print("after     " + "".join(f"{_fmt(sa[k]):>8}" for k in ("ES", "PS", "NS", "S")))
    if args.save:
        print(f"\nsaved {len(previous) + 1} edit(s) to {args.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
