"""Many edits one after another, and a health check that warns before the model turns to garbage.

Edits written in sequence each build on the model the earlier ones left:
ROME's and MEMIT's keys, targets and residuals are computed with every earlier
edit in place. Without care such sequences wear the model down: each update
also moves the outputs of the keys earlier edits wrote, and the updates' norms
add up until generations degrade ("model collapse"). With ``project=True``
every new MEMIT update is confined to directions the keys of all earlier
edits do not use (and, with ``nullspace_threshold``, to the directions the
preserved knowledge hardly uses: AlphaEdit, Fang et al., 2025; see
:mod:`editing.methods.memit`), so earlier facts keep exactly the values they were
given.

:class:`SequentialEditor` holds the edits on a model (an
:class:`~editing.applying.EditStack`: undo of a batch is one step, reset is bit
for bit). Stateless callers such as the page keep a list of edits and call
:func:`editing.methods.compute_batch` with ``previous=`` and ``project=``
instead. :func:`health` measures what a list of edits did to the model: how
far each edited weight moved relative to its own norm, the entropy of a few
fixed generations, and the probability of a few unrelated facts, against the
unedited model; its ``warnings`` are plain sentences for a visitor.

Example::

    with SequentialEditor(lm, project=True) as editor:       # resets the model on exit
        for batch in batches:
            editor.add(batch)                                # one MEMIT edit per batch
            report = editor.health()
            if report.warnings:
                print(*report.warnings, sep="\\n")
        editor.undo()                                        # the last batch, as one step
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tracing.models import LoadedModel

from .edit import Edit, EditRequest

from .applying import EditStack, applied, original_of, original_weights
from .hparams import HyperParams, check_method, load_hparams
from .methods import compute, compute_memit, memit_layers
from .methods.outliers import outlier_warnings
from .progress import Progress
from .sampling import generate
from .scores import continuation_logprobs, fluency

log = logging.getLogger(__name__)


# Fixed prompts whose greedy continuations give the generation entropy, and facts unrelated to typical edits whose
# probability should not move (facts whose subject an edit rewrites are skipped). The default model knows each.
HEALTH_PROMPTS = (
    "My favourite season of the year is",
    "The history of the city begins",
    "To bake bread at home, you need",
)
HEALTH_FACTS = (
    ("The capital of France is", "Paris"),
    ("The chemical symbol for gold is", "Au"),
    ("Shakespeare wrote Romeo and", "Juliet"),
    ("The capital of Japan is", "Tokyo"),
    ("Water freezes at zero degrees", "Celsius"),
    ("The author of Harry Potter is J.K.", "Rowling"),
)
# When to warn (see Health): a weight moved by more than this share of its norm; generation entropy below this share
# of the unedited model's; the unrelated facts' mean probability below this share of the unedited model's.
MAX_RELATIVE_NORM = 0.25
MIN_ENTROPY_SHARE = 0.9
MIN_FACT_SHARE = 0.5


@dataclass(frozen=True)
class Health:
    """What a set of edits did to the model beyond the facts it wrote, compared with the unedited model.

    ``relative_norms[i]``: ‖W − W₀‖_F / ‖W₀‖_F of the down-projection of
    ``layers[i]``; ``entropy``: generation entropy (the paper's n-gram
    entropy) of greedy continuations of :data:`HEALTH_PROMPTS`;
    ``p_facts``: p(answer) (geometric mean over its tokens) of each
    unrelated fact in ``facts``. ``*_before``: the unedited model's.
    ``warnings``: plain sentences, empty when nothing looks wrong.
    """

    layers: tuple[int, ...]
    relative_norms: tuple[float, ...]
    entropy: float
    entropy_before: float
    facts: tuple[tuple[str, str], ...]
    p_facts: tuple[float, ...]
    p_facts_before: tuple[float, ...]
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.warnings

    @property
    def max_relative_norm(self) -> float:
        return max(self.relative_norms, default=0.0)

    @property
    def fact_share(self) -> float:
        """Mean p of the unrelated facts now, as a share of the unedited model's (1: untouched)."""
        before = float(np.mean(self.p_facts_before)) if self.p_facts_before else 0.0
        return float(np.mean(self.p_facts)) / before if before > 0 else 1.0

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "relative_norms": list(self.relative_norms), "entropy": self.entropy,
                "entropy_before": self.entropy_before, "facts": [list(f) for f in self.facts],
                "p_facts": list(self.p_facts), "p_facts_before": list(self.p_facts_before),
                "fact_share": self.fact_share, "warnings": list(self.warnings)}


def _weight_changes(lm: LoadedModel) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Layers whose down-projection differs from its original now, and ‖W − W₀‖ / ‖W₀‖ of each."""
    layers, norms = [], []
    for layer in range(lm.n_layers):
        weight = lm.down_proj(layer).weight
        original = original_of(lm, weight)
        if original is None:
            continue
        original = original.double()
        change = float((weight.detach().double() - original).norm())
        if change > 0:
            layers.append(layer)
            norms.append(change / max(float(original.norm()), 1e-12))
    return tuple(layers), tuple(norms)


def _measure(lm: LoadedModel, prompts: Sequence[str], facts: Sequence[tuple[str, str]],
             max_new_tokens: int) -> tuple[float, tuple[float, ...]]:
    texts = generate(lm, list(prompts), max_new_tokens=max_new_tokens) if prompts else []
    entropy = fluency(texts) if texts else float("nan")
    p = tuple(float(x) for x in np.exp(continuation_logprobs(lm, list(facts)))) if facts else ()
    return entropy, p


def health(
    lm: LoadedModel,
    edits: Sequence[Edit] = (),
    *,
    already_applied: bool = False,
    reference: Health | None = None,
    prompts: Sequence[str] = HEALTH_PROMPTS,
    facts: Sequence[tuple[str, str]] = HEALTH_FACTS,
    max_new_tokens: int = 20,
) -> Health:
    """Measure the model with ``edits`` against the unedited model; warn when it looks damaged.

    Example::

        report = health(lm, visitor_edits)          # applies them for the measurement, restores after
        report.warnings                             # ('Generations are getting repetitive: ...',) or ()
        later = health(lm, more_edits, reference=report)   # reuses the unedited model's measurements

    ``already_applied``: the edits are on the model already (an
    :class:`EditStack`); otherwise they are applied here and removed after.
    Facts whose prompt names a subject of the edits are left out. The unedited
    model's entropy and probabilities come from ``reference`` when given (same
    prompts and facts), else are measured under
    :func:`~editing.applying.original_weights`. Weights are bitwise unchanged after.
    An edit flagged as far outside the model's usual updates when it was
    computed (``edit.info["outlier"]``, :mod:`editing.methods.outliers`) adds
    its sentence to ``warnings``.
    """
    edits = list(edits)
    subjects = {r.subject.strip().lower() for e in edits for r in e.requests}
    facts = tuple((p, a) for p, a in facts if not any(s and s in p.lower() for s in subjects))
    prompts = tuple(prompts)
    context = applied(lm, []) if already_applied else applied(lm, edits)
    with context:
        layers, norms = _weight_changes(lm)
        entropy, p_facts = _measure(lm, prompts, facts, max_new_tokens)
        if reference is not None and set(facts) <= set(reference.facts):
            entropy_before = reference.entropy_before
            known = dict(zip(reference.facts, reference.p_facts_before))
            p_before = tuple(known[f] for f in facts)
        else:
            with original_weights(lm):
                entropy_before, p_before = _measure(lm, prompts, facts, max_new_tokens)
    warnings = []
    worst = int(np.argmax(norms)) if norms else None
    if worst is not None and norms[worst] > MAX_RELATIVE_NORM:
        warnings.append(f"The edits have changed layer {layers[worst]}'s MLP weights by {norms[worst]:.0%} of their "
                        f"size; above {MAX_RELATIVE_NORM:.0%} a model usually starts to lose unrelated knowledge. "
                        "Undo some edits, or write them with the projection.")
    if np.isfinite(entropy) and np.isfinite(entropy_before) and entropy < MIN_ENTROPY_SHARE * entropy_before:
        warnings.append(f"Generations are getting repetitive: their entropy fell from {entropy_before:.2f} to "
                        f"{entropy:.2f}. The edited model may soon produce garbage; undo the last edits.")
    before = float(np.mean(p_before)) if p_before else 0.0
    if before > 0 and float(np.mean(p_facts)) < MIN_FACT_SHARE * before:
        lost = [f"{p} {a} ({b:.2f} → {n:.2f})" for (p, a), b, n in zip(facts, p_before, p_facts) if n < 0.5 * b]
        warnings.append("The model is losing facts the edits did not touch: " + "; ".join(lost[:3]) + ".")
    warnings.extend(outlier_warnings(edits))  # updates flagged before they were applied (ROME's closed form)
    return Health(layers=layers, relative_norms=norms, entropy=float(entropy), entropy_before=float(entropy_before),
                  facts=facts, p_facts=p_facts, p_facts_before=tuple(p_before), warnings=tuple(warnings))


class SequentialEditor:
    """Edits written into one model one after another (single facts or MEMIT batches), optionally projected.

    Example::

        editor = SequentialEditor(lm, project=True)         # method "memit"; "rome", "ft", ... without projection
        edit = editor.add([request1, request2])             # computed on top of every earlier edit, then applied
        editor.health().warnings
        editor.undo(); editor.reset()                        # reset: every weight bitwise the original

    The edits stay applied (an :class:`EditStack`) until :meth:`reset` or the
    end of a ``with`` block. With ``project`` each new MEMIT edit leaves the
    keys of every earlier edit's requests (any method's) unchanged. Earlier
    ``edits`` given to the constructor are applied first. ``health`` compares
    with the unedited model measured once.
    """

    def __init__(self, lm: LoadedModel, *, method: str = "memit", project: bool = False,
                 hparams: HyperParams | None = None, layers: Sequence[int] | None = None, stats_spec=None,
                 edits: Sequence[Edit] = ()):
        check_method(method)
        if project and method != "memit":
            raise ValueError("The projection is MEMIT's (AlphaEdit); use method='memit', or layers=[l] for one layer.")
        self.lm, self.method, self.project = lm, method, bool(project)
        self.hparams = hparams if hparams is not None else load_hparams(lm, method=method)
        self.layers = tuple(layers) if layers is not None else None
        self.stats_spec = stats_spec
        self.stack = EditStack(lm)
        self._reference: Health | None = None
        for edit in edits:
            self.stack.push(edit)

    @property
    def edits(self) -> tuple[Edit, ...]:
        return self.stack.edits

    @property
    def requests(self) -> tuple[EditRequest, ...]:
        """Every request written so far, oldest first."""
        return tuple(r for e in self.edits for r in e.requests)

    def __len__(self) -> int:
        return len(self.stack)

    def add(self, requests: EditRequest | Sequence[EditRequest], *, progress: Progress | None = None) -> Edit:
        """Compute one edit of ``requests`` on top of the earlier ones and apply it; returns it.

        A list of several requests is one MEMIT batch. ``progress`` as in
        :func:`editing.methods.compute_batch`; if it raises, the model keeps
        exactly the earlier edits.
        """
        requests = [requests] if isinstance(requests, EditRequest) else list(requests)
        if self.method == "memit":
            layers = self.layers if self.layers is not None else memit_layers(self.lm, self.hparams, None)
            edit = compute_memit(self.lm, requests, layers=layers, hparams=self.hparams, progress=progress,
                                 stats_spec=self.stats_spec, project=self.project,
                                 keep=self.requests if self.project else ())
        else:
            if len(requests) != 1:
                raise ValueError(f"{self.method.upper()} writes one fact per edit; add them one at a time, or use "
                                 "method='memit' for batches.")
            layer = self.layers[-1] if self.layers else None
            edit = compute(self.lm, requests[0], method=self.method, layer=layer, hparams=self.hparams,
                           progress=progress, stats_spec=self.stats_spec)
        self.stack.push(edit)
        return edit

    def undo(self) -> Edit:
        """Remove the last edit (a whole batch) and return it."""
        return self.stack.undo()

    def reset(self) -> None:
        """Remove every edit: all weights bitwise the originals."""
        self.stack.reset()

    def health(self, **kwargs) -> Health:
        """:func:`health` of the edits applied now (the unedited model is measured once and reused)."""
        report = health(self.lm, self.edits, already_applied=True, reference=self._reference, **kwargs)
        if self._reference is None and not kwargs:
            self._reference = report  # its *_before fields: the unedited model's
        return report

    def __enter__(self) -> "SequentialEditor":
        return self

    def __exit__(self, *exc) -> None:
        self.reset()
