"""The paper's editors side by side (Table 4): FT, FT+L, KN and ROME on the same CounterFact-style cases.

Example::

    .venv/bin/python benchmarks/methods_table.py --generation-tokens 20 --json out/methods.json
    .venv/bin/python benchmarks/methods_table.py --report out/methods.json      # print the table again

Every method edits every case (each edit on the original model, with the
method's shipped hyperparameters for the model, ``assets/hparams/<method>/``)
through :func:`editing.evaluation.evaluate.evaluate_cases`; the unedited model's scores
and generations are computed once and shared. The Markdown table gives the
post-edit ES, PS, NS, S, the magnitudes EM, PM, NM (mean p(new) − p(old); for
neighbours p(old) − p(new)), the generation entropy and seconds per edit, with
the unedited model first; ``--tuning N`` adds the same figures over the cases
after the first N (the ones no hyperparameter was chosen on). The JSON is
written after every method, so a long run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLUMNS = ("ES", "PS", "NS", "S", "EM", "PM", "NM", "fluency")


def _fmt(value) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"


def table(results: dict, tuning: int = 0) -> str:
    """Markdown rows: before any edit, then one per method (and per method over the held-out cases)."""
    from editing.edit import method_label
    from editing.evaluation.evaluate import aggregate

    head = "| method | ES | PS | NS | S | EM | PM | NM | entropy | seconds per edit |"
    lines = [head, "|" + "---|" * 10]
    first = next(iter(results.values()))
    lines.append("| before any edit | " + " | ".join(_fmt(first["pre"].get(k)) for k in COLUMNS) + " | |")
    for method, result in results.items():
        cells = " | ".join(_fmt(result["post"].get(k)) for k in COLUMNS)
        lines.append(f"| {method_label(method)} | {cells} | {result['seconds_per_edit']:.1f} |")
    if tuning:
        for method, result in results.items():
            held = result["per_case"][tuning:]
            if not held:
                continue
            post = aggregate(held, "post")
            seconds = sum(c["seconds"] for c in held) / len(held)
            cells = " | ".join(_fmt(post.get(k)) for k in COLUMNS)
            label = f"{method_label(method)}, cases {tuning + 1}-{tuning + len(held)} only"
            lines.append(f"| {label} | {cells} | {seconds:.1f} |")
    n = len(first["per_case"])
    lines.append(f"\n{n} cases; entropy: mean n-gram entropy of the generations (fluency), '-' without --generation-tokens.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--cases", default=str(ROOT / "assets" / "counterfact_smollm2.json"))
    parser.add_argument("--methods", nargs="+", default=["ft", "ft-l", "kn", "rome"])
    parser.add_argument("--limit", type=int, default=None, help="the first N cases only")
    parser.add_argument("--generation-tokens", type=int, default=0, help="tokens per generation prompt (entropy)")
    parser.add_argument("--tuning", type=int, default=12,
                        help="the first N cases were the tuning subset: also report the rest alone (0: no)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--report", default=None, help="print the table of an earlier --json file")
    args = parser.parse_args()
    if args.report:
        print(table(json.loads(Path(args.report).read_text())["methods"], args.tuning))
        return 0

    import torch

    from editing.evaluation.evaluate import evaluate_cases, read_cases
    from editing.hparams import check_method, load_hparams
    from tracing.loading import load_model

    for method in args.methods:
        check_method(method)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    cases = read_cases(args.cases)[: args.limit]
    before: dict = {}
    results: dict = {}
    for method in args.methods:
        hp = load_hparams(lm, method=method)
        print(f"{method}: {len(cases)} cases ({hp.description[:100]}...)", file=sys.stderr, flush=True)
        result = evaluate_cases(lm, cases, method=method, hparams=hp, generation_tokens=args.generation_tokens,
                                before=before,
                                on_case=lambda i, r: print(f"  [{i + 1}/{len(cases)}] {r['seconds']:.1f} s",
                                                           file=sys.stderr, flush=True))
        result["hparams"] = hp.to_dict()
        results[method] = result
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"model": lm.name, "cases_file": str(args.cases),
                                                   "generation_tokens": args.generation_tokens, "methods": results},
                                                  indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(table(results, args.tuning))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
