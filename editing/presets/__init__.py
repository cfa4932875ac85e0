"""The page's preset facts and the results shipped for them.

:mod:`editing.presets.facts` chooses the preset facts a model knows (each with a
counterfactual, paraphrases and neighbours) and reads and writes
``assets/presets.json``; :mod:`editing.presets.shipped` computes the traces and
edits the page shows for them at once. ``python -m editing.presets`` and
``python -m editing.shipped`` are their command lines.

Example::

    from editing.presets import load_presets
    shipped = load_presets()
    shipped.presets[0].prompt, shipped.presets[0].counterfactual
"""

from .facts import (PRESETS_PATH, Preset, PresetFile, find_presets, guess_subject, load_presets, save_presets,
                    subject_familiarity)

__all__ = ["PRESETS_PATH", "Preset", "PresetFile", "find_presets", "guess_subject", "load_presets", "save_presets",
           "subject_familiarity"]
