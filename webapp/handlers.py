"""The page's event handlers: check the request, hand it to the engine, map the library's events to outputs.

Every handler is an ordinary method (generators stream their progress), so
tests call them without a browser; ``visitor`` is the visitor's
:class:`~webapp.engine.Visitor` held in ``gr.State``. A handler returns (or
yields) a dict of outputs by name -- ``{"prediction": html, "mlp": figure, ...}``
-- and :func:`webapp.layout.by_name` hands them to the components; a name left
out leaves its component as it is. Only here do library errors become
``gr.Error`` messages; nothing reaches the page as a traceback.

Example::

    app = App(create_engine())
    visitor = Visitor()
    *_, last = app.trace("The Eiffel Tower is located in the city of", "The Eiffel Tower", "", 10, 3.0, 10,
                         "gaussian", "prob", "", 1, "auto", False, visitor)
    last["mlp"], last["state"]["layer"]
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import gradio as gr

from editing import (EditRequest, check_edits, compare_events, edit_and_compare, generate, load_edits, original_weights,
                     save_edits)
from editing.batch import BatchItem, parse_requests, read_requests, write_batch
from editing import display
from editing.edit import method_label
from editing.presets import guess_subject
from editing.evaluation.sweep import iter_layer_sweep
from tracing import KINDS
from tracing.loading import describe_placement
from tracing.workflow import (Estimate, Finished, Prediction, Rows, Step, prediction_key, split_precision,
                              trace_events, trace_key)
from tracing.plots import heatmap, layer_sweep_figure, results_json, scores_csv
from tracing.result import suggest_edit_layer

from . import render
from .engine import Engine, Visitor, comparison_key
from .errors import user_errors
from .limits import (Refused, check_batch, check_edit, check_generation, check_request, check_sweep, check_trace,
                     choice, extras_key, number, table_rows)


SKIP = gr.skip()


class App:
    """The page's handlers, bound to one :class:`Engine`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.limits = engine.limits
        self._visitors = threading.Lock()  # guards check-and-set of a visitor's edits between handlers

    # -- helpers ---------------------------------------------------------------------------

    def _drive(self, stream, progress, describe: Callable[[Step], tuple[float, str]],
               element: str) -> Iterator[tuple]:
        """Engine events as ("tick", progress HTML or None) or ("item", x).

        Progress goes two ways: to ``gr.Progress`` (API clients, and the page
        before the first output) and as a progress card in the page itself
        (``element`` is its id), since a streaming handler's own outputs hide
        Gradio's overlay. Ticks come at least every few tenths of a second, so
        the caller yields often and Stop or a disconnect acts promptly; a tick
        whose card did not change carries None.
        """
        progress(0.0, desc="Waiting for the model")
        shown = None
        for event in stream:
            card = None
            if event[0] == "queue":
                text = f"Waiting for the model: {event[1]} request{'s' if event[1] != 1 else ''} ahead of yours"
                progress(0.0, desc=text)
                card = render.progress_card(element, None, text + ". Stop leaves the queue.")
            elif event[0] == "progress" and event[1] is not None:
                fraction, text = describe(event[1])
                progress(fraction, desc=text)
                card = render.progress_card(element, fraction, text)
            elif event[0] == "item":
                yield "item", event[1]
                continue
            if card is not None and card == shown:
                card = None
            shown = card if card is not None else shown
            yield "tick", card

    @staticmethod
    def _tick(card: str | None) -> dict:
        """The outputs of a progress tick: the progress card when it changed, nothing else."""
        return {} if card is None else {"progress": card}

    def _export_button(self, edits):
        if not edits:
            return gr.DownloadButton(value=None, interactive=False)
        path = self.engine.export_path(f"edits-{len(edits)}", ".safetensors")
        save_edits(list(edits), path)
        return gr.DownloadButton(value=str(path), interactive=True)

    def _add_edit(self, visitor: Visitor, previous: list, version: int, edit, what: str) -> None:
        """Add ``edit`` after ``previous``, unless the visitor's edits changed while it was computed (then warn)."""
        with self._visitors:
            added = visitor.version == version
            if added:
                visitor.set_edits(previous + [edit])
        if not added:
            gr.Warning(f"Your edits changed while this {what} ran (undo, reset or import), so it was not added. "
                       f"Run it again to add it to your current edits.")

    def _history(self, visitor: Visitor, message: str | None = None) -> dict:
        """The edit history's outputs (see :data:`HISTORY`) for the visitor's edits now."""
        if message:
            gr.Info(message)
        edits = visitor.edits
        return {"visitor": visitor, "history": render.history_rows(edits), "export": self._export_button(edits),
                "status": render.history_status(edits), "stats_note": self.stats_note()}

    def stats_note(self) -> str:
        return render.stats_note(self.engine.stats_layers(), self.engine.lm.n_layers, self.limits.stats_on_demand)

    # -- presets and small helpers ---------------------------------------------------------

    def model_info(self) -> dict:
        """The loaded model, the app's defaults and limits, for API clients."""
        lm = self.engine.lm
        return {"model": lm.name, "parameters": lm.n_params, "layers": lm.n_layers, "device": str(lm.device),
                "placement": describe_placement(lm),
                "dtype": str(lm.dtype).replace("torch.", ""), "default_edit_layer": self.engine.default_layer,
                "presets": [p.label for p in self.engine.presets], "presets_model": self.engine.presets_model,
                "notice": self.engine.notice, "precisions": list(self.engine.precisions),
                "methods": {m: {"label": method_label(m), "default_layer": self.engine.default_layer_for(m)}
                            for m in self.engine.methods},
                "stats_layers": self.engine.stats_layers(), "limits": self.limits.to_dict()}

    def method_layer(self, method: str):
        """The layer slider for a method: its default layer (KN searches every layer, so no slider)."""
        if method not in self.engine.methods:
            return gr.skip()
        layer = self.engine.default_layer_for(method)
        if layer is None:
            return gr.Slider(interactive=False, label=f"Edit layer ({method_label(method)} searches every layer)")
        return gr.Slider(value=layer, interactive=True, label=f"Edit layer (default for {method_label(method)}: {layer})")

    @user_errors
    def preset_values(self, index) -> tuple:
        """Fill both panels from preset ``index``: trace prompt, subject, answer; edit fields and test prompts."""
        presets = self.engine.presets
        if not presets:
            raise Refused("This server has no presets for its model.")
        p = presets[number(index, "The preset", low=0, high=len(presets) - 1, integer=True)]
        return (p.prompt, p.subject, p.attribute, p.subject, p.rewrite_prompt, p.counterfactual, p.attribute,
                "\n".join(p.paraphrases), "\n".join(p.neighbours), p.counterfactual)

    def suggest_subject(self, prompt: str, subject: str) -> str:
        """Keep a subject that occurs in the prompt; otherwise guess one from the prompt."""
        if not isinstance(prompt, str) or len(prompt) > self.limits.text_chars:
            return subject if isinstance(subject, str) else ""
        if isinstance(subject, str) and subject.strip() and subject.strip() in prompt:
            return subject
        return guess_subject(prompt)

    # -- tracing ---------------------------------------------------------------------------

    @user_errors
    def trace(self, prompt, subject, answer, samples, noise, window, corruption, metric, contrast, seed, precision,
              fast, visitor: Visitor | None, progress=gr.Progress()) -> Iterator[dict]:
        """Trace a fact (:func:`tracing.workflow.trace_events`); yields outputs by name: prediction, hidden, mlp,
        attn (figures), json, csv (downloads), layer (the suggested edit layer), state, progress.

        Figures appear kind by kind, the preview's first. ``fast`` traces only
        the subject's and the last token's rows (the others stay blank).
        """
        visitor = visitor if visitor is not None else Visitor()
        ask = check_trace(self.limits, self.engine.count_tokens, self.engine.lm.n_layers, prompt=prompt,
                          subject=subject, answer=answer, samples=samples, noise=noise, window=window,
                          corruption=corruption, metric=metric, contrast=contrast, seed=seed, precision=precision,
                          fast=fast, precisions=self.engine.precisions)
        config = replace(ask.config, precision=split_precision(ask.precision)[1])
        if not visitor.edits:  # the unedited model's traces are shared (and the presets' ship): no queue at all
            done = self.engine.recall(trace_key(ask.prompt, ask.subject, ask.answer, config), ask.precision)
            if done is not None:
                yield self._trace_outputs(self.engine.recall(prediction_key(ask.prompt), ask.precision), done, ask,
                                          visitor)
                return

        def work(lm, job) -> None:
            for event in trace_events(lm, ask.prompt, ask.subject, answer=ask.answer, config=config, memo=job.memo,
                                      progress=job.step):
                job.emit(event)

        def describe(step: Step) -> tuple[float, str]:
            return step.fraction, "Tracing: restoring the subject's last token and the last token first, then the rest"

        top = None
        figures: dict[str, object] = {kind: None for kind in KINDS}
        note = ""
        no_file = gr.DownloadButton(value=None, interactive=False)
        stream = self.engine.stream(work, visitor=visitor, precision=ask.precision, label="trace")
        for tag, event in self._drive(stream, progress, describe, "trace-progress"):
            if tag == "tick":
                yield self._tick(event)  # also hands control back to the server, so that Stop acts promptly
                continue
            if isinstance(event, Finished):
                yield self._trace_outputs(top, event.results, ask, visitor)
                return
            if isinstance(event, Prediction):
                top = event.top
            elif isinstance(event, Estimate):
                for result in event.results:
                    if figures[result.kind] is None:
                        figures[result.kind] = heatmap(result)
                note = render.preview_note(event.verdict)
            elif isinstance(event, Rows):
                figures[event.result.kind] = heatmap(event.result)
            yield {"prediction": render.prediction_card(top, None, ask.answer, note), **figures, "json": no_file,
                   "csv": no_file}

    def _trace_outputs(self, top, results, ask, visitor: Visitor) -> dict:
        """The finished trace: prediction, the three exact maps, downloads, the suggested layer, the state."""
        results = list(results)
        mlp = next(r for r in results if r.kind == "mlp")
        suggestion = suggest_edit_layer(mlp)
        layer = suggestion.layer if suggestion.layer is not None else self.engine.default_layer
        stem = f"trace-{ask.subject}"
        json_path = self.engine.export_path(stem, ".json")
        json_path.write_text(results_json(results, model=self.engine.lm.name, edits=len(visitor.edits)),
                             encoding="utf-8")
        csv_path = self.engine.export_path(stem, ".csv")
        csv_path.write_text(scores_csv(results), encoding="utf-8")
        last = suggestion.token
        state = {"prompt": ask.prompt, "subject": ask.subject, "answer": results[0].answer, "layer": layer,
                 "effect": [None if v != v else round(float(v) - mlp.low_score, 6) for v in mlp.scores[last]],
                 "token": mlp.tokens[last]}
        return {"prediction": render.prediction_card(top, results[0], ask.answer),
                **{r.kind: heatmap(r) for r in results},
                "json": gr.DownloadButton(value=str(json_path), interactive=True),
                "csv": gr.DownloadButton(value=str(csv_path), interactive=True),
                "layer": render.layer_card(suggestion, self.engine.default_layer), "state": state, "progress": ""}

    @user_errors
    def to_edit(self, state: dict | None, edit_layer) -> tuple:
        """Carry the traced fact to the edit panel: subject, relation prompt, old object, layer; switch tabs."""
        if not isinstance(state, dict) or not {"prompt", "subject", "answer"} <= set(state):
            raise Refused("Trace a fact first; its subject, prompt and peak layer then fill the edit panel.")
        relation = state["prompt"].replace(state["subject"], "{}", 1)
        layer = state.get("layer", edit_layer)
        return state["subject"], relation, state["answer"].strip(), layer, gr.Tabs(selected="edit")

    @user_errors
    def open_fact(self, evt: gr.SelectData) -> tuple:
        """A row of the averaged facts' table, opened in the Locate tab (prompt, subject, answer) to trace it."""
        facts = (self.engine.average or {}).get("facts") or []
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        row = number(index, "The fact's row", low=0, high=max(len(facts) - 1, 0), integer=True)
        if not facts:
            raise Refused("This server has no averaged facts for its model.")
        fact = facts[row]
        return fact["prompt"], fact["subject"], fact["attribute"], gr.Tabs(selected="locate")

    @user_errors
    def which_layer(self, traced: dict | None, target, every, paraphrases, neighbours, visitor: Visitor | None,
                    progress=gr.Progress()) -> Iterator[dict]:
        """ROME at every k-th layer of the traced fact, each alone on top of the visitor's edits and undone;
        yields outputs by name (figure, summary, progress) as layers finish."""

        visitor = visitor if visitor is not None else Visitor()
        engine = self.engine
        ask = check_sweep(self.limits, engine.count_tokens, engine.lm.n_layers, traced=traced, target=target,
                          every=every, paraphrases=paraphrases, neighbours=neighbours, hparams=engine.hparams)
        for layer in ask.layers:
            engine.check_stats(layer)
        edited = bool(visitor.edits)
        effect = [float("nan") if v is None else v for v in traced.get("effect") or []]
        token = str(traced.get("token", ""))

        def work(lm, job) -> None:
            def report(done: int, total: int, layer: int) -> None:
                job.step(Step("sweep", done, max(total, 1), "" if layer < 0 else str(layer)))

            for sweep in iter_layer_sweep(lm, ask.request, layers=ask.layers, paraphrases=ask.paraphrases,
                                          neighbours=ask.neighbours, hparams=engine.hparams,
                                          stats_spec=engine.stats_spec, previous=job.edits, progress=report):
                job.emit(sweep)  # drawn as each layer's edit is scored

        def describe(step: Step) -> tuple[float, str]:
            if not step.detail:
                return 1.0, f"Scored {step.total:g} edits"
            return step.fraction, f"ROME at layer {step.detail} ({step.done + 1:g} of {step.total:g}), then its scores"

        stream = engine.stream(work, visitor=visitor, label="which_layer")
        for tag, item in self._drive(stream, progress, describe, "sweep-progress"):
            if tag == "tick":
                yield self._tick(item)
                continue
            figure = layer_sweep_figure(item, effect or None, token=token, model=engine.lm.name)
            yield {"figure": figure, "summary": render.sweep_card(item, effect, token, edited),
                   **({"progress": ""} if item["complete"] else {})}

    # -- editing -----------------------------------------------------------------------------

    def _check_edit(self, visitor: Visitor, method, layer, **fields):
        """The edit request checked for ``method``; ``layer`` None lets the method choose (KN: every layer)."""
        method = choice(method, "The method", self.engine.methods)
        hp = self.engine.hparams_for(method)
        ask = check_edit(self.limits, self.engine.count_tokens, self.engine.lm.n_layers, layer=layer, method=method,
                         hparams=hp, edits_applied=len(visitor.edits), edits_mb=visitor.megabytes, **fields)
        if method == "rome":
            self.engine.check_stats(ask.layer)
        return method, hp, ask

    @user_errors
    def edit(self, subject, relation, target, old, layer, method, paraphrases, neighbours, max_new_tokens, sample,
             seed, visitor: Visitor | None, progress=gr.Progress()) -> Iterator[dict]:
        """Compute an edit (ROME, FT, FT+L or KN) on top of the visitor's edits; yields outputs by name:
        comparison, scores, details, the history's (:meth:`_history`) once the edit is added, progress."""
        visitor = visitor if visitor is not None else Visitor()
        method, hp, ask = self._check_edit(
            visitor, method, None if method == "kn" else layer, subject=subject, relation=relation, target=target,
            old=old, paraphrases=paraphrases, neighbours=neighbours, max_new_tokens=max_new_tokens, sample=sample,
            seed=seed)
        with self._visitors:
            previous, version = list(visitor.edits), visitor.version
        key = comparison_key(method, ask.request, ask.layer, hp, ask.paraphrases, ask.neighbours, ask.max_new_tokens,
                             ask.sample, ask.seed)
        done = None if previous else self.engine.recall(key)  # shared (or shipped) for the unedited model: no queue

        def work(lm, job) -> None:
            done = job.memo.recall(key)
            if done is None:
                for comparison in compare_events(
                        lm, ask.request, layer=ask.layer, hparams=hp, method=method, paraphrases=ask.paraphrases,
                        neighbours=ask.neighbours, max_new_tokens=ask.max_new_tokens, sample=ask.sample,
                        seed=ask.seed, previous=job.edits, stats_spec=self.engine.stats_spec, progress=job.progress,
                        memo=job.memo):
                    job.emit(comparison)
                job.memo.remember(key, comparison)
            else:
                job.emit(done)

        def describe(step: Step) -> tuple[float, str]:
            return render.edit_progress(step.stage, step.fraction, method)

        stream = ([("item", done)] if done is not None else
                  self.engine.stream(work, visitor=visitor, edits=previous, label="edit"))
        for tag, result in self._drive(stream, progress, describe, "edit-progress"):
            if tag == "tick":
                yield self._tick(result)
                continue
            shown = {"comparison": display.comparison_table(result), "scores": display.scores_card(result),
                     "details": result.to_dict()}
            if result.edit is None:  # the before column, while the edit is computed
                yield shown
                continue
            self._add_edit(visitor, previous, version, result.edit, "edit")
            yield {**shown, **self._history(visitor), "progress": ""}

    @user_errors
    def compare_editors(self, subject, relation, target, old, paraphrases, neighbours, max_new_tokens,
                        visitor: Visitor | None, progress=gr.Progress()) -> Iterator[dict]:
        """The same fact written by every editor in turn, each at its default layer, on top of the visitor's
        edits and undone after each (none is added): yields outputs by name (table, progress)."""
        visitor = visitor if visitor is not None else Visitor()
        methods = self.engine.methods
        checked = [self._check_edit(visitor, m, self.engine.default_layer_for(m), subject=subject, relation=relation,
                                    target=target, old=old, paraphrases=paraphrases, neighbours=neighbours,
                                    max_new_tokens=max_new_tokens, sample=False, seed=0) for m in methods]
        ask = checked[0][2]
        shown = [ask.request.prompt] + [p for p in (ask.paraphrases[:1] + ask.neighbours[:1])]

        def work(lm, job) -> None:
            for i, (method, hp, ask_m) in enumerate(checked):
                def report(stage, fraction, i=i, method=method):
                    job.step(Step(stage, fraction, detail=method, index=i, count=len(checked)))

                job.emit(("running", method))
                job.emit(("done", method, edit_and_compare(
                    lm, ask_m.request, layer=ask_m.layer, hparams=hp, method=method, paraphrases=ask_m.paraphrases,
                    neighbours=ask_m.neighbours, generate_prompts=shown, max_new_tokens=ask_m.max_new_tokens,
                    previous=job.edits, stats_spec=self.engine.stats_spec, progress=report, memo=job.memo)))

        def describe(step: Step) -> tuple[float, str]:
            within, text = render.edit_progress(step.stage, step.done, step.detail)
            return ((step.index + within) / step.count,
                    f"{method_label(step.detail)} ({step.index + 1}/{step.count}): {text}")

        results: dict = {}
        running = None
        stream = self.engine.stream(work, visitor=visitor, label="compare_editors")
        for tag, item in self._drive(stream, progress, describe, "editors-progress"):
            if tag == "tick":
                yield self._tick(item)
                continue
            if item[0] == "running":
                running = item[1]
            else:
                results[item[1]] = item[2]
                running = None
            yield {"table": display.editors_table(results, methods, running)}
        yield {"table": display.editors_table(results, methods), "progress": ""}

    # -- many facts at once ------------------------------------------------------------------

    @staticmethod
    def _batch_table(items: list[BatchItem]) -> tuple[list[list[str]], dict]:
        """Table rows and the facts' test prompts (keyed by subject and prompt) of ``items``."""
        rows = [[it.request.subject, it.request.prompt, it.request.target, it.request.target_true or ""]
                for it in items]
        extras = {extras_key(it.request): {"paraphrases": list(it.paraphrases), "neighbours": list(it.neighbours)}
                  for it in items if it.paraphrases or it.neighbours}
        return rows, extras

    def _append_facts(self, table, extras, items: list[BatchItem]) -> tuple[list[list[str]], dict]:
        """The table's filled rows followed by ``items``, refused beyond batch_facts."""
        kept = [[("" if c is None else str(c)) for c in row[:4]] + [""] * (4 - len(row[:4]))
                for row in table_rows(table) if any(isinstance(c, str) and c.strip() for c in row)]
        self.limits.at_most("batch_facts", len(kept) + len(items), "The number of facts in the batch with these",
                            "Remove some rows first, or write them in several batches.")
        rows, more = self._batch_table(items)
        extras = dict(extras) if isinstance(extras, dict) else {}
        return kept + rows, {**extras, **more}

    @user_errors
    def batch_presets(self, table, extras) -> tuple:
        """Add every preset (with its paraphrases and neighbours) to the batch table."""
        if not self.engine.presets:
            raise Refused("This server has no presets for its model.")
        items = [BatchItem(EditRequest(p.subject, p.rewrite_prompt, p.counterfactual, p.attribute),
                           tuple(p.paraphrases), tuple(p.neighbours)) for p in self.engine.presets]
        present = {(str(r[0]).strip(), str(r[1]).strip()) for r in table_rows(table) if len(r) >= 2}
        items = [it for it in items if (it.request.subject, it.request.prompt) not in present]
        return self._append_facts(table, extras, items)

    @user_errors
    def batch_paste(self, text, table, extras) -> tuple:
        """Add the facts of pasted CSV or JSON text to the batch table; the text box is emptied."""
        text = text if isinstance(text, str) else ""
        if len(text) > self.limits.text_chars * 4 * self.limits.batch_facts:
            raise Refused("The pasted text is longer than a batch of facts can be; paste fewer rows.")
        items = parse_requests(text, max_items=self.limits.batch_facts)
        if not items:
            raise Refused("Nothing to add: paste CSV lines subject,relation prompt,new object[,old object].")
        return (*self._append_facts(table, extras, items), "")

    @user_errors
    def batch_upload(self, path, table, extras) -> tuple:
        """Add the facts of an uploaded CSV or JSON file (CounterFact cases keep their test prompts)."""
        if not path or not isinstance(path, str):
            raise Refused("Choose a CSV or JSON file of facts.")
        items = read_requests(path, max_bytes=min(self.limits.import_bytes, 1_000_000),
                              max_items=self.limits.batch_facts)
        if not items:
            raise Refused(f"{Path(path).name[:80]} holds no facts.")
        return self._append_facts(table, extras, items)

    @user_errors
    def write_batch(self, table, extras, project, visitor: Visitor | None, progress=gr.Progress()) -> Iterator[dict]:
        """Write the table's facts as one MEMIT edit on top of the visitor's edits; yields outputs by name:
        result, the history's (:meth:`_history`), progress."""
        visitor = visitor if visitor is not None else Visitor()
        hp = self.engine.hparams_for("memit")
        n_layers = self.engine.lm.n_layers
        ask = check_batch(self.limits, self.engine.count_tokens, n_layers, table=table, extras=extras,
                          project=project, hparams=hp, edits_applied=len(visitor.edits),
                          edits_mb=visitor.megabytes)
        for layer in hp.edit_layers(n_layers):
            self.engine.check_stats(layer)
        with self._visitors:
            previous, version = list(visitor.edits), visitor.version

        def work(lm, job) -> None:
            job.emit(write_batch(lm, ask.items, hparams=hp, previous=job.edits, project=ask.project,
                                 stats_spec=self.engine.stats_spec, progress=job.progress))

        def describe(step: Step) -> tuple[float, str]:
            return render.batch_progress(step.stage, step.fraction)

        stream = self.engine.stream(work, visitor=visitor, edits=previous, label="batch")
        for tag, result in self._drive(stream, progress, describe, "batch-progress"):
            if tag == "tick":
                yield self._tick(result)
                continue
            self._add_edit(visitor, previous, version, result.edit, "batch")
            yield {"result": display.batch_result(result), **self._history(visitor), "progress": ""}

    @user_errors
    def undo(self, visitor: Visitor | None) -> dict:
        """Drop the visitor's last edit; returns the history's outputs by name (:meth:`_history`)."""
        visitor = visitor if visitor is not None else Visitor()
        with self._visitors:
            if not visitor.edits:
                raise Refused("There is no edit to undo.")
            last = visitor.edits[-1]
            visitor.set_edits(visitor.edits[:-1])
        what = (f"a batch of {len(last.requests)} facts" if len(last.requests) > 1 else
                f"{last.request.text} → {last.request.target}")
        return self._history(visitor, f"Undid: {what}")

    @user_errors
    def reset(self, visitor: Visitor | None) -> dict:
        """Drop all of the visitor's edits."""
        visitor = visitor if visitor is not None else Visitor()
        with self._visitors:
            had = bool(visitor.edits)
            visitor.set_edits([])
        return self._history(visitor, "All edits removed: back to the original model." if had else None)

    @user_errors
    def import_edits(self, path, visitor: Visitor | None) -> dict:
        """Add the edits of an uploaded .safetensors file after checking that they fit this very model.

        Nothing here touches the model: the file's size is checked before it
        is opened, only the tensors its header names are read, each request is
        checked like a typed one, and the edits must have been computed on
        these weights (fingerprint) with shapes that fit.
        """
        visitor = visitor if visitor is not None else Visitor()
        if not path or not isinstance(path, str):
            raise Refused("Choose an edits file (.safetensors) exported from this app.")
        name = Path(path).name
        if not name.endswith(".safetensors"):
            raise Refused(f"{name[:80]} is not a .safetensors file. Import a file exported with 'Export edits' "
                          "(pickle files are never loaded).")
        room = self.limits.edits_per_visitor - len(visitor.edits)
        if room <= 0:
            raise self.limits.refuse("edits_per_visitor", "The number of your edits", len(visitor.edits) + 1,
                                     "Undo or reset some before importing.")
        loaded = load_edits(path, max_bytes=self.limits.import_bytes, max_edits=room, lm=self.engine.lm,
                            max_requests=self.limits.batch_facts)
        if not loaded:
            raise Refused(f"{name[:80]} holds no edits.")
        for i, edit in enumerate(loaded):
            for request in edit.requests:
                check_request(self.limits, self.engine.count_tokens, request, where=f"Edit {i + 1} of the file: ")
        check_edits(self.engine.lm, loaded)  # made for these weights, shapes fit (nothing is applied)
        megabytes = sum(a.nbytes for e in loaded for a in e.arrays().values()) / 1e6
        if visitor.megabytes + megabytes > self.limits.visitor_mb:
            raise self.limits.refuse("visitor_mb", "The size of your edits with this file in megabytes",
                                     f"{visitor.megabytes + megabytes:.1f}", "Undo or reset some first.")
        with self._visitors:
            visitor.set_edits(visitor.edits + loaded)
        return self._history(visitor, f"Imported {len(loaded)} edit{'s' if len(loaded) > 1 else ''}.")

    @user_errors
    def compare(self, prompt, max_new_tokens, sample, seed, visitor: Visitor | None,
                progress=gr.Progress()) -> Iterator[dict]:
        """Continue one free prompt with the original model and with the visitor's edits; yields outputs by name
        (comparison: HTML side by side, or the progress card while it runs)."""
        visitor = visitor if visitor is not None else Visitor()
        prompt, max_new_tokens, sample, seed = check_generation(
            self.limits, self.engine.count_tokens, prompt=prompt, max_new_tokens=max_new_tokens, sample=sample,
            seed=seed)

        def work(lm, job) -> None:
            def complete(which: str) -> str:
                return generate(lm, [prompt], max_new_tokens=max_new_tokens, sample=sample, seed=seed,
                                progress=lambda step, total: job.step(Step(which, step, total)))[0]

            with original_weights(lm):
                original = complete("original")
            job.emit((original, complete("edited") if job.edits else None, job.edits))

        def describe(step: Step) -> tuple[float, str]:
            return step.fraction, f"Generating with the {step.stage} model"

        stream = self.engine.stream(work, visitor=visitor, label="compare")
        for tag, item in self._drive(stream, progress, describe, "free-progress"):
            if tag == "tick":
                yield {} if item is None else {"comparison": item}  # the card stands where the comparison will be
                continue
            yield {"comparison": display.free_comparison(prompt, *item)}

    @user_errors
    def retrace_values(self, subject, relation, target) -> tuple:
        """Fill the trace panel with the edited fact (prompt, subject, new object) and switch to it."""
        request = check_request(self.limits, self.engine.count_tokens, EditRequest(subject, relation, target or "?"))
        return request.text, request.subject, request.target, gr.Tabs(selected="locate")
