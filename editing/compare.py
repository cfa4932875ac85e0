"""One edit and what it changes: generations and CounterFact-style scores before and after.

:func:`edit_and_compare` is what ``python -m editing`` prints and what the
page's edit panel shows: on top of earlier edits (sequential editing) it finds
the old object if none is given, scores and continues the test prompts with
the model as it is, computes the ROME edit, and does the same with the edit
applied. The weights are the originals again when it returns, also when it
raises (a stop or a deadline raised from ``progress`` included).

Example::

    result = edit_and_compare(lm, EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome"),
                              paraphrases=["Where is the Eiffel Tower? It is in the city of"],
                              neighbours=["The Louvre is located in the city of"], max_new_tokens=10)
    result.after[0]                          # ' Rome, Italy. ...'
    result.scores_after.summary()["ES"]      # 1.0
    apply_later = result.edit                # an Edit: applied(lm, [result.edit]), save_edits(...)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, replace


from tracing.models import LoadedModel

from .edit import Edit, EditRequest

from .applying import applied
from .display import comparison_table, notebook_html, scores_card
from .hparams import HyperParams, check_method, load_hparams
from .methods import compute
from .methods.common import with_old_object
from .progress import Progress
from .sampling import generate
from .scores import EditScores, nan_to_none, rescore, score_edit

Memo = Callable[[Hashable, Callable[[], object]], object]

# Stages reported through ``progress(stage, fraction)``, in order; the middle ones come from the method
# (editing.methods.STAGES: ROME's templates..update, FT's optimising and update, KN's attributing and update).
STAGES = ("answer", "before", "templates", "statistics", "keys", "attributing", "optimising", "update", "after")


@dataclass(frozen=True, eq=False)
class EditComparison:
    """The test prompts of one edit, with generations and scores before and (once done) after it.

    ``prompts`` are the scored prompts as (kind, text), kind one of rewrite,
    paraphrase, neighbour; ``generated`` the prompts that were continued
    (by default the same texts), with ``before``/``after`` their
    continuations. ``after``, ``scores_after`` and ``edit`` are None until
    the edit is done (the page shows the before column first).
    """

    request: EditRequest  # with target_true: the old object
    prompts: tuple[tuple[str, str], ...]
    generated: tuple[str, ...]
    before: tuple[str, ...]
    scores_before: EditScores
    after: tuple[str, ...] | None = None
    scores_after: EditScores | None = None
    edit: Edit | None = None

    def _repr_html_(self) -> str:
        """In a notebook: the page's table of generations and p(new)/p(old) before and after, and its scores."""
        return notebook_html(comparison_table(self) + scores_card(self))

    def rows(self) -> list[dict]:
        """Per scored prompt: kind, prompt, p(new)/p(old) before and after, and its continuations if generated."""
        before = self.scores_before.rows()
        after = self.scores_after.rows() if self.scores_after is not None else [None] * len(before)
        continued = {text: i for i, text in enumerate(self.generated)}
        out = []
        for (kind, text), b, a in zip(self.prompts, before, after):
            i = continued.get(text)
            out.append({
                "kind": kind, "prompt": text,
                "before": self.before[i] if i is not None else None,
                "after": self.after[i] if i is not None and self.after is not None else None,
                "p_new_before": b["p_new"], "p_old_before": b["p_old"],
                "p_new_after": a["p_new"] if a else None, "p_old_after": a["p_old"] if a else None,
            })
        return out

    def to_dict(self) -> dict:
        """JSON-serialisable summary (no vectors): request, rows, generations, scores, and the edit's metadata."""
        out = {
            "request": self.request.to_dict(), "rows": self.rows(),
            "generations": [{"prompt": p, "before": b, "after": self.after[i] if self.after is not None else None}
                            for i, (p, b) in enumerate(zip(self.generated, self.before))],
            "scores_before": nan_to_none(self.scores_before.summary()),
        }
        if self.scores_after is not None:
            out["scores_after"] = nan_to_none(self.scores_after.summary())
        if self.edit is not None:
            out["edit"] = self.edit.metadata()
        return out

    def to_record(self) -> dict:
        """Everything but the edit's arrays, losslessly, as JSON; :meth:`from_record` reads it back.

        Example::

            record = comparison.to_record()                   # the edit's arrays: save_edits([comparison.edit], ...)
            EditComparison.from_record(json.loads(json.dumps(record)), edit=comparison.edit)
        """
        return {
            "request": self.request.to_dict(), "prompts": [list(p) for p in self.prompts],
            "generated": list(self.generated), "before": list(self.before),
            "scores_before": self.scores_before.to_dict(),
            "after": None if self.after is None else list(self.after),
            "scores_after": None if self.scores_after is None else self.scores_after.to_dict(),
            "edit": None if self.edit is None else self.edit.metadata(),
        }

    @classmethod
    def from_record(cls, data: dict, edit: Edit | None = None) -> "EditComparison":
        """Rebuild from :meth:`to_record` and the edit (whose arrays the record does not hold); ValueError when
        malformed or when ``edit`` is not the one the record describes."""
        try:
            if (data["edit"] is None) != (edit is None):
                raise ValueError("the record and the edit passed disagree on whether there is an edit")
            if edit is not None and edit.metadata()["request"] != data["edit"]["request"]:
                raise ValueError("the edit passed is not the record's")
            after = data["after"]
            return cls(
                request=EditRequest.from_dict(data["request"]),
                prompts=tuple((str(kind), str(text)) for kind, text in data["prompts"]),
                generated=tuple(data["generated"]), before=tuple(data["before"]),
                scores_before=EditScores.from_dict(data["scores_before"]),
                after=None if after is None else tuple(after),
                scores_after=None if data["scores_after"] is None else EditScores.from_dict(data["scores_after"]),
                edit=edit,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"Malformed edit comparison record: {exc}") from None


def _old_object(lm: LoadedModel, request: EditRequest, report: Progress) -> EditRequest:
    """The request with its old object: the given one, else what the model says now."""
    if request.target_true is not None:
        return request
    report("answer", 0.0)
    req = with_old_object(lm, request)
    if req.target_true is None:
        raise ValueError("The model gives no answer to the rewrite prompt; enter the old object yourself.")
    req.validate()
    return req


@dataclass
class _Comparison:
    """One :func:`edit_and_compare`: its settings, and the steps that :func:`~editing.scores.rescore` runs."""

    lm: LoadedModel
    req: EditRequest
    method: str
    layer: int | None
    hp: HyperParams
    stats_spec: object
    paraphrases: tuple[str, ...]
    neighbours: tuple[str, ...]
    generate_prompts: Sequence[str] | None
    decoding: tuple[int, bool, int]  # max_new_tokens, sample, seed
    previous: list[Edit]
    report: Callable[[str, float], None]
    memo: Memo | None

    def once(self, key: Hashable, compute: Callable[[], object]):
        return self.memo(key, compute) if self.memo is not None and not self.previous else compute()

    def continued(self, texts: tuple[str, ...], stage: str) -> tuple[str, ...]:
        max_new_tokens, sample, seed = self.decoding
        return tuple(generate(self.lm, list(texts), max_new_tokens=max_new_tokens, sample=sample, seed=seed,
                              progress=lambda step, total: self.report(stage, step / total)))

    def scores(self) -> EditScores:
        return score_edit(self.lm, self.req, paraphrases=self.paraphrases, neighbours=self.neighbours)

    def before(self) -> EditComparison:
        self.report("before", 0.0)
        scored = self.once(("scores", self.req, self.paraphrases, self.neighbours), self.scores)
        texts = tuple(scored.prompts if self.generate_prompts is None else  # "{}" filled with the subject
                      (p.replace("{}", self.req.subject.strip(), 1) for p in self.generate_prompts))
        generated = self.once(("generate", texts, *self.decoding), lambda: self.continued(texts, "before"))
        return EditComparison(self.req, tuple(zip(scored.kinds, scored.prompts)), texts, generated, scored)

    def make_edit(self) -> Edit:
        with applied(self.lm, self.previous):
            return self.once(("edit", self.method, self.req, self.layer, self.hp, self.stats_spec),
                             lambda: compute(self.lm, self.req, method=self.method, layer=self.layer, hparams=self.hp,
                                             progress=self.report, stats_spec=self.stats_spec))

    def after(self, comparison: EditComparison) -> EditComparison:
        def run() -> tuple[tuple[str, ...], EditScores]:
            self.report("after", 0.0)
            return self.continued(comparison.generated, "after"), self.scores()

        texts, scored = self.once(("after", self.method, self.req, self.layer, self.hp, self.stats_spec,
                                   self.paraphrases, self.neighbours, comparison.generated, *self.decoding), run)
        return replace(comparison, after=texts, scores_after=scored)


def compare_events(
    lm: LoadedModel,
    request: EditRequest,
    *,
    layer: int | None = None,
    hparams: HyperParams | None = None,
    method: str = "rome",
    paraphrases: Sequence[str] = (),
    neighbours: Sequence[str] = (),
    generate_prompts: Sequence[str] | None = None,
    max_new_tokens: int = 20,
    sample: bool = False,
    seed: int = 0,
    previous: Sequence[Edit] = (),
    stats_spec=None,
    progress: Progress | None = None,
    memo: Memo | None = None,
) -> Iterator[EditComparison]:
    """:func:`edit_and_compare` as the page runs it: yields the comparison with its before column (``after``,
    ``scores_after`` and ``edit`` None) as soon as it is ready, then the complete comparison.

    Example::

        for comparison in compare_events(lm, request, paraphrases=paraphrases, neighbours=neighbours):
            show(comparison)             # the before column first, then before and after side by side

    Same arguments as :func:`edit_and_compare`. Closing the generator between
    the two leaves the model as it was.
    """
    request.validate()
    check_method(method)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    hp = hparams if hparams is not None else load_hparams(lm, method=method)
    previous = list(previous)

    def report(stage: str, fraction: float) -> None:
        if progress:
            progress(stage, float(fraction))

    with applied(lm, previous):
        req = _old_object(lm, request, report)
        job = _Comparison(lm, req, method, layer, hp, stats_spec, tuple(paraphrases), tuple(neighbours),
                          generate_prompts, (max_new_tokens, bool(sample), int(seed)), previous, report, memo)
        before = job.before()
    yield before
    rescored = rescore(lm, job.before, job.make_edit, previous=previous, before=before, score_after=job.after)
    report("after", 1.0)
    yield replace(rescored.after, edit=rescored.edit)


def edit_and_compare(
    lm: LoadedModel,
    request: EditRequest,
    *,
    on_before: Callable[[EditComparison], None] | None = None,
    **options,
) -> EditComparison:
    """Compute an edit (ROME, or ``method`` "ft", "ft-l", "kn") on top of ``previous`` edits; compare before and after.

    Options (those of :func:`compare_events`): ``layer``, ``hparams``,
    ``method``, ``paraphrases``, ``neighbours``, ``generate_prompts``,
    ``max_new_tokens``, ``sample``, ``seed``, ``previous``, ``stats_spec``,
    ``progress``, ``memo``. ``generate_prompts`` defaults to the scored
    prompts (rewrite, paraphrases, neighbours; ``{}`` in them stands for the
    subject). ``progress(stage, fraction)`` reports the stages of
    :data:`STAGES`; an exception it raises stops the work with the weights
    restored. ``on_before`` receives the comparison as soon as the before
    column is ready. ``memo(key, compute)``, when given, may return a
    remembered result instead of computing it; it is only consulted without
    ``previous`` edits (results of the unedited model are deterministic:
    greedy or seeded), e.g. to share them between the visitors of a page.
    Raises ValueError for invalid input before any work.
    """
    events = compare_events(lm, request, **options)
    before = next(events)
    if on_before:
        on_before(before)
    return next(events)
