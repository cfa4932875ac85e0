"""The trace workflow the page runs, as a generator of small typed events that any consumer can read.

:func:`trace_events` is what a visitor sees happen, in order: a first-order
preview of the maps where it was measured trustworthy (about a second), the
model's top-5 next tokens, the exact rows as forward passes complete them
(the subject's last token and the last token first), and the finished maps.
The page and a notebook consume the same events; only how they draw them
differs.

Example::

    for event in trace_events(lm, "The Eiffel Tower is located in the city of", "The Eiffel Tower"):
        match event:
            case Estimate(results, verdict): ...      # previews, kind by kind (may be empty)
            case Prediction(top): print(top)           # [(' Paris', 0.70), ...]
            case Rows(result): draw(result)            # a snapshot; rows not computed yet are NaN
            case Finished(results): hidden, mlp, attn = results

A progress callback gets :class:`Step` values (typed, never a packed string).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Protocol

from .models import LoadedModel
from .preview import estimate, preview_verdict
from .result import KINDS, TraceConfig, TraceResult
from .trace import iter_trace, predict

__all__ = ["Estimate", "Event", "Finished", "Memo", "NoMemo", "Prediction", "Rows", "Step", "split_precision", "trace_events",
           "trace_key"]



class Memo(Protocol):
    """Results of the unedited model kept between requests (the page shares them between visitors)."""

    def recall(self, key: Hashable) -> object | None: ...

    def remember(self, key: Hashable, value: object) -> object: ...


class NoMemo:
    """Remembers nothing: every result is computed (a model with edits applied, or a one-off run)."""

    def recall(self, key: Hashable) -> None:
        return None

    def remember(self, key: Hashable, value: object) -> object:
        return value

    def __call__(self, key: Hashable, compute: Callable[[], object]) -> object:
        return compute()


@dataclass(frozen=True)
class Step:
    """How far a long computation is: ``stage`` (e.g. "rows", "optimising"), ``done`` of ``total`` units.

    ``detail`` names what is being worked on (a method, a layer); work made
    of several such parts (every editor in turn) says which with ``index``
    of ``count``. ``fraction`` is the stage's own share done.
    """

    stage: str
    done: float
    total: float = 1.0
    detail: str = ""
    index: int = 0
    count: int = 1

    @property
    def fraction(self) -> float:
        return min(max(self.done / self.total, 0.0), 1.0) if self.total else 0.0


@dataclass(frozen=True)
class Estimate:
    """First-order previews of the kinds whose estimate was measured good (``verdict``; None: never measured)."""

    results: tuple[TraceResult, ...]
    verdict: dict[str, bool] | None


@dataclass(frozen=True)
class Prediction:
    """The model's top next tokens after the prompt, with their probabilities."""

    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Rows:
    """A snapshot of one kind's exact map: more rows computed (``complete`` once every row is)."""

    result: TraceResult

    @property
    def complete(self) -> bool:
        return bool(self.result.settings.get("complete", True))


@dataclass(frozen=True)
class Finished:
    """The exact maps, one per kind of :data:`tracing.KINDS`, in that order."""

    results: tuple[TraceResult, ...]


Event = Estimate | Prediction | Rows | Finished


def split_precision(precision: str) -> tuple[str, str]:
    """(the weights' precision, the trace's own ``TraceConfig.precision``) for a precision a visitor asks for.

    TF32 is a setting of the trace on float32 weights (matrix products in
    TF32 on CUDA); any other precision is a copy of the weights in that dtype
    ("auto": the model itself), traced as it is.
    """
    return ("tf32", "tf32") if precision == "tf32" else (precision, "auto")


def trace_key(prompt: str, subject: str, answer: str | None, config: TraceConfig) -> tuple:
    """The key under which a finished trace of the unedited model is remembered or shipped."""
    return ("trace", prompt, subject, answer, config)


def prediction_key(prompt: str) -> tuple:
    """The key under which the unedited model's top-5 after ``prompt`` is remembered."""
    return ("top", prompt)


def trace_events(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    *,
    answer: str | None = None,
    config: TraceConfig = TraceConfig(),
    preview: bool = True,
    memo: Memo | None = None,
    progress: Callable[[Step], None] | None = None,
) -> Iterator[Event]:
    """Trace ``subject`` in ``prompt`` as the page does; yields :data:`Event` values, ending with :class:`Finished`.

    ``preview``: first show the first-order estimate of the kinds where it
    was measured good for this model and these settings (or of every kind
    when it was never measured). ``memo`` (a :class:`Memo`), when given,
    may hold the top-5 and the finished trace already (only pass one for the
    unedited model); what is computed here is remembered in it. ``progress`` receives a :class:`Step` ("rows", passes
    done, passes in all) after every forward pass. Closing the generator
    stops the trace at once, with its hooks removed.
    """
    memo = memo if memo is not None else NoMemo()
    key = trace_key(prompt, subject, answer, config)
    results = memo.recall(key)
    if results is not None:  # traced before (or shipped): no preview needed
        yield Prediction(_top(lm, memo, prompt, None))
        yield Finished(tuple(results))
        return
    previews: list[TraceResult] = []
    verdict = None
    if preview:
        verdict = preview_verdict(lm, config)
        if verdict is None or any(verdict.values()):
            previews = estimate(lm, prompt, subject, answer=answer, config=config, top_k=5)
    yield Prediction(_top(lm, memo, prompt, previews[0].settings["top"] if previews else None))
    if preview:
        yield Estimate(tuple(r for r in previews if verdict is None or verdict.get(r.kind)), verdict)
    complete = {}
    step = None if progress is None else lambda done, total: progress(Step("rows", done, total))
    rows = iter_trace(lm, prompt, subject, answer=answer, config=config, progressive=True, progress=step)
    with closing(rows):  # closing this generator closes the trace (and its hooks) at once
        for result in rows:
            yield Rows(result)
            if result.settings.get("complete", True):
                complete[result.kind] = result
    yield Finished(memo.remember(key, tuple(complete[kind] for kind in KINDS)))


def _top(lm: LoadedModel, memo: Memo, prompt: str, found) -> tuple[tuple[str, float], ...]:
    """The top-5 after ``prompt``: remembered, else ``found`` (a preview's clean row gives it), else predicted."""
    top = memo.recall(prediction_key(prompt))
    if top is None:
        top = memo.remember(prediction_key(prompt), tuple(tuple(p) for p in (found or predict(lm, prompt, k=5))))
    return tuple(tuple(pair) for pair in top)
