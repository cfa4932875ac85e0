"""Preset results that are already done: the exact traces and the edits of every preset, shipped in ``assets/``.

A class clicks the same dozen presets, and after a restart the page's memo is
empty. So the default model's results for every preset -- the exact causal
traces with the page's default settings (the paper's) and the edit comparison
the page's edit button computes -- are computed offline and shipped:
``assets/shipped/presets.json`` (traces and comparisons as JSON) and
``assets/shipped/edits.safetensors`` (the edits' vectors; never pickle).
They are keyed by the model's fingerprint and every setting, and the loaders
return None for anything else: another model or copy (bf16), edited weights,
another setting, prompt, request or test prompt.

Example::

    results = shipped_trace(lm, preset.prompt, preset.subject, preset.attribute, TraceConfig())   # or None
    comparison = shipped_comparison(lm, EditRequest(preset.subject, preset.rewrite_prompt, preset.counterfactual,
                                                    preset.attribute),
                                    layer=1, hparams=load_hparams(lm), paraphrases=preset.paraphrases,
                                    neighbours=preset.neighbours, max_new_tokens=16, sample=False, seed=0)

Regenerate (the default model, about 10 minutes on 2 quiet CPU cores), or time
what a first click costs, with::

    python -m editing.shipped
    python -m editing.shipped --time
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from tracing.assets import ROOT
from tracing.models import LoadedModel
from tracing.result import KINDS, TraceConfig, TraceResult
from tracing.trace import trace

from ..compare import EditComparison, edit_and_compare
from ..edit import EditRequest
from ..applying import is_edited
from ..edit_files import load_edits, save_edits
from ..hparams import load_hparams
from ..stats import StatsSpec

log = logging.getLogger(__name__)

SHIPPED = ROOT / "shipped"
RESULTS = SHIPPED / "presets.json"
EDITS = SHIPPED / "edits.safetensors"  # the edits' arrays, in the order of the comparisons in RESULTS
FORMAT = "locate-edit/shipped-presets"
VERSION = 1
# What the page's edit button passes besides the preset's own values (webapp.handlers.App.edit, the layout's defaults).
PAGE_EDIT = {"max_new_tokens": 16, "sample": False, "seed": 0}


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        return None
    return data


def _for(lm: LoadedModel, path: Path) -> dict | None:
    """The shipped file if it was made for these very weights, unedited; else None."""
    data = _read(path)
    if data is None or is_edited(lm) or data.get("fingerprint") != lm.fingerprint:
        return None
    return data


def shipped_trace(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    answer: str | None,
    config: TraceConfig,
    *,
    kinds: Sequence[str] = KINDS,
    occurrence: int = 0,
    path: str | Path = RESULTS,
) -> list[TraceResult] | None:
    """The shipped exact traces of ``prompt`` (one per kind, in ``kinds`` order), or None if none fits exactly.

    None unless the model's fingerprint, its unedited weights, the prompt,
    subject, answer, occurrence and every setting of ``config`` are those the
    results were computed with. Each result's ``settings["shipped"]`` is True.
    """
    data = _for(lm, Path(path))
    if data is None:
        return None
    try:
        if TraceConfig.from_dict(data["trace_config"]) != config:
            return None
    except (KeyError, TypeError, ValueError):
        return None
    for entry in data.get("traces", []):
        if (entry.get("prompt"), entry.get("subject"), entry.get("answer"), entry.get("occurrence")) == (
                prompt, subject, answer, occurrence):
            by_kind = {r["kind"]: r for r in entry["results"]}
            if not set(kinds) <= set(by_kind):
                return None
            out = []
            for kind in kinds:
                result = TraceResult.from_dict(by_kind[kind])
                result.settings["shipped"] = True
                out.append(result)
            return out
    return None


def _edit_key(request: EditRequest, *, layer, hparams, paraphrases, neighbours, max_new_tokens, sample, seed,
              method, stats_spec) -> dict:
    """Everything an edit comparison depends on, as JSON (compared exactly)."""
    spec = stats_spec if stats_spec is not None else StatsSpec.from_hparams(hparams)
    return json.loads(json.dumps({
        "request": request.to_dict(), "layer": int(layer), "method": method, "hparams": hparams.settings(),
        "stats_spec": dataclasses.asdict(spec), "paraphrases": list(paraphrases), "neighbours": list(neighbours),
        "max_new_tokens": int(max_new_tokens), "sample": bool(sample), "seed": int(seed),
    }))


def _settings_only(key) -> dict | None:
    """A stored key without the hyperparameters' notes (files written before keys left them out held them)."""
    if not isinstance(key, dict) or not isinstance(key.get("hparams"), dict):
        return key
    return {**key, "hparams": {k: v for k, v in key["hparams"].items() if k not in ("description", "match")}}


def shipped_comparison(
    lm: LoadedModel,
    request: EditRequest,
    *,
    layer: int,
    hparams,
    paraphrases: Sequence[str],
    neighbours: Sequence[str],
    max_new_tokens: int,
    sample: bool,
    seed: int,
    method: str = "rome",
    stats_spec=None,
    previous: Sequence = (),
    path: str | Path = RESULTS,
    edits_path: str | Path | None = None,
) -> EditComparison | None:
    """The shipped :class:`EditComparison` of an edit of the unedited model, or None if none fits exactly.

    The arguments are those of :func:`editing.edit_and_compare` (``stats_spec``
    None: the hyperparameters' own; the prompts generated are the scored
    ones). Only edits of the original weights are shipped: None with
    ``previous`` edits or while edits are applied.
    """
    data = _for(lm, Path(path))
    if data is None or previous:
        return None
    try:
        key = _edit_key(request, layer=layer, hparams=hparams, paraphrases=paraphrases, neighbours=neighbours,
                        max_new_tokens=max_new_tokens, sample=sample, seed=seed, method=method, stats_spec=stats_spec)
    except (TypeError, ValueError, AttributeError):
        return None
    for entry in data.get("comparisons", []):
        if _settings_only(entry.get("key")) == key:
            edits = load_edits(edits_path or Path(path).with_name(EDITS.name))
            edit = edits[int(entry["edit"])]
            if edit.fingerprint != lm.fingerprint:
                return None
            return EditComparison.from_record(entry["comparison"], edit=edit)
    return None


def compute_shipped(lm: LoadedModel, presets: Sequence, *, config: TraceConfig = TraceConfig(), hparams=None,
                    stats_spec=None, path: str | Path = RESULTS, edits_path: str | Path | None = None,
                    keep_traces: bool = False) -> Path:
    """Compute every preset's exact traces and edit comparison as the page does, and write them.

    Example::

        compute_shipped(load_model(), load_presets().presets)

    The page's settings are the defaults: ``config`` the trace's (the
    paper's), ``hparams`` the model's ROME settings (their edit layer),
    ``stats_spec`` theirs; tests pass smaller ones. ``keep_traces`` reuses
    the traces already in ``path`` that fit exactly (same weights, settings
    and prompt; see :func:`shipped_trace`), so new edit settings only cost
    the edits.
    """
    if is_edited(lm):
        raise ValueError("Shipped results are of the unedited model; undo every edit first.")
    hp = hparams if hparams is not None else load_hparams(lm)
    layer = hp.edit_layer(lm.n_layers)
    spec = stats_spec if stats_spec is not None else StatsSpec.from_hparams(hp)
    traces, comparisons, edits = [], [], []
    for i, p in enumerate(presets):
        started = time.perf_counter()
        results = shipped_trace(lm, p.prompt, p.subject, p.attribute, config, path=path) if keep_traces else None
        if results is None:
            results = trace(lm, p.prompt, p.subject, answer=p.attribute, config=config)
        else:
            for result in results:
                result.settings.pop("shipped", None)
        traced = time.perf_counter() - started
        traces.append({"prompt": p.prompt, "subject": p.subject, "answer": p.attribute, "occurrence": 0,
                       "results": [r.to_dict() for r in results]})
        request = EditRequest(p.subject, p.rewrite_prompt, p.counterfactual, p.attribute)
        settings = dict(layer=layer, hparams=hp, paraphrases=tuple(p.paraphrases), neighbours=tuple(p.neighbours),
                        **PAGE_EDIT)
        comparison = edit_and_compare(lm, request, stats_spec=spec, **settings)
        comparisons.append({"key": _edit_key(request, method="rome", stats_spec=spec, **settings),
                            "comparison": comparison.to_record(), "edit": len(edits)})
        edits.append(comparison.edit)
        log.info("[%d/%d] %s: trace %.1f s, edit %.1f s", i + 1, len(presets), p.label, traced,
                 time.perf_counter() - started - traced)
    import transformers  # here: only for its version, without loading it on import

    data = {
        "format": FORMAT, "version": VERSION, "model": lm.name, "fingerprint": lm.fingerprint,
        "generated_by": "python -m editing.shipped", "torch": torch.__version__,
        "transformers": transformers.__version__, "trace_config": config.to_dict(),
        "traces": traces, "comparisons": comparisons,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_edits(edits, edits_path or path.with_name(EDITS.name))
    path.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
