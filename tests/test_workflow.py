"""The trace workflow as typed events (tracing.workflow): order, exactness, the memo, stopping."""

from __future__ import annotations

import numpy as np
import pytest

from tracing import KINDS, TraceConfig, trace
from tracing.hooks import active_hook_count
from tracing.workflow import (Estimate, Finished, NoMemo, Prediction, Rows, Step, split_precision, trace_events,
                              trace_key)

from conftest import make_tiny

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
CONFIG = TraceConfig(samples=3, window=2)


@pytest.fixture(scope="module")
def llama(tokenizer, device):
    return make_tiny("llama", tokenizer, device)


class DictMemo:
    def __init__(self):
        self.values = {}

    def recall(self, key):
        return self.values.get(key)

    def remember(self, key, value):
        self.values[key] = value
        return value


def test_events_come_in_the_pages_order_and_end_with_the_exact_maps(llama):
    steps: list[Step] = []
    events = list(trace_events(llama, PROMPT, SUBJECT, config=CONFIG, progress=steps.append))
    kinds = [type(e) for e in events]
    assert kinds[:2] == [Prediction, Estimate] and kinds[-1] is Finished
    assert set(kinds[2:-1]) == {Rows}
    top = events[0].top
    assert len(top) == 5 and top[0][1] >= top[-1][1]
    assert {r.kind for r in events[1].results} <= set(KINDS)
    assert all(r.settings["estimate"] for r in events[1].results)
    rows = [e for e in events if isinstance(e, Rows)]
    assert not rows[0].complete and {e.result.kind for e in rows if e.complete} == set(KINDS)
    exact = trace(llama, PROMPT, SUBJECT, config=CONFIG)
    for got, want in zip(events[-1].results, exact):
        assert got.kind == want.kind
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-6)
    assert steps and all(s.stage == "rows" and 0 < s.fraction <= 1 for s in steps) and steps[-1].fraction == 1


def test_the_memo_answers_a_trace_seen_before_without_a_preview(llama, monkeypatch):
    memo = DictMemo()
    first = list(trace_events(llama, PROMPT, SUBJECT, config=CONFIG, memo=memo))
    assert trace_key(PROMPT, SUBJECT, None, CONFIG) in memo.values
    import tracing.workflow as workflow

    monkeypatch.setattr(workflow, "iter_trace", lambda *a, **k: pytest.fail("traced again"))
    monkeypatch.setattr(workflow, "estimate", lambda *a, **k: pytest.fail("previewed again"))
    again = list(trace_events(llama, PROMPT, SUBJECT, config=CONFIG, memo=memo))
    assert [type(e) for e in again] == [Prediction, Finished]
    assert again[0].top == first[0].top and again[1].results == first[-1].results
    assert NoMemo().recall("anything") is None and NoMemo()("key", lambda: 3) == 3


def test_closing_the_events_stops_the_trace_and_removes_its_hooks(llama):
    events = trace_events(llama, PROMPT, SUBJECT, config=CONFIG, preview=False)
    assert isinstance(next(events), Prediction)
    assert isinstance(next(events), Rows)
    events.close()
    assert active_hook_count(llama.model) == 0


def test_precision_is_split_in_one_place():
    assert split_precision("tf32") == ("tf32", "tf32")
    assert split_precision("bf16") == ("bf16", "auto") and split_precision("auto") == ("auto", "auto")
    assert Step("x", 1, 4).fraction == 0.25 and Step("x", 5, 4).fraction == 1.0 and Step("x", 0, 0).fraction == 0.0


def test_a_trace_draws_itself_in_a_notebook_as_the_page_does(llama):
    traces = trace(llama, PROMPT, SUBJECT, config=CONFIG)
    assert isinstance(traces, list) and [r.kind for r in traces] == list(KINDS)
    page = traces._repr_html_()
    assert page.count('class="plotly-graph-div"') == 3
    assert page.count("plotly.js v") == 1  # plotly.js embedded once: works offline
    assert all(r.answer in page or "Impact of restoring" in page for r in traces)
