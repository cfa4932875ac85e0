"""Figures and exports of causal traces, in the paper's convention.

Each :class:`~tracing.result.TraceResult` becomes one Plotly heatmap: layers on
x, the prompt's tokens on y from top to bottom, subject tokens marked with
``*``, Purples / Greens / Reds for hidden states / MLP / attention, the colour
scale starting at the corrupted run's score. Plotting never computes a trace:
every function here takes finished results.

Example::

    results = trace(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    fig = heatmap(results[1])              # the MLP heatmap, a plotly Figure
    fig.write_html("mlp.html")
    open("scores.csv", "w").write(scores_csv(results))
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from .result import KINDS, TraceResult, window_layers

# kind -> (colour scale, what is restored, x-axis title); {window} and {model} are filled in.
KIND_STYLE: dict[str, tuple[str, str, str]] = {
    "hidden": ("Purples", "single hidden state", "single restored layer within {model}"),
    "mlp": ("Greens", "MLP", "center of interval of {window} restored MLP layers"),
    "attn": ("Reds", "attention", "center of interval of {window} restored attention layers"),
}
KIND_TITLE = {"hidden": "state", "mlp": "MLP", "attn": "Attn"}


def metric_label(result: TraceResult) -> str:
    """The colour bar's title for a result's metric: p(answer), a logit difference, or the recovered fraction.

    Example::

        metric_label(result)    # "p( Paris)"
    """
    answer = result.answer.strip() or result.answer
    if result.metric == "logit_diff":
        contrast = str(result.settings.get("contrast") or "contrast").strip()
        return f"logit({answer}) − logit({contrast})"
    if result.metric == "recovered":
        return f"recovered p({answer})"
    return f"p({answer})"


def token_labels(result: TraceResult) -> list[str]:
    """Readable y-axis labels: each token's text, ``*`` after subject tokens, special characters made visible.

    Example::

        token_labels(result)[:4]     # ['The*', ' E*', 'iffel*', ' Tower*']
    """
    start, end = result.subject_range
    labels = []
    for i, token in enumerate(result.tokens):
        text = token.replace("\n", "\\n").replace("\t", "\\t")
        if not text.strip():
            text = repr(token)  # a lone space or empty token stays visible
        labels.append(text + ("*" if start <= i < end else ""))
    return labels


def _restored_layers(result: TraceResult, layer: int) -> str:
    """Which layers a cell restores: "12" for hidden states, "7–16" for a window of MLP/attention layers."""
    if result.kind == "hidden":
        return str(layer)
    window = int(result.settings.get("window", 1))
    span = window_layers(layer, window, result.n_layers)
    return str(span.start) if len(span) == 1 else f"{span.start}–{span.stop - 1}"


def _hover_text(result: TraceResult, labels: list[str]) -> list[list[str]]:
    """One HTML hover string per cell: token, restored layer(s) and value."""
    what = KIND_STYLE[result.kind][1]
    metric = html.escape(metric_label(result))
    rows = []
    for t, label in enumerate(labels):
        token = html.escape(label)
        row = []
        for layer in range(result.n_layers):
            value = result.scores[t, layer]
            shown = "not computed" if np.isnan(value) else f"{value:.4g}"
            row.append(
                f"token {t}: <b>{token}</b><br>"
                f"restored {what} at layer(s) {_restored_layers(result, layer)}<br>"
                f"{metric} = <b>{shown}</b>"
            )
        rows.append(row)
    return rows


def heatmap(
    result: TraceResult,
    *,
    title: str | None = None,
    zmax: float | None = None,
    height: int | None = None,
    width: int | None = None,
    model_label: str | None = None,
) -> go.Figure:
    """A Plotly heatmap of one trace, as in the paper's Figure 1.

    Example::

        hidden, mlp, attn = trace(lm, prompt, subject)
        heatmap(mlp).show()

    ``result.scores`` (tokens, layers) is drawn with layer on x and token on y
    (first token on top); NaN cells (not computed) stay blank. The colour scale
    runs from ``result.low_score`` to ``zmax`` (default: the largest score).
    """
    if result.kind not in KIND_STYLE:
        raise ValueError(f"Unknown trace kind {result.kind!r}; expected one of {', '.join(KINDS)}.")
    scores = np.asarray(result.scores, dtype=np.float64)  # (tokens, layers)
    if scores.ndim != 2 or scores.shape[0] != len(result.tokens):
        raise ValueError(
            f"scores must have shape (tokens, layers) = ({len(result.tokens)}, layers); got {scores.shape}."
        )
    n_tokens, n_layers = scores.shape
    colours, _, x_title = KIND_STYLE[result.kind]
    window = int(result.settings.get("window", 1))
    model = model_label or result.model or "the model"
    labels = token_labels(result)

    zmin = float(result.low_score)
    finite = scores[np.isfinite(scores)]
    top = float(finite.max()) if finite.size else float(result.high_score)
    zmax = float(zmax) if zmax is not None else top
    if not zmax > zmin:
        zmax = zmin + max(abs(zmin) * 1e-3, 1e-6)  # a flat map still needs a range

    fig = go.Figure(
        go.Heatmap(
            z=scores,
            x=list(range(n_layers)),
            y=list(range(n_tokens)),
            zmin=zmin,
            zmax=zmax,
            colorscale=colours,
            colorbar=dict(title=dict(text=html.escape(metric_label(result)), side="right"), thickness=14),
            text=_hover_text(result, labels),
            hovertemplate="%{text}<extra></extra>",
            hoverongaps=False,
            xgap=1,
            ygap=1,
        )
    )
    answer = html.escape(result.answer)
    subtitle = (
        f"answer <b>{answer!s}</b> · clean {result.high_score:.3g} · corrupted {result.low_score:.3g}"
    )
    default_title = f"Impact of restoring {KIND_TITLE[result.kind]} after corrupted input"
    if result.settings.get("estimate"):
        default_title = f"Estimate: {default_title[0].lower()}{default_title[1:]}"
        subtitle += " · <i>first-order (gradient) estimate; the exact map follows</i>"
    elif result.settings.get("complete") is False:
        subtitle += " · <i>rows still being computed</i>"
    fig.update_layout(
        title=dict(text=title or default_title, subtitle=dict(text=subtitle), x=0.0, xanchor="left"),
        margin=dict(l=10, r=10, t=70, b=50),
        plot_bgcolor="white",
        height=height or max(300, 90 + 24 * n_tokens),
        width=width,
        font=dict(size=12),
    )
    fig.update_xaxes(
        title=dict(text=x_title.format(window=window, model=html.escape(model))),
        tickmode="linear",
        dtick=max(1, n_layers // 10),
        showgrid=False,
        zeroline=False,
    )
    fig.update_yaxes(
        tickmode="array",
        tickvals=list(range(n_tokens)),
        ticktext=[html.escape(label) for label in labels],  # numeric y: repeated tokens stay separate rows
        autorange="reversed",
        showgrid=False,
        zeroline=False,
    )
    return fig


def scores_rows(results: Sequence[TraceResult]) -> list[dict]:
    """One flat record per (kind, token, layer) cell, for tables and CSV.

    Example::

        scores_rows(results)[0]
        # {'kind': 'hidden', 'token_index': 0, 'token': 'The', 'subject': True, 'layer': 0,
        #  'restored_layers': '0', 'score': 0.0148, 'metric': 'prob', 'answer': ' Paris', ...}
    """
    rows = []
    for result in results:
        start, end = result.subject_range
        for t, token in enumerate(result.tokens):
            for layer in range(result.n_layers):
                value = float(result.scores[t, layer])
                rows.append(
                    {
                        "kind": result.kind,
                        "token_index": t,
                        "token": token,
                        "subject": start <= t < end,
                        "layer": layer,
                        "restored_layers": _restored_layers(result, layer),
                        "score": None if np.isnan(value) else value,
                        "metric": result.metric,
                        "answer": result.answer,
                        "low_score": result.low_score,
                        "high_score": result.high_score,
                    }
                )
    return rows


def scores_csv(results: Sequence[TraceResult]) -> str:
    """Every cell of every result as CSV text (header row first; empty score = not computed).

    Example::

        Path("trace.csv").write_text(scores_csv(trace(lm, prompt, subject)))
    """
    rows = scores_rows(results)
    out = io.StringIO()
    fields = ["kind", "token_index", "token", "subject", "layer", "restored_layers", "score", "metric",
              "answer", "low_score", "high_score"]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return out.getvalue()


def results_json(results: Sequence[TraceResult], **extra) -> str:
    """The results as one JSON document: ``{"results": [TraceResult.to_dict(), ...], **extra}``.

    Example::

        data = json.loads(results_json(results, model="SmolLM2-135M-Instruct"))
        [TraceResult.from_dict(d) for d in data["results"]]
    """
    return json.dumps({**extra, "results": [r.to_dict() for r in results]}, indent=1)
