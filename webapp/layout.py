"""The page's layout and wiring: the header, one function per tab, then the events.

Example::

    demo = build_demo(create_engine())
    launch(demo, host="127.0.0.1", port=7860)
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Callable
from types import SimpleNamespace

import gradio as gr
import plotly.graph_objects as go

from editing.edit import method_label
from tracing.plots import average_csv, average_curves, average_heatmap, severed_figure
from editing.presets import guess_subject
from tracing.result import CORRUPTIONS, METRICS

from . import render
from .engine import Engine, Visitor
from .handlers import SKIP, App

PAPER = "https://arxiv.org/abs/2202.05262"
DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
THEME = gr.themes.Soft(
    primary_hue="violet",
    secondary_hue="green",
    font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
)


def on_gpu(fn: Callable) -> Callable:
    """``spaces.GPU(fn)`` on a Hugging Face Space with ZeroGPU (the ``spaces`` package is importable), else ``fn``."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def by_name(fn: Callable, outputs: dict[str, object]) -> tuple[Callable, list]:
    """``fn``, whose results are dicts of outputs by name, as Gradio wants it: values in ``outputs``' order.

    Returns the wrapped handler and the output components. A name missing
    from a result leaves its component as it is (``gr.skip()``); a name that
    ``outputs`` does not know is a bug and raises.
    """
    names = list(outputs)

    def order(value):
        if not isinstance(value, dict):
            return value  # None: a stopped request
        unknown = set(value) - set(names)
        if unknown:
            raise KeyError(f"{fn.__name__} returned outputs the page does not show: {', '.join(sorted(unknown))}")
        values = tuple(value.get(name, SKIP) for name in names)
        return values[0] if len(values) == 1 else values

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            for value in fn(*args, **kwargs):
                yield order(value)

        return generator, list(outputs.values())

    @functools.wraps(fn)
    def function(*args, **kwargs):
        return order(fn(*args, **kwargs))

    return function, list(outputs.values())


def run_and_stop(label: str, name: str) -> tuple[gr.Button, gr.Button]:
    """A primary button and its Stop button, side by side (ids ``NAME-button``, ``NAME-stop``)."""
    with gr.Row():
        return (gr.Button(label, variant="primary", elem_id=f"{name}-button"),
                gr.Button("Stop", variant="stop", scale=0, elem_id=f"{name}-stop"))


def help_column(name: str) -> None:
    """A side column with a help text of ``assets/static``."""
    with gr.Column(scale=2, elem_classes="le-help"):
        gr.Markdown(render.static_text(name))


def header(engine: Engine):
    """Title, model card and the preset gallery (None when the server has no presets)."""
    with gr.Row(elem_classes="le-header"):
        gr.Markdown(
            "# Locate & edit facts in a language model\n"
            f"Find **where** a model stores a fact (causal tracing), then **rewrite** it (ROME) - "
            f"after Meng et al., [*Locating and Editing Factual Associations in GPT*]({PAPER})."
        )
    gr.HTML(render.model_card(engine))
    if not engine.presets:
        return None
    note = ("" if engine.presets_model in ("", engine.lm.name) else
            f" (chosen for {engine.presets_model}; {engine.lm.name} may not know them)")
    return gr.Dataset(
        components=[gr.Textbox(visible=False)], samples=[[p.label] for p in engine.presets], type="index",
        label=f"Preset facts: click one to fill both panels{note}", layout="gallery",
        samples_per_page=max(12, len(engine.presets)), elem_id="presets",
    )


def locate_tab(engine: Engine) -> SimpleNamespace:
    """① Locate the fact: prompt, subject, settings, the three heatmaps and their downloads."""
    n_layers, chars = engine.lm.n_layers, engine.limits.text_chars
    ui = SimpleNamespace()
    with gr.Tab("① Locate the fact", id="locate", elem_id="tab-locate"):
        with gr.Row():
            with gr.Column(scale=3):
                ui.prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", elem_id="trace-prompt", max_length=chars,
                                       info="A sentence the model completes with a fact.")
                with gr.Row():
                    ui.subject = gr.Textbox(guess_subject(DEFAULT_PROMPT), label="Subject", max_length=chars,
                                            info="Guessed from the prompt; edit it if needed.",
                                            elem_id="trace-subject")
                    ui.answer = gr.Textbox("", label="Expected answer (optional)", max_length=chars,
                                           info="Empty: trace the model's own top prediction.",
                                           elem_id="trace-answer")
                with gr.Accordion("Advanced settings (defaults: the paper's)", open=False):
                    with gr.Row():
                        ui.samples = gr.Slider(1, engine.limits.samples, value=10, step=1, label="Samples",
                                               info="Corrupted copies averaged per cell.")
                        ui.noise = gr.Number(3.0, label="Noise (× embedding std)", minimum=0.01, maximum=100)
                        ui.window = gr.Slider(1, n_layers, value=min(10, n_layers), step=1,
                                              label="Window (MLP/attention layers restored together)")
                    with gr.Row():
                        ui.corruption = gr.Radio(list(CORRUPTIONS), value="gaussian", label="Corruption")
                        ui.metric = gr.Dropdown(list(METRICS), value="prob", label="Metric")
                        ui.contrast = gr.Textbox("", label="Contrast answer (for logit_diff)", max_length=chars)
                    with gr.Row():
                        ui.seed = gr.Number(1, label="Seed", precision=0, minimum=0)
                        ui.precision = gr.Dropdown(list(engine.precisions), value="auto", label="Precision",
                                                   info="Other precisions run on a copy of the model.")
                        ui.fast = gr.Checkbox(False, label="Quick trace: only the subject's and the last token's rows")
                ui.trace_btn, ui.stop_btn = run_and_stop("Trace", "trace")
            help_column("help-trace.md")
        ui.progress = gr.HTML(elem_id="trace-status")
        ui.prediction = gr.HTML(elem_id="prediction")
        with gr.Row(equal_height=True):
            ui.plot_hidden = gr.Plot(label="Hidden states", elem_id="plot-hidden", min_width=320)
            ui.plot_mlp = gr.Plot(label="MLP", elem_id="plot-mlp", min_width=320)
            ui.plot_attn = gr.Plot(label="Attention", elem_id="plot-attn", min_width=320)
        with gr.Row():
            ui.layer_html = gr.HTML()
        with gr.Row():
            ui.json_btn = gr.DownloadButton("Scores (JSON)", interactive=False, size="sm", elem_id="dl-json")
            ui.csv_btn = gr.DownloadButton("Scores (CSV)", interactive=False, size="sm", elem_id="dl-csv")
            ui.to_edit_btn = gr.Button("Edit this fact →", size="sm", elem_id="to-edit")
        gr.Markdown("PNG: use the camera icon in each figure's toolbar.", elem_classes="le-small")
        # Rendered but never shown: the browser loads Plotly (a large script) with the page, not when the first map
        # arrives (in headless Chromium on 2 busy cores that took 1.5 s of the first preview's way to the screen).
        gr.Plot(go.Figure(), visible="hidden", elem_id="plotly-preload")
        sweep_section(engine, ui)
    return ui


def sweep_section(engine: Engine, ui: SimpleNamespace) -> None:
    """Which layer to edit? ROME at every k-th layer of the traced fact, drawn beside its MLP trace row."""
    n_layers, limits = engine.lm.n_layers, engine.limits
    fewest = max(1, math.ceil(n_layers / limits.sweep_layers))  # the smallest k within the limit
    with gr.Accordion("Which layer to edit? Edit the traced fact at each layer", open=False,
                      elem_id="sweep-accordion"):
        gr.Markdown(render.static_text("help-sweep.md"))
        with gr.Row():
            ui.sweep_target = gr.Textbox("Rome", label="New object to write", max_length=limits.text_chars,
                                         elem_id="sweep-target", scale=2)
            ui.sweep_every = gr.Slider(fewest, n_layers, value=max(fewest, min(3, n_layers)), step=1,
                                       label=f"Every k-th layer (at most {limits.sweep_layers} edits)",
                                       elem_id="sweep-every", scale=2)
        ui.sweep_btn, ui.sweep_stop = run_and_stop("Edit at each layer", "sweep")
        ui.sweep_progress = gr.HTML(elem_id="sweep-status")
        ui.sweep_plot = gr.Plot(label="Edit success per layer, and the traced MLP effect", elem_id="sweep-plot")
        ui.sweep_out = gr.HTML(elem_id="sweep-out")


def average_tab(engine: Engine) -> SimpleNamespace:
    """③ Across many facts: the shipped averages over the known facts (paper's Fig. 2 and 3), and the facts."""
    ui = SimpleNamespace(table=None)
    summary = engine.average
    with gr.Tab("③ Across many facts", id="average", elem_id="tab-average"):
        if summary is None:
            gr.Markdown(render.static_text("help-average-missing.md"), elem_id="average-missing")
            return ui
        gr.Markdown(render.average_intro(summary), elem_id="average-intro")
        with gr.Row(equal_height=True):
            gr.Plot(average_curves(summary), elem_id="average-curve-subject", min_width=360)
            gr.Plot(average_curves(summary, "last token"), elem_id="average-curve-last", min_width=360)
        with gr.Row(equal_height=True):
            for kind in summary["kinds"]:
                gr.Plot(average_heatmap(summary, kind), elem_id=f"average-{kind}", min_width=320)
        if summary.get("severed"):
            with gr.Row():
                with gr.Column(scale=3):
                    gr.Plot(severed_figure(summary["severed"], model=summary["model"]), elem_id="average-severed")
                with gr.Column(scale=2, elem_classes="le-help"):
                    gr.Markdown(render.severed_text(summary))
        stem = f"average-{summary['n_facts']}-facts"
        with gr.Row():
            gr.DownloadButton("Averages (CSV)", engine.static_file(f"{stem}.csv", average_csv(summary)), size="sm",
                              elem_id="average-csv")
            gr.DownloadButton("Averages (JSON)", engine.static_file(f"{stem}.json", json.dumps(summary, indent=1)),
                              size="sm", elem_id="average-json")
        headers, rows = render.average_fact_rows(summary)
        ui.table = gr.Dataframe(headers=headers, value=rows, interactive=False, elem_id="average-facts", wrap=True,
                                label=f"The {summary['n_facts']} facts (click a row to trace it in ①)",
                                max_height=420)
    return ui


def edit_tab(engine: Engine, app: App) -> SimpleNamespace:
    """② Rewrite the fact: the request, test prompts, before/after, scores, history, files, free prompts."""
    ui = SimpleNamespace()
    with gr.Tab("② Rewrite the fact", id="edit", elem_id="tab-edit"):
        with gr.Row():
            with gr.Column(scale=3):
                edit_request(engine, app, ui)
            help_column("help-edit.md")
        ui.progress = gr.HTML(elem_id="edit-status-progress")
        ui.comparison = gr.HTML(elem_id="comparison")
        ui.scores = gr.HTML(elem_id="scores")
        with gr.Accordion("Raw results (JSON)", open=False):
            ui.details = gr.JSON(label="Edit results")
        batch_section(engine, ui)
        history_section(ui)
        with gr.Accordion("Compare editors: the same fact with ROME, FT, FT+L and KN", open=False,
                          elem_id="editors-accordion"):
            gr.Markdown(render.static_text("help-editors.md"))
            ui.editors_btn, ui.editors_stop = run_and_stop("Compare editors on this fact", "editors")
            ui.editors_progress = gr.HTML(elem_id="editors-status")
            ui.editors_out = gr.HTML(elem_id="editors")
        with gr.Accordion("Try your own prompt", open=False):
            with gr.Row():
                ui.free_prompt = gr.Textbox("The Eiffel Tower is in", label="Prompt", scale=4,
                                            max_length=engine.limits.text_chars)
                ui.free_btn = gr.Button("Generate", scale=1, elem_id="free-button")
                ui.free_stop = gr.Button("Stop", variant="stop", scale=0, elem_id="free-stop")
            ui.free_out = gr.HTML()
    return ui


def edit_request(engine: Engine, app: App, ui: SimpleNamespace) -> None:
    """The edit's fields: subject, relation, objects, layer, method, test prompts, generation settings, buttons."""
    n_layers, chars, limits = engine.lm.n_layers, engine.limits.text_chars, engine.limits
    lines_chars = chars * (limits.test_lines + 1)
    with gr.Row():
        ui.subject = gr.Textbox("The Eiffel Tower", label="Subject", elem_id="edit-subject", max_length=chars)
        ui.relation = gr.Textbox("{} is located in the city of", label="Relation prompt",
                                 info="Use {} where the subject goes.", elem_id="edit-relation", max_length=chars)
    with gr.Row():
        ui.target = gr.Textbox("Rome", label="New object", elem_id="edit-target", max_length=chars)
        ui.old = gr.Textbox("Paris", label="Old object (optional)", max_length=chars,
                            info="Empty: the model's current answer.", elem_id="edit-old")
        ui.layer = gr.Slider(0, n_layers - 1, value=engine.default_layer, step=1,
                             label=f"Edit layer (default {engine.default_layer})", elem_id="edit-layer")
        ui.method = gr.Dropdown([(method_label(m), m) for m in engine.methods], value="rome", label="Method",
                                elem_id="edit-method", info="ROME, fine-tuning (FT), constrained fine-tuning (FT+L), "
                                                            "Knowledge Neurons (KN).")
    ui.stats_note = gr.HTML(app.stats_note())
    with gr.Row():
        ui.paraphrases = gr.Textbox(
            "The Eiffel Tower, located in the city of\nThe Eiffel Tower can be found in", lines=2,
            label=f"Paraphrases (one per line, up to {limits.test_lines})", elem_id="edit-paraphrases",
            max_length=lines_chars)
        ui.neighbours = gr.Textbox(
            "The Louvre is located in the city of\nNotre-Dame de Paris is located in the city of", lines=2,
            label=f"Neighbour prompts (one per line, up to {limits.test_lines})", elem_id="edit-neighbours",
            max_length=lines_chars)
    with gr.Accordion("Generation settings", open=False):
        with gr.Row():
            ui.max_new = gr.Slider(4, limits.new_tokens, value=min(16, limits.new_tokens), step=1, label="New tokens")
            ui.sample = gr.Checkbox(False, label="Sample (seeded) instead of greedy")
            ui.seed = gr.Number(0, label="Sampling seed", precision=0, minimum=0)
    ui.edit_btn, ui.stop_btn = run_and_stop("Apply edit", "edit")


def history_section(ui: SimpleNamespace) -> None:
    """The visitor's edits: status, history table, undo, reset, export, import, and a retrace of the edited model."""
    gr.Markdown("### Your edits")
    ui.status = gr.HTML(render.history_status([]))
    ui.history = gr.Dataframe(headers=render.HISTORY_HEADERS, value=[], interactive=False, elem_id="history",
                              label="Edit history (applied in order)")
    with gr.Row():
        ui.undo_btn = gr.Button("Undo last", size="sm", elem_id="undo-button")
        ui.reset_btn = gr.Button("Reset all", size="sm", variant="stop", elem_id="reset-button")
        ui.export_btn = gr.DownloadButton("Export edits", interactive=False, size="sm", elem_id="export-edits")
        ui.import_btn = gr.UploadButton("Import edits", file_types=[".safetensors"], size="sm", elem_id="import-edits")
        ui.retrace_btn = gr.Button("Trace the edited model →", size="sm", elem_id="retrace-button")


def batch_section(engine: Engine, ui: SimpleNamespace) -> None:
    """Edit many facts: a table of requests written as one MEMIT batch (undone, exported as one edit)."""
    limits = engine.limits
    with gr.Accordion(f"Edit many facts at once (MEMIT, up to {limits.batch_facts})", open=False,
                      elem_id="batch-accordion"):
        with gr.Row():
            with gr.Column(scale=3):
                ui.batch_table = gr.Dataframe(
                    headers=["Subject", "Relation prompt ({} = subject)", "New object", "Old object (optional)"],
                    value=[["", "", "", ""]], type="array", datatype="str", interactive=True, row_count=1,
                    row_limits=(1, limits.batch_facts), column_count=4, column_limits=(4, 4),
                    elem_id="batch-table", label="Facts to write (one per row)", wrap=True)
                ui.batch_extras = gr.State({})
                with gr.Row():
                    ui.batch_presets_btn = gr.Button("Add all presets", size="sm", elem_id="batch-presets")
                    ui.batch_upload = gr.UploadButton("Add from a file (CSV or JSON)", file_types=[".csv", ".json"],
                                                      size="sm", elem_id="batch-upload")
                    ui.batch_clear = gr.Button("Clear the table", size="sm", elem_id="batch-clear")
                with gr.Row():
                    ui.batch_csv = gr.Textbox("", lines=2, label="Paste CSV: subject,relation prompt,new object[,old]",
                                              max_length=limits.text_chars * 4 * limits.batch_facts, scale=4,
                                              elem_id="batch-csv")
                    ui.batch_paste_btn = gr.Button("Add pasted rows", size="sm", scale=1, elem_id="batch-paste")
                ui.batch_project = gr.Checkbox(False, label="Keep my earlier edits exactly (AlphaEdit's projection)",
                                               elem_id="batch-project")
                ui.batch_btn, ui.batch_stop = run_and_stop("Write all facts (one MEMIT edit)", "batch")
            help_column("help-batch.md")
        ui.batch_progress = gr.HTML(elem_id="batch-status")
        ui.batch_out = gr.HTML(elem_id="batch")


def wire_edits(app: App, ed: SimpleNamespace, visitor, model_events: dict) -> None:
    """The edit tab's events: an edit, the editors compared, a batch, the history's buttons, free prompts."""
    history = {"visitor": visitor, "history": ed.history, "export": ed.export_btn, "status": ed.status,
               "stats_note": ed.stats_note}
    edit_inputs = [ed.subject, ed.relation, ed.target, ed.old, ed.layer, ed.method, ed.paraphrases, ed.neighbours,
                   ed.max_new, ed.sample, ed.seed, visitor]
    edit_fn, edit_outputs = by_name(app.edit, {"comparison": ed.comparison, "scores": ed.scores,
                                               "details": ed.details, **history, "progress": ed.progress})
    edit_event = ed.edit_btn.click(on_gpu(edit_fn), edit_inputs, edit_outputs, api_name="edit", **model_events)
    ed.stop_btn.click(None, None, None, cancels=[edit_event])
    ed.method.change(app.method_layer, ed.method, ed.layer, queue=False, api_visibility="private")
    editors_fn, editors_outputs = by_name(app.compare_editors, {"table": ed.editors_out,
                                                                "progress": ed.editors_progress})
    editors_event = ed.editors_btn.click(
        on_gpu(editors_fn), [ed.subject, ed.relation, ed.target, ed.old, ed.paraphrases, ed.neighbours,
                             ed.max_new, visitor],
        editors_outputs, api_name="compare_editors", **model_events)
    ed.editors_stop.click(None, None, None, cancels=[editors_event])
    batch_fn, batch_outputs = by_name(app.write_batch, {"result": ed.batch_out, **history,
                                                        "progress": ed.batch_progress})
    batch_event = ed.batch_btn.click(
        on_gpu(batch_fn), [ed.batch_table, ed.batch_extras, ed.batch_project, visitor],
        batch_outputs, api_name="write_batch", **model_events)
    ed.batch_stop.click(None, None, None, cancels=[batch_event])
    table_io = [ed.batch_table, ed.batch_extras]
    ed.batch_presets_btn.click(app.batch_presets, table_io, table_io, api_name="batch_presets")
    ed.batch_paste_btn.click(app.batch_paste, [ed.batch_csv, *table_io], [*table_io, ed.batch_csv],
                             api_name="batch_paste")
    ed.batch_upload.upload(app.batch_upload, [ed.batch_upload, *table_io], table_io, api_name="batch_upload")
    ed.batch_clear.click(lambda: ([["", "", "", ""]], {}), None, table_io, api_visibility="private")
    # Undo, reset and import only change the visitor's own list of edits: instant, never waiting for the model.
    undo_fn, history_outputs = by_name(app.undo, history)
    ed.undo_btn.click(undo_fn, visitor, history_outputs, api_name="undo")
    ed.reset_btn.click(by_name(app.reset, history)[0], visitor, history_outputs, api_name="reset")
    ed.import_btn.upload(by_name(app.import_edits, history)[0], [ed.import_btn, visitor], history_outputs,
                         api_name="import_edits")
    compare_fn, compare_outputs = by_name(app.compare, {"comparison": ed.free_out})
    free_event = ed.free_btn.click(on_gpu(compare_fn), [ed.free_prompt, ed.max_new, ed.sample, ed.seed, visitor],
                                   compare_outputs, api_name="compare", **model_events)
    ed.free_stop.click(None, None, None, cancels=[free_event])


def wire(app: App, presets, loc: SimpleNamespace, ed: SimpleNamespace, tabs, visitor, trace_state) -> None:
    """Connect the events. Model events share the engine's queue (one at a time, each bounded by the limits)."""
    limits = app.engine.limits
    # Handlers start at once and wait in the engine's queue, where they show their place and can be stopped.
    model_events = dict(concurrency_id="model", concurrency_limit=limits.queue_size + 1)
    trace_inputs = [loc.prompt, loc.subject, loc.answer, loc.samples, loc.noise, loc.window, loc.corruption,
                    loc.metric, loc.contrast, loc.seed, loc.precision, loc.fast, visitor]
    trace_fn, trace_outputs = by_name(app.trace, {
        "prediction": loc.prediction, "hidden": loc.plot_hidden, "mlp": loc.plot_mlp, "attn": loc.plot_attn,
        "json": loc.json_btn, "csv": loc.csv_btn, "layer": loc.layer_html, "state": trace_state,
        "progress": loc.progress})
    trace_fn = on_gpu(trace_fn)
    trace_event = loc.trace_btn.click(trace_fn, trace_inputs, trace_outputs, api_name="trace", **model_events)
    loc.prompt.input(app.suggest_subject, [loc.prompt, loc.subject], loc.subject, queue=False,
                     api_visibility="private")
    loc.to_edit_btn.click(app.to_edit, [trace_state, ed.layer], [ed.subject, ed.relation, ed.old, ed.layer, tabs],
                          queue=False, api_visibility="private")

    wire_edits(app, ed, visitor, model_events)
    retrace_event = ed.retrace_btn.click(
        app.retrace_values, [ed.subject, ed.relation, ed.target], [loc.prompt, loc.subject, loc.answer, tabs],
        api_name="retrace_values",
    ).success(trace_fn, trace_inputs, trace_outputs, api_visibility="private", **model_events)
    loc.stop_btn.click(None, None, None, cancels=[trace_event, retrace_event])
    sweep_fn, sweep_outputs = by_name(app.which_layer, {"figure": loc.sweep_plot, "summary": loc.sweep_out,
                                                        "progress": loc.sweep_progress})
    sweep_event = loc.sweep_btn.click(
        on_gpu(sweep_fn), [trace_state, loc.sweep_target, loc.sweep_every, ed.paraphrases, ed.neighbours, visitor],
        sweep_outputs, api_name="which_layer", **model_events)
    loc.sweep_stop.click(None, None, None, cancels=[sweep_event])
    info = gr.JSON(visible=False)
    gr.Button(visible=False).click(app.model_info, None, info, api_name="model_info")
    preset_outputs = [loc.prompt, loc.subject, loc.answer, ed.subject, ed.relation, ed.target, ed.old,
                      ed.paraphrases, ed.neighbours, loc.sweep_target]
    if presets is not None:
        presets.click(app.preset_values, presets, preset_outputs, queue=False, api_visibility="private")
        # An API route to pick a preset by index (the gallery click carries the index in the page).
        preset_index = gr.Number(0, visible=False, precision=0)
        gr.Button(visible=False).click(app.preset_values, preset_index, preset_outputs, api_name="preset")


def build_demo(engine: Engine) -> gr.Blocks:
    """The page: header, presets, the Locate, Edit and Across-many-facts tabs, and their wiring (no model is loaded
    here)."""
    app = App(engine)
    with gr.Blocks(title="locate-edit: trace and rewrite facts in a language model", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        visitor = gr.State(Visitor())
        trace_state = gr.State(None)
        presets = header(engine)
        with gr.Tabs(selected="locate") as tabs:
            loc = locate_tab(engine)
            ed = edit_tab(engine, app)
            avg = average_tab(engine)
        wire(app, presets, loc, ed, tabs, visitor, trace_state)
        if avg.table is not None:
            avg.table.select(app.open_fact, None, [loc.prompt, loc.subject, loc.answer, tabs], queue=False,
                             api_visibility="private")
    return demo


def launch(demo: gr.Blocks, engine: Engine, *, host: str, port: int, share: bool = False, **kwargs):
    """Queue the events (the engine bounds the model's own queue) and serve the page.

    Uploads larger than the import limit are refused by Gradio while they are
    received, before they reach a handler.
    """
    limits = engine.limits
    demo.queue(default_concurrency_limit=4, max_size=2 * limits.queue_size + 8)
    return demo.launch(
        server_name=host, server_port=port, share=share, theme=THEME, css=render.static_text("style.css"),
        ssr_mode=False, show_error=True, footer_links=["api", "gradio"], max_file_size=limits.import_bytes,
        **kwargs,
    )
