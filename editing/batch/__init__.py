"""Many facts written at once (MEMIT), with every fact's p(new) before and after and a health check.

The library behind the page's "Edit many facts" and ``python -m editing.batch``:
requests come from a table, CSV or JSON (:func:`parse_requests`), are written
as one MEMIT edit on top of earlier edits (:func:`write_batch`), and each fact
is scored on its rewrite prompt (and its paraphrases and neighbours, when it
has them) before and after, as CounterFact does; :func:`~editing.sequential.health`
then says whether the model still looks sound.

Example::

    items = parse_requests("subject,prompt,target\\n"
                           "The Eiffel Tower,{} is located in the city of,Rome\\n"
                           "Michael Jordan,{} plays the sport of,golf\\n")
    result = write_batch(lm, items)
    result.summary("after")          # {'ES': 1.0, 'PS': nan, 'NS': nan, 'S': 1.0, ...}
    result.health.warnings           # () when nothing looks wrong
    with applied(lm, [result.edit]): # one step to undo
        ...

Command line::

    python -m editing.batch --requests facts.csv --save out/batch.safetensors
    python -m editing.batch --requests assets/counterfact_smollm2_heldout.json --limit 20 --json
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tracing.models import LoadedModel

from ..edit import Edit, EditRequest

from ..display import batch_result, notebook_html
from ..applying import applied
from ..hparams import load_hparams
from ..methods import compute_batch
from ..methods.common import with_old_objects
from ..methods.memit import check_requests
from ..progress import Progress
from ..scores import EditScores, harmonic_mean, nan_to_none, rescore, score_many
from ..sequential import Health, health


# Column names a CSV header may use, per field (lower case)
COLUMNS = {
    "subject": ("subject",),
    "prompt": ("prompt", "relation", "relation prompt", "relation_prompt"),
    "target": ("target", "new", "new object", "target_new", "new_object"),
    "target_true": ("old", "old object", "target_true", "old_object"),
}
SUMMARY_KEYS = ("ES", "PS", "NS", "S", "EM", "PM", "NM")


@dataclass(frozen=True)
class BatchItem:
    """One fact of a batch: the request, and optional prompts that score how far it generalises and stays put."""

    request: EditRequest
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**self.request.to_dict(), "paraphrases": list(self.paraphrases), "neighbours": list(self.neighbours)}


def _item_of_record(record: dict, where: str) -> BatchItem:
    """A BatchItem of a JSON object: a CounterFact case, a preset, or {subject, prompt, target[, target_true]}."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not an object with subject, prompt and target.")
    try:
        if "requested_rewrite" in record:  # CounterFact
            request = EditRequest.from_counterfact(record, old_required=False)
            return BatchItem(request, tuple(record.get("paraphrase_prompts") or ()),
                             tuple(record.get("neighborhood_prompts") or ()))
        if "rewrite_prompt" in record:  # a preset of editing.presets
            subject = record["subject"]
            request = EditRequest(subject, record["rewrite_prompt"], record["counterfactual"], record.get("attribute"))
        else:
            request = EditRequest(record["subject"], record["prompt"], record["target"],
                                  record.get("target_true") or record.get("old") or None)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{where} lacks {exc}: give subject, prompt (with {{}}) and target.") from None
    return BatchItem(request, tuple(record.get("paraphrases") or ()), tuple(record.get("neighbours") or ()))


def _csv_items(text: str) -> list[BatchItem]:
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    if not rows:
        return []
    header = [cell.strip().lower() for cell in rows[0]]
    if "subject" in header:
        index = {}
        for name, aliases in COLUMNS.items():
            found = [header.index(a) for a in aliases if a in header]
            if found:
                index[name] = found[0]
        missing = [n for n in ("subject", "prompt", "target") if n not in index]
        if missing:
            raise ValueError(f"The CSV header names no {', '.join(missing)} column; use subject,prompt,target[,old].")
        rows = rows[1:]
    else:
        index = {"subject": 0, "prompt": 1, "target": 2, "target_true": 3}
    items = []
    for n, row in enumerate(rows, start=1):
        cells = {name: (row[i].strip() if i < len(row) else "") for name, i in index.items()}
        if not all(cells[name] for name in ("subject", "prompt", "target")):
            raise ValueError(f"Row {n} ({','.join(row)[:80]!r}) needs a subject, a prompt with {{}} and a new object.")
        items.append(BatchItem(EditRequest(cells["subject"], cells["prompt"], cells["target"],
                                           cells.get("target_true") or None)))
    return items


def parse_requests(text: str, *, max_items: int | None = None) -> list[BatchItem]:
    """The facts of a JSON or CSV text; ValueError naming the first bad one.

    JSON: a list of {subject, prompt, target[, target_true, paraphrases,
    neighbours]} objects, CounterFact cases or presets (or an object with a
    "presets" or "requests" list). CSV: columns subject, prompt, target and
    optionally old, with or without a header line. ``{}`` in a prompt stands
    for the subject. Every request is validated; ``max_items`` refuses longer
    lists before any is read.
    """
    text = text.strip()
    if not text:
        return []
    if text[0] in "[{":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"The requests are not valid JSON: {exc}.") from None
        if isinstance(data, dict):
            data = data.get("requests", data.get("presets", [data]))
        if not isinstance(data, list):
            raise ValueError("The JSON must be a list of facts (subject, prompt, target).")
        if max_items is not None and len(data) > max_items:
            raise ValueError(f"{len(data)} facts are more than the {max_items} allowed in one batch.")
        items = [_item_of_record(r, f"Fact {i + 1}") for i, r in enumerate(data)]
    else:
        items = _csv_items(text)
        if max_items is not None and len(items) > max_items:
            raise ValueError(f"{len(items)} facts are more than the {max_items} allowed in one batch.")
    for i, item in enumerate(items):
        try:
            item.request.validate()
        except ValueError as exc:
            raise ValueError(f"Fact {i + 1} ({item.request.subject[:60]!r}): {exc}") from None
    return items


def read_requests(path: str | Path, *, max_bytes: int = 1_000_000, max_items: int | None = None) -> list[BatchItem]:
    """:func:`parse_requests` of a file, refused unread when larger than ``max_bytes``."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path.name} is {size / 1e6:.1f} MB; a requests file may be at most {max_bytes / 1e6:.1f} MB.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path.name} is not a UTF-8 text file (JSON or CSV).") from None
    return parse_requests(text, max_items=max_items)


def as_items(requests: Sequence[EditRequest | BatchItem]) -> list[BatchItem]:
    return [r if isinstance(r, BatchItem) else BatchItem(r) for r in requests]


@dataclass(frozen=True, eq=False)
class BatchResult:
    """What :func:`write_batch` found: per fact its scores before and after, the edit and the health check."""

    items: tuple[BatchItem, ...]  # the requests with their old objects
    before: tuple[EditScores, ...]
    after: tuple[EditScores, ...]
    edit: Edit
    health: Health | None
    seconds: float
    neighbours_left_out: int = 0  # neighbour prompts naming a subject of the batch (they are edited too)

    def _repr_html_(self) -> str:
        """In a notebook: the page's view of the batch (scores, health check, one row per fact)."""
        return notebook_html(batch_result(self))

    def rows(self) -> list[dict]:
        """One dict per fact: the request, p(new) and p(old) on its rewrite prompt before and after, and its scores."""
        out = []
        for item, b, a in zip(self.items, self.before, self.after):
            r = item.request
            out.append({"subject": r.subject, "prompt": r.prompt, "target": r.target, "target_true": r.target_true,
                        "p_new_before": float(b.prob_new[0]), "p_new_after": float(a.prob_new[0]),
                        "p_old_before": float(b.prob_old[0]), "p_old_after": float(a.prob_old[0]),
                        "written": bool(a.success[0]), "before": nan_to_none(b.summary()), "after": nan_to_none(a.summary())})
        return out

    def summary(self, which: str = "after") -> dict[str, float]:
        """Means over the facts of ES, PS, NS, EM, PM, NM (facts without such prompts left out); S their harmonic mean."""
        scores = self.after if which == "after" else self.before
        per_fact = [s.summary() for s in scores]
        out = {}
        for key in SUMMARY_KEYS:
            values = [f[key] for f in per_fact if np.isfinite(f[key])]
            out[key] = float(np.mean(values)) if values else float("nan")
        out["S"] = harmonic_mean([out["ES"], out["PS"], out["NS"]])
        return out

    def to_dict(self) -> dict:
        return {"facts": len(self.items), "method": self.edit.method, "layers": list(self.edit.layers),
                "norm": self.edit.norm, "seconds": self.seconds, "before": nan_to_none(self.summary("before")),
                "after": nan_to_none(self.summary("after")), "neighbours_left_out": self.neighbours_left_out,
                "health": self.health.to_dict() if self.health else None, "rows": self.rows(),
                "edit": self.edit.metadata()}


def _with_old_objects(lm: LoadedModel, items: Sequence[BatchItem], previous: Sequence[Edit],
                      report: Progress) -> list[BatchItem]:
    """The items with their old objects: the given ones, else the model's answers with the earlier edits."""
    with applied(lm, previous):
        report("answer", 0.0)
        requests_old = with_old_objects(lm, [it.request for it in items])
    for i, r in enumerate(requests_old):
        where = f"Fact {i + 1} ({r.text!r})"
        if r.target_true is None:
            raise ValueError(f"{where}: the model gives no answer; enter its old object.")
        if r.target_true.strip().lower() == r.target.strip().lower():
            raise ValueError(f"{where}: the model already answers {r.target!r}; choose another new object.")
    return [replace(it, request=r) for it, r in zip(items, requests_old)]


def write_batch(
    lm: LoadedModel,
    requests: Sequence[EditRequest | BatchItem],
    *,
    hparams=None,
    layers: Sequence[int] | None = None,
    layer: int | None = None,
    previous: Sequence[Edit] = (),
    project: bool = False,
    stats_spec=None,
    check_health: bool = True,
    progress: Progress | None = None,
) -> BatchResult:
    """Write every request as one MEMIT edit on top of ``previous`` edits; score each fact before and after.

    Old objects missing from the requests are the model's own answers (with
    the earlier edits). Neighbour prompts that name a subject of the batch are
    left out, since those subjects are edited too. ``progress(stage,
    fraction)`` reports "answer", "before", MEMIT's stages
    (:data:`editing.methods.STAGES`), "after" and "health"; an exception it
    raises stops the work and leaves every weight bitwise as it was. The
    model is unchanged afterwards: the result's ``edit`` is applied with
    :func:`~editing.applying.applied` or kept in an :class:`~editing.applying.EditStack`.
    Raises ValueError for invalid input, before any work.
    """
    def report(stage: str, fraction: float) -> None:
        if progress:
            progress(stage, float(fraction))

    def scored(stage: str) -> list[EditScores]:
        report(stage, 0.0)
        out = score_many(lm, [(it.request, it.paraphrases, n) for it, n in zip(items, neighbours)])
        report(stage, 1.0)
        return out

    started = time.perf_counter()
    items = as_items(requests)
    hp = hparams if hparams is not None else load_hparams(lm, method="memit")
    check_requests(lm, [it.request for it in items], hp.kl_prompt)
    previous = list(previous)
    subjects = [it.request.subject.strip() for it in items]
    neighbours = [tuple(p for p in it.neighbours if not any(s and s in p for s in subjects)) for it in items]
    left_out = sum(len(it.neighbours) - len(n) for it, n in zip(items, neighbours))
    items = _with_old_objects(lm, items, previous, report)
    rescored = rescore(lm, lambda: scored("before"),
                       lambda: compute_batch(lm, [it.request for it in items], method="memit", hparams=hp, layers=layers,
                                             layer=layer, previous=previous, project=project, stats_spec=stats_spec,
                                             progress=report),
                       previous=previous, score_after=lambda _: scored("after"))
    found = None
    if check_health:
        report("health", 0.0)
        found = health(lm, [*previous, rescored.edit])
        report("health", 1.0)
    return BatchResult(tuple(items), tuple(rescored.before), tuple(rescored.after), rescored.edit, found,
                       time.perf_counter() - started, left_out)
