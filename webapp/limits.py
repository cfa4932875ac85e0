"""Every bound on a page request, in one place, checked before the shared model is touched.

A public Space or a classroom sends whatever a textbox, an API client or a
script can send. Each request is checked here first - its size, then its
estimated cost - in the request's own thread, with only the tokenizer; a
refused request names the limit, the value it got and how an operator raises
it, and never waits for or touches the model.

Defaults fit the embedded SmolLM2-135M on 2 CPU cores (the paper's trace of
the 10-token Eiffel Tower prompt costs 9,000 units and takes about a minute
there). Operators raise them per limit, e.g. on a GPU Space::

    python app.py --limit trace_cost=200000 --limit deadline_s=600
    LOCATE_EDIT_LIMIT_TRACE_COST=200000 python app.py

Example::

    limits = Limits.from_env().with_overrides(["samples=20"])
    prompt = limits.text(prompt, "The prompt")              # stripped, or Refused
    limits.at_most("trace_cost", cost, "This trace's cost")
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from editing.batch import BatchItem
from editing.edit import EditRequest
from tracing.result import CORRUPTIONS, KINDS, METRICS, TraceConfig

ENV_PREFIX = "LOCATE_EDIT_LIMIT_"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # control characters other than tab and newlines


class Refused(ValueError):
    """A request refused before it reached the model: too large, too costly, malformed, or the queue is full."""


@dataclass(frozen=True)
class Limits:
    """Bounds on page requests. Each field is one limit; :meth:`refuse` words its message."""

    text_chars: int = 300  # characters of one prompt, subject, object or test-prompt line (textboxes too)
    trace_tokens: int = 40  # tokens of a traced prompt
    samples: int = 50  # corrupted copies of one trace
    trace_cost: int = 30_000  # traced rows x layers x samples x kinds (Eiffel prompt, paper settings: 9,000)
    subject_tokens: int = 16  # tokens of a subject
    object_tokens: int = 8  # tokens of a new or old object (or an expected/contrast answer)
    relation_tokens: int = 32  # tokens of the rewrite prompt with its subject
    test_lines: int = 5  # paraphrase lines, and neighbour lines, of one edit
    line_tokens: int = 40  # tokens of one test prompt or free prompt
    new_tokens: int = 60  # tokens generated per prompt
    edit_cost: int = 3_000_000  # token-layer passes of one edit's optimisation (see edit_work); ROME here: ~370,000
    batch_facts: int = 12  # facts in one "Edit many facts" batch (MEMIT): the presets fit
    batch_cost: int = 6_000_000  # token-layer passes of one batch's optimisation (see edit_work); 12 presets: ~3.4 M
    sweep_layers: int = 10  # ROME edits of one "Which layer to edit?" sweep (every third layer of the default model)
    sweep_cost: int = 6_000_000  # token-layer passes of one sweep's edits together (see edit_work); Eiffel, 10: ~4 M
    edits_per_visitor: int = 20  # edits one visitor can have applied (typed and imported)
    visitor_mb: float = 40.0  # megabytes of one visitor's edits (a fine-tuning edit of the default model: 3.5 MB)
    import_bytes: int = 40_000_000  # size of an uploaded edits file (Gradio refuses larger uploads while receiving)
    waiting_per_visitor: int = 2  # model requests of one visitor waiting or running at once
    queue_size: int = 16  # model requests waiting or running, all visitors together
    deadline_s: float = 300.0  # seconds a request may hold the model before it is stopped and undone
    queue_wait_s: float = 900.0  # seconds a request may wait for the model before it is turned away
    stats_on_demand: bool = True  # may a request compute a layer's key statistics (bounded by the deadline)?

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"Limit {f.name} must be a positive number, not {value!r}.")

    # -- building ------------------------------------------------------------------

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Limits":
        """Defaults, changed by ``LOCATE_EDIT_LIMIT_<NAME>`` variables (e.g. LOCATE_EDIT_LIMIT_DEADLINE_S=600)."""
        environ = os.environ if environ is None else environ
        pairs = [f"{key[len(ENV_PREFIX):].lower()}={value}" for key, value in environ.items()
                 if key.startswith(ENV_PREFIX)]
        return cls().with_overrides(pairs)

    def with_overrides(self, pairs: Iterable[str]) -> "Limits":
        """A copy with ``name=value`` pairs applied (from ``--limit`` flags); ValueError names a bad one."""
        changes = {}
        types = {f.name: f.type for f in dataclasses.fields(self)}
        for pair in pairs:
            name, sep, raw = str(pair).partition("=")
            name = name.strip().lower()
            if not sep or name not in types:
                raise ValueError(f"Unknown limit {pair!r}: use NAME=VALUE with NAME one of {', '.join(types)}.")
            raw = raw.strip()
            try:
                if types[name] == "bool":
                    if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError
                    changes[name] = raw.lower() in ("1", "true", "yes", "on")
                elif types[name] == "int":
                    parsed = float(raw)
                    if not parsed.is_integer():
                        raise ValueError
                    changes[name] = int(parsed)
                else:
                    changes[name] = float(raw)
            except ValueError:
                raise ValueError(f"Limit {name} needs a {types[name]} value, not {raw!r}.") from None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- refusing --------------------------------------------------------------------

    def refuse(self, name: str, what: str, got, hint: str = "") -> Refused:
        """The error for ``what`` (the value ``got``) over limit ``name``: what, the bound, the fix, how to raise it."""
        allowed = getattr(self, name)
        allowed_text = f"{allowed:g}" if isinstance(allowed, float) else f"{allowed:,}"
        got_text = f"{got:,}" if isinstance(got, int) else str(got)
        hint = f" {hint.strip()}" if hint else ""
        return Refused(
            f"{what} is {got_text}; this server allows at most {allowed_text} (limit {name}).{hint} "
            f"An operator can raise it with --limit {name}=N or {ENV_PREFIX}{name.upper()}=N."
        )

    def at_most(self, name: str, value: int | float, what: str, hint: str = "") -> None:
        """Refused when ``value`` exceeds limit ``name``."""
        if value > getattr(self, name):
            raise self.refuse(name, what, value, hint)

    def text(self, value, what: str, *, required: bool = True, example: str = "") -> str:
        """``value`` as a stripped string within text_chars, without control characters; "" if optional and empty."""
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise Refused(f"{what} must be text, not {type(value).__name__}.")
        if len(value) > self.text_chars:
            raise self.refuse("text_chars", f"{what}'s length in characters", len(value), "Shorten it.")
        if _CONTROL.search(value):
            raise Refused(f"{what} contains control characters (such as NUL); remove them and try again.")
        value = value.strip()
        if required and not value:
            example = f", e.g. {example!r}" if example else ""
            raise Refused(f"{what} is empty. Enter it{example}.")
        return value

    def lines(self, value, what: str) -> list[str]:
        """Non-empty lines of a multi-line box: at most test_lines of them, each checked like :meth:`text`."""
        if value is None:
            return []
        if not isinstance(value, str):
            raise Refused(f"{what} must be text, one prompt per line.")
        lines = [line for line in value.splitlines() if line.strip()]
        self.at_most("test_lines", len(lines), f"The number of {what.lower()}", "Remove some lines.")
        return [self.text(line, f"A line of {what.lower()}") for line in lines]


def number(value, what: str, *, low: float, high: float, integer: bool = False) -> float | int:
    """``value`` (a number or numeric text from a form or an API) within [low, high], else Refused."""
    if isinstance(value, bool) or value is None:
        raise Refused(f"{what} must be a number.")
    try:
        number_ = float(value)
    except (TypeError, ValueError):
        raise Refused(f"{what} must be a number, not {str(value)[:40]!r}.") from None
    if not math.isfinite(number_):
        raise Refused(f"{what} must be a finite number, not {number_}.")
    if integer and number_ != int(number_):
        raise Refused(f"{what} must be a whole number, not {number_:g}.")
    if not low <= number_ <= high:
        raise Refused(f"{what} must be between {low:g} and {high:g}, not {number_:g}.")
    return int(number_) if integer else number_


def choice(value, what: str, options: Iterable[str]) -> str:
    """``value`` if it is one of ``options``, else Refused listing them."""
    options = tuple(options)
    if not isinstance(value, str) or value not in options:
        raise Refused(f"{what} must be one of {', '.join(options)}; got {str(value)[:40]!r}.")
    return value


# ---------------------------------------------------------------------------
# Whole requests: sizes first, then the estimated cost; only the tokenizer is used

TokenCounter = Callable[[str], int]
SEED_MAX = 2**31 - 1


@dataclass(frozen=True)
class TraceAsk:
    """A trace request that passed every check: what to hand to :func:`tracing.iter_trace`."""

    prompt: str
    subject: str
    answer: str | None
    config: TraceConfig
    precision: str
    cost: int


@dataclass(frozen=True)
class EditAsk:
    """An edit request that passed every check: what to hand to :func:`editing.edit_and_compare`."""

    request: EditRequest
    layer: int | None
    paraphrases: tuple[str, ...]
    neighbours: tuple[str, ...]
    max_new_tokens: int
    sample: bool
    seed: int
    cost: int


def _flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise Refused(f"{what} must be true or false, not {str(value)[:20]!r}.")
    return value


def check_trace(limits: Limits, count: TokenCounter, n_layers: int, *, prompt, subject, answer, samples, noise,
                window, corruption, metric, contrast, seed, precision, fast, precisions: Iterable[str]) -> TraceAsk:
    """Check a trace request from the page or the API; Refused (a ValueError) says what to change."""
    prompt = limits.text(prompt, "The prompt", example="The Eiffel Tower is located in the city of")
    subject = limits.text(subject, "The subject", example="The Eiffel Tower")
    if subject not in prompt:
        raise Refused(f"The subject {subject[:60]!r} does not occur in the prompt. Copy it from the prompt exactly "
                      "(case and spelling matter).")
    answer = limits.text(answer, "The expected answer", required=False) or None
    contrast = limits.text(contrast, "The contrast answer", required=False) or None
    samples = number(samples, "Samples", low=1, high=1e12, integer=True)
    limits.at_most("samples", samples, "Samples")
    noise = number(noise, "Noise", low=1e-3, high=100)
    window = number(window, "Window", low=1, high=n_layers, integer=True)
    corruption = choice(corruption, "Corruption", CORRUPTIONS)
    metric = choice(metric, "Metric", METRICS)
    if metric == "logit_diff" and not contrast:
        raise Refused("The logit_diff metric compares the answer with a contrast answer: enter one (e.g. 'Rome').")
    seed = number(seed, "Seed", low=0, high=SEED_MAX, integer=True)
    precision = choice(precision, "Precision", precisions)
    fast = _flag(fast, "Quick trace")
    tokens = count(prompt)
    limits.at_most("trace_tokens", tokens, "The prompt's length in tokens", "Shorten the prompt.")
    subject_tokens = count(subject)
    limits.at_most("subject_tokens", subject_tokens, "The subject's length in tokens", "Shorten the subject.")
    for name, value in (("The expected answer", answer), ("The contrast answer", contrast)):
        if value:
            limits.at_most("object_tokens", count(value), f"{name}'s length in tokens", "Shorten it.")
    rows = min(tokens, subject_tokens + 1) if fast else tokens
    kinds = len(KINDS)
    cost = rows * n_layers * samples * kinds
    most = limits.trace_cost // max(1, rows * n_layers * kinds)
    limits.at_most("trace_cost", cost, f"This trace's cost ({rows} rows × {n_layers} layers × {samples} samples × "
                   f"{kinds} kinds)", f"Use at most {most} samples, the quick trace, or a shorter prompt."
                   if most >= 1 else "Use the quick trace or a shorter prompt.")
    config = TraceConfig(samples=samples, noise=noise, window=window, corruption=corruption, metric=metric,
                         contrast=contrast, seed=seed, tokens="subject_last" if fast else "all")
    return TraceAsk(prompt, subject, answer, config, precision, cost)


def check_request(limits: Limits, count: TokenCounter, request: EditRequest, where: str = "") -> EditRequest:
    """An :class:`EditRequest` (typed or imported) checked for sizes and form; ValueError says what to change."""
    subject = limits.text(request.subject, f"{where}The subject", example="The Eiffel Tower")
    relation = limits.text(request.prompt, f"{where}The relation prompt", example="{} is located in the city of")
    target = limits.text(request.target, f"{where}The new object", example="Rome")
    old = limits.text(request.target_true, f"{where}The old object", required=False) or None
    checked = EditRequest(subject, relation, target, old)
    checked.validate()
    limits.at_most("subject_tokens", count(subject), f"{where}The subject's length in tokens", "Shorten it.")
    limits.at_most("relation_tokens", count(checked.text), f"{where}The rewrite prompt's length in tokens",
                   "Shorten the relation.")
    for name, value in (("new", target), ("old", old)):
        if value:
            limits.at_most("object_tokens", count(value), f"{where}The {name} object's length in tokens",
                           "Shorten it.")
    return checked


def edit_work(method: str, hparams, width: int, n_layers: int, layer: int | None,
              retries: int | None = None) -> tuple[int, str]:
    """An edit's estimated work in token-layer passes (a backward pass counts as two), and how it was counted.

    ROME optimises v* on the templated prompts through the layers above the
    edit layer (counted with its ``retries`` of twice the steps each, for an
    edit that did not take: by default one), and MEMIT each fact's target the same way above its
    last layer (the keys and updates of its range cost little beside it); FT
    and FT+L run the whole model per step; KN integrates gradients for every
    searched layer through the whole model.
    """
    if method in ("rome", "memit"):
        contexts = sum(count for _, count in hparams.context_templates) + 1
        retries = (1 if method == "rome" else 0) if retries is None else retries
        steps, layers = hparams.v_num_grad_steps * (2 ** (retries + 1) - 1), n_layers - (layer or 0)
        return width * contexts * steps * layers * 3, f"{width} tokens × {contexts} contexts × {steps} steps × " \
                                                       f"{layers} layers × 3"
    if method in ("ft", "ft-l"):
        return width * hparams.num_steps * n_layers * 3, f"{width} tokens × {hparams.num_steps} steps × " \
                                                          f"{n_layers} layers × 3"
    searched = len(hparams.search_layers(n_layers)) if layer is None else 1
    return width * hparams.steps * searched * n_layers * 3, f"{width} tokens × {hparams.steps} steps × " \
                                                             f"{searched} searched layers × {n_layers} layers × 3"


def _check_room(limits: Limits, edits_applied: int, edits_mb: float, what: str, why: str = "") -> None:
    """Refused when the visitor already has as many edits, or as many megabytes of them, as allowed."""
    limits.at_most("edits_per_visitor", edits_applied + 1, f"The number of your edits with {what}",
                   "Undo or reset some first.")
    if edits_mb >= limits.visitor_mb:
        raise limits.refuse("visitor_mb", "The size of your edits in megabytes", f"{edits_mb:.1f}",
                            f"Undo or reset some first{why}.")


def check_edit(limits: Limits, count: TokenCounter, n_layers: int, *, subject, relation, target, old, layer,
               paraphrases, neighbours, max_new_tokens, sample, seed, edits_applied: int, method: str = "rome",
               hparams, edits_mb: float = 0.0) -> EditAsk:
    """Check an edit request from the page or the API; Refused (a ValueError) says what to change.

    ``layer`` None lets the method choose (KN searches every layer); ``edits_mb`` is the size of the
    visitor's edits so far.
    """
    _check_room(limits, edits_applied, edits_mb, "this one", " (fine-tuning edits are large)")
    request = check_request(limits, count, EditRequest(subject, relation, target, old))
    if layer is not None:
        layer = number(layer, "The edit layer", low=0, high=n_layers - 1, integer=True)
    para = limits.lines(paraphrases, "Paraphrases")
    neigh = limits.lines(neighbours, "Neighbour prompts")
    for line in (*para, *neigh):
        limits.at_most("line_tokens", count(line), f"The test prompt {line[:40]!r}'s length in tokens",
                       "Shorten it.")
    max_new_tokens = number(max_new_tokens, "New tokens", low=1, high=1e12, integer=True)
    limits.at_most("new_tokens", max_new_tokens, "New tokens")
    sample = _flag(sample, "Sample")
    seed = number(seed, "The sampling seed", low=0, high=SEED_MAX, integer=True)
    width = count(request.text) + count(request.target)
    cost, counted = edit_work(method, hparams, width, n_layers, layer)
    limits.at_most("edit_cost", cost, f"This edit's cost ({counted})", "Shorten the prompt or edit a later layer.")
    return EditAsk(request, layer, tuple(para), tuple(neigh), max_new_tokens, sample, seed, cost)


@dataclass(frozen=True)
class BatchAsk:
    """A batch that passed every check: what to hand to :func:`editing.batch.write_batch`."""

    items: tuple[BatchItem, ...]
    project: bool
    cost: int


BATCH_COLUMNS = ("subject", "relation prompt", "new object", "old object")


def extras_key(request: EditRequest) -> str:
    """Where a fact's test prompts are kept in the page's state: its subject and relation prompt."""
    return f"{request.subject}\x1f{request.prompt}"


def table_rows(table) -> list[list]:
    """The rows of a table from the page (a list of rows, or {"data": rows} from an API client)."""
    if table is None:
        return []
    if isinstance(table, dict):
        table = table.get("data")
    if hasattr(table, "values") and hasattr(table, "columns"):  # a pandas DataFrame
        table = table.values.tolist()
    if not isinstance(table, (list, tuple)) or not all(isinstance(row, (list, tuple)) for row in table):
        raise Refused("The facts must be a table: rows of subject, relation prompt, new object, old object.")
    return [list(row) for row in table]


def check_batch(limits: Limits, count: TokenCounter, n_layers: int, *, table, extras, project, hparams,
                edits_applied: int, edits_mb: float = 0.0) -> BatchAsk:
    """Check an "Edit many facts" request: its rows (empty ones skipped), test prompts per fact, size and cost.

    ``extras`` maps "subject\\x1fprompt" to {"paraphrases": [...], "neighbours": [...]} for facts that come
    with test prompts (presets, CounterFact cases); other facts are scored on their rewrite prompt alone.
    """
    _check_room(limits, edits_applied, edits_mb, "this batch")
    rows = table_rows(table)
    limits.at_most("batch_facts", len(rows), "The number of rows in this batch", "Remove some rows.")
    filled = [(i, row) for i, row in enumerate(rows, start=1)
              if any(isinstance(cell, str) and cell.strip() for cell in row)]
    if not filled:
        raise Refused("The table has no facts: type a subject, a relation prompt with {} and a new object per row, "
                      "paste CSV, upload a file, or add the presets.")
    if extras is not None and not isinstance(extras, dict):
        raise Refused("The facts' test prompts must be a mapping from fact to prompts.")
    extras = extras or {}
    items, seen, cost = [], {}, 0
    for i, row in filled:
        cells = [cell if isinstance(cell, str) or cell is None else str(cell) for cell in row[:4]]
        cells += [None] * (4 - len(cells))
        if len(row) > 4 and any(isinstance(c, str) and c.strip() for c in row[4:]):
            raise Refused(f"Row {i} has more than four cells: subject, relation prompt, new object, old object.")
        where = f"Row {i}: "
        try:
            request = check_request(limits, count, EditRequest(cells[0] or "", cells[1] or "", cells[2] or "",
                                                               (cells[3] or "").strip() or None))
        except ValueError as exc:
            raise Refused(where + str(exc)) from None
        key = (request.subject, request.prompt)
        if key in seen:
            raise Refused(f"Row {i} repeats the subject and relation of row {seen[key]}; a batch writes each fact once.")
        seen[key] = i
        extra = extras.get(extras_key(request)) or {}
        if not isinstance(extra, dict):
            raise Refused(f"{where}its test prompts must be a mapping with paraphrases and neighbours.")
        prompts = []
        for name in ("paraphrases", "neighbours"):
            lines = extra.get(name) or []
            if not isinstance(lines, list) or not all(isinstance(x, str) and "\n" not in x for x in lines):
                raise Refused(f"{where}its {name} must be a list of one-line prompts.")
            checked = limits.lines("\n".join(lines), f"{name.capitalize()} of row {i}")
            for line in checked:
                limits.at_most("line_tokens", count(line), f"The test prompt {line[:40]!r}'s length in tokens",
                               "Shorten it.")
            prompts.append(tuple(checked))
        items.append(BatchItem(request, *prompts))
        width = count(request.text) + count(request.target)
        cost += edit_work("memit", hparams, width, n_layers, hparams.edit_layer(n_layers))[0]
    limits.at_most("batch_cost", cost, f"This batch's cost ({len(items)} facts' targets, token-layer passes)",
                   "Write fewer facts at once, or in several batches.")
    return BatchAsk(tuple(items), _flag(project, "Keep earlier edits"), cost)


@dataclass(frozen=True)
class SweepAsk:
    """A "Which layer to edit?" request that passed every check: what to hand to :func:`editing.evaluation.sweep.layer_sweep`."""

    request: EditRequest
    layers: tuple[int, ...]
    paraphrases: tuple[str, ...]
    neighbours: tuple[str, ...]
    cost: int


def check_sweep(limits: Limits, count: TokenCounter, n_layers: int, *, traced, target, every, paraphrases,
                neighbours, hparams) -> SweepAsk:
    """Check a layer sweep of the traced fact (``traced``: the Locate tab's state) with a new object.

    The fact's prompt becomes the rewrite prompt (its subject replaced by
    ``{}``) and its traced answer the old object; ROME edits every
    ``every``-th layer from 0, each alone and undone: at most sweep_layers of
    them, and sweep_cost of work together.
    """
    if not isinstance(traced, dict) or not all(isinstance(traced.get(k), str) for k in ("prompt", "subject", "answer")):
        raise Refused("Trace a fact first: the sweep edits the traced fact at each layer.")
    subject = traced["subject"]
    relation = traced["prompt"].replace(subject, "{}", 1)
    request = check_request(limits, count, EditRequest(subject, relation, target, traced["answer"].strip() or None))
    if request.target_true is None:
        raise Refused("The traced answer is empty; trace the fact with an expected answer first.")
    if request.target.strip() == request.target_true.strip():
        raise Refused("The new object is the traced answer; enter a different object to write.")
    every = number(every, "Every k-th layer", low=1, high=n_layers, integer=True)
    layers = tuple(range(0, n_layers, every))
    limits.at_most("sweep_layers", len(layers), f"The number of layers to edit (every k = {every} of {n_layers} layers)",
                   f"Use every {math.ceil(n_layers / limits.sweep_layers)}th layer or more.")
    para = limits.lines(paraphrases, "Paraphrases")
    neigh = limits.lines(neighbours, "Neighbour prompts")
    for line in (*para, *neigh):
        limits.at_most("line_tokens", count(line), f"The test prompt {line[:40]!r}'s length in tokens",
                       "Shorten it.")
    width = count(request.text) + count(request.target)
    cost = sum(edit_work("rome", hparams, width, n_layers, layer, retries=0)[0] for layer in layers)  # no retries
    limits.at_most("sweep_cost", cost, f"This sweep's cost ({len(layers)} edits, token-layer passes)",
                   "Edit fewer layers (a larger k) or shorten the prompt.")
    return SweepAsk(request, layers, tuple(para), tuple(neigh), cost)


def check_generation(limits: Limits, count: TokenCounter, *, prompt, max_new_tokens, sample, seed) -> tuple:
    """Check a free completion request: (prompt, max_new_tokens, sample, seed)."""
    prompt = limits.text(prompt, "The prompt", example="The Eiffel Tower is in")
    limits.at_most("line_tokens", count(prompt), "The prompt's length in tokens", "Shorten it.")
    max_new_tokens = number(max_new_tokens, "New tokens", low=1, high=1e12, integer=True)
    limits.at_most("new_tokens", max_new_tokens, "New tokens")
    return prompt, max_new_tokens, _flag(sample, "Sample"), number(seed, "The sampling seed", low=0, high=SEED_MAX,
                                                                    integer=True)
