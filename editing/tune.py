"""Choose ROME's hyperparameters on tuning cases: a grid of settings, every edit scored as ``editing.evaluate`` does.

Example::

    python -m editing.tune --cases assets/counterfact_smollm2_tune.json --limit 30 \\
        --grid layer=0,1,2,4 --grid v_num_grad_steps=20,40 --json out/tune.json

or from Python::

    from editing.tune import tune
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
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from tracing.models import LoadedModel
from tracing.workers import WorkerPool, add_ray_args, pool_from_args

from .evaluate import evaluate_cases, intervals, paired_difference
from .hparams import ROMEHyperParams, load_hparams

__all__ = ["FORMAT", "format_table", "grid_settings", "marginals", "parse_grid", "tune"]

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


def _value(text: str):
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
        grid[key] = [_value(v) for v in _split_top_level(values)]
    return grid


def grid_settings(grid: Mapping[str, Sequence]) -> list[dict]:
    """Every combination of the grid's values, in order (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _cases_key(cases: Sequence[dict]) -> str:
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
    from .stats import StatsSpec, ensure_stats

    if not cases:
        raise ValueError("No cases to tune on.")
    base = dict(base or {})
    settings = grid_settings(grid) if grid else [{}]
    hps = [load_hparams(lm, path=hparams_path, **{**base, **setting}) for setting in settings]
    layers = sorted({hp.edit_layer(lm.n_layers) for hp in hps})
    key = _cases_key(cases)
    done = {}
    if previous and previous.get("fingerprint") == lm.fingerprint and previous.get("cases_key") == key:
        done = {json.dumps(r["hparams"], sort_keys=True): r for r in previous.get("settings", ())}
    rows, before = [], {}
    for i, (setting, hp) in enumerate(zip(settings, hps)):
        row = done.get(json.dumps(hp.settings(), sort_keys=True))
        if row is None:
            spec = StatsSpec.from_hparams(hp)
            ensure_stats(lm, layers, spec)
            result = evaluate_cases(lm, cases, hparams=hp, stats_spec=spec, before=before, on_case=on_case, pool=pool)
            row = _row(setting, hp, result)
        else:
            row = {**row, "setting": setting}
        rows.append(row)
        if on_setting:
            on_setting(i + 1, len(settings), row)
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
        "cases_key": key,
        "base": base,
        "grid": {k: list(v) for k, v in grid.items()},
        "reference": reference["setting"],
        "settings": ranked,
        "marginals": marginals(ranked, grid),
    }


def _fmt(value, width: int = 7, digits: int = 3) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _setting_text(setting: dict) -> str:
    return " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in setting.items()) or "(defaults)"


def format_table(result: dict) -> str:
    """The settings, best S first, then what each swept hyperparameter does to PS and S."""
    lines = [f"{result['model']}: {result['cases']} cases, {len(result['settings'])} settings"
             + (f" on top of {_setting_text(result['base'])}" if result.get("base") else ""),
             f"{'ES':>7}{'PS':>7}{'PS 95 %':>14}{'NS':>7}{'S':>7}{'S 95 %':>14}{'ΔS vs ref (95 %)':>24}{'PM':>7}"
             f"{'miss':>5}{'retry':>6}{'steps':>7}{'s/edit':>8}  setting"]
    for r in result["settings"]:
        post, ci = r["post"], r.get("ci95") or {}
        band = lambda m: f"{ci[m][0]:>7.3f}–{ci[m][1]:<6.3f}" if m in ci else f"{'-':>14}"  # noqa: E731
        d = (r.get("vs_reference") or {}).get("S")
        delta = f"{d[0]:+.3f} ({d[1]:+.3f} {d[2]:+.3f})" if d else "-"
        lines.append(f"{_fmt(post['ES'])}{_fmt(post['PS'])}{band('PS')}{_fmt(post['NS'])}{_fmt(post['S'])}{band('S')}"
                     f"{delta:>24}{_fmt(post['PM'])}{r['not_taken']:>5}{r['retried']:>6}{_fmt(r['steps'], 7, 1)}"
                     f"{_fmt(r['seconds_median'], 8, 1)}  {_setting_text(r['setting'])}")
    if result.get("reference") is not None:
        lines.append(f"ref: {_setting_text(result['reference'])}; a paired interval that excludes 0 is a real difference "
                     "on these cases")
    for key, entries in result.get("marginals", {}).items():
        lines.append(f"{key}: " + "; ".join(f"{e['value']}: PS {e['PS']:.3f} S {e['S']:.3f} ({e['settings']})"
                                          for e in entries))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import logging
    import sys

    from tracing.models import DEFAULT_MODEL

    from tracing.loading import load_model

    from .evaluate import read_cases

    p = argparse.ArgumentParser(
        prog="python -m editing.tune",
        description="Choose ROME's hyperparameters: score every setting of a grid over the same tuning cases "
        "(ES/PS/NS/S with 95 % intervals, best first, and what each hyperparameter does to PS). "
        "A --json file that exists is resumed: its settings are not computed again.",
        epilog="Example: python -m editing.tune --cases assets/counterfact_smollm2_tune.json --limit 30 "
        "--grid layer=0,1,2 --grid kl_factor=0.0625,0.25 --json out/tune.json",
    )
    p.add_argument("--cases", required=True, help="CounterFact-format JSON (the tuning part, never the held-out one)")
    p.add_argument("--limit", type=int, default=None, help="the first N cases (default: all)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a hyperparameter and the values to try (repeat for a product of grids)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="a fixed override for every setting")
    p.add_argument("--hparams", default=None, help="a ROME hyperparameter JSON (default: the model's)")
    p.add_argument("--model", default=None, help=f"Hugging Face id or local path; default: the embedded {DEFAULT_MODEL}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", metavar="OUT", default=None, help="write (and resume from) the results here")
    p.add_argument("--quiet", action="store_true", help="no per-setting lines")
    add_ray_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        grid = parse_grid(args.grid)
        base = {}
        for item in args.set:
            key, _, value = item.partition("=")
            base[key.strip()] = _value(value.strip())
        cases = read_cases(args.cases)[: args.limit]
        previous = None
        if args.json and Path(args.json).is_file():
            previous = json.loads(Path(args.json).read_text(encoding="utf-8"))
            if not isinstance(previous, dict) or previous.get("format") != FORMAT:
                raise ValueError(f"{args.json} exists but is not a tuning result; choose another --json.")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        lm = load_model(args.model)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if previous and (previous.get("fingerprint"), previous.get("cases_key")) != (lm.fingerprint, _cases_key(cases)):
        print(f"error: {args.json} was made with other weights or cases; choose another --json.", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows: list[dict] = []

    def save(result: dict) -> None:
        """The result plus the file's earlier settings that this grid did not score again."""
        scored = [r["hparams"] for r in result["settings"]]
        kept = [r for r in (previous or {}).get("settings", ()) if r["hparams"] not in scored]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**result, "settings": result["settings"] + kept}, indent=1) + "\n",
                                   encoding="utf-8")

    def on_setting(done: int, total: int, row: dict) -> None:
        rows.append(row)
        if args.json:  # after every setting, so that a stopped run resumes from here
            save({"format": FORMAT, "model": lm.name, "fingerprint": lm.fingerprint, "cases": len(cases),
                  "cases_key": _cases_key(cases), "settings": rows})
        if not args.quiet:
            post = row["post"]
            print(f"[{done}/{total}] {time.perf_counter() - started:7.1f} s  {_setting_text(row['setting'])}: "
                  f"ES {post['ES']:.3f} PS {post['PS']:.3f} NS {post['NS']:.3f} S {post['S']:.3f}", flush=True)

    try:
        result = tune(lm, cases, grid, base=base, hparams_path=args.hparams, previous=previous, on_setting=on_setting,
                      pool=pool_from_args(args, name=args.model))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["command"] = "python -m editing.tune " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_table(result))
    if args.json:
        save(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
