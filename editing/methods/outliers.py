"""Updates far outside what a model's edits normally write, found before they are applied.

A *disabling* edit (Gupta et al., 2024, "Rebuilding ROME") takes, yet breaks
the model on unrelated facts. On the default model it shows as an update ΔW
many times larger than the model's ordinary edits at the same layer: the
paper code's closed form divides δ by u·k₀ (u = C⁻¹k*/‖C⁻¹k*‖, k₀ the bare
prompt's key), and where u leans on directions k₀ barely uses that divisor is
small (``python -m editing.disabling`` records both keys' updates edit by
edit; ``assets/tuning/smollm2-135m-rome-keys-*.json``).

Two yardsticks, the first that applies:

* **reference** (``assets/update_norms.json``, per model and layer): ‖ΔW‖
  above :data:`NORM_FACTOR` times the median ‖ΔW‖ of that model's reference
  edits at that layer (the shipped preset edits and the tuning-split edits);
* **statistics** (any model, any layer with key statistics): the update
  writes ``δ (u·k)/(u·k_ref)`` at a token whose key is k; its *spill*,
  ``sqrt(uᵀCu) / |u·k_ref|``, is what it writes on an ordinary token (the RMS
  over the statistics' keys) per unit of what it writes on the edited fact.
  Above :data:`SPILL_LIMIT` the update fires on every token nearly as hard
  as on the subject, and it is flagged.

Without either (no reference and no statistics) nothing is flagged, and the
check says why. The verdict goes into ``edit.info``: ``outlier`` (bool),
``outlier_warning`` (a sentence, or None) and ``outlier_check`` (the numbers).

Example::

    check = check_update(lm, edit, stats=key_stats(lm, edit.layer))
    check.outlier, check.warning      # False, None for an ordinary edit
    edit.info.update(check.info())
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tracing.assets import ROOT
from tracing.models import LoadedModel

from ..edit import Edit

log = logging.getLogger(__name__)

UPDATE_NORMS = ROOT / "update_norms.json"  # reference ‖ΔW‖ per model and layer (python -m editing.disabling)
REFERENCE_FORMAT = "locate-edit update norms v1"
NORM_FACTOR = 5.0  # flag ‖ΔW‖ above this multiple of the reference median: a robust z of about 5 on log norms
SPILL_LIMIT = 0.75  # without a reference: flag an update whose spill onto ordinary tokens is above this
MIN_REFERENCE = 10  # fewer reference edits than this at a layer: use the statistics instead


@dataclass(frozen=True)
class Reference:
    """The ‖ΔW‖ of a model's reference edits at one layer."""

    layer: int
    median: float
    count: int
    source: str  # where the norms come from, in words


@dataclass(frozen=True)
class UpdateCheck:
    """Whether an update is far outside what the model's edits normally write, and on what basis.

    ``basis``: "reference", "statistics" or "none"; ``value`` the measured
    quantity (‖ΔW‖, or the share of the layer's output) and ``limit`` its
    flagging bound; ``warning`` a sentence for a person when flagged.
    """

    outlier: bool
    basis: str
    norm: float
    value: float | None
    limit: float | None
    reference_median: float | None
    reason: str
    warning: str | None

    def info(self) -> dict:
        """The keys that go into ``edit.info``: ``outlier``, ``outlier_warning``, ``outlier_check``."""
        return {"outlier": self.outlier, "outlier_warning": self.warning, "outlier_check": asdict(self)}


def load_reference(lm: LoadedModel, layer: int, path: str | Path = UPDATE_NORMS) -> Reference | None:
    """The reference norms of ``lm`` (by weights fingerprint, else by name) at ``layer``, or None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"Cannot read the reference update norms {path}: {exc}; restore it from the repository.") \
            from None
    if not isinstance(data, dict) or data.get("format") != REFERENCE_FORMAT:
        raise ValueError(f"{path} is not a reference of update norms ({REFERENCE_FORMAT}); restore it.")
    for entry in data.get("models", ()):
        if lm.fingerprint != entry.get("fingerprint") and lm.name != entry.get("model"):
            continue
        norms = (entry.get("layers") or {}).get(str(layer))
        if not norms or len(norms["norms"]) < MIN_REFERENCE:
            return None
        return Reference(layer=layer, median=float(np.median(norms["norms"])), count=len(norms["norms"]),
                         source=norms.get("source", ""))
    return None


def spill(u: np.ndarray, key: np.ndarray, mom2: np.ndarray) -> float:
    """sqrt(uᵀCu) / |u·k_ref|: what v uᵀ writes on an ordinary key (RMS under C) per unit at ``key``."""
    u = np.asarray(u, dtype=np.float64)  # (d_in,)
    along = abs(float(u @ np.asarray(key, dtype=np.float64)))
    ordinary = float(np.sqrt(max(float(u @ np.asarray(mom2, dtype=np.float64) @ u), 0.0)))
    return ordinary / along if along > 0 else math.inf


def check_update(lm: LoadedModel, edit: Edit, *, stats=None, reference: Reference | None | bool = True) -> UpdateCheck:
    """Is ROME ``edit``'s update far outside what ``lm``'s edits normally write? Computed before it is applied.

    ``stats``: the layer's :class:`~editing.stats.KeyStats` (the fallback
    yardstick); ``reference``: True to look it up in
    ``assets/update_norms.json``, a :class:`Reference`, or None/False for none.
    """
    if edit.u is None or edit.v is None:
        raise ValueError("check_update takes a ROME edit (a rank-one update with u and v).")
    layer, norm = edit.layer, edit.norm
    if reference is True:
        reference = load_reference(lm, layer)
    if reference:
        ratio = norm / reference.median
        flagged = ratio > NORM_FACTOR
        warning = (f"Unusually large update: ‖ΔW‖ = {norm:.3g}, {ratio:.1f} times the median of this model's "
                   f"ordinary edits at layer {layer} ({reference.median:.3g}; flagged above {NORM_FACTOR:g} times). "
                   "Edits like this often break unrelated facts: check the neighbours' scores before keeping it, "
                   "or write it with variant guarded (or bare), or at another layer.") if flagged else None
        return UpdateCheck(flagged, "reference", norm, norm, NORM_FACTOR * reference.median, reference.median,
                           f"{reference.count} reference edits at layer {layer}: {reference.source}", warning)
    if stats is None:
        return UpdateCheck(False, "none", norm, None, None, None,
                           f"no reference norms for this model at layer {layer} and no key statistics: not checked",
                           None)
    value = spill(edit.u, edit.key, stats.mom2)
    flagged = bool(value > SPILL_LIMIT)
    warning = (f"Unusually large update: on an ordinary token it would write {value:.0%} of what it writes on the "
               f"edited fact (flagged above {SPILL_LIMIT:.0%}). Edits like this often break unrelated facts: check "
               "the neighbours' scores before keeping it, or write it with variant guarded (or bare), or at another "
               "layer.") if flagged else None
    return UpdateCheck(flagged, "statistics", norm, value, SPILL_LIMIT, None,
                       f"no reference norms for this model at layer {layer}: the update's spill onto the statistics' "
                       "keys", warning)


def outlier_warnings(edits) -> list[str]:
    """A sentence for each flagged edit (``edit.info["outlier"]``), naming it: for the health checks."""
    return [f"Edit {i + 1} ({e.request.text!r} -> {e.request.target!r}): {e.info.get('outlier_warning')}"
            for i, e in enumerate(edits) if e.info.get("outlier")]
