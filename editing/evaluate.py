"""``python -m editing.evaluate``: CounterFact-style scores of one editing method on a set of cases.

The command line of :mod:`editing.evaluation.evaluate` (see there for what is measured). Example::

    python -m editing.evaluate --cases assets/counterfact_smollm2.json --json out/eval.json --limit 40
    python -m editing.evaluate --cases assets/counterfact_smollm2_heldout.json --method memit --batch 100 --limit 100
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from tracing.cli import Column, add_common_args, cell, load_from_args, model_options, start, table
from tracing.models import LoadedModel
from tracing.workers import add_ray_args, pool_from_args

from .edit import method_label
from .evaluation.evaluate import METRICS, evaluate_batches, evaluate_cases, read_cases
from .hparams import METHODS, VARIANTS, HyperParams, load_hparams
from .methods import memit_layers
from .stats import StatsSpec

CHECKPOINTS = (Column("facts", 8, "d"), Column("ES", 8), Column("PS", 8), Column("NS", 8), Column("S", 8),
               Column("fluency", 9), Column("max |dW|/|W|", 15), Column("facts p", 9, ".2f"))


def _metric_lines(result: dict) -> list[str]:
    """Pre, post and (when there are intervals) the post 95 % interval of each metric."""
    ci = result.get("post_ci95") or {}
    head = [Column("metric", 10, "", "<"), Column("pre", 10), Column("post", 10)]
    rows = [(m, result["pre"].get(m), result["post"].get(m),
             f"{cell(ci[m][0], 14)} – {cell(ci[m][1], 0)}" if m in ci else "")
            for m in (*METRICS, "fluency") if m in result["pre"] or m in result["post"]]
    return [*table([*head, *([Column("post 95 % interval", 22, "")] if ci else [])], []),
            *table([*head, Column("", 0, "")], rows, header=False)]


def _checkpoint_lines(result: dict) -> list[str]:
    lines = table(CHECKPOINTS, [])
    for point in result["checkpoints"]:
        h = point["health"]
        lines += table(CHECKPOINTS, [(point["facts"], *(point.get(k) for k in ("ES", "PS", "NS", "S")),
                                      point.get("fluency"), max(h["relative_norms"], default=0), h["fact_share"])],
                       header=False)
        lines += [f"{'':>8}warning: {warning}" for warning in h["warnings"]]
    return lines


def format_table(result: dict) -> str:
    """The pre/post summary as a text table."""
    lines = _metric_lines(result)
    batch, sequential = result.get("batch", 1), result.get("sequential", False)
    how = (f", batches of {batch}" if batch > 1 else "") + (", one after another" if sequential else "") + \
        (", projected" if result.get("project") else "")
    lines.append(f"{method_label(result.get('method', 'rome'))}: {result['cases']} cases{how}, "
                 f"{result['seconds_per_edit']:.1f} s per {'batch' if batch > 1 else 'edit'} "
                 f"(median {result['seconds_per_edit_median']:.1f} s)")
    answered = result.get("answered_paraphrases")
    if answered and answered.get("PS") is not None:
        lines.append(f"PS over the {answered['prompts']} of {answered['of']} paraphrase prompts the unedited model "
                     f"answers (p(old) >= {answered['threshold']:g}): {answered['PS']:.3f} (all, pooled: "
                     f"{answered['PS_all']:.3f})")
    if result.get("not_taken") or result.get("retried"):
        lines.append(f"edits that did not take: {result.get('not_taken', 0)}; taken only on a retry: "
                     f"{result.get('retried', 0)}")
    if result.get("checkpoints"):
        lines += _checkpoint_lines(result)
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m editing.evaluate", description=main.__doc__)
    parser.add_argument("--cases", required=True, help="CounterFact-format JSON list")
    parser.add_argument("--method", choices=METHODS, default="rome",
                        help="rome (default), ft (fine-tuning), ft-l (constrained fine-tuning), kn (knowledge neurons) "
                             "or memit (many facts at once)")
    parser.add_argument("--batch", type=int, default=1, help="write this many cases as one edit (memit)")
    parser.add_argument("--sequential", action="store_true",
                        help="write the edits one after another into the same model; score every case written so far")
    parser.add_argument("--project", action="store_true",
                        help="memit: keep the keys of earlier edits (and the null space) unchanged (AlphaEdit)")
    parser.add_argument("--checkpoints", type=int, nargs="*", default=None,
                        help="with --sequential: score after this many facts (default 1 10 100 1000) and at the end")
    parser.add_argument("--layer", type=int, default=None,
                        help="edit layer (default: hyperparameters; kn: search only this layer; memit: its last)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N cases")
    parser.add_argument("--variant", choices=VARIANTS, default=None, help="ROME's variant")
    parser.add_argument("--hparams", default=None,
                        help="a hyperparameter JSON file instead of assets/hparams (ft, ft-l, kn: assets/hparams/<method>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override one hyperparameter, e.g. --set v_num_grad_steps=10")
    parser.add_argument("--generation-tokens", type=int, default=0,
                        help="generate this many tokens per generation prompt for the fluency score (0: skip)")
    parser.add_argument("--stats-tokens", type=int, default=None, help="ROME's statistics corpus size")
    add_ray_args(parser)
    return add_common_args(parser, dtype=True, threads=True, json_out="file", quiet="no per-case lines")


def _check(args: argparse.Namespace) -> None:
    """The combinations of options that cannot work, refused before the model loads."""
    if args.method not in ("rome", "memit") and args.stats_tokens:
        raise ValueError("--stats-tokens is ROME's and MEMIT's; leave it out for --method " + args.method)
    if args.method != "rome" and args.variant:
        raise ValueError("--variant is ROME's; leave it out for --method " + args.method)
    if args.batch < 1:
        raise ValueError("--batch must be at least 1")
    if args.batch > 1 and args.method != "memit":
        raise ValueError(f"--batch {args.batch} needs --method memit: the other methods write one fact per edit")
    if args.project and args.method != "memit":
        raise ValueError("--project needs --method memit")
    if args.ray and (args.batch > 1 or args.sequential):
        raise ValueError("--ray runs one-case edits on workers; leave it out with --batch or --sequential")


def _hparams(args: argparse.Namespace, lm: LoadedModel) -> tuple[HyperParams, StatsSpec | None]:
    """The method's hyperparameters with ``--set`` and ``--variant``, and the statistics ROME and MEMIT need."""
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    _check(args)
    if args.variant:
        overrides["variant"] = args.variant
    hp = load_hparams(lm, path=args.hparams, method=args.method, **overrides)
    if args.method not in ("rome", "memit"):
        return hp, None
    return hp, StatsSpec(corpus=hp.stats_corpus, n_tokens=args.stats_tokens or hp.stats_tokens, seed=hp.stats_seed,
                         sample_length=hp.stats_sample_length, top_k=hp.stats_top_k)


def _where(args: argparse.Namespace, lm: LoadedModel, hp: HyperParams) -> tuple[int | None, str]:
    """The layer passed to the method and the words that say where it edits."""
    if args.method == "kn":
        return args.layer, "every layer" if args.layer is None else f"layer {args.layer}"
    if args.method == "memit":
        return args.layer, "layers " + ", ".join(map(str, memit_layers(lm, hp, args.layer)))
    layer = args.layer if args.layer is not None else hp.edit_layer(lm.n_layers)
    return layer, f"layer {layer}"


def _case_line(i: int, total: int, record: dict) -> str:
    r, pre, post = record["request"], record["pre"], record["post"]
    return (f"[{i + 1}/{total}] {r['prompt'].replace('{}', r['subject'])!r} -> {r['target']!r}: "
            f"ES {pre['ES']:.0f}->{post['ES']:.0f}  PS {pre['PS'] or 0:.2f}->{post['PS'] or 0:.2f}  "
            f"NS {pre['NS'] or 0:.2f}->{post['NS'] or 0:.2f}  |ΔW| {record['norm']:.3g}  {record['seconds']:.1f} s")


def _edit_line(g: int, summary: dict) -> str:
    line = f"[edit {g + 1}] {summary['facts']} fact(s), |ΔW| {summary['norm']:.3g}, {summary['seconds']:.1f} s"
    point = summary.get("checkpoint")
    if point:
        line += (f"; after {point['facts']} facts: ES {point['ES']:.3f} PS {point['PS']:.3f} NS {point['NS']:.3f}"
                 f" S {point['S']:.3f}")
        if point.get("fluency") is not None:
            line += f" fluency {point['fluency']:.3f}"
    return line


def _run(args: argparse.Namespace, lm: LoadedModel, cases: list[dict], hp: HyperParams, spec, layer) -> dict:
    """Single edits, or batches and sequences of them, with a line per case or edit unless ``--quiet``."""
    options = {"method": args.method, "layer": layer, "hparams": hp, "generation_tokens": args.generation_tokens,
               "stats_spec": spec}
    if args.batch > 1 or args.sequential:
        on_edit = None if args.quiet else lambda g, summary: print(_edit_line(g, summary), flush=True)
        return evaluate_batches(lm, cases, batch=args.batch, sequential=args.sequential, project=args.project,
                                checkpoints=args.checkpoints, on_edit=on_edit, **options)
    on_case = None if args.quiet else lambda i, record: print(_case_line(i, len(cases), record), flush=True)
    return evaluate_cases(lm, cases, on_case=on_case, pool=pool_from_args(args, **model_options(args)), **options)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m editing.evaluate``: CounterFact-style scores of one editing method on a set of cases."""
    parser = _parser()
    args = parser.parse_args(argv)
    start(args)
    try:
        cases = read_cases(args.cases)
        if args.limit is not None:
            cases = cases[: args.limit]
        lm = load_from_args(args)
        hp, spec = _hparams(args, lm)
    except (ValueError, LookupError) as exc:
        parser.error(str(exc))
    layer, where = _where(args, lm, hp)
    variant = getattr(hp, "variant", "")
    print(f"{lm.name}: {len(cases)} cases, {method_label(args.method)} at {where}"
          + (f", variant {variant}" if variant else ""), flush=True)
    result = _run(args, lm, cases, hp, spec, layer)
    result.update({"model": lm.name, "layer": layer, "variant": variant, "dtype": str(lm.dtype),
                   "hparams": hp.to_dict(), "cases_file": str(args.cases)})
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
