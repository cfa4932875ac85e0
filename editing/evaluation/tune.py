"""Choose ROME's hyperparameters on tuning cases: a grid of settings, every edit scored as ``editing.evaluation.evaluate`` does.

Example::

    python -m editing.tune --cases assets/counterfact_smollm2_tune.json --limit 30 \\
        --grid layer=0,1,2,4 --grid v_num_grad_steps=20,40 --json out/tune.json

or from Python::

    from editing.evaluation.tune import tune
    result = tune(lm, cases, {"layer": [0, 1, 2], "kl_factor": [0.0625, 0.25]})
    result["settings"][0]       # the best by S: {"setting": {...}, "post": {...}, "ci95": {...}, ...}

Every setting of the grid (the product of the ``--grid`` values, on top of
the model's hyperparameters and any ``--set``) edits the same cases, each
on the original model. The table lists, best S first, post-edit ES, PS, NS
and S with 95 % bootstrap intervals over cases, PM (mean p(new) - p(old) on
paraphrases), the edits that did not take or took only on the retry, the
optimisation steps and the median seconds per edit. Below it, for each swept
hyperparameter, the mean PS and S at each of its values across the rest of
the grid: what moves the paraphrase score.

The ``--json`` file doubles as the run's memory: settings it already holds,
scored on the same model and cases, are read back rather than recomputed,
so a grid can be extended, or an interrupted run continued, on any machine
that has the file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from tracing.models import LoadedModel
from tracing.workers import WorkerPool

from .evaluate import evaluate_cases, intervals, paired_difference
from ..hparams import ROMEHyperParams, load_hparams
from ..stats import StatsSpec, ensure_stats

__all__ = ["FORMAT", "cases_key", "grid_settings", "marginals", "parse_grid", "parse_settings", "read_tuning", "resumes",
           "setting_text", "tune"]

FORMAT = "locate-edit ROME tuning v1"
SUMMARY = ("ES", "PS", "NS", "S", "EM", "PM", "NM")
# What one setting keeps of each case: enough to recompute any mean or interval later.
CASE_KEYS = ("case_id", "norm", "seconds", "steps", "took", "retried")

SettingDone = Callable[[int, int, dict], None]  # (settings done, settings in all, the row just scored)


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: ``[5,10],[10,10]`` is two values."""
    parts, depth, quoted, current = [], 0, False, []
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "[{":
            depth += 1
        elif not quoted and ch in "]}":
            depth -= 1
        if ch == "," and depth == 0 and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_value(text: str):
    """A value as JSON where it parses, else the bare word itself (``r-rome``, ``original``)."""
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word: r-rome, original


def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """``["layer=0,1,2", "variant=r-rome,original"]`` as ``{"layer": [0, 1, 2], "variant": ["r-rome", "original"]}``.

    Values are JSON where they parse (numbers, lists such as
    ``context_templates=[[5,10]],[[5,10],[10,10]]``), else strings. Unknown
    hyperparameters are refused with the list of known ones.
    """
    known = {f for f in ROMEHyperParams.__dataclass_fields__ if f not in ("description", "match")}
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"A grid entry is KEY=VALUE[,VALUE...], not {item!r}.")
        if key not in known:
            raise ValueError(f"Unknown ROME hyperparameter {key!r}. Known: {', '.join(sorted(known))}.")
        if key in grid:
            raise ValueError(f"{key} is given twice; put all its values in one entry.")
        grid[key] = [parse_value(v) for v in _split_top_level(values)]
    return grid


def grid_settings(grid: Mapping[str, Sequence]) -> list[dict]:
    """Every combination of the grid's values, in order (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def cases_key(cases: Sequence[dict]) -> str:
    """A short hash of the cases: a result is resumed only on the same ones."""
    return hashlib.sha256(json.dumps(list(cases), sort_keys=True).encode()).hexdigest()[:16]


def _row(setting: dict, hp: ROMEHyperParams, result: dict) -> dict:
    per_case = [{**{k: c.get(k) for k in CASE_KEYS}, "post": {m: c["post"].get(m) for m in SUMMARY}}
                for c in result["per_case"]]
    seconds = [c["seconds"] for c in per_case]
    steps = [c["steps"] for c in per_case if c["steps"] is not None]
    return {
        "setting": setting,
        "hparams": hp.settings(),
        "post": {m: result["post"].get(m) for m in SUMMARY},
        "ci95": result.get("post_ci95") or intervals(per_case),
        "not_taken": result["not_taken"],
        "retried": result["retried"],
        "steps": float(np.mean(steps)) if steps else None,
        "norm": float(np.mean([c["norm"] for c in per_case])),
        "seconds_median": float(np.median(seconds)),
        "seconds_mean": float(np.mean(seconds)),
        "per_case": per_case,
    }


def marginals(rows: Sequence[dict], grid: Mapping[str, Sequence]) -> dict[str, list[dict]]:
    """For each hyperparameter the grid varies: the mean PS, S and ES of the settings at each of its values."""
    out = {}
    for key, values in grid.items():
        if len(values) < 2:
            continue
        entries = []
        for value in values:
            chosen = [r for r in rows if r["setting"].get(key) == value]
            if not chosen:
                continue
            mean = lambda m: float(np.mean([r["post"][m] for r in chosen if r["post"][m] is not None]))  # noqa: E731
            entries.append({"value": value, "settings": len(chosen), "ES": mean("ES"), "PS": mean("PS"),
                            "S": mean("S"), "PM": mean("PM")})
        out[key] = entries
    return out


def tune(
    lm: LoadedModel,
    cases: Sequence[dict],
    grid: Mapping[str, Sequence],
    *,
    base: Mapping | None = None,
    hparams_path: str | None = None,
    previous: dict | None = None,
    on_setting: SettingDone | None = None,
    on_case: Callable[[int, dict], None] | None = None,
    pool: WorkerPool | None = None,
) -> dict:
    """Score every setting of ``grid`` over ``cases``; ``previous`` (an earlier result) supplies rows already done.

    Every setting is checked before the first edit, so a bad value fails at
    once. Returns ``{"format", "model", "fingerprint", "cases", "cases_key",
    "base", "grid", "settings": [rows, best S first], "marginals"}``; each row
    holds its ``setting``, full ``hparams``, post-edit means and ``ci95``,
    ``not_taken``, ``retried``, ``steps``, ``norm``, seconds, per-case scores
    and ``vs_reference``: each metric's paired difference from the reference
    setting (the unswept hyperparameters if the grid holds them, else its
    first setting) on the same cases, ``[mean, low, high]``. With ``pool`` (a
    :class:`~tracing.workers.WorkerPool`) each setting's cases are edited on its workers.
    """
    if not cases:
        raise ValueError("No cases to tune on.")
    base = dict(base or {})
    settings = grid_settings(grid) if grid else [{}]
    hps = [load_hparams(lm, path=hparams_path, **{**base, **setting}) for setting in settings]
    layers = sorted({hp.edit_layer(lm.n_layers) for hp in hps})
    done = {}
    if previous and resumes(previous, lm, cases):
        done = {json.dumps(r["hparams"], sort_keys=True): r for r in previous.get("settings", ())}
    rows, before = [], {}
    for i, (setting, hp) in enumerate(zip(settings, hps)):
        row = done.get(json.dumps(hp.settings(), sort_keys=True))
        if row is None:
            spec = StatsSpec.from_hparams(hp)
            ensure_stats(lm, layers, spec)
            row = _row(setting, hp, evaluate_cases(lm, cases, hparams=hp, stats_spec=spec, before=before,
                                                   on_case=on_case, pool=pool))
        rows.append({**row, "setting": setting})
        if on_setting:
            on_setting(i + 1, len(settings), rows[-1])
    # The reference: the setting with the hyperparameters as they are (file and --set), else the grid's first.
    current = load_hparams(lm, path=hparams_path, **base).settings()
    reference = next((r for r in rows if r["hparams"] == current), rows[0])
    for row in rows:
        row["vs_reference"] = paired_difference(row["per_case"], reference["per_case"])
    ranked = sorted(rows, key=lambda r: -(r["post"]["S"] if r["post"]["S"] is not None else -1.0))
    return {
        "format": FORMAT,
        "model": lm.name,
        "fingerprint": lm.fingerprint,
        "cases": len(cases),
        "cases_key": cases_key(cases),
        "base": base,
        "grid": {k: list(v) for k, v in grid.items()},
        "reference": reference["setting"],
        "settings": ranked,
        "marginals": marginals(ranked, grid),
    }


def setting_text(setting: dict) -> str:
    """``layer=1 kl_factor=0.25``, or ``(defaults)`` for the empty setting."""
    return " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in setting.items()) or "(defaults)"


def parse_settings(items: Sequence[str]) -> dict:
    """``["kl_factor=0.25", "variant=original"]`` (``--set``) as a dict of fixed overrides."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = parse_value(value.strip())
    return out


def read_tuning(path: str | Path) -> dict | None:
    """An earlier tuning result to resume (None when there is no such file); ValueError if the file is another."""
    if not Path(path).is_file():
        return None
    previous = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(previous, dict) or previous.get("format") != FORMAT:
        raise ValueError(f"{path} exists but is not a tuning result; choose another --json.")
    return previous


def resumes(previous: dict, lm: LoadedModel, cases: Sequence[dict]) -> bool:
    """Whether ``previous`` was scored on these weights and cases (only then are its rows reused)."""
    return (previous.get("fingerprint"), previous.get("cases_key")) == (lm.fingerprint, cases_key(cases))
