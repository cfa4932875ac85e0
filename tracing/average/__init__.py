"""Causal traces averaged over many facts, by token group and layer (the paper's Fig. 2 and Appendix B).

Example::

    from tracing import load_model
    from tracing.average import average_traces, recalled_facts
    lm = load_model()
    summary = average_traces(lm, recalled_facts(lm)[:20])   # traces cached on disk: a rerun resumes
    summary["kinds"]["mlp"]["mean"][2]                      # MLP restored p(answer) at the last subject token, per layer

or from the command line::

    python -m tracing.average --limit 20 --json out/average.json --html out/average.html

(the command line lives in :mod:`tracing.average.__main__`).

Every fact is traced with the paper's settings (10 samples, noise 3 x the
embedding std, window 10, every token) and its answer is the fact's attribute.
Each trace is cached per fact (key: the model's fingerprint, the prompt,
subject, attribute and settings), so an interrupted run picks up where it
stopped and a longer run reuses a shorter one's work. Averages of disjoint
sets of facts merge exactly (:func:`merge_summaries`, ``--merge``): a
shipped run extended on a machine without its cache, or runs split across
machines.

Token groups, as in the paper: the first subject token, the middle subject
tokens, the last subject token, the first token after the subject, the further
tokens, and the last token. A one-token subject's row counts as both first
and last subject token; a fact whose subject ends just before the last token
counts that row as both first subsequent and last token (so every group is
an average over the facts that have it). The middle and further groups
pool every token they hold. Means are the restored score (p(answer) for the
default metric, a fraction), with 95 % confidence intervals (mean +- 1.96
standard errors over the pooled rows).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from ..assets import AVERAGES
from ..models import LoadedModel, cache_dir, read_json_cache, write_json_cache
from ..recall import recalled_facts
from ..result import KINDS, TraceConfig, TraceResult
from ..sever import SEVERABLE, SeverResult, sever
from ..trace import trace
from ..workers import WorkerPool

log = logging.getLogger(__name__)

GROUPS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
LAST_SUBJECT = GROUPS.index("last subject token")
FORMAT = "locate-edit average trace v1"

__all__ = ["FORMAT", "GROUPS", "average_traces", "cached_sever", "cached_trace", "merge_summaries", "peaks", "recalled_facts",
           "shipped_average", "summarise", "token_groups"]


def default_cache() -> Path:
    """Where per-fact traces are kept: ``<cache>/traces/<model fingerprint>/``."""
    return cache_dir() / "traces"


def _key(fact: dict, config: TraceConfig) -> str:
    return json.dumps([fact["prompt"], fact["subject"], fact["attribute"], config.to_dict()], sort_keys=True)


def _cache_file(lm: LoadedModel, key: str, cache: Path | None, prefix: str = "") -> Path:
    name = prefix + hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(cache or default_cache()) / lm.fingerprint / f"{name}.json"


def _read(lm: LoadedModel, fact: dict, config: TraceConfig, cache: Path | None, prefix: str = "") -> dict:
    """A fact's cache file (``{}`` when there is none, or it is unreadable or another fact's)."""
    key = _key(fact, config)
    data = read_json_cache(_cache_file(lm, key, cache, prefix))
    return data if isinstance(data, dict) and data.get("key") == key else {}


def _store(lm: LoadedModel, fact: dict, config: TraceConfig, cache: Path | None, prefix: str = "", **payload) -> None:
    key = _key(fact, config)
    write_json_cache(_cache_file(lm, key, cache, prefix), {"key": key, **payload})


def _stored_trace(lm: LoadedModel, fact: dict, config: TraceConfig, cache: Path | None,
                  kinds: Sequence[str]) -> list[TraceResult] | None:
    """The fact's cached trace of ``kinds``, or None (no file, an unreadable or foreign one, kinds missing)."""
    try:
        results = [TraceResult.from_dict(r) for r in _read(lm, fact, config, cache).get("results", ())]
    except (KeyError, TypeError, ValueError):
        results = []
    ok = results and all(k in {r.kind for r in results} for k in kinds)
    return [r for r in results if r.kind in kinds] if ok else None


def cached_trace(
    lm: LoadedModel, fact: dict, config: TraceConfig = TraceConfig(), cache: Path | None = None,
    kinds: Sequence[str] = KINDS,
) -> list[TraceResult]:
    """The trace of one fact (answer: its attribute), read from the cache or computed and cached.

    Example::

        hidden, mlp, attn = cached_trace(lm, {"prompt": "...", "subject": "...", "attribute": "Paris"})

    An unreadable or foreign file is recomputed.
    """
    results = _stored_trace(lm, fact, config, cache, kinds)
    if results is None:
        results = trace(lm, fact["prompt"], fact["subject"], answer=fact["attribute"], kinds=kinds, config=config)
        _store(lm, fact, config, cache, results=[r.to_dict() for r in results])
    return results


def _stored_sever(lm: LoadedModel, fact: dict, config: TraceConfig, cache: Path | None) -> SeverResult | None:
    data = _read(lm, fact, config, cache, "sever-")
    try:
        return SeverResult.from_dict(data["result"]) if data else None
    except (KeyError, TypeError, ValueError):
        return None


def cached_sever(lm: LoadedModel, fact: dict, config: TraceConfig = TraceConfig(), cache: Path | None = None) -> SeverResult:
    """Severed paths at one fact's last subject token (:func:`~tracing.sever.sever`), cached like its trace."""
    result = _stored_sever(lm, fact, config, cache)
    if result is None:
        result = sever(lm, fact["prompt"], fact["subject"], answer=fact["attribute"], config=config)
        _store(lm, fact, config, cache, "sever-", result=result.to_dict())
    return result


def fact_job(lm: LoadedModel, fact: dict, *, config: TraceConfig, kinds: Sequence[str],
             severed: bool) -> tuple[list[TraceResult], SeverResult | None]:
    """One fact's trace (and severed paths), uncached: what a worker computes for :func:`average_traces`."""
    results = trace(lm, fact["prompt"], fact["subject"], answer=fact["attribute"], kinds=kinds, config=config)
    return results, sever(lm, fact["prompt"], fact["subject"], answer=fact["attribute"], config=config) if severed else None


def _pooled(lm: LoadedModel, facts: Sequence[dict], pool: WorkerPool, config: TraceConfig, kinds: Sequence[str],
            cache: Path | None, severed: bool, progress, should_stop) -> dict[int, tuple]:
    """Each fact's (trace, severed paths): from the cache, else from ``pool``'s workers, cached as they arrive."""
    out = {}
    for i, fact in enumerate(facts):
        results, cut = _stored_trace(lm, fact, config, cache, kinds), _stored_sever(lm, fact, config, cache)
        if results is not None and (cut is not None or not severed):
            out[i] = (results, cut if severed else None)
    todo = [i for i in range(len(facts)) if i not in out]
    job = functools.partial(fact_job, config=config, kinds=kinds, severed=severed)
    for j, (results, cut) in pool.map(job, [facts[i] for i in todo]):
        fact = facts[todo[j]]
        _store(lm, fact, config, cache, results=[r.to_dict() for r in results])
        if cut is not None:
            _store(lm, fact, config, cache, "sever-", result=cut.to_dict())
        out[todo[j]] = (results, cut)
        if progress:
            progress(len(out), len(facts), fact)
        if should_stop and should_stop():
            break
    return out


def token_groups(subject_range: Sequence[int], n_tokens: int) -> list[list[int]]:
    """Token positions of each of :data:`GROUPS` for one prompt (a group may be empty).

    Example::

        token_groups((1, 4), 10)    # [[1], [2], [3], [4], [5, 6, 7, 8], [9]]
    """
    start, end = int(subject_range[0]), int(subject_range[1])
    if not 0 <= start < end <= n_tokens:
        raise ValueError(f"Subject range {start}..{end} does not fit a prompt of {n_tokens} tokens.")
    last = n_tokens - 1
    after = [end] if end <= last else []
    return [[start], list(range(start + 1, end - 1)), [end - 1], after, list(range(end + 1, last)), [last]]


def _json(values) -> list | float | None:
    """Floats for JSON: NaN (an empty group, an interval of one row) becomes None."""
    if isinstance(values, (list, tuple, np.ndarray)):
        return [_json(v) for v in values]
    return None if values is None or math.isnan(values) else float(values)


def _mean_ci(rows: list[np.ndarray], n_layers: int) -> tuple[list, list]:
    """Mean and 95 % half-width per layer of pooled rows (None where there are too few rows)."""
    if not rows:
        return [None] * n_layers, [None] * n_layers
    a = np.stack(rows)  # (rows, layers)
    half = 1.96 * a.std(0, ddof=1) / math.sqrt(len(a)) if len(a) > 1 else np.full(n_layers, math.nan)
    return _json(a.mean(0)), _json(half)


def _scalar(values: Sequence[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    half = 1.96 * a.std(ddof=1) / math.sqrt(len(a)) if len(a) > 1 else math.nan
    return {"mean": _json(a.mean()), "ci95": _json(half)}


def _peak(result: TraceResult) -> dict:
    token, layer = result.peak()
    return {"token": int(token), "layer": int(layer), "score": float(result.scores[token, layer])}


def _fact_line(fact: dict, first: TraceResult, by_kind: dict[str, TraceResult], kinds: Sequence[str]) -> dict:
    """One fact of a summary: its clean and corrupted scores, each kind's peak, and the peak at its last subject token."""
    last_subject = first.subject_range[1] - 1
    return {
        "prompt": fact["prompt"], "subject": fact["subject"], "attribute": fact["attribute"],
        "relation_id": fact.get("relation_id", ""), "known_id": fact.get("known_id"),
        "clean": first.high_score, "corrupted": first.low_score,
        "peaks": {kind: _peak(by_kind[kind]) for kind in kinds},
        "last_subject_peak": {kind: {"layer": int(np.nanargmax(by_kind[kind].scores[last_subject])),
                                     "score": float(np.nanmax(by_kind[kind].scores[last_subject]))}
                              for kind in kinds},
    }


def summarise(
    traced: Sequence[tuple[dict, Sequence[TraceResult]]],
    *,
    severed: Sequence[SeverResult] | None = None,
    model: str = "",
    settings: dict | None = None,
) -> dict:
    """Average finished traces by token group and layer.

    Example::

        summary = summarise([(fact, cached_trace(lm, fact)) for fact in facts], model=lm.name)

    Returns ``{"format", "model", "n_facts", "clean", "corrupted", "settings",
    "kinds": {kind: {"groups", "mean", "ci95", "n"}}, "facts": [...]}``:
    ``clean`` and ``corrupted`` are the mean scores of the clean and corrupted
    runs (with ``clean_ci95``/``corrupted_ci95``), ``mean[g][l]`` the mean
    restored score of group ``g`` at layer ``l``, ``n[g]`` the rows pooled in
    it, and ``facts`` one line per fact (its clean and corrupted scores, each
    kind's peak cell and the peak at its last subject token).
    With ``severed`` (one :class:`~tracing.sever.SeverResult` per fact, at its
    last subject token) the summary adds ``"severed"``: the mean restored
    score per layer unsevered (``"none"``) and with each kind severed, and
    the per-fact gap (unsevered - severed), each with its 95 % interval.
    """
    if not traced:
        raise ValueError("No traced facts to average.")
    kinds = [r.kind for r in traced[0][1]]
    n_layers = traced[0][1][0].n_layers
    rows: dict[str, list[list[np.ndarray]]] = {k: [[] for _ in GROUPS] for k in kinds}
    clean, corrupted, facts = [], [], []
    for fact, results in traced:
        by_kind = {r.kind: r for r in results}
        first = results[0]
        clean.append(first.high_score)
        corrupted.append(first.low_score)
        groups = token_groups(first.subject_range, len(first.tokens))
        for kind in kinds:
            scores = by_kind[kind].scores
            for g, positions in enumerate(groups):
                rows[kind][g].extend(scores[t] for t in positions if not np.isnan(scores[t]).any())
        facts.append(_fact_line(fact, first, by_kind, kinds))
    c, k = _scalar(clean), _scalar(corrupted)
    out = {
        "format": FORMAT,
        "model": model or traced[0][1][0].model,
        "n_facts": len(traced),
        "clean": c["mean"], "clean_ci95": c["ci95"],
        "corrupted": k["mean"], "corrupted_ci95": k["ci95"],
        "metric": traced[0][1][0].metric,
        "settings": dict(settings if settings is not None else traced[0][1][0].settings),
        "kinds": {kind: _kind_means(rows[kind], n_layers) for kind in kinds},
        "facts": facts,
    }
    if severed:
        out["severed"] = _summarise_severed(severed, n_layers, facts)
    return out


def _kind_means(rows: list[list[np.ndarray]], n_layers: int) -> dict:
    """One kind's mean restored score and 95 % interval per token group and layer, and the rows pooled per group."""
    means, cis = zip(*(_mean_ci(group_rows, n_layers) for group_rows in rows))
    return {"groups": list(GROUPS), "mean": list(means), "ci95": list(cis), "n": [len(group_rows) for group_rows in rows]}


def _summarise_severed(severed: Sequence[SeverResult], n_layers: int, facts: list[dict]) -> dict:
    """The severed paths' means per layer; each fact's line gains its largest gap per kind."""
    if len(severed) != len(facts):
        raise ValueError(f"Got {len(severed)} severed results for {len(facts)} traced facts.")
    for line, result in zip(facts, severed):
        line["severed_gap"] = {kind: float(np.max(result.gap(kind))) for kind in result.severed}
    kinds = [k for k in SEVERABLE if all(k in r.severed for r in severed)]
    none = [r.unsevered for r in severed]
    out = {"token_group": GROUPS[LAST_SUBJECT], "n": len(severed), "none": dict(zip(("mean", "ci95"), _mean_ci(none, n_layers)))}
    for kind in kinds:
        out[kind] = dict(zip(("mean", "ci95"), _mean_ci([r.severed[kind] for r in severed], n_layers)))
    out["gap"] = {kind: dict(zip(("mean", "ci95"), _mean_ci([r.gap(kind) for r in severed], n_layers))) for kind in kinds}
    return out


def _array(values) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in np.ravel(values)], dtype=np.float64).reshape(np.shape(values))


def _pool(parts: Sequence[tuple[int, list | float | None, list | float | None]]) -> tuple[list | float, list | float]:
    """Mean and 95 % half-width of the union of disjoint samples, from each one's (n, mean, half-width).

    Exact, not approximate: a half-width is ``1.96 * sd / sqrt(n)`` with
    ``ddof=1``, so each part's sum of squared deviations can be recovered and
    pooled (the parallel form of Welford's update).
    """
    filled = [(n, _array(m), _array(h)) for n, m, h in parts if n > 0]
    if not filled:  # an empty group in every part stays empty
        return parts[0][1], parts[0][2]
    parts, total = filled, sum(n for n, _, _ in filled)
    mean = sum(n * m for n, m, _ in parts) / total
    squares = sum((n - 1) * (h * math.sqrt(n) / 1.96) ** 2 if n > 1 else np.zeros_like(m) for n, m, h in parts)
    squares = squares + sum(n * (m - mean) ** 2 for n, m, _ in parts)
    half = 1.96 * np.sqrt(squares / (total - 1)) / math.sqrt(total) if total > 1 else np.full_like(mean, math.nan)
    return _json(mean.tolist() if mean.ndim else float(mean)), _json(half.tolist() if half.ndim else float(half))


def _fact_key(line: dict) -> tuple[str, str, str]:
    return line["prompt"], line["subject"], line["attribute"]


def merge_summaries(parts: Sequence[dict]) -> dict:
    """One summary of several that average disjoint sets of facts, as if all had been averaged at once.

    Example::

        whole = merge_summaries([shipped, summarise(more)])   # extend a shipped run, or join two machines' runs

    The parts must share the model (fingerprint, where recorded), metric and
    settings, and no fact may be in two of them. Means and intervals are
    pooled exactly (see :func:`_pool`); severed paths are kept when every part
    has them. ``n_recalled`` is the largest of the parts'.
    """
    if not parts:
        raise ValueError("Nothing to merge.")
    first = parts[0]
    for name in ("format", "model", "metric", "settings", "fingerprint"):
        values = {json.dumps(part.get(name), sort_keys=True) for part in parts}
        if len(values) > 1:
            raise ValueError(f"Cannot merge averages whose {name} differs: {', '.join(sorted(values))}.")
    if len({tuple(part["kinds"]) for part in parts}) > 1:
        raise ValueError("Cannot merge averages of different kinds: " + ", ".join(str(list(p["kinds"])) for p in parts))
    seen: set[tuple[str, str, str]] = set()
    for part in parts:
        keys = {_fact_key(line) for line in part["facts"]}
        if seen & keys:
            raise ValueError(f"The same fact is in two parts: {sorted(seen & keys)[0][0]!r}; merge disjoint runs only.")
        seen |= keys
    out = {key: value for key, value in first.items() if key not in ("command",)}
    out["n_facts"] = sum(part["n_facts"] for part in parts)
    for name in ("clean", "corrupted"):
        out[name], out[f"{name}_ci95"] = _pool([(p["n_facts"], p[name], p[f"{name}_ci95"]) for p in parts])
    out["kinds"] = {}
    for kind, data in first["kinds"].items():
        pooled = [_pool([(p["kinds"][kind]["n"][g], p["kinds"][kind]["mean"][g], p["kinds"][kind]["ci95"][g])
                         for p in parts]) for g in range(len(data["groups"]))]
        out["kinds"][kind] = {"groups": list(data["groups"]), "mean": [m for m, _ in pooled],
                              "ci95": [h for _, h in pooled],
                              "n": [sum(p["kinds"][kind]["n"][g] for p in parts) for g in range(len(data["groups"]))]}
    out["facts"] = [line for part in parts for line in part["facts"]]
    out.pop("severed", None)
    if all(part.get("severed") for part in parts):
        severed = {"token_group": first["severed"]["token_group"], "n": sum(p["severed"]["n"] for p in parts)}
        for name in [k for k in first["severed"] if k not in ("token_group", "n", "gap")]:
            severed[name] = dict(zip(("mean", "ci95"), _pool(
                [(p["severed"]["n"], p["severed"][name]["mean"], p["severed"][name]["ci95"]) for p in parts])))
        severed["gap"] = {kind: dict(zip(("mean", "ci95"), _pool(
            [(p["severed"]["n"], p["severed"]["gap"][kind]["mean"], p["severed"]["gap"][kind]["ci95"]) for p in parts])))
            for kind in first["severed"]["gap"]}
        out["severed"] = severed
    if any("n_recalled" in part for part in parts):
        out["n_recalled"] = max(part.get("n_recalled", 0) for part in parts)
    return out


def peaks(summary: dict) -> dict[str, dict]:
    """Where each kind's average peaks: ``{kind: {"group", "layer", "mean", "ci95", "effect"}}``.

    ``effect`` is the peak's average indirect effect: its mean minus the
    corrupted run's mean.
    """
    out = {}
    for kind, data in summary["kinds"].items():
        mean = np.array(data["mean"], dtype=np.float64)
        g, layer = np.unravel_index(int(np.nanargmax(mean)), mean.shape)
        out[kind] = {"group": data["groups"][g], "layer": int(layer), "mean": float(mean[g, layer]),
                     "ci95": _json(data["ci95"][g][layer]), "effect": float(mean[g, layer]) - summary["corrupted"]}
    return out


def average_traces(
    lm: LoadedModel,
    facts: Iterable[dict] | None = None,
    *,
    config: TraceConfig = TraceConfig(),
    kinds: Sequence[str] = KINDS,
    limit: int | None = None,
    cache: Path | None = None,
    severed: bool = True,
    progress: Callable[[int, int, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    pool: WorkerPool | None = None,
) -> dict:
    """Trace each fact (cached) and average them: see :func:`summarise` for the result.

    Example::

        summary = average_traces(lm, limit=50)      # the first 50 facts the model recalls

    ``facts`` defaults to :func:`~tracing.recall.recalled_facts` (the paper's
    known facts the model answers); ``limit`` takes the first ones.
    With ``severed`` each fact's severed paths at its last subject token are
    computed (and cached) too. ``progress(done, total, fact)`` is called after each fact;
    ``should_stop()`` ends the run early with the facts done so far. With ``pool`` (a
    :class:`~tracing.workers.WorkerPool`) uncached facts are traced on its workers and cached here as they finish.
    """
    facts = list(recalled_facts(lm) if facts is None else facts)
    available = len(facts)
    if limit is not None:
        facts = facts[: max(0, limit)]
    if not facts:
        raise ValueError("No facts to trace: the model recalls none of them (its top next token is never the answer).")
    if pool:
        done = _pooled(lm, facts, pool, config, kinds, cache, severed, progress, should_stop)
    else:
        done = {}
        for i, fact in enumerate(facts):
            if should_stop and should_stop():
                break
            done[i] = (cached_trace(lm, fact, config, cache, kinds), cached_sever(lm, fact, config, cache) if severed else None)
            if progress:
                progress(i + 1, len(facts), fact)
    traced = [(facts[i], done[i][0]) for i in sorted(done)]
    severs = [done[i][1] for i in sorted(done)] if severed else []
    if not traced:
        raise ValueError("Stopped before the first fact was traced.")
    summary = summarise(traced, severed=severs or None, model=lm.name, settings=config.to_dict())
    summary["fingerprint"] = lm.fingerprint
    summary["n_recalled"] = available  # the facts there were; n_facts of them were traced (a limit or a stop)
    return summary


def read_averages(path: str | Path) -> dict:
    """A file of averages (``--json``, a shipped file); a ValueError if it is not one."""
    part = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(part, dict) or part.get("format") != FORMAT:
        raise ValueError(f"{path} is not a file of averages ({FORMAT}); write one with --json.")
    return part


def extend_averages(lm: LoadedModel, facts: Sequence[dict], earlier: Sequence[dict], **options) -> dict:
    """The averages of ``facts`` pooled with ``earlier`` runs: only the facts these do not hold are traced.

    Example::

        summary = extend_averages(lm, recalled_facts(lm), [shipped_average(lm)])

    ``options`` go to :func:`average_traces`. Every part must come from the same
    weights (fingerprint); a ValueError says which do not, or that nothing is left.
    """
    covered = {_fact_key(line) for part in earlier for line in part.get("facts", ())}
    todo = [fact for fact in facts if _fact_key(fact) not in covered]
    parts = [*earlier, *([average_traces(lm, todo, **options)] if todo else [])]
    for part in parts:
        if part.get("fingerprint") not in (None, lm.fingerprint):
            raise ValueError(f"Cannot merge averages of other weights (fingerprint {part['fingerprint']}, "
                             f"this model {lm.fingerprint}).")
    if not parts:
        raise ValueError("No facts to trace.")
    return merge_summaries(parts) if len(parts) > 1 else parts[0]


def ship_path(lm: LoadedModel) -> Path:
    """Where a model's shipped averages go: ``assets/averages/<model name>.json``."""
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in lm.name.split("/")[-1]).strip("-.") or "model"
    return AVERAGES / f"{name.lower()}.json"


def shipped_average(lm: LoadedModel, folder: Path | None = None) -> dict | None:
    """The averages shipped for this model (same weights: fingerprint) and the paper's settings, else None.

    Example::

        summary = shipped_average(lm)       # the page's "Across many facts" tab shows it at once
    """
    folder = Path(folder or AVERAGES)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("Skipping unreadable averages file %s", path)
            continue
        if (isinstance(data, dict) and data.get("format") == FORMAT and data.get("fingerprint") == lm.fingerprint
                and data.get("settings") == TraceConfig().to_dict()):
            return data
    return None
