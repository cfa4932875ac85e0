"""Evaluate an editing method on CounterFact-format cases: pre/post efficacy, paraphrase, neighbourhood, S, fluency.

Each case's edit is computed by one method (``--method rome|ft|ft-l|kn|memit``,
see :mod:`editing.methods`) on, and applied to, the *original* model in turn
(``applied`` restores it after each case). With ``--batch N`` (MEMIT) every N
cases are written as one edit, and with ``--sequential`` the edits (single
facts or batches) are written one after another into the same model, with
``--project`` each projected away from the keys of the earlier ones (see
:mod:`editing.sequential`); the scores are then those of *every* case written
so far, after 1, 10, 100, ... edits (``"checkpoints"``) and at the end
(``"post"``). In these runs a neighbour prompt that names a subject of the
run is left out (pre and post alike): that subject's own fact is rewritten. Besides ES, PS, NS and S it reports
the magnitudes EM, PM, NM (mean p(new) − p(old); for neighbours p(old) −
p(new)), EasyEdit's token-level accuracies ``rel_acc``, ``gen_acc``, ``loc_acc`` (Reliability,
Generalization, Locality: :func:`~editing.scores.accuracy_scores`; not ES/PS/NS) and, with ``--generation-tokens``, the generation entropy ("fluency"),
as in the paper's Table 4, and PS over the paraphrases the unedited model
answers (:func:`answered_paraphrases`). Records are read as-is in the
CounterFact format: ``requested_rewrite`` (``prompt`` with ``{}``,
``subject``, ``target_new.str``, ``target_true.str``), ``paraphrase_prompts``,
``neighborhood_prompts`` and optional ``generation_prompts``.

Example::

    python -m editing.evaluate --cases assets/counterfact_smollm2.json --json out/eval.json --limit 40
    python -m editing.evaluate --cases assets/counterfact_smollm2.json --method ft-l --generation-tokens 20
    python -m editing.evaluate --cases assets/counterfact_smollm2_heldout.json --method memit --batch 100 --limit 100
    python -m editing.evaluate --cases assets/counterfact_smollm2_heldout.json --method memit --sequential --project

writes ``{"method": ..., "batch": ..., "sequential": ..., "pre": {"ES", "PS", "NS", "S", "EM", ...}, "post": {...},
"per_case": [...], "seconds_per_edit": ...}`` (sequential runs add ``"checkpoints"``) and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tracing.models import LoadedModel
from tracing.workers import WorkerPool, add_ray_args, each_result, pool_from_args

from .edit import EditRequest, applied, method_label
from .hparams import METHODS, VARIANTS, HyperParams
from .methods import compute, compute_batch
from .sampling import generate
from .scores import (ACCURACY, EditScores, accuracy_scores, continuation_scores, fluency, harmonic_mean, score_edit,
                     token_predictions)

log = logging.getLogger(__name__)

METRICS = ("ES", "PS", "NS", "S", "EM", "PM", "NM", *ACCURACY)  # ACCURACY: EasyEdit's token-level rel/gen/loc_acc
ANSWERED = 0.05  # a paraphrase elicits the fact when the unedited model gives the old object at least this


def answered_paraphrases(per_case: Sequence[dict], threshold: float = ANSWERED) -> dict:
    """PS over the paraphrase prompts that elicit the fact before the edit: p(old object) >= ``threshold``.

    A paraphrase after which the unedited model gives neither object any
    weight ("Marco Tardelli plays as", for a footballer's position) compares
    two tiny probabilities; whether the edit wins there says little about
    generalisation. Pooled over prompts (PS itself is a mean over cases):
    ``{"threshold", "prompts", "of", "PS", "PS_all"}``, PS_all over every
    paraphrase prompt, pooled the same way.
    """
    rows = [p for c in per_case for p in c.get("prompts", ()) if p["kind"] == "paraphrase" and "success_post" in p]
    kept = [p for p in rows if p["p_old"] >= threshold]
    share = lambda items: float(np.mean([p["success_post"] for p in items])) if items else None  # noqa: E731
    return {"threshold": threshold, "prompts": len(kept), "of": len(rows), "PS": share(kept), "PS_all": share(rows)}


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


def _resampled(per_case: Sequence[dict], which: str, picks: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric aggregated over each resample of cases (``picks``: resamples x cases indices)."""
    names = [m for m in METRICS if m != "S"]
    values = np.array([[np.nan if c[which].get(m) is None else c[which][m] for m in names] for c in per_case],
                      dtype=np.float64)  # (cases, metrics without S)
    with warnings.catch_warnings():  # a resample without a paraphrase is NaN, and skipped
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(values[picks], axis=1)  # (resamples, metrics)
    out = dict(zip(names, means.T))
    es, ps, ns = out["ES"], out["PS"], out["NS"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["S"] = np.where((es > 0) & (ps > 0) & (ns > 0), 3.0 / (1.0 / es + 1.0 / ps + 1.0 / ns), 0.0)
    return out


def _picks(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _band(column: np.ndarray) -> list[float] | None:
    column = column[~np.isnan(column)]
    return [float(np.percentile(column, 2.5)), float(np.percentile(column, 97.5))] if len(column) else None


def intervals(per_case: Sequence[dict], which: str = "post", *, resamples: int = 2000, seed: int = 0) -> dict:
    """95 % bootstrap intervals over cases of ES, PS, NS, S, EM, PM, NM: ``{metric: [low, high]}``.

    Cases are resampled with replacement and each resample aggregated as
    :func:`evaluate_cases` does (S: the harmonic mean of the resample's mean
    ES, PS and NS), so S gets an interval too. Seeded: the same cases give the
    same intervals.
    """
    if len(per_case) < 2:
        return {}
    columns = _resampled(per_case, which, _picks(len(per_case), resamples, seed))
    bands = {m: _band(columns[m]) for m in METRICS}
    return {m: band for m, band in bands.items() if band is not None}


def paired_difference(per_case: Sequence[dict], reference: Sequence[dict], which: str = "post", *,
                      resamples: int = 2000, seed: int = 0) -> dict:
    """How ``per_case`` differs from ``reference`` on the same cases: ``{metric: [mean, low, high]}``.

    The mean difference of each aggregate (S included) with its 95 % interval
    from resampling the *cases* (both runs resampled alike), so a setting is
    compared with another case by case: far tighter than two separate intervals.
    """
    if len(per_case) != len(reference):
        raise ValueError(f"Paired runs need the same cases: {len(per_case)} and {len(reference)}.")
    if len(per_case) < 2:
        return {}
    picks = _picks(len(per_case), resamples, seed)
    a, b = _resampled(per_case, which, picks), _resampled(reference, which, picks)
    whole = _resampled(per_case, which, np.arange(len(per_case))[None]), _resampled(reference, which,
                                                                                   np.arange(len(per_case))[None])
    out = {}
    for m in METRICS:
        band = _band(a[m] - b[m])
        if band is not None:
            out[m] = [float(whole[0][m][0] - whole[1][m][0]), *band]
    return out


def evaluate_case(lm: LoadedModel, item: tuple[int, dict], *, method: str = "rome", layer: int | None = None,
                  hparams: HyperParams | None = None, generation_tokens: int = 0, stats_spec=None,
                  before: dict | None = None) -> dict:
    """One case's edit on the original model, scored before and after: ``item`` is (index, CounterFact record)."""
    i, case = item
    request = request_of(case)
    paraphrases = list(case.get("paraphrase_prompts") or [])
    neighbours = list(case.get("neighborhood_prompts") or [])
    gen_prompts = list(case.get("generation_prompts") or [])[:2] if generation_tokens else []
    key = (json.dumps(case, sort_keys=True), generation_tokens)
    if before is not None and key in before:
        pre, pre_text, pre_tokens = before[key]
    else:
        pre = score_edit(lm, request, paraphrases, neighbours)
        pre_text = generate(lm, gen_prompts, generation_tokens) if gen_prompts else []
        pre_tokens = token_predictions(lm, [pre])[0]
        if before is not None:
            before[key] = (pre, pre_text, pre_tokens)
    t0 = time.perf_counter()
    edit = compute(lm, request, method=method, layer=layer, hparams=hparams, stats_spec=stats_spec)
    seconds = time.perf_counter() - t0
    with applied(lm, [edit]):
        post = score_edit(lm, request, paraphrases, neighbours)
        post_tokens = token_predictions(lm, [post])[0]
        post_text = generate(lm, gen_prompts, generation_tokens) if gen_prompts else []
    record = {
        "case_id": case.get("case_id", i), "request": request.to_dict(), "method": edit.method, "layer": edit.layer,
        "layers": list(edit.layers), "norm": edit.norm, "seconds": seconds, "steps": edit.info.get("steps"),
        "took": edit.info.get("took"),  # ROME: the rewrite prompt prefers the new object after the edit
        "retried": bool(edit.info.get("retried")),
        "pre": _nan_to_none({**pre.summary(), **accuracy_scores(pre, pre_tokens),
                             "fluency": fluency(pre_text) if pre_text else float("nan")}),
        "post": _nan_to_none({**post.summary(), **accuracy_scores(post, post_tokens, pre_tokens),
                              "fluency": fluency(post_text) if post_text else float("nan")}),
        "prompts": [{**a, "p_new_post": b["p_new"], "p_old_post": b["p_old"], "success_post": b["success"]}
                    for a, b in zip(pre.rows(), post.rows())],
    }
    if gen_prompts:
        record["generations"] = [{"prompt": p, "pre": a, "post": b} for p, a, b in zip(gen_prompts, pre_text, post_text)]
    return record


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
    pool: WorkerPool | None = None,
) -> dict:
    """Pre/post scores of ``method`` over ``cases``; each edit is applied to the original model alone.

    ``before``, a dict kept between calls, remembers the unedited model's
    scores and generations per case, so that comparing methods on the same
    cases computes them once. With ``pool`` (:class:`~tracing.workers.WorkerPool`)
    the cases are edited on its workers (``before`` is not used there) and
    ``on_case`` is called as each finishes; the per-case scores are the same.
    """
    job = functools.partial(evaluate_case, method=method, layer=layer, hparams=hparams,
                            generation_tokens=generation_tokens, stats_spec=stats_spec, before=None if pool else before)
    per_case: list = [None] * len(cases)
    for i, record in each_result(lm, job, list(enumerate(cases)), pool):
        per_case[i] = record
        if on_case:
            on_case(i, record)
    edit_seconds = [c["seconds"] for c in per_case]
    return {
        "method": method,
        "batch": 1,
        "sequential": False,
        "pre": _nan_to_none(_aggregate(per_case, "pre")),
        "post": _nan_to_none(_aggregate(per_case, "post")),
        "post_ci95": intervals(per_case, "post"),
        "per_case": per_case,
        "seconds_per_edit": float(np.mean(edit_seconds)) if edit_seconds else None,
        "seconds_per_edit_median": float(np.median(edit_seconds)) if edit_seconds else None,
        "cases": len(per_case),
        "answered_paraphrases": answered_paraphrases(per_case),
        "not_taken": sum(1 for c in per_case if c.get("took") is False),
        "retried": sum(1 for c in per_case if c.get("retried")),
    }


# ---------------------------------------------------------------------------
# Batches and sequences of edits


def _prompts_of(case: dict, subjects: Sequence[str]) -> tuple[list[str], list[str], int]:
    """A case's paraphrases, its neighbours that name none of ``subjects``, and how many neighbours were left out."""
    neighbours = list(case.get("neighborhood_prompts") or [])
    kept = [p for p in neighbours if not any(s and s in p for s in subjects)]
    return list(case.get("paraphrase_prompts") or []), kept, len(neighbours) - len(kept)


def score_many(lm: LoadedModel, items: Sequence[tuple[EditRequest, Sequence[str], Sequence[str]]]) -> list[EditScores]:
    """:func:`~editing.scores.score_edit` of many (request, paraphrases, neighbours) in shared forward passes."""
    plans, pairs = [], []
    for request, paraphrases, neighbours in items:
        subject = request.subject.strip()
        prompts = [request.text] + [p.replace("{}", subject, 1) for p in paraphrases] + \
                  [p.replace("{}", subject, 1) for p in neighbours]
        kinds = ["rewrite"] + ["paraphrase"] * len(paraphrases) + ["neighbour"] * len(neighbours)
        plans.append((request, prompts, kinds, len(pairs)))
        pairs += [(p, request.target) for p in prompts] + [(p, request.target_true) for p in prompts]
    logp, predictions = continuation_scores(lm, pairs) if pairs else (np.zeros(0), [])
    return [EditScores.from_pass(prompts, kinds, logp[start:], predictions[start:], request.target,
                                 request.target_true) for request, prompts, kinds, start in plans]


def _generations(lm: LoadedModel, prompt_lists: Sequence[Sequence[str]], tokens: int) -> list[list[str]]:
    """Greedy continuations of every case's prompts in shared decoding passes, split back per case."""
    flat = [p for prompts in prompt_lists for p in prompts]
    texts = generate(lm, flat, tokens) if flat and tokens else []
    out, start = [], 0
    for prompts in prompt_lists:
        out.append(texts[start : start + len(prompts)] if tokens else [])
        start += len(prompts)
    return out


def _summaries(scores: Sequence[EditScores], texts: Sequence[Sequence[str]]) -> list[dict]:
    return [_nan_to_none({**s.summary(), "fluency": fluency(t) if t else float("nan")}) for s, t in zip(scores, texts)]


def _checkpoint_marks(total: int, checkpoints: Sequence[int] | None) -> list[int]:
    marks = sorted({int(c) for c in (checkpoints if checkpoints is not None else (1, 10, 100, 1000)) if 0 < c < total})
    return marks + [total]


def evaluate_batches(
    lm: LoadedModel,
    cases: Sequence[dict],
    *,
    method: str = "memit",
    batch: int = 1,
    sequential: bool = False,
    project: bool = False,
    layer: int | None = None,
    hparams: HyperParams | None = None,
    generation_tokens: int = 0,
    stats_spec=None,
    checkpoints: Sequence[int] | None = None,
    on_edit: Callable[[int, dict], None] | None = None,
) -> dict:
    """Scores of ``cases`` written ``batch`` at a time (MEMIT), each batch alone or (``sequential``) one after another.

    Alone: each batch's edit is computed on and applied to the original model,
    and its own cases are scored. Sequential: every edit is computed on top of
    all earlier ones (with ``project``, AlphaEdit's projection) and after 1,
    10, 100, ... written facts (``checkpoints``) and at the end every case
    written so far is scored, with the generation entropy and a
    :func:`~editing.sequential.health` report. Neighbour prompts that name a
    subject of these cases are left out (pre and post alike).
    """
    from .hparams import load_hparams
    from .methods import memit_layers
    from .sequential import SequentialEditor, health

    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}.")
    if batch > 1 and method != "memit":
        raise ValueError(f"{method_label(method)} writes one fact per edit; batches of {batch} are MEMIT's "
                         "(--method memit).")
    if project and method != "memit":
        raise ValueError("The projection is MEMIT's (--method memit).")
    hp = hparams if hparams is not None else load_hparams(lm, method=method)
    layers = None
    if layer is not None:
        layers = memit_layers(lm, hp, layer) if method == "memit" else (layer,)
    cases = list(cases)
    requests = [request_of(c) for c in cases]
    subjects = sorted({r.subject.strip() for r in requests})
    prompts = [_prompts_of(c, subjects) for c in cases]
    gen_prompts = [list(c.get("generation_prompts") or [])[:2] if generation_tokens else [] for c in cases]
    pre_scores = score_many(lm, [(r, p, n) for r, (p, n, _) in zip(requests, prompts)])
    pre_tokens = token_predictions(lm, pre_scores)
    pre = [{**summary, **_nan_to_none(accuracy_scores(s, t))}
           for summary, s, t in zip(_summaries(pre_scores, _generations(lm, gen_prompts, generation_tokens)),
                                    pre_scores, pre_tokens)]
    groups = [list(range(i, min(i + batch, len(cases)))) for i in range(0, len(cases), batch)]
    post: list[dict | None] = [None] * len(cases)
    post_scores: list[EditScores | None] = [None] * len(cases)
    meta: list[dict] = [{} for _ in cases]
    seconds: list[float] = []
    history: list[dict] = []

    def score_now(indices: Sequence[int]) -> None:
        scored = score_many(lm, [(requests[i], prompts[i][0], prompts[i][1]) for i in indices])
        texts = _generations(lm, [gen_prompts[i] for i in indices], generation_tokens)
        tokens = token_predictions(lm, scored)
        for i, s, t, summary in zip(indices, scored, tokens, _summaries(scored, texts)):
            post[i], post_scores[i] = {**summary, **_nan_to_none(accuracy_scores(s, t, pre_tokens[i]))}, s

    def record(edit, group, elapsed) -> None:
        for i in group:
            meta[i] = {"layers": list(edit.layers), "norm": edit.norm, "seconds": elapsed,
                       "steps": edit.info.get("steps")}

    if not sequential:
        for g, group in enumerate(groups):
            t0 = time.perf_counter()
            edit = compute_batch(lm, [requests[i] for i in group], method=method, layer=layer, hparams=hp,
                                 stats_spec=stats_spec, project=project)
            seconds.append(time.perf_counter() - t0)
            record(edit, group, seconds[-1])
            with applied(lm, [edit]):
                score_now(group)
            if on_edit:
                on_edit(g, {"facts": len(group), "seconds": seconds[-1], "norm": edit.norm})
    else:
        marks = _checkpoint_marks(len(cases), checkpoints)
        reference = None
        with SequentialEditor(lm, method=method, project=project, hparams=hp, stats_spec=stats_spec,
                              layers=layers) as editor:
            written = 0
            for g, group in enumerate(groups):
                t0 = time.perf_counter()
                edit = editor.add([requests[i] for i in group])
                seconds.append(time.perf_counter() - t0)
                record(edit, group, seconds[-1])
                written += len(group)
                summary = {"facts": len(group), "seconds": seconds[-1], "norm": edit.norm}
                if marks and written >= marks[0]:
                    while marks and written >= marks[0]:
                        marks.pop(0)
                    done = [i for grp in groups[: g + 1] for i in grp]
                    score_now(done)
                    report = health(lm, editor.edits, already_applied=True, reference=reference)
                    reference = reference or report
                    point = {"edits": g + 1, "facts": written,
                             **_nan_to_none(_aggregate([{"post": post[i]} for i in done], "post")),
                             "health": report.to_dict()}
                    history.append(point)
                    summary["checkpoint"] = point
                if on_edit:
                    on_edit(g, summary)
    per_case = []
    for i, case in enumerate(cases):
        if post[i] is None:
            continue
        record_ = {"case_id": case.get("case_id", i), "request": requests[i].to_dict(), "method": method,
                   **meta[i], "neighbours_left_out": prompts[i][2], "pre": pre[i], "post": post[i],
                   "prompts": [{**a, "p_new_post": b["p_new"], "p_old_post": b["p_old"], "success_post": b["success"]}
                               for a, b in zip(pre_scores[i].rows(), post_scores[i].rows())]}
        per_case.append(record_)
    result = {
        "method": method, "batch": batch, "sequential": bool(sequential), "project": bool(project),
        "pre": _nan_to_none(_aggregate(per_case, "pre")), "post": _nan_to_none(_aggregate(per_case, "post")),
        "per_case": per_case,
        "seconds_per_edit": float(np.mean(seconds)) if seconds else None,
        "seconds_per_edit_median": float(np.median(seconds)) if seconds else None,
        "seconds_per_batch": float(np.mean(seconds)) if seconds else None,
        "edits": len(groups), "cases": len(per_case),
        "neighbours_left_out": int(sum(p[2] for p in prompts)),
        "neighbours_kept": int(sum(len(p[1]) for p in prompts)),
        "answered_paraphrases": answered_paraphrases(per_case),
    }
    if sequential:
        result["checkpoints"] = history
    return result


def format_table(result: dict) -> str:
    """The pre/post summary as a text table."""
    ci = result.get("post_ci95") or {}
    lines = [f"{'metric':<10}{'pre':>10}{'post':>10}" + (f"{'post 95 % interval':>22}" if ci else "")]
    for metric in (*METRICS, "fluency"):
        if metric not in result["pre"] and metric not in result["post"]:
            continue
        a, b = result["pre"].get(metric), result["post"].get(metric)
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        interval = f"{fmt(ci[metric][0]):>14} – {fmt(ci[metric][1])}" if metric in ci else ""
        lines.append(f"{metric:<10}{fmt(a):>10}{fmt(b):>10}{interval}")
    batch, sequential = result.get("batch", 1), result.get("sequential", False)
    how = (f", batches of {batch}" if batch > 1 else "") + (", one after another" if sequential else "") + \
        (", projected" if result.get("project") else "")
    per = "batch" if batch > 1 else "edit"
    lines.append(f"{method_label(result.get('method', 'rome'))}: {result['cases']} cases{how}, "
                 f"{result['seconds_per_edit']:.1f} s per {per} "
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
        lines.append(f"{'facts':>8}{'ES':>8}{'PS':>8}{'NS':>8}{'S':>8}{'fluency':>9}{'max |dW|/|W|':>15}{'facts p':>9}")
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        for point in result["checkpoints"]:
            h = point["health"]
            lines.append(f"{point['facts']:>8}" + "".join(f"{fmt(point.get(k)):>8}" for k in ("ES", "PS", "NS", "S"))
                         + f"{fmt(point.get('fluency')):>9}{max(h['relative_norms'], default=0):>15.3f}"
                         f"{h['fact_share']:>9.2f}")
            for warning in h["warnings"]:
                lines.append(f"{'':>8}warning: {warning}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m editing.evaluate``: CounterFact-style scores of one editing method on a set of cases."""
    import torch

    from tracing.loading import load_model

    from .hparams import load_hparams
    from .stats import StatsSpec

    parser = argparse.ArgumentParser(prog="python -m editing.evaluate", description=main.__doc__)
    parser.add_argument("--cases", required=True, help="CounterFact-format JSON list")
    parser.add_argument("--json", default=None, help="write the full results here")
    parser.add_argument("--model", default=None, help="model name or path (default: embedded SmolLM2-135M)")
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
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="fp32 (default), bf16 or fp16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no per-case lines")
    add_ray_args(parser)
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
        if args.variant:
            overrides["variant"] = args.variant
        hp = load_hparams(lm, path=args.hparams, method=args.method, **overrides)
        spec = None
        if args.method in ("rome", "memit"):
            spec = StatsSpec(corpus=hp.stats_corpus, n_tokens=args.stats_tokens or hp.stats_tokens, seed=hp.stats_seed,
                             sample_length=hp.stats_sample_length, top_k=hp.stats_top_k)
    except (ValueError, LookupError) as exc:
        parser.error(str(exc))
    if args.method == "kn":
        layer, where = args.layer, "every layer" if args.layer is None else f"layer {args.layer}"
    elif args.method == "memit":
        from .methods import memit_layers

        layer = args.layer
        where = "layers " + ", ".join(map(str, memit_layers(lm, hp, layer)))
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

    def show_edit(g: int, summary: dict) -> None:
        if args.quiet:
            return
        line = f"[edit {g + 1}] {summary['facts']} fact(s), |ΔW| {summary['norm']:.3g}, {summary['seconds']:.1f} s"
        point = summary.get("checkpoint")
        if point:
            line += (f"; after {point['facts']} facts: ES {point['ES']:.3f} PS {point['PS']:.3f} NS {point['NS']:.3f}"
                     f" S {point['S']:.3f}")
            if point.get("fluency") is not None:
                line += f" fluency {point['fluency']:.3f}"
        print(line, flush=True)

    if args.batch > 1 or args.sequential:
        result = evaluate_batches(lm, cases, method=args.method, batch=args.batch, sequential=args.sequential,
                                  project=args.project, layer=layer, hparams=hp,
                                  generation_tokens=args.generation_tokens, stats_spec=spec,
                                  checkpoints=args.checkpoints, on_edit=show_edit)
    else:
        result = evaluate_cases(lm, cases, method=args.method, layer=layer, hparams=hp,
                                generation_tokens=args.generation_tokens, stats_spec=spec, on_case=show,
                                pool=pool_from_args(args, name=args.model, device=args.device, dtype=args.dtype))
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
