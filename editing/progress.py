"""The progress callback that every long computation of :mod:`editing` takes.

``progress(stage, fraction)`` is called with a stage's name ("statistics",
"optimising", "update", ...) and how much of it is done, from 0 to 1; an
exception it raises stops the work (a stop or a deadline). The editors
(:mod:`editing.methods`), the key statistics (:mod:`editing.stats`), batches,
sequences and comparisons all take this one type. It lives here, below all
of them, so that :mod:`editing.stats` (which the editors use) need not import
the editors' package.

Example::

    edit = compute(lm, request, progress=lambda stage, fraction: print(stage, f"{fraction:.0%}"))
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, float], None]

__all__ = ["Progress"]
