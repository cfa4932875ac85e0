"""ROME fact editing (Meng et al., 2022, §3): compute, apply, undo, save and score rank-one edits.

Example::

    from tracing import load_model
    from editing import EditRequest, compute_edit, applied, generate, score_edit

    lm = load_model()
    edit = compute_edit(lm, EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome"))
    with applied(lm, [edit]):                       # weights restored bit for bit on exit
        print(generate(lm, ["The Eiffel Tower is located in the city of"]))
        after = score_edit(lm, edit.request, paraphrases=["The Eiffel Tower is in the city of"],
                           neighbours=["The Louvre is located in the city of"])

Modules: :mod:`editing.rome` (the method), :mod:`editing.stats` (key
statistics, ``python -m editing.stats``), :mod:`editing.edit` (edits as data,
reversible application, files), :mod:`editing.compare` (an edit with
generations and scores before and after: ``python -m editing`` and the page),
:mod:`editing.scores` (CounterFact-style scores), :mod:`editing.evaluate`
(``python -m editing.evaluate``), :mod:`editing.cases` (building an evaluation
set from known facts), :mod:`editing.presets` (the page's preset facts).
"""

from .edit import (Edit, EditRequest, EditStack, applied, check_edits, is_edited, load_edits, original_weights,
                   save_edits)
from .compare import EditComparison, edit_and_compare
from .hparams import ROMEHyperParams, load_hparams
from .rome import compute_edit, model_answer
from .sampling import generate
from .scores import EditScores, fluency, score_edit

_LAZY = {"KeyStats", "StatsSpec", "ensure_stats", "key_stats"}  # from .stats, imported on first use so that
# `python -m editing.stats` does not find its own module already imported


def __getattr__(name: str):
    if name in _LAZY:
        from . import stats

        return getattr(stats, name)
    raise AttributeError(f"module 'editing' has no attribute {name!r}")


__all__ = [
    "Edit", "EditComparison", "EditRequest", "EditScores", "EditStack", "KeyStats", "ROMEHyperParams", "StatsSpec", "applied",
    "check_edits", "compute_edit", "edit_and_compare", "ensure_stats", "fluency", "generate", "is_edited", "key_stats", "load_edits",
    "load_hparams", "model_answer", "original_weights", "save_edits", "score_edit",
]
