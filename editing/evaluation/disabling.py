"""Disabling edits: ROME's update with both keys over CounterFact-style cases, recorded edit by edit.

A disabling edit (Gupta et al., 2024, "Rebuilding ROME") takes, yet breaks the
model on unrelated facts: its update ΔW = v uᵀ is many times larger than an
ordinary edit's, because the paper code's closed form divides δ by u·k₀ (k₀
the bare prompt's key) while u = C⁻¹k*/‖C⁻¹k*‖ follows the averaged key k*;
where u leans on directions that k₀ barely uses, u·k₀ is small and ‖ΔW‖ large.
This survey runs one v* optimisation per case (the δ does not depend on the
key, :func:`~editing.methods.rome.compute_key_edits`), writes it with the
paper code's key ("original"), with r-ROME's and with the bare prompt's own
("bare", u = C⁻¹k₀/‖C⁻¹k₀‖: the "guarded" variant's fallback), and records per edit: the
update norm ‖ΔW‖, the key's size under C⁻¹ (k*ᵀC⁻¹k* and ‖C⁻¹k*‖), sqrt(uᵀCu)
(how far an ordinary key reaches along u), the optimisation's steps and final
loss, ES/PS/NS/S, EasyEdit's token scores, and NS before and after (the drop).

Its command line is ``python -m editing.disabling`` (:mod:`editing.disabling`). Example::

    python -m editing.disabling --cases assets/counterfact_smollm2_tune.json \\
        --cases assets/counterfact_smollm2_heldout.json --json assets/tuning/smollm2-135m-rome-keys.json

The ``--json`` file is resumed: cases it holds (same model, hyperparameters
and case text) are not computed again, and it is written after every case.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from tracing.models import LoadedModel

from ..applying import applied
from .evaluate import request_of
from ..hparams import ROMEHyperParams
from ..methods.outliers import REFERENCE_FORMAT
from ..methods.rome import compute_key_edits, key_geometry
from ..scores import accuracy_scores, score_edit, token_predictions
from ..stats import StatsSpec, key_stats

log = logging.getLogger(__name__)

FORMAT = "locate-edit ROME key survey v1"
KEYS = ("original", "r-rome", "bare")  # the paper code's key, r-ROME's, and the bare prompt's own (the fallback)
INFO = ("steps", "loss", "nll", "took", "retried", "delta_norm", "value_norm", "denominator", "key_norm",
        "bare_key_norm", "cinv_key_norm", "key_cinv", "ordinary_key_rms", "target_prob_after")


def case_key(source: str, case: dict) -> str:
    """A case's identity in the survey: its file's name, its id and a hash of its text."""
    digest = hashlib.sha256(json.dumps(case, sort_keys=True).encode()).hexdigest()[:12]
    return f"{Path(source).name}#{case.get('case_id')}#{digest}"


def layer_output_rms(lm: LoadedModel, layer: int, spec: StatsSpec) -> float:
    """sqrt(E‖W k‖²) = sqrt(tr(W C Wᵀ)) over the statistics' keys: what the layer writes on a typical token."""
    weight = lm.module("down_proj", layer).weight.detach().double().cpu()  # (d_out, d_in)
    mom2 = torch.from_numpy(key_stats(lm, layer, spec).mom2)  # (d_in, d_in)
    return float(torch.sqrt(torch.einsum("oi,ij,oj->", weight, mom2, weight)))


def survey_case(lm: LoadedModel, case: dict, hp: ROMEHyperParams, spec: StatsSpec, output_rms: float) -> dict:
    """One case: scores before, then each key's edit, its diagnostics and its scores after."""
    request = request_of(case)
    paraphrases = list(case.get("paraphrase_prompts") or [])
    neighbours = list(case.get("neighborhood_prompts") or [])
    pre = score_edit(lm, request, paraphrases, neighbours)
    pre_tokens = token_predictions(lm, [pre])[0]
    t0 = time.perf_counter()
    edits = compute_key_edits(lm, request, KEYS, hparams=hp, stats_spec=spec)
    seconds = time.perf_counter() - t0
    record = {"case_id": case.get("case_id"), "request": request.to_dict(), "seconds": seconds,
              "pre": {**pre.summary(), **accuracy_scores(pre, pre_tokens)}, "keys": {}}
    for variant, edit in edits.items():
        with applied(lm, [edit]):
            post = score_edit(lm, request, paraphrases, neighbours)
            post_tokens = token_predictions(lm, [post])[0]
        info = {k: edit.info.get(k) for k in INFO}
        info["retried"] = bool(info["retried"])
        rms = info.get("ordinary_key_rms")
        record["keys"][variant] = {
            "norm": edit.norm, **info,
            # RMS of ‖ΔW k‖ over the statistics' keys, as a share of what the layer writes there
            "ordinary_share": float(np.linalg.norm(edit.v) * rms / output_rms) if rms else None,
            "post": {**post.summary(), **accuracy_scores(post, post_tokens, pre_tokens)},
            "ns_drop": pre.summary()["NS"] - post.summary()["NS"],
        }
    return json.loads(json.dumps(record, default=float).replace("NaN", "null"))


def screen_cases(lm: LoadedModel, items: Sequence[tuple[str, dict]], hp: ROMEHyperParams,
                 done: dict | None = None) -> dict[str, dict]:
    """:func:`~editing.methods.rome.key_geometry` of every (source, case): no optimisation, a second or two each."""
    spec = StatsSpec.from_hparams(hp)
    out = dict(done or {})
    for source, case in items:
        key = case_key(source, case)
        if key not in out:
            out[key] = key_geometry(lm, request_of(case), hparams=hp, stats_spec=spec)
    return out


def survey(lm: LoadedModel, sources: Sequence[tuple[str, list[dict]]], hp: ROMEHyperParams, *,
           previous: dict | None = None, on_case: Callable[[dict, dict], None] | None = None,
           screen_first: bool = False) -> dict:
    """Every case of every (file name, cases) source; ``previous`` (an earlier result) supplies cases already done.

    ``screen_first``: screen every case first (:func:`screen_cases`, kept in
    ``result["screen"]``), then edit them largest possible ‖ΔW‖ (the paper
    code's key) first, so that a run stopped early has the suspects.
    """
    spec = StatsSpec.from_hparams(hp)
    layer = hp.edit_layer(lm.n_layers)
    done, screened = {}, {}
    same = lambda settings: {**settings, "variant": None} == {**hp.settings(), "variant": None}  # noqa: E731
    if previous and previous.get("fingerprint") == lm.fingerprint and same(previous.get("hparams") or {}):
        done = {r["key"]: r for r in previous.get("edits", ())}
        screened = previous.get("screen") or {}
    items = [(source, case) for source, cases in sources for case in cases]
    result = {"format": FORMAT, "model": lm.name, "fingerprint": lm.fingerprint, "layer": layer,
              "hparams": hp.settings(), "output_rms": layer_output_rms(lm, layer, spec), "edits": []}
    if screen_first:
        result["screen"] = screen_cases(lm, items, hp, screened)
        items.sort(key=lambda item: -result["screen"][case_key(*item)]["norm_bound"]["original"])
    for source, case in items:
        key = case_key(source, case)
        record = done.get(key)
        if record is None:
            record = {"key": key, "split": Path(source).name, **survey_case(lm, case, hp, spec, result["output_rms"])}
        result["edits"].append(record)
        if on_case:
            on_case(result, record)
    return result


def reference_entry(lm: LoadedModel, hp: ROMEHyperParams, *, surveys: Sequence[dict] = (),
                    tuning: Sequence[dict] = (), shipped: Sequence = ()) -> dict:
    """The ‖ΔW‖ of ``lm``'s reference edits at the edit layer, for ``assets/update_norms.json``.

    The reference is what the model's ordinary edits write with ``hp`` and the
    paper code's key: the "original" edits of key surveys, the rows of
    ``editing.tune`` results whose settings are ``hp``'s with that key (a case
    in both counts once), and shipped preset edits. Held-out cases are refused:
    the reference chooses, so it never sees them.
    """
    layer = hp.edit_layer(lm.n_layers)
    wanted = {**hp.settings(), "variant": "original"}
    norms: dict[tuple, float] = {}
    for result in tuning:
        for row in result.get("settings", ()):
            if row.get("hparams") == wanted and result.get("fingerprint") == lm.fingerprint:
                norms.update({("tune", c["case_id"]): c["norm"] for c in row["per_case"]})
    for result in surveys:
        if result.get("fingerprint") != lm.fingerprint or {**result["hparams"], "variant": "original"} != wanted:
            raise ValueError("A key survey was made with other weights or settings than the reference's.")
        for record in result["edits"]:
            if "heldout" in record["split"]:
                raise ValueError(f"{record['split']} is a held-out split: the reference must not see it.")
            norms[("tune" if "tune" in record["split"] else record["split"], record["case_id"])] = \
                record["keys"]["original"]["norm"]
    counted = len(norms)
    values = list(norms.values()) + [e.norm for e in shipped if e.layer == layer and e.u is not None]
    return {"model": lm.name, "fingerprint": lm.fingerprint, "method": "rome",
            "layers": {str(layer): {"norms": [round(float(v), 4) for v in values], "median": float(np.median(values)),
                                    "source": f"{counted} tuning-split edits and {len(values) - counted} shipped "
                                              "preset edits, paper code's key, the model's ROME settings"}}}


def write_reference(path: str | Path, entry: dict, command: str) -> Path:
    """Put ``entry`` (one model) into the reference file at ``path``, replacing that model's earlier entry."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"format": REFERENCE_FORMAT}
    models = [m for m in data.get("models", ()) if m.get("fingerprint") != entry["fingerprint"]]
    data.update(models=models + [{**entry, "command": command}],
                description="‖ΔW‖ of each model's ordinary ROME edits per layer: the yardstick of "
                            "editing.methods.outliers (python -m editing.disabling --write-reference)")
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
