"""Averages over many facts: token groups, the arithmetic, the per-fact cache and resuming, the CLI and figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tracing.average as average
from tracing.average.__main__ import main as average_main
from tracing import TraceConfig, TraceResult, predict
from tracing.average import GROUPS, average_traces, cached_trace, peaks, summarise, token_groups
from tracing.plots import average_csv, average_curves, average_heatmap, average_page, severed_figure
from tracing.recall import recalled_facts

from conftest import make_tiny

CONFIG = TraceConfig(samples=2, window=2)
PROMPTS = [("Paris is the capital of the country of", "Paris"), ("The Rhine flows through the city of", "The Rhine"),
           ("Miles Davis plays the", "Miles Davis")]


@pytest.fixture
def lm(tokenizer, device):
    return make_tiny("llama", tokenizer, device)


@pytest.fixture
def facts(lm):
    """Facts the tiny model 'knows': each attribute is its own top next token."""
    out = []
    for i, (prompt, subject) in enumerate(PROMPTS):
        top = predict(lm, prompt, k=1)[0][0]
        out.append({"known_id": i, "prompt": prompt, "subject": subject, "attribute": top, "relation_id": f"P{i % 2}"})
    return out


@pytest.mark.parametrize("subject_range, n, expected", [
    ((1, 4), 10, [[1], [2], [3], [4], [5, 6, 7, 8], [9]]),
    ((0, 1), 4, [[0], [], [0], [1], [2], [3]]),          # one-token subject: first = last subject token
    ((2, 5), 6, [[2], [3], [4], [5], [], [5]]),          # subject just before the last token
    ((2, 5), 5, [[2], [3], [4], [], [], [4]]),           # subject at the end: no subsequent tokens
])
def test_token_groups(subject_range, n, expected):
    assert token_groups(subject_range, n) == expected


def test_token_groups_refuse_a_range_outside_the_prompt():
    with pytest.raises(ValueError, match="does not fit"):
        token_groups((3, 9), 5)


def _result(kind, scores, subject_range, low=0.1, high=0.9):
    scores = np.asarray(scores, dtype=np.float64)
    return TraceResult(kind=kind, scores=scores, low_score=low, high_score=high,
                       tokens=tuple(f"t{i}" for i in range(len(scores))), subject_range=subject_range,
                       answer=" A", answer_id=1, prompt="p", subject="s", model="m")


def test_summary_pools_rows_by_group_with_intervals():
    a = _result("hidden", [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], (0, 2), low=0.1, high=0.7)
    b = _result("hidden", [[1, 1], [3, 3], [5, 5], [7, 7], [9, 9]], (1, 3), low=0.3, high=0.9)
    s = summarise([({"prompt": "p", "subject": "s", "attribute": "A"}, [a]),
                   ({"prompt": "q", "subject": "s", "attribute": "A"}, [b])])
    assert s["n_facts"] == 2 and s["clean"] == pytest.approx(0.8) and s["corrupted"] == pytest.approx(0.2)
    data = s["kinds"]["hidden"]
    assert data["groups"] == list(GROUPS)
    # first subject token: rows a[0] and b[1]; middle: none; last subject: a[1], b[2]
    assert data["mean"][0] == pytest.approx([1.5, 2.0]) and data["n"][0] == 2
    assert data["mean"][1] == [None, None] and data["n"][1] == 0  # JSON-clean: no NaN
    assert data["mean"][2] == pytest.approx([3.5, 4.0])
    # further tokens pool a[3] only (b has none between its first subsequent and last token)
    assert data["mean"][4] == pytest.approx([6, 7]) and data["n"][4] == 1
    assert data["mean"][5] == pytest.approx([8.5, 9.0])
    # 95 % interval: 1.96 standard errors of the two pooled rows
    assert data["ci95"][5][0] == pytest.approx(1.96 * np.std([8, 9], ddof=1) / np.sqrt(2))
    p = peaks(s)["hidden"]
    assert (p["group"], p["layer"]) == ("last token", 1) and p["effect"] == pytest.approx(9.0 - 0.2)


def test_average_traces_caches_each_fact_and_resumes(lm, facts, tmp_path, monkeypatch):
    calls = []
    real = average.trace

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(average, "trace", counting)
    stops = iter([False, True])
    first = average_traces(lm, facts, config=CONFIG, cache=tmp_path, severed=False, should_stop=lambda: next(stops))
    assert first["n_facts"] == 1 and first["n_recalled"] == 3 and len(calls) == 1
    whole = average_traces(lm, facts, config=CONFIG, cache=tmp_path)
    assert whole["n_facts"] == 3 and len(calls) == 3  # the first fact came from the cache
    again = average_traces(lm, facts, config=CONFIG, cache=tmp_path)
    assert len(calls) == 3  # NaN (a group of one row has no interval) compares unequal, its JSON does not
    assert json.dumps(again) == json.dumps(whole)
    # a damaged cache file is recomputed, not trusted
    for path in (tmp_path / lm.fingerprint).glob("[!s]*.json"):
        path.write_text("{not json")
    cached_trace(lm, facts[0], CONFIG, tmp_path)
    assert len(calls) == 4


def test_severed_summary_matches_the_facts(lm, facts, tmp_path):
    from tracing.sever import sever

    s = average_traces(lm, facts, config=CONFIG, cache=tmp_path)
    one = [sever(lm, f["prompt"], f["subject"], answer=f["attribute"], config=CONFIG) for f in facts]
    assert s["severed"]["n"] == 3 and s["severed"]["token_group"] == "last subject token"
    assert s["severed"]["none"]["mean"] == pytest.approx(np.mean([r.unsevered for r in one], 0).tolist())
    assert s["severed"]["gap"]["mlp"]["mean"] == pytest.approx(np.mean([r.gap("mlp") for r in one], 0).tolist())
    # the unsevered curve is the hidden kind's last-subject-token average
    assert s["severed"]["none"]["mean"] == pytest.approx(s["kinds"]["hidden"]["mean"][2])


def test_recalled_facts_keep_only_what_the_model_answers(lm, facts):
    wrong = dict(facts[1], attribute="zzzz qqq", known_id=9)
    chosen = recalled_facts(lm, [*facts, wrong])
    assert [f["known_id"] for f in chosen] == [0, 1, 2]  # relations take turns: P0, P1, then P0 again
    assert recalled_facts(lm, [wrong]) == []


def test_nothing_to_average_is_a_clear_error(lm, facts):
    with pytest.raises(ValueError, match="No facts"):
        average_traces(lm, [], config=CONFIG)


def test_figures_and_exports(lm, facts, tmp_path):
    s = average_traces(lm, facts, config=CONFIG, cache=tmp_path)
    fig = average_heatmap(s, "mlp")
    assert list(fig.data[0].z.shape) == [6, lm.n_layers] and "3 facts" in fig.layout.title.subtitle.text
    assert "tiny-llama" in fig.layout.title.subtitle.text
    curves = average_curves(s, "last token")
    assert {t.name for t in curves.data if t.showlegend is not False} == {"single hidden state", "MLP", "attention"}
    with pytest.raises(ValueError, match="Unknown token group"):
        average_curves(s, "the middle")
    assert len(severed_figure(s["severed"], model=s["model"]).data) >= 3
    rows = average_csv(s).splitlines()
    assert rows[0] == "series,group,layer,mean,ci95,n" and len(rows) == 1 + 3 * 6 * lm.n_layers + 3 * lm.n_layers
    page = average_page(s)
    assert page.count("plotly-graph-div") >= 6 and "3 facts" in page


def test_cli_writes_json_and_html(lm, facts, tokenizer, tmp_path, capsys):
    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "facts.json").write_text(json.dumps(facts))
    out = tmp_path / "avg.json"
    argv = ["--model", str(folder), "--facts", str(tmp_path / "facts.json"), "--limit", "2", "--cache",
            str(tmp_path / "cache"), "--json", str(out), "--html", str(tmp_path / "avg.html"), "--quiet"]
    assert average_main(argv) == 0
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON a browser can read"))
    assert data["n_facts"] == 2 and set(data["kinds"]) == {"hidden", "mlp", "attn"}
    assert len(data["kinds"]["mlp"]["mean"]) == 6 and "severed" in data
    assert "peak mlp" in capsys.readouterr().out
    assert average_main(["--model", str(tmp_path / "nowhere")]) == 2


def test_merged_parts_equal_one_average(lm, facts, tmp_path):
    whole = average_traces(lm, facts, config=CONFIG, cache=tmp_path)
    parts = [average_traces(lm, facts[:1], config=CONFIG, cache=tmp_path),
             average_traces(lm, facts[1:], config=CONFIG, cache=tmp_path)]
    merged = average.merge_summaries(parts)
    assert merged["n_facts"] == 3 and merged["facts"] == whole["facts"]
    assert merged["clean"] == pytest.approx(whole["clean"]) and merged["corrupted_ci95"] == pytest.approx(whole["corrupted_ci95"])
    for kind, data in whole["kinds"].items():
        assert merged["kinds"][kind]["n"] == data["n"]
        for g in range(len(GROUPS)):
            for name in ("mean", "ci95"):  # exact pooling, None where a group has too few rows
                got, want = merged["kinds"][kind][name][g], data[name][g]
                assert [v is None for v in got] == [v is None for v in want]
                assert [v for v in got if v is not None] == pytest.approx([v for v in want if v is not None], abs=1e-12)
    assert merged["severed"]["n"] == 3
    assert merged["severed"]["gap"]["mlp"]["ci95"] == pytest.approx(whole["severed"]["gap"]["mlp"]["ci95"], abs=1e-12)
    assert merged["severed"]["none"]["mean"] == pytest.approx(whole["severed"]["none"]["mean"], abs=1e-12)
    with pytest.raises(ValueError, match="same fact"):
        average.merge_summaries([whole, parts[0]])
    other = dict(parts[1], settings=dict(parts[1]["settings"], samples=99))
    with pytest.raises(ValueError, match="settings differs"):
        average.merge_summaries([parts[0], other])


def test_cli_merges_an_earlier_run_without_tracing_it_again(lm, facts, tokenizer, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    lm.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "facts.json").write_text(json.dumps(facts))
    base = ["--model", str(folder), "--facts", str(tmp_path / "facts.json"), "--cache", str(tmp_path / "cache"), "--quiet"]
    assert average_main([*base, "--limit", "1", "--json", str(tmp_path / "one.json")]) == 0
    traced = []
    real = average.cached_trace
    monkeypatch.setattr(average, "cached_trace", lambda lm_, fact, *a, **k: traced.append(fact) or real(lm_, fact, *a, **k))
    assert average_main([*base, "--merge", str(tmp_path / "one.json"), "--json", str(tmp_path / "all.json")]) == 0
    data = json.loads((tmp_path / "all.json").read_text())
    assert data["n_facts"] == 3 and len(traced) == 2 and facts[0] not in traced
    (tmp_path / "bad.json").write_text("{}")
    assert average_main([*base, "--merge", str(tmp_path / "bad.json")]) == 2


def test_the_shipped_averages_are_the_default_models(real_lm):
    """The page's tab ③ shows these: they must match the served weights and settings, and cover every fact it recalls."""
    from tracing.average import shipped_average
    from tracing.recall import answer_probabilities

    summary = shipped_average(real_lm)
    assert summary is not None, "run python -m tracing.average --ship for the default model"
    assert summary["n_facts"] == summary["n_recalled"] == len(summary["facts"]) and summary["severed"]["n"] == summary["n_facts"]
    assert all(data["n"][2] == summary["n_facts"] for data in summary["kinds"].values())  # every fact: a last subject token
    # the clean run of a few facts, recomputed: the shipped numbers are this model's
    lines = summary["facts"][:: max(1, len(summary["facts"]) // 4)]
    probs, top = answer_probabilities(real_lm, [f["prompt"] for f in lines], [f["attribute"] for f in lines])
    assert all(top) and probs == pytest.approx([f["clean"] for f in lines], abs=1e-4)
    assert summary["clean"] == pytest.approx(np.mean([f["clean"] for f in summary["facts"]]), abs=1e-9)
