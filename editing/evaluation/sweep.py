"""Which layer to edit: ROME at each candidate layer, and how well the traced effect predicts edit success.

Example::

    from editing.evaluation.sweep import layer_sweep
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
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from tracing.average import cached_trace
from tracing.models import LoadedModel, cache_dir, read_json_cache, write_json_cache
from tracing.result import TraceConfig
from tracing.workers import WorkerPool, each_result

from ..edit import EditRequest

from ..applying import applied
from ..hparams import HyperParams, load_hparams
from ..methods.rome import compute_edit
from ..scores import EditScores, nan_to_none, rescore, score_edit
from .evaluate import request_of

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
    summary = nan_to_none(post.summary())
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


def iter_layer_sweep(
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
) -> Iterator[dict]:
    """:func:`layer_sweep` layer by layer: yields the sweep so far after each layer (the page draws it as it grows).

    Each snapshot has the shape of :func:`layer_sweep`'s result, with the rows
    done so far, ``best`` among them, and ``"complete"`` (True for the last).
    """
    request.validate()
    if request.target_true is None:
        raise ValueError("The layer sweep needs the old object (target_true) to score the edits.")
    chosen = sweep_layers(lm.n_layers, every, layers)
    hp = hparams if hparams is not None else load_hparams(lm)
    paraphrases, neighbours = tuple(paraphrases), tuple(neighbours)
    previous = list(previous)

    def scores() -> EditScores:
        return score_edit(lm, request, paraphrases=paraphrases, neighbours=neighbours)

    def edit_at(layer: int):
        with applied(lm, previous):  # no retry: the sweep shows where the hyperparameters' own optimisation takes
            return compute_edit(lm, request, layer=layer, hparams=hp, stats_spec=stats_spec, retries=0)

    with applied(lm, previous):
        pre = scores()
    rows = []
    for done, layer in enumerate(chosen):
        if progress:
            progress(done, len(chosen), layer)
        started = time.perf_counter()
        rescored = rescore(lm, scores, lambda: edit_at(layer), previous=previous, before=pre)
        rows.append(_layer_row(layer, pre, rescored.after, rescored.edit, time.perf_counter() - started))
        if done < len(chosen) - 1:
            yield _sweep(request, pre, rows, complete=False)
    if progress:
        progress(len(chosen), len(chosen), -1)
    yield _sweep(request, pre, rows, complete=True)


def _sweep(request: EditRequest, pre: EditScores, rows: list[dict], complete: bool) -> dict:
    best = max(rows, key=lambda r: (r["S"] or 0.0, r["rewrite_score"], -r["layer"]))["layer"] if rows else None
    return {"request": request.to_dict(), "pre": pre.summary(), "layers": list(rows), "best": best,
            "complete": complete}


def layer_sweep(lm: LoadedModel, request: EditRequest, **options) -> dict:
    """ROME edits of one fact at each candidate layer (each applied alone on top of ``previous``), scored.

    Options (those of :func:`iter_layer_sweep`): ``layers`` or ``every``,
    ``paraphrases``, ``neighbours``, ``hparams``, ``stats_spec``,
    ``previous``, ``progress``. Returns ``{"request", "pre", "layers": [row
    per layer], "best", "complete"}``: each row has the layer, ES/PS/NS/S (and
    EM/PM/NM) after the edit, the rewrite prompt's ``p_new``/``p_old``,
    ``rewrite_score``, ``paraphrase_score``, ``took`` (p_new > p_old on the
    rewrite prompt), the update's norm, the optimisation's steps and seconds.
    ``best`` is the layer of the highest S (ties: the higher rewrite score,
    then the lower layer), None without rows. ``progress(done, total,
    layer)`` is called before each layer (an exception it raises stops the
    sweep; the weights are restored).
    """
    *_, result = iter_layer_sweep(lm, request, **options)
    return result


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
    """One case's layer sweep and traced MLP effect per layer (uncached): ``item`` is (index, CounterFact record).

    What a Ray worker computes for :func:`sweep_cases`.
    """
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
