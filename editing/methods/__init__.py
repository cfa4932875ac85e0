"""The editors behind one entry point: ROME, fine-tuning (FT and FT+L), Knowledge Neurons (KN) and MEMIT.

The ROME paper argues by comparison (Table 4): FT generalises but spills over
onto other subjects, FT+L stays specific but does not generalise, KN barely
edits, and only ROME does both. Every method here turns an
:class:`~editing.edit.EditRequest` into an :class:`~editing.edit.Edit`, a
reversible change of named weights, so applying, undoing, saving, scoring and
the page work the same for all of them:

* ``"rome"``: :func:`editing.methods.rome.compute_edit`, a rank-one update (``Edit.u``, ``Edit.v``);
* ``"ft"``, ``"ft-l"``: :func:`editing.methods.ft.compute_ft`, a dense delta of one down-projection;
* ``"kn"``: :func:`editing.methods.kn.compute_kn`, deltas of a few neurons' value vectors;
* ``"memit"``: :func:`editing.methods.memit.compute_memit`, low-rank deltas of a range of
  down-projections; the only method that writes a batch of facts as one edit
  (:func:`compute_batch`).

What the editors share (the stopwatch, the old object, layer checks, token
rows, the suffix runner) is in :mod:`editing.methods.common`; the editors
import from there and never from each other or from this module. Their
``progress`` callback is :data:`editing.progress.Progress`.

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
    batch = compute_batch(lm, requests, method="memit")   # one Edit writing every request; undone as one step
"""

from __future__ import annotations

from collections.abc import Sequence

from tracing.models import LoadedModel

from ..edit import Edit, EditRequest

from ..applying import applied
from ..hparams import HPARAMS_CLASSES, METHODS, HyperParams, MEMITHyperParams, check_method, load_hparams
from ..progress import Progress
from .common import Stopwatch, check_layer, with_old_object
from .ft import compute_ft
from .kn import compute_kn
from .memit import compute_memit
from .rome import compute_edit

# The stages each method reports through progress(stage, fraction), in order.
STAGES = {
    "rome": ("templates", "statistics", "keys", "optimising", "update"),
    "ft": ("optimising", "update"),
    "ft-l": ("optimising", "update"),
    "kn": ("attributing", "update"),
    "memit": ("templates", "statistics", "keys", "optimising", "update"),
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
    searches that layer only instead of every layer; MEMIT: the range keeps
    its length and ends at ``layer``, as the paper's GPT-2 XL range 13-17 ends
    at ROME's layer 17). ``progress(stage,
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
        return compute_edit(lm, request, layer=layer, hparams=hparams, progress=progress, stats_spec=stats_spec)
    if method in ("ft", "ft-l"):
        return compute_ft(lm, request, method=method, layer=layer, hparams=hparams, progress=progress)
    if method == "memit":
        return compute_batch(lm, [request], method=method, layer=layer, hparams=hparams, progress=progress,
                             stats_spec=stats_spec)
    return compute_kn(lm, request, layer=layer, hparams=hparams, progress=progress)


def memit_layers(lm: LoadedModel, hparams, layer: int | None) -> tuple[int, ...]:
    """MEMIT's range: the hyperparameters' layers, or as many ending at ``layer``."""
    layers = hparams.edit_layers(lm.n_layers)
    if layer is None:
        return layers
    last = check_layer(lm, layer)
    return tuple(range(max(0, last - len(layers) + 1), last + 1))


def compute_batch(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    *,
    method: str = "memit",
    layer: int | None = None,
    layers: Sequence[int] | None = None,
    hparams: HyperParams | None = None,
    progress: Progress | None = None,
    stats_spec=None,
    previous: Sequence[Edit] = (),
    project: bool = False,
) -> Edit:
    """One edit that writes every request (MEMIT), computed on top of ``previous`` edits.

    Example::

        batch = compute_batch(lm, [EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome"),
                                   EditRequest("Michael Jordan", "{} plays the sport of", "golf")],
                              progress=lambda stage, fraction: None)
        with applied(lm, [*previous, batch]):     # undo = drop it from the list
            ...
        nxt = compute_batch(lm, more, previous=[*previous, batch], project=True)   # keeps earlier edits' keys

    ``previous`` are applied for the computation (on top of the model as it
    is; the weights are the same again afterwards) and, with ``project``,
    the new update leaves the keys of all their requests unchanged (see
    :mod:`editing.methods.memit`). ``layers`` sets MEMIT's range directly, ``layer``
    its last layer. Other methods write one fact per edit: a batch of one is
    passed to :func:`compute`, more raise a ValueError.
    ``progress(stage, fraction)`` is called at every optimisation step with
    the stages of :data:`STAGES`; an exception it raises stops the work and
    leaves every weight bitwise as it was. Raises ValueError for invalid input,
    before any work.
    """
    check_method(method)
    requests = [requests] if isinstance(requests, EditRequest) else list(requests)
    previous = list(previous)
    if method != "memit":
        if len(requests) != 1:
            raise ValueError(f"{method.upper()} writes one fact per edit; write a batch with method='memit', or "
                             "apply single edits one after another (editing.sequential).")
        if project or layers is not None:
            raise ValueError("project and layers are MEMIT's; leave them out for method " + repr(method))
        with applied(lm, previous):
            return compute(lm, requests[0], method=method, layer=layer, hparams=hparams, progress=progress,
                           stats_spec=stats_spec)
    hp = hparams if hparams is not None else load_hparams(lm, method="memit")
    if not isinstance(hp, MEMITHyperParams):
        raise ValueError(f"The 'memit' method takes MEMITHyperParams, not {type(hp).__name__}; "
                         "load them with load_hparams(lm, method='memit').")
    if layers is not None and layer is not None:
        raise ValueError("Give MEMIT either layers (the range) or layer (its last layer), not both.")
    if layers is None:
        layers = memit_layers(lm, hp, layer)
    keep = [r for edit in previous for r in edit.requests] if project else []
    with applied(lm, previous):
        return compute_memit(lm, requests, layers=layers, hparams=hp, progress=progress, stats_spec=stats_spec,
                             project=project, keep=keep)


__all__ = ["METHODS", "STAGES", "Progress", "Stopwatch", "compute", "compute_batch", "compute_edit", "compute_ft",
           "compute_kn", "compute_memit", "load_hparams", "memit_layers", "with_old_object"]
