"""Turning library results into page content: pure functions from data to HTML strings. No Gradio here.

Example::

    html = history_status(visitor.edits)     # (the HTML of edit results is editing.display's, shared with notebooks)
    html = prediction_card(top5, mlp_result, expected=None)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import editing
from editing.display import esc, fmt_p  # the edit results' HTML: editing.display (notebooks too)
from editing.edit import method_label
from tracing import TraceResult
from tracing.result import LayerSuggestion
from tracing.assets import STATIC
from tracing.average import peaks
from tracing.loading import describe_placement

from .engine import Engine

# Stages of an edit request: (start, end) of the progress bar, and what the visitor reads.
EDIT_STAGES = {
    "answer": (0.0, 0.05, "Asking the model for the old object"),
    "before": (0.05, 0.2, "Generating and scoring before the edit"),
    "templates": (0.2, 0.25, "Context templates (once per model)"),
    "statistics": (0.25, 0.5, "Key statistics of this layer (once per layer, then cached)"),
    "keys": (0.5, 0.55, "Computing the subject's key k*"),
    "optimising": (0.55, 0.85, "Optimising the new value v*"),
    "update": (0.85, 0.87, "Writing the rank-one update"),
    "after": (0.87, 1.0, "Generating and scoring after the edit"),
}
# What the other methods do in the stages they report (editing.methods.STAGES).
METHOD_STAGES = {
    "ft": {"optimising": (0.2, 0.85, "Fine-tuning the layer's weights"),
           "update": (0.85, 0.87, "Collecting the weight change")},
    "ft-l": {"optimising": (0.2, 0.85, "Fine-tuning the layer's weights within the norm bound"),
             "update": (0.85, 0.87, "Collecting the weight change")},
    "kn": {"attributing": (0.2, 0.85, "Attributing the old object to neurons (integrated gradients)"),
           "update": (0.85, 0.87, "Changing the chosen neurons' value vectors")},
}
# Stages of an "Edit many facts" batch (editing.batch.write_batch): MEMIT's, between scoring before and after.
BATCH_STAGES = {
    "answer": (0.0, 0.03, "Asking the model for the old objects"),
    "before": (0.03, 0.08, "Scoring every fact before the edit"),
    "templates": (0.08, 0.1, "Context templates (once per model)"),
    "statistics": (0.1, 0.3, "Key statistics of the edited layers (once per layer, then cached)"),
    "keys": (0.3, 0.32, "Reading the subjects' keys"),
    "optimising": (0.32, 0.85, "Optimising every fact's target vector"),
    "update": (0.85, 0.9, "Spreading the updates over the layers"),
    "after": (0.9, 0.95, "Scoring every fact after the edit"),
    "health": (0.95, 1.0, "Checking the model's health (unrelated facts, fluency)"),
}
HISTORY_HEADERS = ["#", "Method", "Subject", "Relation", "New object", "Old object", "Layer", "‖ΔW‖"]


def static_text(name: str) -> str:
    """A text file of ``assets/static`` (help texts, CSS)."""
    return (STATIC / name).read_text(encoding="utf-8")


def edit_progress(stage: str, fraction: float, method: str = "rome") -> tuple[float, str]:
    """(overall fraction, description) of an edit request's stage and its own fraction."""
    start, end, text = METHOD_STAGES.get(method, {}).get(stage) or EDIT_STAGES.get(stage, (0.0, 1.0, stage))
    return start + (end - start) * min(max(float(fraction), 0.0), 1.0), text


def model_card(engine: Engine) -> str:
    """HTML badge of the loaded model: name, size, layers, device, dtype (and a notice if one is due)."""
    lm = engine.lm
    size = f"{lm.n_params / 1e9:.2f} B" if lm.n_params >= 1e9 else f"{lm.n_params / 1e6:.0f} M"
    d_model = lm.embed.weight.shape[1]
    parts = [
        f'<span class="le-chip le-model">{esc(lm.name)}</span>',
        f'<span class="le-chip">{size} parameters</span>',
        f'<span class="le-chip">{lm.n_layers} layers · d<sub>model</sub> {d_model}</span>',
        f'<span class="le-chip">{esc(lm.device)} · {str(lm.dtype).replace("torch.", "")}</span>',
    ]
    if len(set(lm.placement())) > 1 or lm.offloaded:  # a model split over devices by a device map
        parts.append(f'<span class="le-chip" id="model-placement">{esc(describe_placement(lm))}</span>')
    notice = f'<div class="le-notice">{esc(engine.notice)}</div>' if engine.notice else ""
    return f'<div class="le-card" id="model-card">{"".join(parts)}</div>{notice}'


def progress_card(element: str, fraction: float | None, text: str) -> str:
    """A progress line and bar (``fraction`` None: no bar, e.g. while waiting in the queue)."""
    bar = ""
    if fraction is not None:
        percent = min(max(fraction, 0.0), 1.0) * 100
        bar = f'<div class="le-bar"><div style="width:{percent:.0f}%"></div></div>'
        text = f"{text} · {percent:.0f}%"
    return f'<div class="le-progress" id="{esc(element)}"><div class="le-progress-text">{esc(text)}</div>{bar}</div>'



def preview_note(verdict: dict[str, bool] | None) -> str:
    """What the maps shown before the exact ones are, and which kinds have none."""
    if verdict is None:
        return ("The first maps are first-order estimates (attribution patching), not yet measured against exact "
                "traces for this model and these settings; the exact maps replace them row by row.")
    hidden = [kind for kind, shown in verdict.items() if not shown]
    missing = f" No estimate is shown for {', '.join(hidden)}: it was measured too far from the exact map." \
        if hidden else ""
    return ("The first maps are first-order estimates (attribution patching); the exact maps replace them row by "
            f"row, the subject's last token and the last token first.{missing}")


def prediction_card(top: list[tuple[str, float]] | None, result: TraceResult | None, expected: str | None,
                    note: str = "") -> str:
    """HTML summary of the clean prediction and, once traced, the clean and corrupted scores (and a note)."""
    rows = []
    if top:
        best, p_best = top[0]
        others = " · ".join(f"<code>{esc(t)}</code> {fmt_p(p)}" for t, p in top[1:])
        rows += [f'<div class="le-big">Model\'s next token: <code>{esc(best)}</code> <b>p = {fmt_p(p_best)}</b></div>',
                 f'<div class="le-small">then {others}</div>']
    else:
        best = result.answer if result is not None else ""
    if result is not None:
        settings = result.settings
        how = {"gaussian": "Gaussian noise on the subject", "uniform": "uniform noise on the subject",
               "subject": "the subject swapped for others"}.get(settings.get("corruption", "gaussian"), "noise")
        unit = "p" if result.metric == "prob" else result.metric
        ran = ""
        if settings.get("seconds") is not None:
            where = " · ".join(str(settings[k]) for k in ("device", "dtype") if settings.get(k))
            ran = f", {float(settings['seconds']):.1f} s{' on ' + esc(where) if where else ''}"
        rows.append(
            f'<div class="le-big" id="trace-scores">Traced answer <code>{esc(result.answer)}</code>: '
            f'clean {unit} = <b>{fmt_p(result.high_score)}</b> → corrupted {unit} = <b>{fmt_p(result.low_score)}</b>'
            f' <span class="le-small">({how}, {settings.get("copies", settings.get("samples"))} '
            f'samples{ran})</span></div>'
        )
        if expected and expected.strip() and result.answer.strip() != best.strip():
            rows.append(f'<div class="le-small">Tracing the expected answer <code>{esc(result.answer)}</code>, '
                        f'not the top prediction.</div>')
        if result.settings.get("shipped"):
            rows.append('<div class="le-small">Computed in advance for this preset and these settings.</div>')
    if note:
        rows.append(f'<div class="le-small le-preview-note" id="preview-note">{esc(note)}</div>')
    return f'<div class="le-card le-pred">{"".join(rows)}</div>'


def layer_card(suggestion: LayerSuggestion, default_layer: int) -> str:
    """The edit layer the trace suggests, or why it suggests none (then the sweep below helps)."""
    if suggestion.layer is not None:
        return (f'<div class="le-card" id="layer-suggestion">{esc(suggestion.reason)} <b>Edit this fact →</b> '
                f'carries it to the edit panel with layer <b>{suggestion.layer}</b> (the hyperparameters\' default '
                f'is layer {default_layer}; pick any).</div>')
    return (f'<div class="le-card le-warn" id="layer-suggestion">{esc(suggestion.reason)} <b>Edit this fact →</b> '
            f'keeps the default layer {default_layer}; <b>Which layer to edit?</b> below edits each layer in turn '
            f'and shows where the edit takes.</div>')


def sweep_card(sweep: dict, effect: Sequence[float], token: str, on_edits: bool) -> str:
    """A layer sweep's verdict: the best layer, where the edit took, and how that compares with the trace."""
    rows = sweep.get("layers", [])
    if not rows:
        return '<div class="le-card" id="sweep-summary">No layer was edited.</div>'
    took = [r["layer"] for r in rows if r["took"]]
    best = next(r for r in rows if r["layer"] == sweep["best"])
    so_far = "" if sweep.get("complete", True) else "So far (more layers are being edited): "
    parts = [f'{so_far}Best layer by S: <b>{best["layer"]}</b> (ES {fmt_p(best["ES"])}, PS {fmt_p(best["PS"])}, '
             f'NS {fmt_p(best["NS"])}; p(new) on the rewrite prompt {fmt_p(best["p_new"])}).']
    parts.append(f'The new object beat the old one on the rewrite prompt at {len(took)} of {len(rows)} layers'
                 + (f' ({", ".join(map(str, took))}).' if took and len(took) < len(rows) else '.'))
    known = [(r["layer"], effect[r["layer"]]) for r in rows
             if r["layer"] < len(effect) and not np.isnan(effect[r["layer"]])]
    if len(known) >= 3:
        traced_best = max(known, key=lambda kv: kv[1])[0]
        parts.append(f'The traced MLP effect at <code>{esc(token)}</code> is largest at layer {traced_best} of '
                     'these' + (' — the same layer.' if traced_best == best["layer"] else
                                ', not at the best edit layer: where a fact is traced need not be where an edit '
                                'works best (Hase et al., 2023).'))
    if on_edits:
        parts.append('Measured on top of your earlier edits.')
    return f'<div class="le-card" id="sweep-summary">{" ".join(parts)}</div>'


def stats_note(ready: Sequence[int], n_layers: int, on_demand: bool) -> str:
    """Which layers can be edited without a statistics pass first."""
    ready = sorted(ready)
    listed = ", ".join(map(str, ready)) if ready else "none yet"
    if len(ready) == n_layers:
        return '<div class="le-small" id="stats-note">Key statistics are ready for every layer.</div>'
    other = ("other layers compute theirs first (once, then cached; bounded by the request's deadline)"
             if on_demand else "other layers are not available on this server")
    return f'<div class="le-small" id="stats-note">Key statistics ready for layers: <b>{listed}</b>; {other}.</div>'


def history_rows(edits: Sequence[editing.Edit]) -> list[list]:
    """One table row per edit of the visitor, oldest first (a batch is one row: undone as one step)."""
    rows = []
    for i, e in enumerate(edits):
        r = e.request
        if len(e.requests) > 1:
            def listed(values: list[str]) -> str:
                return ", ".join(values[:3]) + (", …" if len(values) > 3 else "")

            fact = [f"{len(e.requests)} facts: " + listed([q.subject for q in e.requests]), "(a batch)",
                    listed([q.target for q in e.requests]), listed([q.target_true or "?" for q in e.requests])]
        else:
            fact = [r.subject, r.prompt, r.target, r.target_true or ""]
        rows.append([i + 1, method_label(e.method), *fact, ", ".join(map(str, e.layers)), round(e.norm, 3)])
    return rows


def history_status(edits: Sequence[editing.Edit]) -> str:
    if not edits:
        return '<div class="le-small" id="edit-status">No edits: you are talking to the original model.</div>'
    return (f'<div class="le-small" id="edit-status"><b>{len(edits)} edit{"s" if len(edits) > 1 else ""} active</b> '
            "in your session (only you see them; the shared model is restored after each of your requests).</div>")


def batch_progress(stage: str, fraction: float) -> tuple[float, str]:
    """(overall fraction, description) of a batch's stage and its own fraction."""
    start, end, text = BATCH_STAGES.get(stage, (0.0, 1.0, stage))
    return start + (end - start) * min(max(float(fraction), 0.0), 1.0), text


# ---------------------------------------------------------------------------
# Across many facts (the shipped averages of tracing.average)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def average_intro(summary: dict) -> str:
    """What the averaged figures are, over how many facts, and where each kind peaks."""
    recalled = summary.get("n_recalled") or summary["n_facts"]
    share = f" (the first {summary['n_facts']} of the {recalled} it recalls)" if recalled > summary["n_facts"] else ""
    lines = [
        f"**{summary['n_facts']} facts that {summary['model']} knows**{share} (of the paper's known facts: its top "
        f"next token is the answer), each traced with the paper's settings and averaged by token group and layer. "
        f"Clean runs give the answer {_pct(summary['clean'])} on average, corrupted runs {_pct(summary['corrupted'])} "
        f"(the paper's GPT-2 XL: 27.0 % and 8.47 %).",
        "",
        "| kind | peak: token group | layer | restored p | average indirect effect |",
        "|---|---|---|---|---|",
    ]
    names = {"hidden": "hidden state", "mlp": "MLP (window)", "attn": "attention (window)"}
    for kind, p in peaks(summary).items():
        lines.append(f"| {names.get(kind, kind)} | {p['group']} | {p['layer']} | {_pct(p['mean'])} | "
                     f"{100 * p['effect']:+.1f} points |")
    lines += ["", "The paper found, for GPT-2 XL, that MLP states at the **last subject token** in the middle "
              "layers carry a strong effect (the early site), and attention at the **last token** in late layers "
              "(the late site). The curves show each kind at those two token groups, with 95 % intervals; the "
              "heatmaps show every group. " + (f"Computed with `{esc(summary['command'])}`." if summary.get("command")
                                               else "")]
    return "\n".join(lines)


def severed_text(summary: dict) -> str:
    """The severed-path figure's explanation, with this model's largest MLP gap."""
    severed = summary["severed"]
    gap = [v if v is not None else float("nan") for v in severed["gap"].get("mlp", {}).get("mean", [])]
    where = ""
    if gap and not np.isnan(gap).all():
        layer = int(np.nanargmax(gap))
        where = (f" Here the largest MLP gap is at layer {layer}: {100 * gap[layer]:+.1f} points "
                 f"({severed['n']} facts).")
    return ("**Severed paths** (the paper's Fig. 3). Restore the hidden state of the last subject token at one "
            "layer, but hold the MLP (or attention) outputs of the layers above it, at that token, at their corrupted "
            "values. If the restored state works *through* later MLPs, severing them removes its effect. The paper "
            "found that for GPT-2 XL severing the MLPs removes most of the effect of early layers (the MLPs mediate "
            "the early site), while severing attention changes little." + where)


AVERAGE_HEADERS = ["Prompt", "Subject", "Answer", "Clean p", "Corrupted p", "MLP peak layer (last subject token)",
                   "MLP peak effect"]


def average_fact_rows(summary: dict) -> tuple[list[str], list[list]]:
    """The facts behind the averages as table rows (a row opens its fact in the Locate tab)."""
    rows = []
    for fact in summary.get("facts", []):
        peak = (fact.get("last_subject_peak") or {}).get("mlp") or {}
        score = peak.get("score")
        rows.append([fact["prompt"], fact["subject"], fact["attribute"], round(fact["clean"], 4),
                     round(fact["corrupted"], 4), peak.get("layer"),
                     None if score is None else round(score - fact["corrupted"], 4)])
    return AVERAGE_HEADERS, rows
