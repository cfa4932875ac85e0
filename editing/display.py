"""HTML of edit results, shared by the page (:mod:`webapp.render`) and notebooks (``_repr_html_``).

The results are duck-typed (an :class:`~editing.compare.EditComparison`, a
:class:`~editing.batch.BatchResult`, a :class:`~editing.sequential.Health`),
since those modules draw themselves with these functions.

The functions return fragments that use the page's CSS classes (``le-*``);
:func:`notebook_html` wraps one with the page's stylesheet so that Jupyter
draws it as the page does.

Example::

    result = edit_and_compare(lm, request, paraphrases=..., neighbours=...)
    result                                   # in a notebook: the comparison table and the scores
    html = comparison_table(result) + scores_card(result)
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import numpy as np

from tracing.assets import STATIC

from .edit import Edit, method_label

__all__ = ["batch_result", "comparison_table", "editors_table", "esc", "evaluation_table", "fmt_p", "free_comparison",
           "health_card", "highlight", "layers_text", "notebook_html", "pct", "scores_card"]


def notebook_html(fragment: str) -> str:
    """``fragment`` with the page's stylesheet, for Jupyter (``_repr_html_``)."""
    style = (STATIC / "style.css").read_text(encoding="utf-8")
    return f'<div class="le-notebook"><style>{style}</style>{fragment}</div>'


def esc(text: object) -> str:
    return html.escape(str(text))


def fmt_p(p: float | None) -> str:
    if p is None or not np.isfinite(p):
        return "–"
    return f"{p:.3f}" if abs(p) >= 0.001 or p == 0 else f"{p:.1e}"


def pct(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.0%}"


def layers_text(edit: Edit) -> str:
    layers = list(edit.layers)
    return f"layer {layers[0]}" if len(layers) == 1 else "layers " + ", ".join(map(str, layers))


def highlight(text: str, new: str, old: str | None) -> str:
    """HTML of a generation with the new object marked green and the old one red (case-insensitive)."""
    classes = {w.strip().lower(): cls for w, cls in ((old, "le-old"), (new, "le-new")) if w and w.strip()}
    if not classes:
        return esc(text)
    pattern = re.compile("|".join(re.escape(w) for w in sorted(classes, key=len, reverse=True)), re.IGNORECASE)
    out, pos = [], 0
    for match in pattern.finditer(text):
        out.append(esc(text[pos : match.start()]))
        out.append(f'<mark class="{classes[match.group(0).lower()]}">{esc(match.group(0))}</mark>')
        pos = match.end()
    out.append(esc(text[pos:]))
    return "".join(out)


def comparison_table(result) -> str:
    """HTML table: per test prompt, the generations before and after and p(new) vs p(old)."""
    new, old = result.request.target, result.request.target_true
    body = []
    for i, row in enumerate(result.rows()):
        kind = row["kind"]
        before = row["before"] or ""
        after_html = ('<span class="le-wait">editing…</span>' if result.after is None
                      else highlight(row["after"] or "", new, old))
        probs = []
        for name in ("before", "after"):
            p_new, p_old = row[f"p_new_{name}"], row[f"p_old_{name}"]
            if p_new is not None:
                win = "le-win" if p_new > p_old else "le-lose"
                probs.append(f'<div class="{win}">{name}: {fmt_p(p_new)} vs {fmt_p(p_old)}</div>')
        body.append(
            f'<tr data-kind="{kind}" data-index="{i}">'
            f'<td><span class="le-tag le-{kind}">{kind}</span></td>'
            f'<td class="le-prompt">{esc(row["prompt"])}</td>'
            f'<td class="before">{highlight(before, new, old)}</td>'
            f'<td class="after">{after_html}</td>'
            f'<td class="le-probs">{"".join(probs)}</td></tr>'
        )
    head = (f"<tr><th></th><th>Prompt</th><th>Before the edit</th><th>After the edit</th>"
            f"<th>p(<mark class='le-new'>{esc(new.strip())}</mark>) vs "
            f"p(<mark class='le-old'>{esc((old or '?').strip())}</mark>)</th></tr>")
    return f'<table class="le-compare" id="edit-comparison">{head}{"".join(body)}</table>'


def scores_card(result) -> str:
    """HTML summary: efficacy, paraphrase and neighbourhood scores before/after, update norm, timings."""
    if result.scores_after is None or result.edit is None:
        return '<div class="le-card">Computing the edit…</div>'
    b, a = result.scores_before, result.scores_after

    def cell(name: str, value_b: float, value_a: float, help_text: str) -> str:
        return (f'<div class="le-score"><div class="le-score-name">{name}</div>'
                f'<div class="le-score-value">{pct(value_a)}</div>'
                f'<div class="le-small">before: {pct(value_b)}</div><div class="le-small">{help_text}</div></div>')

    edit = result.edit
    warning = edit.info.get("warning")
    retried = edit.info.get("retried")
    note = ""
    if edit.info.get("outlier_warning"):  # flagged before it was applied: far outside this model's usual updates
        note += f'<div class="le-card le-warn" id="edit-outlier">{esc(edit.info["outlier_warning"])}</div>'
    if edit.info.get("key_fallback"):  # the guarded variant wrote it along the bare prompt's own key
        note += f'<div class="le-small" id="edit-key-fallback">{esc(edit.info["key_fallback"])}</div>'
    if warning:
        note += f'<div class="le-card le-warn" id="edit-warning">{esc(warning)}</div>'
    elif retried:
        note += (f'<div class="le-small" id="edit-retried">The first optimisation did not make the rewrite prompt prefer '
                f'the new object; a second one with {retried["steps"]} steps and clamp '
                f'{retried["clamp_norm_factor"]:.3g} did.</div>')
    return (
        note + '<div class="le-scores" id="edit-scores">'
        + cell("Efficacy", b.efficacy, a.efficacy, "rewrite prompt: p(new) > p(old)")
        + cell("Paraphrase", b.paraphrase, a.paraphrase, "paraphrases: p(new) > p(old)")
        + cell("Neighbourhood", b.neighbourhood, a.neighbourhood, "neighbours keep p(old) > p(new)")
        + f'<div class="le-score"><div class="le-score-name">Update ({method_label(edit.method)})</div>'
        f'<div class="le-score-value">{edit.norm:.3g}</div><div class="le-small">‖ΔW‖ at {layers_text(edit)}</div>'
        f'<div class="le-small">computed in {edit.seconds:.1f} s</div></div></div>'
    )


def free_comparison(prompt: str, original: str, edited: str | None, edits: Sequence[Edit]) -> str:
    """HTML of one free prompt continued by the original model and with the visitor's edits."""
    new = edits[-1].request.target if edits else ""
    old = edits[-1].request.target_true if edits else None
    right = highlight(edited, new, old) if edited is not None else '<span class="le-small">(no edits yet)</span>'
    return (f'<table class="le-compare" id="free-comparison"><tr><th>Prompt</th><th>Original model</th>'
            f'<th>With your edits</th></tr><tr><td class="le-prompt">{esc(prompt)}</td>'
            f'<td class="before">{highlight(original, new, old)}</td><td class="after">{right}</td></tr></table>')


# What each editor trades away, as the paper found it (Table 4, Fig. 6); shown above its column.
METHOD_NOTES = {
    "rome": "One rank-one change of one MLP's key-value memory. The paper: edits, generalises to paraphrases and "
            "leaves other subjects alone.",
    "ft": "Fine-tunes one MLP layer on the rewrite prompt. The paper: edits and generalises, but spills over onto "
          "other subjects.",
    "ft-l": "Fine-tuning with a bound on every weight's change. The paper: stays specific, but generalises little.",
    "kn": "Knowledge Neurons: rewrites a few neurons found by integrated gradients. The paper: barely edits.",
}


def editors_table(results: dict, methods: Sequence[str], running: str | None = None) -> str:
    """One column per editor for the same fact: generations after its edit, its scores and its update.

    ``results`` maps a method to its :class:`EditComparison` (the first one's
    before column is shown once); ``running`` marks the method being computed.
    """
    done = [results[m] for m in methods if m in results]
    if not done:
        return f'<div class="le-card" id="editors-comparison">Computing {method_label(running or methods[0])}…</div>'
    first = done[0]
    new, old = first.request.target, first.request.target_true
    heads = "".join(
        f'<th class="le-method" data-method="{m}"><div>{method_label(m)}</div>'
        f'<div class="le-small le-note">{esc(METHOD_NOTES.get(m, ""))}</div></th>' for m in methods)
    kinds = {text: kind for kind, text in first.prompts}
    body = []
    for i, text in enumerate(first.generated):
        kind = kinds.get(text, "prompt")
        cells = []
        for m in methods:
            if m in results and results[m].after is not None:
                cells.append(f'<td class="after" data-method="{m}">{highlight(results[m].after[i], new, old)}</td>')
            else:
                cells.append(f'<td data-method="{m}"><span class="le-wait">{"editing…" if m == running else ""}'
                             f'</span></td>')
        body.append(f'<tr><td><span class="le-tag le-{kind}">{kind}</span> <span class="le-prompt">{esc(text)}'
                    f'</span></td><td class="before">{highlight(first.before[i], new, old)}</td>{"".join(cells)}</tr>')

    def score_row(name: str, key: str, as_pct: bool, help_text: str) -> str:
        value = first.scores_before.summary()[key]
        cells = "".join(
            f'<td data-method="{m}"><b>{(pct if as_pct else fmt_p)(results[m].scores_after.summary()[key])}</b></td>'
            if m in results and results[m].scores_after is not None else f'<td data-method="{m}"></td>'
            for m in methods)
        return (f'<tr class="le-score-row"><td>{name} <span class="le-small">{help_text}</span></td>'
                f'<td>{(pct if as_pct else fmt_p)(value)}</td>{cells}</tr>')

    body.append(score_row("Efficacy", "ES", True, "rewrite: p(new) > p(old)"))
    body.append(score_row("Paraphrase", "PS", True, "p(new) > p(old)"))
    body.append(score_row("Neighbourhood", "NS", True, "neighbours keep p(old) > p(new)"))
    body.append(score_row("Efficacy magnitude", "EM", False, "mean p(new) − p(old)"))
    body.append(score_row("Paraphrase magnitude", "PM", False, "mean p(new) − p(old)"))
    body.append(score_row("Neighbourhood magnitude", "NM", False, "mean p(old) − p(new)"))
    updates = "".join(
        f'<td data-method="{m}">{results[m].edit.norm:.3g} at {layers_text(results[m].edit)}, '
        f'{results[m].edit.seconds:.1f} s</td>' if m in results and results[m].edit is not None
        else f'<td data-method="{m}"></td>' for m in methods)
    body.append(f'<tr class="le-score-row"><td>Update ‖ΔW‖, time</td><td>–</td>{updates}</tr>')
    return (f'<table class="le-compare le-editors" id="editors-comparison"><tr><th>Prompt</th><th>Before</th>{heads}'
            f'</tr>{"".join(body)}</table>')


def batch_result(result) -> str:
    """HTML of a written batch: the scores before and after, the health check, then one row per fact."""
    b, a = result.summary("before"), result.summary("after")

    def cell(name: str, key: str, help_text: str) -> str:
        return (f'<div class="le-score" data-score="{key}"><div class="le-score-name">{name}</div>'
                f'<div class="le-score-value">{pct(a[key])}</div>'
                f'<div class="le-small">before: {pct(b[key])}</div><div class="le-small">{help_text}</div></div>')

    edit = result.edit
    scores = (
        '<div class="le-scores" id="batch-scores">'
        + cell("Efficacy", "ES", f"rewrite prompts of all {len(result.items)} facts: p(new) > p(old)")
        + cell("Paraphrase", "PS", "facts with paraphrases (presets, CounterFact cases)")
        + cell("Neighbourhood", "NS", "neighbours keep p(old) > p(new)")
        + f'<div class="le-score"><div class="le-score-name">Update (MEMIT)</div>'
        f'<div class="le-score-value">{edit.norm:.3g}</div><div class="le-small">‖ΔW‖ over {layers_text(edit)}</div>'
        f'<div class="le-small">{len(result.items)} facts in {result.seconds:.1f} s</div></div></div>'
    )
    body = []
    for i, row in enumerate(result.rows()):
        win = "le-win" if row["written"] else "le-lose"
        body.append(
            f'<tr data-index="{i}" data-written="{str(row["written"]).lower()}">'
            f'<td class="le-prompt">{esc(row["prompt"].replace("{}", row["subject"], 1))}</td>'
            f'<td><mark class="le-new">{esc(row["target"])}</mark></td>'
            f'<td><mark class="le-old">{esc(row["target_true"] or "?")}</mark></td>'
            f'<td>{fmt_p(row["p_new_before"])} → <b class="{win}">{fmt_p(row["p_new_after"])}</b></td>'
            f'<td>{fmt_p(row["p_old_before"])} → {fmt_p(row["p_old_after"])}</td>'
            f'<td class="{win}">{"written" if row["written"] else "not written"}</td></tr>')
    table = ('<table class="le-compare" id="batch-facts"><tr><th>Rewrite prompt</th><th>New</th><th>Old</th>'
             '<th>p(new) before → after</th><th>p(old) before → after</th><th></th></tr>' + "".join(body) + "</table>")
    return f'<div id="batch-result">{scores}{health_card(result.health)}{table}</div>'


def health_card(report) -> str:
    """HTML of a health check: warnings first, then the measurements they rest on."""
    if report is None:
        return ""
    worst = max(report.relative_norms) if report.relative_norms else 0.0
    facts = (f"unrelated facts p(answer) {np.mean(report.p_facts_before):.2f} → {np.mean(report.p_facts):.2f}"
             if report.p_facts else "no unrelated facts checked")
    measured = (f"largest weight change {worst:.1%} of the layer's weights; generation entropy "
                f"{report.entropy_before:.2f} → {report.entropy:.2f}; {facts}")
    if report.warnings:
        items = "".join(f"<li>{esc(w)}</li>" for w in report.warnings)
        return (f'<div class="le-notice" id="batch-health" data-ok="false"><b>Health check: the edited model may be '
                f'damaged.</b><ul>{items}</ul><div class="le-small">{esc(measured)}</div></div>')
    return (f'<div class="le-card" id="batch-health" data-ok="true"><b>Health check: nothing looks wrong.</b> '
            f'<span class="le-small">{esc(measured)}</span></div>')


def evaluation_table(result: dict) -> str:
    """HTML of an evaluation's summary (:func:`editing.evaluation.evaluate_cases`): each metric before and after,
    with the after value's 95 % interval, then the method, the cases and the seconds per edit."""
    ci = result.get("post_ci95") or {}
    pre, post = result.get("pre") or {}, result.get("post") or {}
    rows = []
    for metric in dict.fromkeys([*pre, *post]):
        band = f"{fmt_p(ci[metric][0])} – {fmt_p(ci[metric][1])}" if metric in ci else ""
        rows.append(f'<tr data-metric="{esc(metric)}"><td>{esc(metric)}</td><td>{fmt_p(pre.get(metric))}</td>'
                    f'<td><b>{fmt_p(post.get(metric))}</b></td><td class="le-small">{band}</td></tr>')
    seconds = result.get("seconds_per_edit")
    caption = (f"{method_label(result.get('method', 'rome'))}: {result.get('cases', 0)} cases"
               + (f", {seconds:.1f} s per edit" if seconds is not None else ""))
    return (f'<table class="le-compare" id="evaluation"><caption>{esc(caption)}</caption><tr><th>metric</th>'
            f'<th>before</th><th>after</th><th>after: 95 % interval</th></tr>{"".join(rows)}</table>')
