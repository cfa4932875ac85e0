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

import functools
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tracing.models import LoadedModel
from tracing.workers import WorkerPool, each_result

from ..display import evaluation_table, notebook_html
from ..edit import EditRequest, method_label
from ..hparams import HyperParams, load_hparams
from ..methods import compute, compute_batch, memit_layers
from ..sampling import generate
from ..scores import (ACCURACY, EditScores, Rescored, accuracy_scores, fluency, harmonic_mean, nan_to_none, rescore,
                      score_edit, score_many, token_predictions)
from ..sequential import SequentialEditor, health

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
    """The EditRequest of a CounterFact record (its old object required): :meth:`EditRequest.from_counterfact`."""
    return EditRequest.from_counterfact(case)


def aggregate(per_case: Sequence[dict], which: str) -> dict:
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


def _measure(lm: LoadedModel, request: EditRequest, paraphrases: Sequence[str], neighbours: Sequence[str],
             gen_prompts: Sequence[str], tokens: int) -> tuple[EditScores, list[str], list]:
    """The model's scores on a case as it is now, its continuations of the generation prompts, its token predictions."""
    scores = score_edit(lm, request, paraphrases, neighbours)
    texts = generate(lm, gen_prompts, tokens) if gen_prompts else []
    return scores, texts, token_predictions(lm, [scores])[0]


def _case_record(i: int, case: dict, rescored: Rescored, gen_prompts: Sequence[str]) -> dict:
    """One case of :func:`evaluate_cases`: the edit's facts and the scores before and after it."""
    (pre, pre_text, pre_tokens), (post, post_text, post_tokens) = rescored.before, rescored.after
    edit = rescored.edit
    record = {
        "case_id": case.get("case_id", i),
        "request": request_of(case).to_dict(),
        "method": edit.method,
        "layer": edit.layer,
        "layers": list(edit.layers),
        "norm": edit.norm,
        "seconds": rescored.seconds,
        "steps": edit.info.get("steps"),
        "took": edit.info.get("took"),  # ROME: the rewrite prompt prefers the new object after the edit
        "retried": bool(edit.info.get("retried")),
        "pre": nan_to_none({**pre.summary(), **accuracy_scores(pre, pre_tokens),
                            "fluency": fluency(pre_text) if pre_text else float("nan")}),
        "post": nan_to_none({**post.summary(), **accuracy_scores(post, post_tokens, pre_tokens),
                             "fluency": fluency(post_text) if post_text else float("nan")}),
        "prompts": _prompt_rows(pre, post),
    }
    if gen_prompts:
        record["generations"] = [{"prompt": p, "pre": a, "post": b}
                                 for p, a, b in zip(gen_prompts, pre_text, post_text)]
    return record


def _prompt_rows(pre: EditScores, post: EditScores) -> list[dict]:
    return [{**a, "p_new_post": b["p_new"], "p_old_post": b["p_old"], "success_post": b["success"]}
            for a, b in zip(pre.rows(), post.rows())]


def _seconds(seconds: Sequence[float]) -> dict:
    return {"seconds_per_edit": float(np.mean(seconds)) if seconds else None,
            "seconds_per_edit_median": float(np.median(seconds)) if seconds else None}


class Evaluation(dict):
    """An evaluation's result (a plain dict, as JSON stores it) that draws its summary table in a notebook."""

    def _repr_html_(self) -> str:
        return notebook_html(evaluation_table(self))


def evaluate_case(lm: LoadedModel, item: tuple[int, dict], *, method: str = "rome", layer: int | None = None,
                  hparams: HyperParams | None = None, generation_tokens: int = 0, stats_spec=None,
                  before: dict | None = None) -> dict:
    """One case's edit on the model as it is, scored before and after: ``item`` is (index, CounterFact record).

    What a Ray worker computes for :func:`evaluate_cases`; ``before`` as there.
    """
    i, case = item
    request = request_of(case)
    paraphrases = list(case.get("paraphrase_prompts") or [])
    neighbours = list(case.get("neighborhood_prompts") or [])
    gen_prompts = list(case.get("generation_prompts") or [])[:2] if generation_tokens else []
    key = (json.dumps(case, sort_keys=True), generation_tokens)
    rescored = rescore(lm, lambda: _measure(lm, request, paraphrases, neighbours, gen_prompts, generation_tokens),
                       lambda: compute(lm, request, method=method, layer=layer, hparams=hparams,
                                       stats_spec=stats_spec),
                       before=before.get(key) if before is not None else None)
    if before is not None:
        before[key] = rescored.before
    return _case_record(i, case, rescored, gen_prompts)


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
                            generation_tokens=generation_tokens, stats_spec=stats_spec,
                            before=None if pool else before)
    per_case: list = [None] * len(cases)
    for i, record in each_result(lm, job, list(enumerate(cases)), pool):
        per_case[i] = record
        if on_case:
            on_case(i, record)
    return Evaluation({
        "method": method,
        "batch": 1,
        "sequential": False,
        "pre": nan_to_none(aggregate(per_case, "pre")),
        "post": nan_to_none(aggregate(per_case, "post")),
        "post_ci95": intervals(per_case, "post"),
        "per_case": per_case,
        **_seconds([c["seconds"] for c in per_case]),
        "cases": len(per_case),
        "answered_paraphrases": answered_paraphrases(per_case),
        "not_taken": sum(1 for c in per_case if c.get("took") is False),
        "retried": sum(1 for c in per_case if c.get("retried")),
    })


# ---------------------------------------------------------------------------
# Batches and sequences of edits


def prompts_of(case: dict, subjects: Sequence[str]) -> tuple[list[str], list[str], int]:
    """A case's paraphrases, its neighbours that name none of ``subjects``, and how many neighbours were left out."""
    neighbours = list(case.get("neighborhood_prompts") or [])
    kept = [p for p in neighbours if not any(s and s in p for s in subjects)]
    return list(case.get("paraphrase_prompts") or []), kept, len(neighbours) - len(kept)


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
    return [nan_to_none({**s.summary(), "fluency": fluency(t) if t else float("nan")}) for s, t in zip(scores, texts)]


def _checkpoint_marks(total: int, checkpoints: Sequence[int] | None) -> list[int]:
    marks = sorted({int(c) for c in (checkpoints if checkpoints is not None else (1, 10, 100, 1000)) if 0 < c < total})
    return marks + [total]


def _check_batches(method: str, batch: int, project: bool) -> None:
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}.")
    if batch > 1 and method != "memit":
        raise ValueError(f"{method_label(method)} writes one fact per edit; batches of {batch} are MEMIT's "
                         "(--method memit).")
    if project and method != "memit":
        raise ValueError("The projection is MEMIT's (--method memit).")


class _Batches:
    """The cases of :func:`evaluate_batches`, their scores before, and (as the edits are written) after."""

    def __init__(self, lm: LoadedModel, cases: Sequence[dict], batch: int, generation_tokens: int) -> None:
        self.lm, self.cases, self.tokens = lm, list(cases), generation_tokens
        self.requests = [request_of(c) for c in self.cases]
        subjects = sorted({r.subject.strip() for r in self.requests})
        self.prompts = [prompts_of(c, subjects) for c in self.cases]
        self.gen_prompts = [list(c.get("generation_prompts") or [])[:2] if generation_tokens else []
                            for c in self.cases]
        self.pre_scores = score_many(lm, [(r, p, n) for r, (p, n, _) in zip(self.requests, self.prompts)])
        self.pre_tokens = token_predictions(lm, self.pre_scores)
        texts = _generations(lm, self.gen_prompts, generation_tokens)
        self.pre = [{**summary, **nan_to_none(accuracy_scores(s, t))}
                    for summary, s, t in zip(_summaries(self.pre_scores, texts), self.pre_scores, self.pre_tokens)]
        n = len(self.cases)
        self.groups = [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
        self.post: list[dict | None] = [None] * n
        self.post_scores: list[EditScores | None] = [None] * n
        self.meta: list[dict] = [{} for _ in self.cases]
        self.seconds: list[float] = []

    def score_now(self, indices: Sequence[int]) -> list[EditScores]:
        """Score these cases on the model as it is now (their edits applied), and keep their summaries."""
        scored = score_many(self.lm, [(self.requests[i], self.prompts[i][0], self.prompts[i][1]) for i in indices])
        texts = _generations(self.lm, [self.gen_prompts[i] for i in indices], self.tokens)
        tokens = token_predictions(self.lm, scored)
        for i, s, t, summary in zip(indices, scored, tokens, _summaries(scored, texts)):
            self.post[i] = {**summary, **nan_to_none(accuracy_scores(s, t, self.pre_tokens[i]))}
            self.post_scores[i] = s
        return scored

    def record(self, edit, group: Sequence[int], elapsed: float) -> dict:
        """Note an edit of ``group`` and what it cost; the summary :func:`evaluate_batches` passes to ``on_edit``."""
        self.seconds.append(elapsed)
        for i in group:
            self.meta[i] = {"layers": list(edit.layers), "norm": edit.norm, "seconds": elapsed,
                            "steps": edit.info.get("steps")}
        return {"facts": len(group), "seconds": elapsed, "norm": edit.norm}

    def per_case(self, method: str) -> list[dict]:
        return [{"case_id": case.get("case_id", i), "request": self.requests[i].to_dict(), "method": method,
                 **self.meta[i], "neighbours_left_out": self.prompts[i][2], "pre": self.pre[i], "post": self.post[i],
                 "prompts": _prompt_rows(self.pre_scores[i], self.post_scores[i])}
                for i, case in enumerate(self.cases) if self.post[i] is not None]


def _alone(lm: LoadedModel, run: _Batches, on_edit, **options) -> None:
    """Each batch computed on and applied to the original model; its own cases scored."""
    for g, group in enumerate(run.groups):
        rescored = rescore(lm, lambda: run.score_now(group),
                           lambda: compute_batch(lm, [run.requests[i] for i in group], **options),
                           before=[run.pre_scores[i] for i in group])  # scored at the start, in shared passes
        summary = run.record(rescored.edit, group, rescored.seconds)
        if on_edit:
            on_edit(g, summary)


def _in_sequence(lm: LoadedModel, run: _Batches, editor: SequentialEditor, checkpoints, on_edit) -> list[dict]:
    """Every batch written on top of the earlier ones; every case written so far scored at the checkpoints."""
    marks, reference, history, written = _checkpoint_marks(len(run.cases), checkpoints), None, [], 0
    for g, group in enumerate(run.groups):
        t0 = time.perf_counter()
        edit = editor.add([run.requests[i] for i in group])
        summary = run.record(edit, group, time.perf_counter() - t0)
        written += len(group)
        if marks and written >= marks[0]:
            while marks and written >= marks[0]:
                marks.pop(0)
            done = [i for grp in run.groups[: g + 1] for i in grp]
            run.score_now(done)
            report = health(lm, editor.edits, already_applied=True, reference=reference)
            reference = reference or report
            point = {"edits": g + 1, "facts": written,
                     **nan_to_none(aggregate([{"post": run.post[i]} for i in done], "post")),
                     "health": report.to_dict()}
            history.append(point)
            summary["checkpoint"] = point
        if on_edit:
            on_edit(g, summary)
    return history


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
    _check_batches(method, batch, project)
    hp = hparams if hparams is not None else load_hparams(lm, method=method)
    layers = None
    if layer is not None:
        layers = memit_layers(lm, hp, layer) if method == "memit" else (layer,)
    run = _Batches(lm, cases, batch, generation_tokens)
    history = []
    if not sequential:
        _alone(lm, run, on_edit, method=method, layer=layer, hparams=hp, stats_spec=stats_spec, project=project)
    else:
        with SequentialEditor(lm, method=method, project=project, hparams=hp, stats_spec=stats_spec,
                              layers=layers) as editor:
            history = _in_sequence(lm, run, editor, checkpoints, on_edit)
    per_case = run.per_case(method)
    seconds = run.seconds
    result = Evaluation({
        "method": method, "batch": batch, "sequential": bool(sequential), "project": bool(project),
        "pre": nan_to_none(aggregate(per_case, "pre")), "post": nan_to_none(aggregate(per_case, "post")),
        "per_case": per_case, **_seconds(seconds),
        "seconds_per_batch": float(np.mean(seconds)) if seconds else None,
        "edits": len(run.groups), "cases": len(per_case),
        "neighbours_left_out": int(sum(p[2] for p in run.prompts)),
        "neighbours_kept": int(sum(len(p[1]) for p in run.prompts)),
        "answered_paraphrases": answered_paraphrases(per_case),
    })
    if sequential:
        result["checkpoints"] = history
    return result
