"""Which layer to edit: ROME at each candidate layer, and how well the traced effect predicts edit success.

Example::

    from editing.sweep import layer_sweep
    sweep = layer_sweep(lm, EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome", "Paris"),
                        layers=range(0, 30, 3), paraphrases=["{} stands in the city of"],
                        neighbours=["The Louvre is located in the city of"])
    sweep["layers"][0]      # {'layer': 0, 'ES': 1.0, 'PS': 1.0, 'NS': 0.5, 'p_new': 0.93, 'rewrite_score': 0.93, ...}

or over a CounterFact-style set, with the traced MLP effect at each edit layer
and its correlation with edit success (Hase et al., 2023)::

    python -m editing.sweep --cases assets/counterfact_smollm2_tune.json --limit 30 --every 3 --json out/sweep.json

Edit success per layer, as Hase et al. measure it: the *rewrite score*
``(p_post(new) - p_pre(new)) / (1 - p_pre(new))`` on the rewrite prompt (1 =
the new object is certain, 0 = no change), the same averaged over the
paraphrases, and CounterFact's ES/PS/NS. The traced effect at a layer is the
MLP trace's restored p(answer) at the last subject token minus the corrupted
run's (paper settings, window 10, the trace of the rewrite prompt with the
true object as answer).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from tracing.average import cached_trace
from tracing.models import LoadedModel, cache_dir, read_json_cache, write_json_cache
from tracing.result import TraceConfig
from tracing.workers import WorkerPool, add_ray_args, each_result, pool_from_args

from .edit import EditRequest, applied
from .evaluate import request_of
from .hparams import HyperParams, load_hparams
from .methods.rome import compute_edit
from .scores import EditScores, score_edit

SweepProgress = Callable[[int, int, int], None]  # (layers done, layers in all, the layer now starting)

__all__ = ["correlations", "layer_sweep", "rewrite_score", "sweep_cases", "sweep_layers"]


def sweep_layers(n_layers: int, every: int = 1, layers: Iterable[int] | None = None) -> list[int]:
    """The candidate layers: ``layers`` if given (checked), else 0, every, 2*every, ... below ``n_layers``."""
    if layers is not None:
        chosen = sorted(set(int(l) for l in layers))
        bad = [l for l in chosen if not 0 <= l < n_layers]
        if bad or not chosen:
            raise ValueError(f"Layers {bad or 'none'} are not layers of this {n_layers}-layer model.")
        return chosen
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}.")
    return list(range(0, n_layers, every))


def rewrite_score(pre: float, post: float) -> float:
    """Hase et al.'s rewrite score: the share of the way from p_pre(new) to certainty that the edit went."""
    return (post - pre) / (1.0 - pre) if pre < 1.0 else 0.0


def _layer_row(layer: int, pre: EditScores, post: EditScores, edit, seconds: float) -> dict:
    rw = [i for i, k in enumerate(post.kinds) if k == "rewrite"][0]
    para = [i for i, k in enumerate(post.kinds) if k == "paraphrase"]
    p_new, p_old = float(post.prob_new[rw]), float(post.prob_old[rw])
    summary = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in post.summary().items()}
    return {
        "layer": layer,
        **summary,
        "p_new": p_new,
        "p_old": p_old,
        "rewrite_score": rewrite_score(float(pre.prob_new[rw]), p_new),
        "paraphrase_score": (float(np.mean([rewrite_score(float(pre.prob_new[i]), float(post.prob_new[i]))
                                            for i in para])) if para else None),
        "took": p_new > p_old,
        "norm": float(edit.norm),
        "steps": edit.info.get("steps"),
        "seconds": round(seconds, 3),
    }


def layer_sweep(
    lm: LoadedModel,
    request: EditRequest,
    *,
    layers: Iterable[int] | None = None,
    every: int = 1,
    paraphrases: Sequence[str] = (),
    neighbours: Sequence[str] = (),
    hparams: HyperParams | None = None,
    stats_spec=None,
    previous: Sequence = (),
    progress: SweepProgress | None = None,
) -> dict:
    """ROME edits of one fact at each candidate layer (each applied alone on top of ``previous``), scored.

    Returns ``{"request", "pre", "layers": [row per layer], "best"}``: each
    row has the layer, ES/PS/NS/S (and EM/PM/NM) after the edit, the rewrite
    prompt's ``p_new``/``p_old``, ``rewrite_score``, ``paraphrase_score``,
    ``took`` (p_new > p_old on the rewrite prompt), the update's norm, the
    optimisation's steps and seconds. ``best`` is the layer of the highest S
    (ties: the higher rewrite score, then the lower layer), None without
    rows. ``progress(done, total, layer)`` is called before each layer (an
    exception it raises stops the sweep; the weights are restored).
    """
    request.validate()
    if request.target_true is None:
        raise ValueError("The layer sweep needs the old object (target_true) to score the edits.")
    chosen = sweep_layers(lm.n_layers, every, layers)
    hp = hparams if hparams is not None else load_hparams(lm)
    paraphrases, neighbours = tuple(paraphrases), tuple(neighbours)
    rows = []
    with applied(lm, list(previous)):
        pre = score_edit(lm, request, paraphrases=paraphrases, neighbours=neighbours)
        for done, layer in enumerate(chosen):
            if progress:
                progress(done, len(chosen), layer)
            started = time.perf_counter()
            # no retry: the sweep shows where the hyperparameters' own optimisation takes
            edit = compute_edit(lm, request, layer=layer, hparams=hp, stats_spec=stats_spec, retries=0)
            with applied(lm, [edit]):
                post = score_edit(lm, request, paraphrases=paraphrases, neighbours=neighbours)
            rows.append(_layer_row(layer, pre, post, edit, time.perf_counter() - started))
    if progress:
        progress(len(chosen), len(chosen), -1)
    best = max(rows, key=lambda r: (r["S"] or 0.0, r["rewrite_score"], -r["layer"]))["layer"] if rows else None
    return {"request": request.to_dict(), "pre": pre.summary(), "layers": rows, "best": best}


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def correlations(cases: Sequence[dict], success: Sequence[str] = ("rewrite_score", "paraphrase_score", "ES", "PS", "S")) -> dict:
    """How well the traced effect at the edit layer predicts edit success (Hase et al., 2023).

    ``cases``: ``[{"effect": [per layer], "layers": [sweep rows]}]``. For
    each success measure: the pooled Pearson r and R² over every (case,
    layer) pair, and the per-case r across layers (mean and median over the
    cases where it is defined), plus how often the traced peak layer is also
    the best edit layer.
    """
    out: dict = {}
    for measure in success:
        xs, ys, per_case = [], [], []
        for case in cases:
            x = [case["effect"][row["layer"]] for row in case["layers"]]
            y = [np.nan if row.get(measure) is None else row[measure] for row in case["layers"]]
            xs += x
            ys += y
            r = _pearson(x, y)
            if r is not None:
                per_case.append(r)
        pooled = _pearson(xs, ys)
        out[measure] = {
            "pooled_r": pooled, "pooled_r2": None if pooled is None else pooled**2, "pairs": len(xs),
            "per_case_r_mean": float(np.mean(per_case)) if per_case else None,
            "per_case_r_median": float(np.median(per_case)) if per_case else None, "cases_with_r": len(per_case),
        }
    agree = [max(c["layers"], key=lambda r: c["effect"][r["layer"]])["layer"] == c["best"] for c in cases if c["layers"]]
    out["traced_peak_is_best_layer"] = float(np.mean(agree)) if agree else None
    return out


def sweep_case(lm: LoadedModel, item: tuple[int, dict], *, layers: Sequence[int], hparams: HyperParams,
               stats_spec=None) -> dict:
    """One case's layer sweep and traced MLP effect per layer (uncached): ``item`` is (index, CounterFact record)."""
    i, case = item
    request = request_of(case)
    fact = {"prompt": request.text, "subject": request.subject.strip(), "attribute": request.target_true}
    (mlp,) = cached_trace(lm, fact, TraceConfig(tokens="subject_last"), kinds=("mlp",))
    last = mlp.subject_range[1] - 1
    effect = (mlp.scores[last] - mlp.low_score).tolist()
    sweep = layer_sweep(lm, request, layers=layers, paraphrases=case.get("paraphrase_prompts") or (),
                        neighbours=case.get("neighborhood_prompts") or (), hparams=hparams, stats_spec=stats_spec)
    return {"case_id": case.get("case_id", i), **sweep, "effect": effect, "clean": mlp.high_score,
            "corrupted": mlp.low_score}


def sweep_cases(
    lm: LoadedModel,
    cases: Sequence[dict],
    *,
    layers: Iterable[int] | None = None,
    every: int = 1,
    hparams: HyperParams | None = None,
    stats_spec=None,
    on_case: Callable[[int, dict], None] | None = None,
    cache: Path | None = None,
    pool: WorkerPool | None = None,
) -> dict:
    """:func:`layer_sweep` over CounterFact-style cases, each with its traced MLP effect per layer.

    Each case's sweep is cached on disk (``cache``, default
    ``$LOCATE_EDIT_CACHE/sweeps``; key: the model's fingerprint, the case,
    the layers and the hyperparameters), so an interrupted run resumes. With
    ``pool`` (:class:`~tracing.workers.WorkerPool`) the uncached cases are swept
    on its workers and cached here as they finish (cached ones are reported first).

    Returns ``{"layers", "cases": [{"case_id", "request", "effect", "pre",
    "layers", "best"}], "per_layer": [{layer, ES, PS, NS, S, rewrite_score,
    took, effect}], "correlation": correlations(...)}``.
    """
    chosen = sweep_layers(lm.n_layers, every, layers)
    hp = hparams if hparams is not None else load_hparams(lm)
    folder = Path(cache or cache_dir() / "sweeps") / lm.fingerprint
    keys = [json.dumps([case, chosen, hp.settings()], sort_keys=True, default=str) for case in cases]
    paths = [folder / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json" for key in keys]
    records = {i: _read_cached(path, key) for i, (path, key) in enumerate(zip(paths, keys))}
    todo = [i for i, record in records.items() if record is None]
    for i, record in records.items():
        if record is not None and on_case:
            on_case(i, record)
    job = functools.partial(sweep_case, layers=chosen, hparams=hp, stats_spec=stats_spec)
    for j, record in each_result(lm, job, [(i, cases[i]) for i in todo], pool):
        write_json_cache(paths[todo[j]], {"key": keys[todo[j]], "record": record})
        records[todo[j]] = record
        if on_case:
            on_case(todo[j], record)
    out_cases = [records[i] for i in range(len(cases))]
    per_layer = []
    for j, layer in enumerate(chosen):
        rows = [c["layers"][j] for c in out_cases]
        entry = {"layer": layer, "effect": float(np.mean([c["effect"][layer] for c in out_cases]))}
        for key in ("ES", "PS", "NS", "S", "rewrite_score", "paraphrase_score", "took", "seconds"):
            values = [float(r[key]) for r in rows if r.get(key) is not None]
            entry[key] = float(np.mean(values)) if values else None
        per_layer.append(entry)
    return {"model": lm.name, "layers": chosen, "n_cases": len(out_cases), "per_layer": per_layer,
            "correlation": correlations(out_cases), "cases": out_cases}


def _read_cached(path: Path, key: str) -> dict | None:
    data = read_json_cache(path)
    return data.get("record") if isinstance(data, dict) and data.get("key") == key else None


def format_table(result: dict) -> str:
    """Per-layer means of a :func:`sweep_cases` result, then the correlations."""
    lines = [f"{result['model']}: {result['n_cases']} cases",
             f"{'layer':>5}{'effect':>9}{'ES':>7}{'PS':>7}{'NS':>7}{'S':>7}{'rewrite':>9}{'para':>7}{'took':>7}{'s':>6}"]
    for r in result["per_layer"]:
        cell = lambda v, w=7, f=".3f": f"{v:>{w}{f}}" if v is not None else f"{'-':>{w}}"  # noqa: E731
        lines.append(f"{r['layer']:>5}{cell(r['effect'], 9, '.4f')}{cell(r['ES'])}{cell(r['PS'])}{cell(r['NS'])}"
                     f"{cell(r['S'])}{cell(r['rewrite_score'], 9)}{cell(r['paraphrase_score'])}{cell(r['took'])}"
                     f"{cell(r['seconds'], 6, '.1f')}")
    corr = result["correlation"]
    for measure, c in corr.items():
        if isinstance(c, dict):
            fmt = lambda v: "-" if v is None else f"{v:+.3f}"  # noqa: E731
            lines.append(f"traced effect vs {measure}: pooled r {fmt(c['pooled_r'])} (R² {fmt(c['pooled_r2'])}, "
                         f"{c['pairs']} pairs); per case r mean {fmt(c['per_case_r_mean'])}, "
                         f"median {fmt(c['per_case_r_median'])} ({c['cases_with_r']} cases)")
    share = corr.get("traced_peak_is_best_layer")
    if share is not None:
        lines.append(f"the traced peak layer is the best edit layer in {share:.0%} of cases")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys

    from tracing.models import DEFAULT_MODEL

    from tracing.loading import load_model

    from .evaluate import read_cases
    from .stats import StatsSpec, ensure_stats

    p = argparse.ArgumentParser(
        prog="python -m editing.sweep",
        description="ROME at each candidate layer over CounterFact-style cases: per-layer ES/PS/NS and rewrite "
        "scores, each case's traced MLP effect per layer, and how well that effect predicts edit success.",
        epilog="Example: python -m editing.sweep --cases assets/counterfact_smollm2_tune.json --limit 30 "
        "--every 3 --json out/sweep.json",
    )
    p.add_argument("--cases", required=True, help="CounterFact-format JSON (e.g. assets/counterfact_smollm2_tune.json)")
    p.add_argument("--limit", type=int, default=None, help="the first N cases (default: all)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: every --every-th layer)")
    p.add_argument("--every", type=int, default=3, help="every k-th layer from 0 (default 3)")
    p.add_argument("--model", default=None, help=f"Hugging Face id or local path; default: the embedded {DEFAULT_MODEL}")
    p.add_argument("--hparams", default=None, help="a ROME hyperparameter JSON (default: the model's)")
    p.add_argument("--json", metavar="OUT", default=None, help="write every case and layer as JSON")
    p.add_argument("--quiet", action="store_true", help="no per-case lines")
    add_ray_args(p)
    args = p.parse_args(argv)
    try:
        lm = load_model(args.model)
        cases = read_cases(args.cases)[: args.limit]
        hp = load_hparams(lm, path=args.hparams) if args.hparams else load_hparams(lm)
        layers = [int(v) for v in args.layers.split(",") if v.strip()] if args.layers else None
        chosen = sweep_layers(lm.n_layers, args.every, layers)
        spec = StatsSpec.from_hparams(hp)
        ensure_stats(lm, chosen, spec)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()

    def on_case(i: int, record: dict) -> None:
        if not args.quiet:
            best = record["best"]
            print(f"[{i + 1}/{len(cases)}] {time.perf_counter() - started:7.1f} s  {record['request']['prompt']!r} "
                  f"-> {record['request']['target']}: best layer {best}", flush=True)

    result = sweep_cases(lm, cases, layers=chosen, hparams=hp, stats_spec=spec, on_case=on_case,
                         pool=pool_from_args(args, name=args.model))
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
