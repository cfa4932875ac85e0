"""Evaluate an editing method on CounterFact-format cases: pre/post efficacy, paraphrase, neighbourhood, S, fluency.

Each case's edit is computed by one method (``--method rome|ft|ft-l|kn``, see
:mod:`editing.methods`) on, and applied to, the *original* model in turn
(``applied`` restores it after each case). Besides ES, PS, NS and S it reports
the magnitudes EM, PM, NM (mean p(new) − p(old); for neighbours p(old) −
p(new)) and, with ``--generation-tokens``, the generation entropy ("fluency"),
as in the paper's Table 4. Records are read as-is in the
CounterFact format: ``requested_rewrite`` (``prompt`` with ``{}``,
``subject``, ``target_new.str``, ``target_true.str``), ``paraphrase_prompts``,
``neighborhood_prompts`` and optional ``generation_prompts``.

Example::

    python -m editing.evaluate --cases assets/counterfact_smollm2.json --json out/eval.json --limit 40
    python -m editing.evaluate --cases assets/counterfact_smollm2.json --method ft-l --generation-tokens 20

writes ``{"method": ..., "pre": {"ES", "PS", "NS", "S", "EM", ...}, "post": {...}, "per_case": [...],
"seconds_per_edit": ...}`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tracing.models import LoadedModel

from .edit import EditRequest, applied, method_label
from .hparams import METHODS, VARIANTS, HyperParams
from .methods import compute
from .sampling import generate
from .scores import fluency, harmonic_mean, score_edit

log = logging.getLogger(__name__)

METRICS = ("ES", "PS", "NS", "S", "EM", "PM", "NM")


def read_cases(path: str | Path) -> list[dict]:
    """CounterFact-format records; ValueError naming the first malformed one."""
    try:
        cases = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"Cannot read cases from {path}: {exc}") from None
    if not isinstance(cases, list) or not cases:
        raise ValueError(f"{path} must hold a non-empty JSON list of CounterFact records.")
    for i, case in enumerate(cases):
        try:
            request_of(case).validate()
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"Case {i} of {path} is not a usable CounterFact record: {exc}") from None
    return cases


def request_of(case: dict) -> EditRequest:
    """The EditRequest of a CounterFact record."""
    rw = case["requested_rewrite"]
    return EditRequest(subject=rw["subject"], prompt=rw["prompt"], target=rw["target_new"]["str"],
                       target_true=rw["target_true"]["str"])


def _nan_to_none(values: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


def _aggregate(per_case: Sequence[dict], which: str) -> dict:
    """Means over cases of the per-case metrics; S is the harmonic mean of the means of ES, PS, NS."""
    out = {}
    for metric in METRICS:
        if metric == "S":
            continue
        values = [c[which][metric] for c in per_case if c[which].get(metric) is not None]
        out[metric] = float(np.mean(values)) if values else float("nan")
    out["S"] = harmonic_mean([out["ES"], out["PS"], out["NS"]])
    values = [c[which]["fluency"] for c in per_case if c[which].get("fluency") is not None]
    if values:
        out["fluency"] = float(np.mean(values))
    return {k: out[k] for k in (*METRICS, "fluency") if k in out}


def evaluate_cases(
    lm: LoadedModel,
    cases: Sequence[dict],
    *,
    method: str = "rome",
    layer: int | None = None,
    hparams: HyperParams | None = None,
    generation_tokens: int = 0,
    stats_spec=None,
    on_case: Callable[[int, dict], None] | None = None,
    before: dict | None = None,
) -> dict:
    """Pre/post scores of ``method`` over ``cases``; each edit is applied to the original model alone.

    ``before``, a dict kept between calls, remembers the unedited model's
    scores and generations per case, so that comparing methods on the same
    cases computes them once.
    """
    per_case = []
    edit_seconds = []
    for i, case in enumerate(cases):
        request = request_of(case)
        paraphrases = list(case.get("paraphrase_prompts") or [])
        neighbours = list(case.get("neighborhood_prompts") or [])
        gen_prompts = list(case.get("generation_prompts") or [])[:2] if generation_tokens else []
        key = (json.dumps(case, sort_keys=True), generation_tokens)
        if before is not None and key in before:
            pre, pre_text = before[key]
        else:
            pre = score_edit(lm, request, paraphrases, neighbours)
            pre_text = generate(lm, gen_prompts, generation_tokens) if gen_prompts else []
            if before is not None:
                before[key] = (pre, pre_text)
        t0 = time.perf_counter()
        edit = compute(lm, request, method=method, layer=layer, hparams=hparams, stats_spec=stats_spec)
        edit_seconds.append(time.perf_counter() - t0)
        with applied(lm, [edit]):
            post = score_edit(lm, request, paraphrases, neighbours)
            post_text = generate(lm, gen_prompts, generation_tokens) if gen_prompts else []
        record = {
            "case_id": case.get("case_id", i),
            "request": request.to_dict(),
            "method": edit.method,
            "layer": edit.layer,
            "layers": list(edit.layers),
            "norm": edit.norm,
            "seconds": edit_seconds[-1],
            "steps": edit.info.get("steps"),
            "pre": _nan_to_none({**pre.summary(), "fluency": fluency(pre_text) if pre_text else float("nan")}),
            "post": _nan_to_none({**post.summary(), "fluency": fluency(post_text) if post_text else float("nan")}),
            "prompts": [
                {**a, "p_new_post": b["p_new"], "p_old_post": b["p_old"], "success_post": b["success"]}
                for a, b in zip(pre.rows(), post.rows())
            ],
        }
        if gen_prompts:
            record["generations"] = [{"prompt": p, "pre": a, "post": b}
                                     for p, a, b in zip(gen_prompts, pre_text, post_text)]
        per_case.append(record)
        if on_case:
            on_case(i, record)
    return {
        "method": method,
        "pre": _nan_to_none(_aggregate(per_case, "pre")),
        "post": _nan_to_none(_aggregate(per_case, "post")),
        "per_case": per_case,
        "seconds_per_edit": float(np.mean(edit_seconds)) if edit_seconds else None,
        "seconds_per_edit_median": float(np.median(edit_seconds)) if edit_seconds else None,
        "cases": len(per_case),
    }


def format_table(result: dict) -> str:
    """The pre/post summary as a text table."""
    lines = [f"{'metric':<10}{'pre':>10}{'post':>10}"]
    for metric in (*METRICS, "fluency"):
        if metric not in result["pre"] and metric not in result["post"]:
            continue
        a, b = result["pre"].get(metric), result["post"].get(metric)
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(f"{metric:<10}{fmt(a):>10}{fmt(b):>10}")
    lines.append(f"{method_label(result.get('method', 'rome'))}: {result['cases']} cases, "
                 f"{result['seconds_per_edit']:.1f} s per edit "
                 f"(median {result['seconds_per_edit_median']:.1f} s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m editing.evaluate``: CounterFact-style scores of one editing method on a set of cases."""
    import torch

    from tracing.models import load_model

    from .hparams import load_hparams
    from .stats import StatsSpec

    parser = argparse.ArgumentParser(prog="python -m editing.evaluate", description=main.__doc__)
    parser.add_argument("--cases", required=True, help="CounterFact-format JSON list")
    parser.add_argument("--json", default=None, help="write the full results here")
    parser.add_argument("--model", default=None, help="model name or path (default: embedded SmolLM2-135M)")
    parser.add_argument("--method", choices=METHODS, default="rome",
                        help="rome (default), ft (fine-tuning), ft-l (constrained fine-tuning) or kn (knowledge neurons)")
    parser.add_argument("--layer", type=int, default=None,
                        help="edit layer (default: hyperparameters; kn: search only this layer)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N cases")
    parser.add_argument("--variant", choices=VARIANTS, default=None, help="ROME's variant")
    parser.add_argument("--hparams", default=None,
                        help="a hyperparameter JSON file instead of assets/hparams (ft, ft-l, kn: assets/hparams/<method>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override one hyperparameter, e.g. --set v_num_grad_steps=10")
    parser.add_argument("--generation-tokens", type=int, default=0,
                        help="generate this many tokens per generation prompt for the fluency score (0: skip)")
    parser.add_argument("--stats-tokens", type=int, default=None, help="ROME's statistics corpus size")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="fp32 (default), bf16 or fp16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no per-case lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cases = read_cases(args.cases)
        if args.limit is not None:
            cases = cases[: args.limit]
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
        overrides = {}
        for item in args.set:
            key, _, value = item.partition("=")
            overrides[key] = json.loads(value)
        if args.method != "rome" and (args.variant or args.stats_tokens):
            raise ValueError("--variant and --stats-tokens are ROME's; leave them out for --method " + args.method)
        if args.variant:
            overrides["variant"] = args.variant
        hp = load_hparams(lm, path=args.hparams, method=args.method, **overrides)
        spec = None
        if args.method == "rome":
            spec = StatsSpec.from_hparams(hp, **({"n_tokens": args.stats_tokens} if args.stats_tokens else {}))
    except (ValueError, LookupError) as exc:
        parser.error(str(exc))
    if args.method == "kn":
        layer, where = args.layer, "every layer" if args.layer is None else f"layer {args.layer}"
    else:
        layer = args.layer if args.layer is not None else hp.edit_layer(lm.n_layers)
        where = f"layer {layer}"
    variant = getattr(hp, "variant", "")
    print(f"{lm.name}: {len(cases)} cases, {method_label(args.method)} at {where}"
          + (f", variant {variant}" if variant else ""), flush=True)

    def show(i: int, record: dict) -> None:
        if args.quiet:
            return
        r, pre, post = record["request"], record["pre"], record["post"]
        print(f"[{i + 1}/{len(cases)}] {r['prompt'].replace('{}', r['subject'])!r} -> {r['target']!r}: "
              f"ES {pre['ES']:.0f}->{post['ES']:.0f}  PS {pre['PS'] or 0:.2f}->{post['PS'] or 0:.2f}  "
              f"NS {pre['NS'] or 0:.2f}->{post['NS'] or 0:.2f}  |ΔW| {record['norm']:.3g}  {record['seconds']:.1f} s",
              flush=True)

    result = evaluate_cases(lm, cases, method=args.method, layer=layer, hparams=hp,
                            generation_tokens=args.generation_tokens, stats_spec=spec, on_case=show)
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
