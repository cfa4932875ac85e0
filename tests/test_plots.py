"""Heatmap figures and score exports: the paper's conventions, hover text, CSV/JSON round trips."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

go = pytest.importorskip("plotly.graph_objects", reason="the heatmaps need plotly (absent on some GPU machines)")

from tracing import TraceConfig, TraceResult, trace  # noqa: E402
from tracing.plots import heatmap, metric_label, results_json, scores_csv, scores_rows, token_labels  # noqa: E402

from conftest import make_tiny

TOKENS = ("The", " E", "iffel", " Tower", " is", " in", " the", " city", " of", " the")  # " the" twice on purpose


def make_result(kind: str = "mlp", metric: str = "prob", **settings) -> TraceResult:
    scores = np.arange(10 * 6, dtype=np.float64).reshape(10, 6) / 100 + 0.01  # (tokens, layers), all distinct
    scores[0, :] = np.nan  # a row that was not computed
    return TraceResult(
        kind=kind, scores=scores, low_score=0.02, high_score=0.7, tokens=TOKENS, subject_range=(1, 4),
        answer=" Paris", answer_id=42, prompt="The Eiffel Tower is in the city of the", subject="Eiffel Tower",
        metric=metric, model="tiny-test", settings={"window": 4, **settings},
    )


def heatmap_trace(fig: go.Figure) -> go.Heatmap:
    (data,) = fig.data
    assert isinstance(data, go.Heatmap)
    return data


@pytest.mark.parametrize("kind,colours,word", [("hidden", "Purples", "state"), ("mlp", "Greens", "MLP"),
                                               ("attn", "Reds", "Attn")])
def test_paper_colours_and_titles(kind, colours, word):
    fig = heatmap(make_result(kind))
    data = heatmap_trace(fig)
    expected = go.Heatmap(colorscale=colours).colorscale
    assert data.colorscale == expected
    assert fig.layout.title.text == f"Impact of restoring {word} after corrupted input"
    assert "Paris" in fig.layout.title.subtitle.text  # the answer is shown


def test_layers_on_x_tokens_top_to_bottom_subject_starred():
    result = make_result()
    fig = heatmap(result)
    data = heatmap_trace(fig)
    assert list(data.x) == list(range(6))  # layers
    assert list(data.y) == list(range(10))  # one row per token, even for the repeated " the"
    np.testing.assert_array_equal(np.asarray(data.z, dtype=float), result.scores)
    assert fig.layout.yaxis.autorange == "reversed"  # first token on top
    labels = list(fig.layout.yaxis.ticktext)
    assert labels[:5] == ["The", " E*", "iffel*", " Tower*", " is"]
    assert labels.count(" the") == 2
    assert "MLP" in fig.layout.xaxis.title.text and "4" in fig.layout.xaxis.title.text


def test_colour_scale_starts_at_the_low_score():
    result = make_result()
    data = heatmap_trace(heatmap(result))
    assert data.zmin == pytest.approx(result.low_score)
    assert data.zmax == pytest.approx(np.nanmax(result.scores))
    assert heatmap_trace(heatmap(result, zmax=0.9)).zmax == pytest.approx(0.9)


def test_flat_map_still_has_a_colour_range():
    result = make_result()
    flat = TraceResult(**{**result.__dict__, "scores": np.full((10, 6), 0.02)})
    data = heatmap_trace(heatmap(flat))
    assert data.zmax > data.zmin


def test_hover_names_token_restored_window_and_value():
    result = make_result("mlp")
    text = heatmap_trace(heatmap(result)).text
    cell = text[3][0]  # " Tower" (subject), layer 0: window 4 restores layers 0-1 (clipped)
    assert "Tower*" in cell and "layer(s) 0–1" in cell and f"{result.scores[3, 0]:.4g}" in cell
    assert "layer(s) 1–4" in text[3][3]  # centre 3, window 4 -> layers 1..4
    assert "not computed" in text[0][2]  # NaN row
    hidden = heatmap_trace(heatmap(make_result("hidden"))).text
    assert "layer(s) 3<br>" in hidden[3][3]  # hidden states restore exactly one layer


def test_colour_bar_names_the_metric():
    assert heatmap_trace(heatmap(make_result())).colorbar.title.text == "p(Paris)"
    rec = make_result(metric="recovered")
    assert metric_label(rec) == "recovered p(Paris)"
    diff = make_result(metric="logit_diff", contrast="Rome")
    assert metric_label(diff) == "logit(Paris) − logit(Rome)"


def test_labels_escape_html_and_show_whitespace_tokens():
    result = make_result()
    odd = TraceResult(**{**result.__dict__, "tokens": ("<b>", " ", "\n", *TOKENS[3:])})
    labels = token_labels(odd)
    assert labels[0] == "<b>" and labels[1] == "' '*" and labels[2] == "\\n*"
    fig = heatmap(odd)
    assert fig.layout.yaxis.ticktext[0] == "&lt;b&gt;"


def test_bad_results_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="Unknown trace kind"):
        heatmap(TraceResult(**{**make_result().__dict__, "kind": "resid"}))
    with pytest.raises(ValueError, match="shape"):
        heatmap(TraceResult(**{**make_result().__dict__, "scores": np.zeros((3, 6))}))


def test_csv_has_one_row_per_cell_with_blank_for_missing():
    results = [make_result("hidden"), make_result("mlp")]
    text = scores_csv(results)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 2 * 10 * 6
    first = rows[0]
    assert first["kind"] == "hidden" and first["token"] == "The" and first["score"] == ""  # NaN row
    cell = next(r for r in rows if r["kind"] == "mlp" and r["token_index"] == "3" and r["layer"] == "3")
    assert float(cell["score"]) == pytest.approx(results[1].scores[3, 3])
    assert cell["subject"] == "True" and cell["restored_layers"] == "1–4"
    assert len(scores_rows(results)) == len(rows)


def test_json_export_round_trips():
    results = [make_result(k) for k in ("hidden", "mlp", "attn")]
    data = json.loads(results_json(results, model="tiny-test"))
    assert data["model"] == "tiny-test"
    back = [TraceResult.from_dict(d) for d in data["results"]]
    for a, b in zip(results, back):
        assert a.kind == b.kind and a.tokens == b.tokens
        np.testing.assert_array_equal(a.scores, b.scores)


def test_figures_of_a_real_trace(tokenizer, device):
    """End to end on a tiny model: every kind plots, with the trace's own low score and window."""
    lm = make_tiny("llama", tokenizer, device)
    results = trace(lm, "The Eiffel Tower is located in the city of", "Eiffel Tower",
                    config=TraceConfig(samples=2, window=2, tokens="subject_last"))
    for result in results:
        fig = heatmap(result)
        data = heatmap_trace(fig)
        assert np.asarray(data.z, dtype=float).shape == (len(result.tokens), lm.n_layers)
        assert data.zmin == pytest.approx(result.low_score)
        json.loads(fig.to_json())  # serialisable for the page


def test_estimates_and_partial_maps_say_so():
    assert heatmap(make_result(estimate=True)).layout.title.text.startswith("Estimate: impact of restoring")
    assert "gradient" in heatmap(make_result(estimate=True)).layout.title.subtitle.text
    assert "still being computed" in heatmap(make_result(complete=False)).layout.title.subtitle.text
    exact = heatmap(make_result(complete=True)).layout.title
    assert exact.text.startswith("Impact") and "estimate" not in exact.subtitle.text
