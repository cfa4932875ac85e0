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
import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from .result import KINDS, TraceResult, window_layers
from .sever import SEVERABLE as SEVERABLE_KINDS

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
    if result.metric == "answer_logprob":
        return f"log p({answer})"
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


def results_html(results: Sequence[TraceResult], *, plotlyjs: bool | str = True) -> str:
    """An HTML fragment with one :func:`heatmap` per result (what ``--html`` writes and a notebook shows).

    ``plotlyjs``: embed plotly.js once, before the first figure (True: works
    offline), load it from a CDN ("cdn"), or leave it out (False).
    """
    return "\n".join(heatmap(r).to_html(full_html=False, include_plotlyjs=plotlyjs if i == 0 else False)
                     for i, r in enumerate(results))


class Traces(list):
    """The results of one trace (a list of :class:`TraceResult`, one per kind) that draw themselves in Jupyter.

    Example::

        traces = trace(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
        traces                   # in a notebook: the three heatmaps, as the page draws them
        hidden, mlp, attn = traces
    """

    def _repr_html_(self) -> str:
        return results_html(self)


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
    scores = _checked_scores(result)
    n_tokens, n_layers = scores.shape
    colours, _, x_title = KIND_STYLE[result.kind]
    window = int(result.settings.get("window", 1))
    model = model_label or result.model or "the model"
    labels = token_labels(result)

    zmin, zmax = _colour_range(result, scores, zmax)
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
    fig.update_layout(
        title=_title(result, title),
        margin=dict(l=10, r=10, t=70, b=50),
        plot_bgcolor="white",
        height=height or max(300, 90 + 24 * n_tokens),
        width=width,
        font=dict(size=12),
    )
    fig.update_xaxes(title=dict(text=x_title.format(window=window, model=html.escape(model))), tickmode="linear",
                     dtick=max(1, n_layers // 10), showgrid=False, zeroline=False)
    fig.update_yaxes(tickmode="array", tickvals=list(range(n_tokens)),
                     ticktext=[html.escape(label) for label in labels],  # numeric y: repeated tokens stay separate
                     autorange="reversed", showgrid=False, zeroline=False)
    return fig


def _checked_scores(result: TraceResult) -> np.ndarray:
    """``result.scores`` as float64 (tokens, layers), after checking the kind and the shape."""
    if result.kind not in KIND_STYLE:
        raise ValueError(f"Unknown trace kind {result.kind!r}; expected one of {', '.join(KINDS)}.")
    scores = np.asarray(result.scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(result.tokens):
        raise ValueError(f"scores must have shape (tokens, layers) = ({len(result.tokens)}, layers); got {scores.shape}.")
    return scores


def _colour_range(result: TraceResult, scores: np.ndarray, zmax: float | None) -> tuple[float, float]:
    """The colour scale: from the corrupted score to ``zmax`` (default: the largest score drawn)."""
    zmin = float(result.low_score)
    finite = scores[np.isfinite(scores)]
    top = float(finite.max()) if finite.size else float(result.high_score)
    zmax = float(zmax) if zmax is not None else top
    if not zmax > zmin:
        zmax = zmin + max(abs(zmin) * 1e-3, 1e-6)  # a flat map still needs a range
    return zmin, zmax


def _title(result: TraceResult, title: str | None) -> dict:
    """The figure's title (``title`` or what it shows) and its subtitle: the answer, the scores, and whether the map
    is an estimate or still being computed."""
    subtitle = (f"answer <b>{html.escape(result.answer)!s}</b> · clean {result.high_score:.3g} · "
                f"corrupted {result.low_score:.3g}")
    default_title = f"Impact of restoring {KIND_TITLE[result.kind]} after corrupted input"
    if result.settings.get("estimate"):
        default_title = f"Estimate: {default_title[0].lower()}{default_title[1:]}"
        subtitle += " · <i>first-order (gradient) estimate; the exact map follows</i>"
    elif result.settings.get("complete") is False:
        subtitle += " · <i>rows still being computed</i>"
    return dict(text=title or default_title, subtitle=dict(text=subtitle), x=0.0, xanchor="left")


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


# ---------------------------------------------------------------------------
# Averages over many facts (tracing.average) and severed paths (tracing.sever)

KIND_LINE = {"hidden": "#6a51a3", "mlp": "#238b45", "attn": "#cb181d"}  # the heatmaps' scales at their dark end
_BAND = {"hidden": "rgba(106,81,163,0.18)", "mlp": "rgba(35,139,69,0.18)", "attn": "rgba(203,24,29,0.18)"}


def _average_subtitle(summary: dict) -> str:
    return (f"{html.escape(str(summary['model']))} · {summary['n_facts']} facts · "
            f"clean {summary['clean']:.3f} · corrupted {summary['corrupted']:.3f}")


def average_heatmap(summary: dict, kind: str, *, height: int | None = None) -> go.Figure:
    """Token group × layer heatmap of one kind's average restored score (the paper's Fig. 2, top).

    Example::

        summary = average_traces(lm, limit=50)
        average_heatmap(summary, "mlp").write_html("mlp_average.html")
    """
    if kind not in summary.get("kinds", {}):
        raise ValueError(f"The summary has no {kind!r} averages; it has {', '.join(summary.get('kinds', {}))}.")
    data = summary["kinds"][kind]
    mean = np.array(data["mean"], dtype=np.float64)  # (groups, layers)
    ci = np.array(data["ci95"], dtype=np.float64)
    groups, n_layers = data["groups"], mean.shape[1]
    text = [[f"{groups[g]} · layer {layer}<br>restored {mean[g, layer]:.4f} ± {ci[g, layer]:.4f}"
             f"<br>{data['n'][g]} rows" for layer in range(n_layers)] for g in range(len(groups))]
    zmin = float(summary["corrupted"])
    top = float(np.nanmax(mean)) if np.isfinite(mean).any() else zmin
    colours, _, x_title = KIND_STYLE[kind]
    window = int(summary.get("settings", {}).get("window", 1))
    fig = go.Figure(go.Heatmap(
        z=mean, x=list(range(n_layers)), y=list(range(len(groups))), zmin=zmin, zmax=max(top, zmin + 1e-6),
        colorscale=colours, colorbar=dict(title=dict(text="mean p(answer)", side="right"), thickness=14),
        text=text, hovertemplate="%{text}<extra></extra>", hoverongaps=False, xgap=1, ygap=1,
    ))
    fig.update_layout(
        title=dict(text=f"Average impact of restoring {KIND_TITLE[kind]}",
                   subtitle=dict(text=_average_subtitle(summary)), x=0.0, xanchor="left"),
        margin=dict(l=10, r=10, t=70, b=50), plot_bgcolor="white", height=height or 330, font=dict(size=12),
    )
    fig.update_xaxes(title=dict(text=x_title.format(window=window, model=html.escape(str(summary["model"])))),
                     tickmode="linear", dtick=max(1, n_layers // 10), showgrid=False, zeroline=False)
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(groups))), ticktext=groups, autorange="reversed",
                     showgrid=False, zeroline=False)
    return fig


def _band(fig: go.Figure, x: list[int], mean: np.ndarray, ci: np.ndarray, name: str, colour: str, band: str,
          dash: str | None = None) -> None:
    ok = np.isfinite(ci)
    if ok.any():
        xs = [x[i] for i in range(len(x)) if ok[i]]
        upper, lower = (mean + ci)[ok].tolist(), (mean - ci)[ok].tolist()
        fig.add_trace(go.Scatter(x=xs + xs[::-1], y=upper + lower[::-1], fill="toself", fillcolor=band,
                                 line=dict(width=0), hoverinfo="skip", showlegend=False, legendgroup=name))
    fig.add_trace(go.Scatter(x=x, y=mean.tolist(), mode="lines+markers", name=name, legendgroup=name,
                             line=dict(color=colour, dash=dash), marker=dict(size=4),
                             customdata=np.nan_to_num(ci).tolist(),
                             hovertemplate=f"{name} · layer %{{x}}: %{{y:.4f}} ± %{{customdata:.4f}}<extra></extra>"))


def average_curves(summary: dict, group: str = "last subject token") -> go.Figure:
    """Each kind's average restored score at one token group, per layer, with 95 % bands.

    Example::

        average_curves(summary, "last token").show()
    """
    first = next(iter(summary["kinds"].values()))
    if group not in first["groups"]:
        raise ValueError(f"Unknown token group {group!r}; choose from {', '.join(first['groups'])}.")
    g = first["groups"].index(group)
    fig = go.Figure()
    for kind, data in summary["kinds"].items():
        mean, ci = np.array(data["mean"][g], dtype=np.float64), np.array(data["ci95"][g], dtype=np.float64)
        _band(fig, list(range(len(mean))), mean, ci, KIND_STYLE[kind][1], KIND_LINE[kind], _BAND[kind])
    fig.add_hline(y=summary["corrupted"], line=dict(color="#888", dash="dot"),
                  annotation_text="corrupted", annotation_position="bottom right")
    return _curve_layout(fig, f"Average restored p(answer) at the {group}", _average_subtitle(summary),
                         "layer (centre of the window for MLP and attention)", "mean p(answer)")


def _curve_layout(fig: go.Figure, title: str, subtitle: str, x_title: str, y_title: str) -> go.Figure:
    """The layout the per-layer curve figures share: title and subtitle, axes, legend below."""
    fig.update_layout(
        title=dict(text=title, subtitle=dict(text=subtitle), x=0.0, xanchor="left"),
        xaxis_title=x_title, yaxis_title=y_title,
        margin=dict(l=10, r=10, t=70, b=50), plot_bgcolor="white", height=340, font=dict(size=12),
        legend=dict(orientation="h", y=-0.25),
    )
    fig.update_xaxes(showgrid=False, zeroline=False)
    fig.update_yaxes(gridcolor="#eee", zeroline=False)
    return fig


def severed_figure(severed: dict, *, model: str = "", n_facts: int | None = None) -> go.Figure:
    """Restoring the last subject token's hidden state, unsevered and with later MLP or attention severed (Fig. 3).

    Example::

        severed_figure(summary["severed"], model=summary["model"])
        severed_figure(sever(lm, prompt, subject).to_dict())        # one fact

    ``severed`` is an average summary's ``"severed"`` part (means with 95 %
    bands) or one :class:`~tracing.sever.SeverResult`'s ``to_dict()``.
    """
    if "none" in severed:  # an average
        lines = {"none": severed["none"], **{k: severed[k] for k in SEVERABLE_KINDS if k in severed}}
        n = severed.get("n", n_facts)
    else:  # one fact
        lines = {"none": {"mean": severed["unsevered"], "ci95": [math.nan] * len(severed["unsevered"])},
                 **{k: {"mean": v, "ci95": [math.nan] * len(v)} for k, v in severed["severed"].items()}}
        n = 1
        model = model or severed.get("model", "")
    names = {"none": ("restored hidden state", "hidden", None), "mlp": ("… with later MLPs severed", "mlp", "dash"),
             "attn": ("… with later attention severed", "attn", "dot")}
    fig = go.Figure()
    for key, data in lines.items():
        label, colour_kind, dash = names[key]
        mean, ci = np.array(data["mean"], dtype=np.float64), np.array(data["ci95"], dtype=np.float64)
        _band(fig, list(range(len(mean))), mean, ci, label, KIND_LINE[colour_kind], _BAND[colour_kind], dash)
    facts = f" · {n} fact{'s' if n != 1 else ''}" if n else ""
    return _curve_layout(fig, "Restoring the last subject token's hidden state, with paths severed",
                         f"{html.escape(str(model))}{facts} · later layers' outputs at that token held at their "
                         "corrupted values", "layer of the restored hidden state", "p(answer)")


def average_csv(summary: dict) -> str:
    """The averages as CSV: one row per (kind, token group, layer), then the severed paths if present."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["series", "group", "layer", "mean", "ci95", "n"])
    for kind, data in summary["kinds"].items():
        for g, group in enumerate(data["groups"]):
            for layer, (m, c) in enumerate(zip(data["mean"][g], data["ci95"][g])):
                writer.writerow([kind, group, layer, m, c, data["n"][g]])
    severed = summary.get("severed")
    if severed:
        for key in ["none", *SEVERABLE_KINDS]:
            if key in severed:
                name = "hidden" if key == "none" else f"hidden, {key} severed"
                for layer, (m, c) in enumerate(zip(severed[key]["mean"], severed[key]["ci95"])):
                    writer.writerow([name, severed["token_group"], layer, m, c, severed["n"]])
    return out.getvalue()


def average_page(summary: dict) -> str:
    """A standalone HTML page with every figure of an average summary (the CLI's ``--html``)."""
    figures = [average_curves(summary), average_curves(summary, "last token")]
    figures += [average_heatmap(summary, kind) for kind in summary["kinds"]]
    if summary.get("severed"):
        figures.append(severed_figure(summary["severed"], model=summary["model"]))
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    title = f"Causal traces averaged over {summary['n_facts']} facts · {html.escape(str(summary['model']))}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
            f"<body style='font-family:sans-serif;max-width:960px;margin:auto'><h2>{title}</h2>{''.join(parts)}</body></html>")


def layer_sweep_figure(sweep: dict, effect: Sequence[float] | None = None, *, token: str = "",
                       model: str = "") -> go.Figure:
    """Where editing works beside where the fact is traced: edit scores per layer and the MLP trace row.

    Example::

        sweep = layer_sweep(lm, request, every=3, paraphrases=..., neighbours=...)   # editing.evaluation.sweep
        layer_sweep_figure(sweep, effect=(mlp.scores[last] - mlp.low_score), token=" Tower")

    ``sweep`` is :func:`editing.evaluation.sweep.layer_sweep`'s result; ``effect``, if
    given, the MLP trace's restored score minus the corrupted one at the last
    subject token, per layer (drawn in green on its own axis).
    """
    rows = sorted(sweep.get("layers", []), key=lambda r: r["layer"])
    x = [r["layer"] for r in rows]
    fig = go.Figure()
    series = (("p_new", "p(new object) on the rewrite prompt", "#6a51a3", "solid"),
              ("PS", "paraphrases that prefer the new object", "#2171b5", "dash"),
              ("NS", "neighbours that keep the old object", "#fd8d3c", "dot"))
    for key, name, colour, dash in series:
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            fig.add_trace(go.Scatter(x=x, y=[np.nan if v is None else v for v in values], name=name,
                                     mode="lines+markers", line=dict(color=colour, dash=dash),
                                     hovertemplate=f"layer %{{x}}: {name} %{{y:.3f}}<extra></extra>"))
    if effect is not None and len(effect):
        fig.add_trace(go.Bar(x=list(range(len(effect))), y=list(effect), name=f"traced MLP effect at {token!r}",
                             marker_color="rgba(35,139,69,0.35)", yaxis="y2",
                             hovertemplate="layer %{x}: traced effect %{y:+.4f}<extra></extra>"))
    best = sweep.get("best")
    if best is not None:
        fig.add_vline(x=best, line=dict(color="#444", dash="dot"), annotation_text=f"best S: layer {best}",
                      annotation_position="top")
    request = sweep.get("request", {})
    subject = str(request.get("subject", ""))
    what = html.escape(str(request.get("prompt", "")).replace("{}", subject)) if request else ""
    fig.update_layout(
        title=dict(text="Where editing works, and where the fact is traced",
                   subtitle=dict(text=f"{html.escape(model)} · ROME at each layer · {what} → "
                                 f"{html.escape(str(request.get('target', '')))}"), x=0.0, xanchor="left"),
        xaxis=dict(title="layer (edit layer; MLP window centre for the trace)", showgrid=False, zeroline=False),
        yaxis=dict(title="after the edit (fraction)", range=[0, 1.05], gridcolor="#eee"),
        yaxis2=dict(title="traced effect", overlaying="y", side="right", showgrid=False, zeroline=True),
        margin=dict(l=10, r=10, t=70, b=50), plot_bgcolor="white", height=360, font=dict(size=12),
        legend=dict(orientation="h", y=-0.25),
    )
    return fig
