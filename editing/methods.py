"""The paper's editors behind one entry point: ROME, fine-tuning (FT and FT+L) and Knowledge Neurons (KN).

The ROME paper argues by comparison (Table 4): FT generalises but spills over
onto other subjects, FT+L stays specific but does not generalise, KN barely
edits, and only ROME does both. Every method here turns an
:class:`~editing.edit.EditRequest` into an :class:`~editing.edit.Edit`, a
reversible change of named weights, so applying, undoing, saving, scoring and
the page work the same for all of them:

* ``"rome"``: :func:`editing.rome.compute_edit`, a rank-one update (``Edit.u``, ``Edit.v``);
* ``"ft"``, ``"ft-l"``: :func:`editing.ft.compute_ft`, a dense delta of one down-projection;
* ``"kn"``: :func:`editing.kn.compute_kn`, deltas of a few neurons' value vectors.

None of them modifies the model's weights: deltas are computed on the side
and the weights are bitwise unchanged afterwards, also when the computation
raises (a stop or a deadline raised from ``progress`` included).

KE and MEND are not here: both need hypernetworks trained on edit data that
this project cannot reach offline.

Example::

    edit = compute(lm, EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome"), method="ft-l",
                   progress=lambda stage, fraction: print(stage, fraction))
    edit.method, edit.layer, edit.norm          # 'ft-l', 1, 0.9
    with applied(lm, [edit]):
        ...
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tracing.models import LoadedModel

from .edit import EditRequest, Edit
from .hparams import HPARAMS_CLASSES, METHODS, HyperParams, check_method, load_hparams

Progress = Callable[[str, float], None]

# The stages each method reports through progress(stage, fraction), in order.
STAGES = {
    "rome": ("templates", "statistics", "keys", "optimising", "update"),
    "ft": ("optimising", "update"),
    "ft-l": ("optimising", "update"),
    "kn": ("attributing", "update"),
}


def compute(
    lm: LoadedModel,
    request: EditRequest,
    *,
    method: str = "rome",
    layer: int | None = None,
    hparams: HyperParams | None = None,
    progress: Progress | None = None,
    stats_spec=None,
) -> Edit:
    """Compute the edit of ``method`` that makes the model complete ``request`` with its new target.

    Example::

        edit = compute(lm, request, method="kn")

    ``hparams`` defaults to the method's file for this model (see
    :func:`editing.hparams.load_hparams`); ``layer`` overrides its layer (KN:
    searches that layer only instead of every layer). ``progress(stage,
    fraction)`` is called at every optimisation step with the stages of
    :data:`STAGES`; an exception it raises stops the work. ``stats_spec`` only
    matters to ROME. Raises ValueError for invalid input, before any work.
    """
    check_method(method)
    if not isinstance(request, EditRequest):
        raise ValueError("An edit needs an EditRequest(subject, prompt, target).")
    if hparams is not None and not isinstance(hparams, HPARAMS_CLASSES[method]):
        raise ValueError(f"The {method!r} method takes {HPARAMS_CLASSES[method].__name__}, not "
                         f"{type(hparams).__name__}; load them with load_hparams(lm, method={method!r}).")
    if method == "rome":
        from .rome import compute_edit

        return compute_edit(lm, request, layer=layer, hparams=hparams, progress=progress, stats_spec=stats_spec)
    if method in ("ft", "ft-l"):
        from .ft import compute_ft

        return compute_ft(lm, request, method=method, layer=layer, hparams=hparams, progress=progress)
    from .kn import compute_kn

    return compute_kn(lm, request, layer=layer, hparams=hparams, progress=progress)


def with_old_object(lm: LoadedModel, request: EditRequest) -> EditRequest:
    """``request`` with ``target_true`` set to the model's own short answer when it is missing."""
    if request.target_true is not None:
        return request
    from .rome import model_answer

    return EditRequest(request.subject, request.prompt, request.target, model_answer(lm, request.text) or None)


class Stopwatch:
    """Seconds per stage of one computation; the stages add up to the total (``other`` takes the rest).

    Example::

        clock = Stopwatch(); ...; clock.lap("optimise"); ...; timings = clock.finish()
    """

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._start = self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(self.timings.get(name, 0.0) + now - self._clock, 4)
        self._clock = now

    def finish(self) -> dict[str, float]:
        total = time.perf_counter() - self._start
        self.timings["other"] = round(max(0.0, total - sum(self.timings.values())), 4)
        return dict(self.timings)


__all__ = ["METHODS", "STAGES", "Stopwatch", "compute", "load_hparams", "with_old_object"]
