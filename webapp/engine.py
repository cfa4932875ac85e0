"""The one model every visitor shares: its queue, lock, limits, deadlines and memo. No Gradio here.

A request reaches the model only through :meth:`Engine.stream`:

1. **Admission** (the caller's thread, instant): at most
   ``limits.waiting_per_visitor`` requests of one visitor and
   ``limits.queue_size`` of everyone are waiting or running; more are refused.
2. **Queue**: first come, first served. While it waits the request reports
   its place; stopped while waiting, it leaves without touching the model;
   waiting longer than ``limits.queue_wait_s`` turns it away.
3. **Work**, in its own thread, holding the lock: the visitor's edits are
   applied (``editing.applied``), and a guard checked before every
   transformer block and at every progress report stops the work when the
   visitor presses Stop or leaves, or when ``limits.deadline_s`` has passed.
   However it ends, the weights are the originals again, bit for bit, and the
   lock is free.

Example::

    engine = create_engine()                          # the embedded SmolLM2-135M, offline
    visitor = Visitor()                               # one per browser session (gr.State)
    for event in engine.stream(lambda lm, job: job.emit(predict(lm, prompt)), visitor=visitor):
        kind, *value = event                          # ("queue", ahead) | ("progress", stage, f) | ("item", x)
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import editing
from editing import EditRequest, applied, is_edited, load_hparams
from editing.hparams import METHODS, HyperParams
from editing.presets import PRESETS_PATH, Preset, load_presets
from editing.presets.shipped import PAGE_EDIT, shipped_comparison, shipped_trace
from editing.stats import StatsSpec, cached_layers
from tracing.average import shipped_average
from tracing import LoadedModel, TraceConfig, load_model
from tracing.loading import DEVICE_MAP_ENV, MAX_MEMORY_ENV
from tracing.backends import kernel_policy
from tracing.hooks import Hook, hooks
from tracing.models import DEFAULT_MODEL, parse_dtype
from tracing.loading import warm_up
from tracing.plots import heatmap
from tracing.preview import estimate
from tracing.prepare import with_precision
from tracing.workflow import NoMemo, Step, split_precision, trace_key

from .limits import Limits, Refused

log = logging.getLogger("locate-edit.engine")

MODEL_ENV = "LOCATE_EDIT_MODEL"
EDITORS = ("rome", "ft", "ft-l", "kn")  # the paper's single-fact editors, in the order the page shows them
MEMO_SIZE = 64  # results of the unedited model kept for the next visitors (traces, generations, edits)
POLL_S = 0.25  # how often a waiting or running request reports back (so Stop and disconnects act promptly)
# Engine.warm_up's prompt: as long as a typical visitor's, so that its batch is too (a preset is not one of them)
WARM_UP_PREVIEW = ("In the middle of the nineteenth century, the city of Paris was the capital of the country of",
                   "Paris")
ABANDONED_S = 15.0  # a request whose events nobody has read for this long was abandoned (its visitor left)


def comparison_key(method: str, request, layer, hparams, paraphrases, neighbours, max_new_tokens: int, sample: bool,
                   seed: int) -> tuple:
    """The memo key of an edit comparison of the unedited model, as the page asks for it."""
    return ("comparison", method, request, layer, hparams, tuple(paraphrases), tuple(neighbours), int(max_new_tokens),
            bool(sample), int(seed))


class Stopped(Exception):
    """The visitor stopped the request or left; the work ends at its next block or progress report."""


class DeadlineExceeded(ValueError):
    """The request held the model past its deadline; it was stopped and the weights restored."""


@dataclass
class Visitor:
    """One visitor's session (kept in ``gr.State``): their edits, applied only to their own requests.

    ``version`` changes whenever the edits change, so an edit request that
    ran while the visitor pressed Undo or Reset does not write over them.
    ``active`` counts this visitor's model requests waiting or running.
    """

    edits: list = field(default_factory=list)
    version: int = 0
    active: int = 0

    def set_edits(self, edits: Sequence[editing.Edit]) -> None:
        self.edits = list(edits)
        self.version += 1

    @property
    def megabytes(self) -> float:
        """Memory held by this visitor's edits (a fine-tuning edit holds a whole weight matrix)."""
        return sum(a.nbytes for e in self.edits for a in e.arrays().values()) / 1e6


@dataclass
class _Ticket:
    visitor: Visitor | None
    stop: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    seen: float = field(default_factory=time.monotonic)  # when the request's events were last read

    def ended(self) -> bool:
        """Stopped, or abandoned: nobody has read its events for ABANDONED_S (e.g. the page was closed and the
        server stopped iterating the handler without closing it)."""
        return self.stop.is_set() or time.monotonic() - self.seen > ABANDONED_S


class SharedMemo:
    """The engine's memo of the unedited model in one precision, as a request's work sees it (a
    :class:`tracing.workflow.Memo`, also callable as ``memo(key, compute)``)."""

    def __init__(self, engine: "Engine", precision: str):
        self._engine, self._precision = engine, precision

    def recall(self, key: Hashable):
        return self._engine.recall(key, self._precision)

    def remember(self, key: Hashable, value):
        return self._engine.remember(key, value, self._precision)

    def __call__(self, key: Hashable, compute: Callable[[], object]):
        value = self.recall(key)
        return self.remember(key, compute()) if value is None else value


class Job:
    """What a request's work uses: the edits applied for it, the memo, progress and results, and the checks of
    Stop and the deadline.

    ``edits`` are the visitor's edits that the engine applied before the work
    started (the same for every kind of request); work that computes a new
    edit passes them on as ``previous=`` (already applied, they are not applied
    again). ``memo`` shares results of the unedited model between requests
    (:class:`SharedMemo`); with edits applied it remembers nothing (:class:`NoMemo`).
    """

    def __init__(self, ticket: _Ticket, deadline: float, events: queue.Queue, memo, edits: Sequence = ()):
        self._ticket = ticket
        self.deadline = deadline
        self._events = events
        self.memo = memo
        self.edits = tuple(edits)

    def stop(self) -> None:
        """Ask the work to end at its next check (what closing the request's stream does)."""
        self._ticket.stop.set()

    def check(self) -> None:
        """Raise :class:`Stopped` or :class:`DeadlineExceeded` if the request must end now."""
        if self._ticket.ended():
            raise Stopped
        if time.monotonic() > self.deadline:
            raise DeadlineExceeded("deadline")

    def step(self, step: Step) -> None:
        """Report progress (a typed :class:`~tracing.workflow.Step`)."""
        self.check()
        self._events.put(("progress", step))

    def progress(self, stage: str, fraction: float) -> None:
        """Report progress the way :mod:`editing` reports it: ``progress(stage, fraction)``."""
        self.step(Step(stage, float(fraction)))

    def emit(self, item) -> None:
        self.check()
        self._events.put(("item", item))


@dataclass(frozen=True)
class Record:
    """How one request went: seconds waiting for the model, seconds holding it, and how it ended."""

    label: str
    waited: float
    ran: float
    outcome: str  # done | stopped | deadline | error | left (stopped while waiting) | turned away


class Engine:
    """The shared model, the queue and lock in front of it, its limits, presets and memo.

    ``precisions``: the precisions a trace may ask for; each is a copy of the
    model made once, on first use, and kept ("auto" is the model itself). By
    default only precisions whose copy is no larger than the model are offered.
    """

    def __init__(
        self,
        lm: LoadedModel,
        *,
        presets: Sequence[Preset] = (),
        presets_model: str = "",
        hparams: editing.ROMEHyperParams | None = None,
        limits: Limits | None = None,
        notice: str = "",
        workdir: str | Path | None = None,
        precisions: Sequence[str] | None = None,
    ):
        self.lm = lm
        self.presets = tuple(presets)
        self.presets_model = presets_model
        self.hparams = hparams if hparams is not None else load_hparams(lm)  # ROME's
        self.stats_spec = StatsSpec.from_hparams(self.hparams)
        self.default_layer = self.hparams.edit_layer(lm.n_layers)
        self.methods = tuple(m for m in EDITORS if m in METHODS)  # single-fact editors the page offers
        self._method_hparams: dict[str, HyperParams] = {"rome": self.hparams}
        self.limits = limits if limits is not None else Limits()
        self.notice = notice
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="locate-edit-"))
        self.fingerprint = lm.fingerprint  # taken now, on the original weights
        self.lock = threading.Lock()  # held while a request uses the model
        self._turns = threading.Condition()
        self._queue: deque[_Ticket] = deque()
        self._memo: OrderedDict = OrderedDict()
        self._shipped: dict = {}  # results computed in advance (editing.presets.shipped), never forgotten
        self._copies: dict[str, LoadedModel] = {"auto": lm}
        self.records: deque[Record] = deque(maxlen=10_000)  # the latest requests, for benchmarks and operators
        self.precisions = tuple(precisions) if precisions is not None else self._default_precisions()
        self._counter = copy.deepcopy(lm.tokenizer)  # for checks outside the lock (fast tokenizers are not reentrant)
        self._counter_lock = threading.Lock()
        self.average = shipped_average(lm)  # traces averaged over known facts, shipped for this model (or None)

    # -- cheap things, outside the lock -------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` as a prompt (special tokens included), without touching the model."""
        with self._counter_lock:
            return len(self._counter(text)["input_ids"])

    @property
    def waiting(self) -> int:
        """Requests waiting for the model or running now."""
        with self._turns:
            return len(self._queue)

    def hparams_for(self, method: str) -> HyperParams:
        """The settings of an edit method for this model (ROME's as given; the others from assets/hparams)."""
        if method not in self._method_hparams:
            self._method_hparams[method] = load_hparams(self.lm, method=method)
        return self._method_hparams[method]

    def default_layer_for(self, method: str) -> int | None:
        """Where a method edits by default; None for KN, which searches every layer for its neurons."""
        return None if method == "kn" else self.hparams_for(method).edit_layer(self.lm.n_layers)

    def stats_layers(self) -> list[int]:
        """Layers whose key statistics are ready on disk (an edit there needs no statistics pass)."""
        return cached_layers(self.lm, self.stats_spec)

    def check_stats(self, layer: int) -> None:
        """Refused when a layer has no statistics and the operator does not allow computing them on demand."""
        if self.limits.stats_on_demand or not self.hparams.mom2_adjustment or layer in self.stats_layers():
            return
        ready = ", ".join(map(str, self.stats_layers())) or "none"
        raise Refused(f"Layer {layer} has no key statistics on this server, and computing them here is switched off "
                      f"(limit stats_on_demand). Layers ready: {ready}. An operator can run "
                      f"`python -m editing.stats --layers {layer}` or allow it with --limit stats_on_demand=true.")

    def _default_precisions(self) -> tuple[str, ...]:
        """"auto", TF32 on a CUDA fp32 model (no copy), and copies no larger than the model (none when offloaded)."""
        if self.lm.offloaded:  # weights loaded for each pass by accelerate: there is nothing to copy
            return ("auto",)
        size = self.lm.dtype.itemsize
        tf32 = ("tf32",) if self.lm.device.type == "cuda" and self.lm.dtype == parse_dtype("fp32") else ()
        return ("auto", *tf32, *(name for name in ("fp32", "bf16", "fp16")
                                 if parse_dtype(name) != self.lm.dtype and parse_dtype(name).itemsize <= size))

    # -- the memo of the unedited model ---------------------------------------------------

    def memo(self, key: Hashable, compute: Callable[[], object]):
        """``compute()`` once per ``key`` for the *unedited* model, then remembered (the last MEMO_SIZE keys).

        Traces, generations, scores and edits of the original weights are
        deterministic (greedy or seeded), so in a class where everyone clicks
        the same preset only the first visitor waits. Only call it from a
        request's work with no edits applied.
        """
        value = self._recall(key)
        return self._remember(key, compute()) if value is None else value

    def recall(self, key: Hashable, precision: str = "auto"):
        """A result of the unedited model in ``precision`` remembered by a request's work, or shipped; else None.

        Cheap and lock-free: a handler asks before queueing, so a result that
        is already known never waits for the model.
        """
        return self._recall((precision, key))

    def _recall(self, key: Hashable):
        if key in self._shipped:
            return self._shipped[key]
        if key not in self._memo:
            return None
        self._memo.move_to_end(key)
        return self._memo[key]

    def _remember(self, key: Hashable, value):
        self._memo[key] = value
        while len(self._memo) > MEMO_SIZE:
            self._memo.popitem(last=False)
        return value

    def warm_up(self) -> float:
        """Pay the first visitor's one-time costs now; returns the seconds it took.

        One gradient preview of a 19-token prompt with the paper's settings
        (the preview's first pass, the memory its batch needs, the bf16 copy
        of the blocks where the CPU previews in bf16) and Plotly's first
        figure. Without it the first new prompt on the page waited about
        0.35 s longer for its preview (Eiffel Tower, 2 CPU cores: 0.85 s
        against 0.5 s).
        """
        started = time.perf_counter()
        with self.lock:
            previews = estimate(self.lm, *WARM_UP_PREVIEW, top_k=5)
        heatmap(previews[-1])
        seconds = time.perf_counter() - started
        log.info("Warmed up the preview in %.2f s", seconds)
        return seconds

    def preload_shipped(self) -> int:
        """Remember the presets' shipped exact traces and edit comparisons (never forgotten); how many fitted.

        They fit only the model they were computed on (fingerprint) and the
        page's default settings; anything else is computed as usual.
        """
        found = 0
        for p in self.presets:
            traces = shipped_trace(self.lm, p.prompt, p.subject, p.attribute, TraceConfig())
            if traces is not None:
                self._shipped[("auto", trace_key(p.prompt, p.subject, p.attribute, TraceConfig()))] = traces
                found += 1
            request = EditRequest(p.subject, p.rewrite_prompt, p.counterfactual, p.attribute)
            layer = self.default_layer
            comparison = shipped_comparison(
                self.lm, request, layer=layer, hparams=self.hparams, paraphrases=tuple(p.paraphrases),
                neighbours=tuple(p.neighbours), stats_spec=self.stats_spec, **PAGE_EDIT)
            if comparison is not None:
                self._shipped[("auto", comparison_key("rome", request, layer, self.hparams, p.paraphrases,
                                                      p.neighbours, **PAGE_EDIT))] = comparison
                found += 1
        log.info("%d shipped preset results fit %s", found, self.lm.name)
        return found

    # -- the queue and the lock -----------------------------------------------------------

    def model(self, precision: str = "auto") -> LoadedModel:
        """The model in ``precision`` (a copy made once and kept; TF32 uses the model itself). Hold the lock."""
        if precision not in self.precisions:
            raise Refused(f"Precision {precision!r} is not offered on this server; choose one of "
                          f"{', '.join(self.precisions)}.")
        weights, _ = split_precision(precision)
        if weights == "tf32":
            return self.lm  # float32 weights; the trace asks for TF32 matrix products (tracing.backends)
        if precision not in self._copies:
            log.info("Making a %s copy of %s (once)", precision, self.lm.name)
            # tracing's copy: a model dispatched by accelerate (device map) must not be converted in place
            self._copies[precision] = with_precision(self.lm, precision)
            if self.lm.device.type != "cpu":
                warm_up(self._copies[precision])  # the copy's first trace should not pay one-time GPU costs
        return self._copies[precision]

    def _admit(self, visitor: Visitor | None) -> _Ticket:
        with self._turns:
            if visitor is not None and visitor.active >= self.limits.waiting_per_visitor:
                raise self.limits.refuse("waiting_per_visitor", "The number of your requests waiting or running",
                                         visitor.active + 1, "Wait for them to finish, or press Stop.")
            if len(self._queue) >= self.limits.queue_size:
                raise Refused(f"The model is busy: {len(self._queue)} requests are waiting or running "
                              f"(limit queue_size {self.limits.queue_size}). Please try again in a minute.")
            ticket = _Ticket(visitor)
            self._queue.append(ticket)
            if visitor is not None:
                visitor.active += 1
            return ticket

    def _leave(self, ticket: _Ticket) -> None:
        with self._turns:
            if ticket in self._queue:
                self._queue.remove(ticket)
                if ticket.visitor is not None:
                    ticket.visitor.active = max(0, ticket.visitor.active - 1)
            self._turns.notify_all()

    def _ahead(self, ticket: _Ticket) -> int:
        with self._turns:
            return self._queue.index(ticket) if ticket in self._queue else 0

    def _guard(self, lm: LoadedModel, job: Job) -> list[Hook]:
        """A check of Stop and the deadline before every transformer block's forward pass."""

        def check(module, args, kwargs):
            job.check()

        return [Hook(lm.module_name("hidden", layer), check, pre=True) for layer in range(lm.n_layers)]

    def stream(
        self,
        work: Callable[[LoadedModel, Job], None],
        *,
        visitor: Visitor | None = None,
        edits: Sequence[editing.Edit] | None = None,
        precision: str = "auto",
        label: str = "request",
    ) -> Iterator[tuple]:
        """Run ``work(lm, job)`` with the visitor's edits applied, holding the model; yield its events.

        ``edits``: the edits to apply, when the caller took the visitor's
        list itself (None: ``visitor.edits`` as they are now); ``job.edits``
        hands them to the work. ``precision``: what the visitor asked for
        (:func:`tracing.workflow.split_precision` says which copy of the weights
        that is). Yields ("queue", requests_ahead) while waiting, then
        ("progress", step) with a :class:`~tracing.workflow.Step` and ("item",
        value) as the work reports through its :class:`Job`. Closing the generator (the visitor pressed Stop or left)
        stops the work at its next block or report; the work's exception
        (ValueError for bad input, :class:`DeadlineExceeded`, ...) is raised
        here. The weights are restored and the lock released in every case,
        by the work's own thread, even if nobody consumes this generator.
        Each request leaves a :class:`Record` in :attr:`records`.
        """
        ticket = self._admit(visitor)
        edits = list(edits if edits is not None else visitor.edits if visitor is not None else ())
        events: queue.Queue = queue.Queue()
        worker = threading.Thread(target=self._run, args=(ticket, work, edits, precision, label, events),
                                  name="locate-edit-model", daemon=True)
        worker.start()
        try:
            yield from self._relay(ticket, events)
        finally:
            ticket.stop.set()

    def _wait_turn(self, ticket: _Ticket, admitted: float) -> bool:
        """Wait until ``ticket`` is first in the queue (True), or it ended while waiting (False)."""
        with self._turns:
            while self._queue[0] is not ticket:
                if ticket.ended():
                    return False
                if time.monotonic() - admitted > self.limits.queue_wait_s:
                    raise self.limits.refuse("queue_wait_s", "The time this request waited for the model",
                                             f"{time.monotonic() - admitted:.0f} s", "Please try again later.")
                self._turns.wait(POLL_S)
        return True

    def _run(self, ticket: _Ticket, work, edits: list, precision: str, label: str, events: queue.Queue) -> None:
        """The request's own thread: wait for its turn, then run ``work`` holding the lock with ``edits`` applied."""
        admitted = time.monotonic()
        outcome, began = "left", None
        try:
            if not self._wait_turn(ticket, admitted):
                return
            with self.lock:
                if ticket.ended():
                    return  # stopped or abandoned while waiting: the model is never touched
                ticket.started, began = True, time.monotonic()
                lm = self.model(precision)
                memo = SharedMemo(self, precision) if not edits else NoMemo()  # edited results are never shared
                job = Job(ticket, time.monotonic() + self.limits.deadline_s, events, memo, edits)
                assert not is_edited(lm), "a previous request left edits applied"
                with (applied(lm, edits), hooks(lm.model, *self._guard(lm, job)),
                      kernel_policy(lm.device, dtype=lm.dtype)):  # on CUDA: kernels without per-shape plans
                    work(lm, job)
                outcome = "done"
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer (_relay)
            outcome = ("stopped" if isinstance(exc, Stopped) else "deadline" if isinstance(exc, DeadlineExceeded)
                       else "turned away" if isinstance(exc, Refused) else "error")
            events.put(("error", exc))
        finally:
            self._leave(ticket)
            now = time.monotonic()
            self.records.append(Record(label, (began or now) - admitted, now - began if began else 0.0, outcome))
            events.put(("done", None))

    def _relay(self, ticket: _Ticket, events: queue.Queue) -> Iterator[tuple]:
        """The work's events for the consumer, with the queue's place or a heartbeat whenever none came."""
        while True:
            ticket.seen = time.monotonic()  # the consumer is here: the request is not abandoned
            try:
                tag, *value = events.get(timeout=POLL_S)
            except queue.Empty:
                yield ("queue", self._ahead(ticket)) if not ticket.started else ("progress", None)  # a heartbeat
                continue
            if tag == "done":
                return
            if tag == "error":
                if isinstance(value[0], DeadlineExceeded):
                    raise DeadlineExceeded(
                        f"This request was stopped after its {self.limits.deadline_s:g} s deadline (limit "
                        f"deadline_s); the model is back to its original weights. Ask for less (fewer samples, "
                        f"a shorter prompt, the quick trace) or try again when the server is quieter. An operator "
                        f"can raise it with --limit deadline_s=N.") from None
                raise value[0]
            yield (tag, *value)

    def remember(self, key: Hashable, value, precision: str = "auto"):
        """Keep a result of the unedited model (see :meth:`recall`)."""
        return self._remember((precision, key), value)

    def call(self, fn: Callable[[LoadedModel], object], *, visitor: Visitor | None = None,
             edits: Sequence[editing.Edit] | None = None, label: str = "call"):
        """``fn(lm)`` through :meth:`stream` (queue, lock, edits, deadline); its return value."""
        out = []
        for event in self.stream(lambda lm, job: job.emit(fn(lm)), visitor=visitor, edits=edits, label=label):
            if event[0] == "item":
                out.append(event[1])
        return out[0] if out else None

    # -- files for downloads --------------------------------------------------------------

    def static_file(self, name: str, text: str) -> Path:
        """A download that every visitor shares and that is never cleaned up (e.g. the shipped averages)."""
        path = self.workdir / "static" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

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
    limits: Limits | None = None,
) -> Engine:
    """Load the model (``model``, else $LOCATE_EDIT_MODEL, else the embedded default) and its presets.

    $LOCATE_EDIT_DEVICE_MAP and $LOCATE_EDIT_MAX_MEMORY, where set, spread its
    blocks over devices (``device_map``/``max_memory`` of :func:`tracing.loading.load_model`).

    Example::

        engine = create_engine()                   # SmolLM2-135M, offline
        engine = create_engine("gpt2", device="cpu", limits=Limits(deadline_s=60))

    If a named model cannot be loaded and ``fallback`` is true, the embedded
    default is loaded instead and :attr:`Engine.notice` says why (the page
    shows it); otherwise the ValueError/LookupError propagates.
    """
    name = model or os.environ.get(MODEL_ENV) or None
    notice = ""
    sharding = dict(device_map=os.environ.get(DEVICE_MAP_ENV), max_memory=os.environ.get(MAX_MEMORY_ENV))
    try:
        lm = load_model(name, device=device, dtype=dtype, **sharding)  # $LOCATE_EDIT_DEVICE_MAP: blocks spread
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
    engine = Engine(lm, presets=presets, presets_model=presets_model, notice=notice,
                    limits=limits if limits is not None else Limits.from_env())
    engine.preload_shipped()
    engine.warm_up()
    return engine

