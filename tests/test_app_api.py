"""The launched page through its API (gradio_client): a preset traced, edited and undone, and two visitors
at once - one edits, the other's traces and generations stay those of the original model.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client

from app_fixtures import EDIT, QUICK, engine, served  # noqa: F401 - fixtures
from editing import generate
from editing_fixtures import changed, snapshot
from test_engine import wait_until
from editing.display import highlight

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def trace(client: Client, prompt: str, subject: str, answer: str = "") -> tuple:
    return client.predict(prompt, subject, answer, *QUICK.values(), api_name="/trace")


def heatmap_values(out: tuple) -> list:
    """The z values of the three figures a /trace call returns."""
    return [json.loads(plot["plot"])["data"][0]["z"] for plot in out[1:4]]


def edit(client: Client, subject, relation, target, old, paraphrases, neighbours) -> tuple:
    return client.predict(subject, relation, target, old, EDIT["layer"], "rome", paraphrases, neighbours,
                          EDIT["max_new_tokens"], False, 0, api_name="/edit")


def test_trace_a_preset_then_edit_and_undo(served):
    demo, url = served
    assert demo._queue.max_size is not None  # a full queue turns visitors away instead of piling up work
    client = Client(url, verbose=False)
    info = client.predict(api_name="/model_info")
    assert info["layers"] == 4 and info["default_edit_layer"] == 1 and len(info["presets"]) == 12
    prompt, subject, answer, e_subject, relation, target, old, para, neigh, sweep_target = client.predict(
        0, api_name="/preset")
    out = trace(client, prompt, subject, answer)
    assert all(plot["type"] == "plotly" for plot in out[1:4])
    exported = json.load(open(out[4]["value"]))  # a DownloadButton update: enabled, with its file
    assert [r["kind"] for r in exported["results"]] == ["hidden", "mlp", "attn"]
    assert "peaks at layer" in out[6]  # the suggested edit layer

    comparison, scores, details, history, export, status, stats_note, progress = edit(
        client, e_subject, relation, target, old, para, neigh)
    assert [row["kind"] for row in details["rows"]] == ["rewrite", "paraphrase", "paraphrase", "neighbour", "neighbour"]
    assert history["data"][0][1:5] == ["ROME", e_subject, relation, target]
    assert export["value"].endswith(".safetensors") and export["interactive"]
    assert "1 edit active" in status

    history, export, status, stats_note = client.predict(api_name="/undo")
    assert history["data"] == [] and "original model" in status


def test_two_visitors_one_edits_the_other_sees_the_original(served, engine):
    demo, url = served
    saved = snapshot(engine.lm.model)
    editor, watcher = Client(url, verbose=False), Client(url, verbose=False)
    prompt = "The Eiffel Tower is located in the city of"
    baseline_trace = heatmap_values(trace(watcher, prompt, "The Eiffel Tower"))
    baseline_text = watcher.predict(prompt, 6, False, 0, api_name="/compare")

    def watch():
        return heatmap_values(trace(watcher, prompt, "The Eiffel Tower")), watcher.predict(
            prompt, 6, False, 0, api_name="/compare")

    with ThreadPoolExecutor(2) as pool:
        edited = pool.submit(edit, editor, "The Eiffel Tower", "{} is located in the city of", "Rome", "Paris", "", "")
        watched = pool.submit(watch)
        edited, watched = edited.result(), watched.result()
    assert edited[3]["data"][0][4] == "Rome"
    assert watched == (baseline_trace, baseline_text)
    # Later requests of the watcher still see the original; the editor sees its edit.
    assert heatmap_values(trace(watcher, prompt, "The Eiffel Tower")) == baseline_trace
    assert heatmap_values(trace(editor, prompt, "The Eiffel Tower")) != baseline_trace
    editor_text = editor.predict(prompt, 6, False, 0, api_name="/compare")
    assert "no edits yet" in baseline_text and "no edits yet" not in editor_text
    assert changed(engine.lm.model, saved) == []


def test_a_cancelled_request_restores_the_model(served, engine, monkeypatch):
    """Stop pressed mid-trace: the work stops at its next progress report and the weights come back."""
    from tracing import workflow as workflow_module

    demo, url = served
    client = Client(url, verbose=False)
    edit(client, "The Eiffel Tower", "{} is located in the city of", "Rome", "Paris", "", "")  # this visitor edits
    saved = snapshot(engine.lm.model)
    reporting, reports = threading.Event(), []

    def endless_trace(lm, *args, progress=None, **kwargs):
        reports.append(changed(lm.model, saved))  # the visitor's edit is applied while the work runs
        for step in range(10_000):
            progress(step, 10_000)
            if step == 3:
                reporting.set()  # the work is under way and has passed its Stop check a few times: cancel now
            time.sleep(0.05)  # only paces the endless work (10,000 steps: minutes); the test never waits on it
        yield from ()

    monkeypatch.setattr(workflow_module, "iter_trace", endless_trace)
    job = client.submit("The Eiffel Tower is located in the city of", "The Eiffel Tower", "", *QUICK.values(),
                        api_name="/trace")
    assert reporting.wait(60)
    job.cancel()
    assert wait_until(lambda: not engine.lock.locked(), 30), "the cancelled work still holds the model"
    assert reports[0] and changed(engine.lm.model, saved) == []
    # The page still works for this visitor afterwards: the original model's continuation, and a second column
    # with the visitor's edit (still active: the cancelled request did not lose it).
    monkeypatch.undo()
    prompt = "The Eiffel Tower is in"
    original = engine.call(lambda lm: generate(lm, [prompt], max_new_tokens=4)[0])
    out = client.predict(prompt, 4, False, 0, api_name="/compare")
    assert out.startswith('<table class="le-compare" id="free-comparison">')
    assert f'<td class="le-prompt">{prompt}</td>' in out
    assert f'<td class="before">{highlight(original, "Rome", "Paris")}</td>' in out
    assert '<td class="after">' in out and "no edits yet" not in out


def test_a_visitor_who_leaves_mid_request_does_not_hold_the_model(served, engine, monkeypatch):
    """A browser joins the queue for a trace, reads its progress, then goes away (the event stream closes):
    the work stops and the model is free for the next visitor."""
    import httpx

    import webapp.engine as engine_module
    from tracing import workflow as workflow_module

    demo, url = served
    monkeypatch.setattr(engine_module, "ABANDONED_S", 2.0)
    started, stopped = threading.Event(), threading.Event()

    def endless_trace(lm, *args, progress=None, **kwargs):
        started.set()
        try:
            for step in range(10_000):
                progress(step, 10_000)
                time.sleep(0.05)
        finally:
            stopped.set()
        yield from ()

    monkeypatch.setattr(workflow_module, "iter_trace", endless_trace)
    monkeypatch.setattr(workflow_module, "estimate", lambda *args, **kwargs: [])  # straight to the exact trace
    fn_index = next(i for i, fn in demo.fns.items() if fn.api_name == "trace")
    session = "leaving-visitor"
    settings = {**QUICK, "seed": 4242}  # a trace no earlier test ran (those are remembered)
    data = ["The Eiffel Tower is located in the city of", "The Eiffel Tower", "", *settings.values(), None]
    with httpx.Client(base_url=url, timeout=30) as http:
        http.post("gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                 "event_data": None, "trigger_id": None}).raise_for_status()
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as events:
            for line in events.iter_lines():
                if "progress" in line or "process_generating" in line:
                    break
    assert started.wait(30)
    assert stopped.wait(30), "the work of a visitor who left is still running"
    assert wait_until(lambda: not engine.lock.locked(), 30), "the work of a visitor who left still holds the model"


def test_which_layer_compare_editors_and_a_batch_through_the_api(served, engine):
    """The edit tab's longer requests, wired as the page wires them (a browser adds nothing to these checks; the
    browser test keeps trace, edit and undo)."""
    from test_batch import TINY_MEMIT

    demo, url = served
    client = Client(url, verbose=False)
    prompt, subject, answer, e_subject, relation, target, old, para, neigh, sweep_target = client.predict(
        0, api_name="/preset")
    trace(client, prompt, subject, answer)  # the session's traced fact, which the sweep edits
    figure, summary, progress = client.predict(sweep_target, 2, para, neigh, api_name="/which_layer")
    assert figure["type"] == "plotly" and "Best layer by S" in summary and "of 2 layers" in summary
    assert progress == ""

    table, progress = client.predict(e_subject, relation, target, old, para, neigh, 4, api_name="/compare_editors")
    for method in ("rome", "ft", "ft-l", "kn"):
        assert f'<td class="after" data-method="{method}">' in table
    assert table.count('th class="le-method"') == 4 and "Neighbourhood" in table and progress == ""

    saved = dict(engine._method_hparams)
    engine._method_hparams["memit"] = TINY_MEMIT
    try:
        rows = [["The Eiffel Tower", "{} is located in the city of", "Rome", "Paris"],
                ["Michael Jordan", "{} plays the sport of", "golf", "basketball"]]
        table = {"headers": ["Subject", "Relation prompt", "New object", "Old object"], "data": rows}
        result, history, export, status, stats_note, progress = client.predict(table, False, api_name="/write_batch")
    finally:
        engine._method_hparams.clear()
        engine._method_hparams.update(saved)
    assert result.count("<tr data-index=") == 2 and 'id="batch-health"' in result and "Health check" in result
    assert history["data"][0][1] == "MEMIT" and "1 edit active" in status and progress == ""
    history, export, status, stats_note = client.predict(api_name="/undo")
    assert history["data"] == [] and "original model" in status
