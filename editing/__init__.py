"""Fact editing: ROME (Meng et al., 2022, §3), the paper's baselines and MEMIT; compute, apply, undo, save and score.

Example::

    from tracing import load_model
    from editing import EditRequest, compute_edit, applied, generate, score_edit

    lm = load_model()
    edit = compute_edit(lm, EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome"))
    with applied(lm, [edit]):                       # weights restored bit for bit on exit
        print(generate(lm, ["The Eiffel Tower is located in the city of"]))
        after = score_edit(lm, edit.request, paraphrases=["The Eiffel Tower is in the city of"],
                           neighbours=["The Louvre is located in the city of"])

    batch = compute_batch(lm, requests)                # MEMIT: many facts as one edit
    with SequentialEditor(lm, project=True) as editor: # edits one after another, earlier keys kept
        editor.add(requests); editor.health().warnings

Rooms: :mod:`editing.methods` (every editor behind ``compute`` and
``compute_batch``: :mod:`~editing.methods.rome` the method, FT and FT+L
(:mod:`~editing.methods.ft`), KN (:mod:`~editing.methods.kn`), MEMIT
(:mod:`~editing.methods.memit`, many facts at once), and what they share,
:mod:`~editing.methods.common`); :mod:`editing.evaluation` (CounterFact-style
cases, evaluation, layer sweeps, tuning); :mod:`editing.presets` (the page's
preset facts and their shipped results). Beside them: :mod:`editing.edit`
(edits as data), :mod:`editing.applying` (their reversible application),
:mod:`editing.edit_files` (files of edits), :mod:`editing.display` (results as
HTML, for the page and notebooks), :mod:`editing.scores` (CounterFact-style scores, and
:func:`~editing.scores.rescore`, the score-edit-score step of every
workflow), :mod:`editing.compare` (an edit with generations and scores before
and after), :mod:`editing.batch` (a batch from CSV/JSON, scored fact by
fact), :mod:`editing.sequential` (edits one after another, AlphaEdit's
projection, the health check), :mod:`editing.stats` (key statistics). The
command lines (``python -m editing``, ``editing.evaluate``, ``.sweep``,
``.tune``, ``.cases``, ``.shipped``, ``.batch``, ``.stats``, ``.presets``)
are modules of their own that parse options and print.
"""

from .edit import Edit, EditRequest

from .applying import EditStack, applied, check_edits, is_edited, original_weights
from .edit_files import load_edits, save_edits
from .batch import BatchItem, BatchResult, parse_requests, write_batch
from .compare import EditComparison, compare_events, edit_and_compare
from .hparams import MEMITHyperParams, ROMEHyperParams, load_hparams
from .methods import METHODS, compute, compute_batch, compute_edit, compute_memit
from .methods.common import model_answer
from .sampling import generate
from .scores import EditScores, fluency, score_edit
from .sequential import Health, SequentialEditor, health
from .stats import KeyStats, StatsSpec, ensure_stats, key_stats

__all__ = [
    "METHODS", "BatchItem", "BatchResult", "Edit", "EditComparison", "EditRequest", "EditScores", "EditStack",
    "Health", "KeyStats",
    "MEMITHyperParams", "ROMEHyperParams", "SequentialEditor", "StatsSpec", "applied", "check_edits", "compare_events",
    "compute", "compute_batch", "compute_edit", "compute_memit", "edit_and_compare", "ensure_stats", "fluency",
    "generate", "health", "is_edited", "key_stats", "load_edits", "load_hparams", "model_answer", "original_weights",
    "parse_requests", "save_edits", "score_edit", "write_batch",
]
