"""Edits as data: requests, rank-one edits, reversible application, edit stacks and files.

An :class:`Edit` is a rank-one change ``ΔW = v uᵀ`` of one layer's MLP
down-projection (stored ``u ⊗ v`` for GPT-2's Conv1D, whose weight is (in,
out)). Applying edits never loses the original weights: :func:`applied` and
:class:`EditStack` keep a copy of each touched weight and copy it back, byte
for byte, when the context ends (also on exceptions) or on undo/reset. Edits
are saved as one ``.safetensors`` file whose header holds the requests and
metadata as JSON; nothing is ever pickled.

Example::

    edit = compute_edit(lm, EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome"))
    with applied(lm, [edit]):
        generate(lm, ["The Eiffel Tower is located in the city of"])   # [' Rome, Italy...']
    # every weight is bitwise the original here

    stack = EditStack(lm); stack.push(edit); stack.undo(); stack.reset()
    save_edits([edit], "edits.safetensors"); load_edits("edits.safetensors")
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tracing.models import LoadedModel

log = logging.getLogger(__name__)

FILE_FORMAT = "locate-edit/rome-edits"
FILE_VERSION = "1"


@dataclass(frozen=True)
class EditRequest:
    """A fact to write: ``prompt.format(subject)`` should be completed by ``target``.

    ``prompt`` holds one ``{}`` where the subject goes; ``target_true`` (the
    old object) is optional and only used by the scores; ``compute_edit``
    fills it in from the unedited model's own answer when it is missing.
    """

    subject: str
    prompt: str
    target: str
    target_true: str | None = None

    def validate(self) -> None:
        """Raise a ValueError that says how to fix the request, if anything is wrong with it."""
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise ValueError("The subject is empty. Enter the entity the fact is about, e.g. 'The Eiffel Tower'.")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("The prompt is empty. Enter a relation with {} for the subject, e.g. '{} is located in'.")
        count = self.prompt.count("{}")
        if count == 0:
            hint = ""
            if self.subject.strip() in self.prompt:
                hint = f" Replace the subject in it by {{}}: {self.prompt.replace(self.subject.strip(), '{}', 1)!r}."
            raise ValueError(
                f"The prompt {self.prompt!r} has no {{}} placeholder for the subject.{hint} "
                "Example: '{} is located in the city of'."
            )
        if count > 1:
            raise ValueError(f"The prompt {self.prompt!r} has {count} {{}} placeholders; keep exactly one for the subject.")
        if not self.prompt.replace("{}", "").strip():
            raise ValueError("The prompt is only a placeholder; add the relation, e.g. '{} is located in the city of'.")
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError("The new target is empty. Enter the object the edited model should say, e.g. 'Rome'.")
        if self.target_true is not None:
            if not isinstance(self.target_true, str) or not self.target_true.strip():
                raise ValueError("The old target (target_true) is empty; leave it as None to let the model's answer be used.")
            if self.target_true.strip().lower() == self.target.strip().lower():
                raise ValueError(
                    f"The new target {self.target!r} is the same as the old one; choose a different object to write."
                )

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject.strip(), 1)

    def to_dict(self) -> dict:
        return {"subject": self.subject, "prompt": self.prompt, "target": self.target, "target_true": self.target_true}

    @classmethod
    def from_dict(cls, data: dict) -> "EditRequest":
        try:
            return cls(subject=data["subject"], prompt=data["prompt"], target=data["target"],
                       target_true=data.get("target_true"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"An edit request needs subject, prompt and target fields ({exc}).") from None


@dataclass(frozen=True, eq=False)
class Edit:
    """A rank-one edit of one layer's MLP down-projection: ``ΔW = v uᵀ`` in (out, in) orientation.

    Shapes: ``u`` (d_in,) unit vector C⁻¹k*/‖C⁻¹k*‖; ``v`` (d_out,);
    ``key`` k* (d_in,) and ``value`` v* (d_out,), the pair the edited layer maps
    (``W' k* + b = v*``). ``timings`` holds seconds per stage (answer,
    templates, statistics, keys, optimise, update, other), which add up to
    :attr:`seconds`; ``info`` the optimisation's diagnostics.
    """

    request: EditRequest
    layer: int
    module: str  # dotted name of the edited down-projection
    u: np.ndarray  # (d_in,) float32
    v: np.ndarray  # (d_out,) float32
    key: np.ndarray  # (d_in,) float32: k*
    value: np.ndarray  # (d_out,) float32: v*
    variant: str = "r-rome"
    model: str = ""
    fingerprint: str = ""
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    hparams: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """Wall time of :func:`compute_edit` (the stages in ``timings`` add up to it)."""
        return float(sum(self.timings.values()))

    @property
    def norm(self) -> float:
        """Frobenius norm of the update ΔW (= ‖u‖‖v‖)."""
        return float(np.linalg.norm(self.u.astype(np.float64)) * np.linalg.norm(self.v.astype(np.float64)))

    def update(self, conv1d: bool = False, device=None) -> torch.Tensor:
        """ΔW as a float32 tensor in the weight's orientation: (out, in), or (in, out) for Conv1D."""
        u = torch.from_numpy(np.ascontiguousarray(self.u, dtype=np.float32)).to(device)
        v = torch.from_numpy(np.ascontiguousarray(self.v, dtype=np.float32)).to(device)
        return torch.outer(u, v) if conv1d else torch.outer(v, u)

    def describe(self) -> str:
        """One line for logs and tables."""
        r = self.request
        old = f" (was {r.target_true!r})" if r.target_true else ""
        return f"{r.text!r} -> {r.target!r}{old} at layer {self.layer}, |ΔW| = {self.norm:.3g}"

    def metadata(self) -> dict:
        """Everything but the vectors, JSON-serialisable."""
        return {"request": self.request.to_dict(), "layer": self.layer, "module": self.module,
                "variant": self.variant, "model": self.model, "fingerprint": self.fingerprint,
                "norm": self.norm, "timings": dict(self.timings), "info": dict(self.info),
                "hparams": dict(self.hparams)}

    def to_dict(self) -> dict:
        """JSON-serialisable form (vectors as lists)."""
        data = self.metadata()
        for name in ("u", "v", "key", "value"):
            data[name] = getattr(self, name).astype(np.float32).tolist()
        return data

    @classmethod
    def from_dict(cls, data: dict, vectors: dict[str, np.ndarray] | None = None) -> "Edit":
        """Rebuild from :meth:`to_dict` output (or metadata plus ``vectors``); ValueError when malformed."""
        try:
            vecs = {}
            for name in ("u", "v", "key", "value"):
                raw = vectors[name] if vectors is not None else data[name]
                arr = np.asarray(raw, dtype=np.float32)
                if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
                    raise ValueError(f"vector {name!r} must be a non-empty finite 1-D array")
                vecs[name] = arr
            if vecs["u"].shape != vecs["key"].shape or vecs["v"].shape != vecs["value"].shape:
                raise ValueError("u/key and v/value shapes disagree")
            layer = int(data["layer"])
            if layer < 0:
                raise ValueError("negative layer")
            request = EditRequest.from_dict(data["request"])
            request.validate()
            return cls(request=request, layer=layer, module=str(data["module"]),
                       variant=str(data.get("variant", "r-rome")), model=str(data.get("model", "")),
                       fingerprint=str(data.get("fingerprint", "")), timings=dict(data.get("timings") or {}),
                       info=dict(data.get("info") or {}), hparams=dict(data.get("hparams") or {}), **vecs)
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise ValueError(f"Malformed edit record: {exc}") from None


# ---------------------------------------------------------------------------
# Applying edits


# The unedited originals of the weights that edits currently change, per model: {id(weight): (weight, original)}.
# `applied` and `EditStack` register what they save, so that caches of the model's own behaviour (context
# templates, key statistics) can always be computed on the original weights (`original_weights`).
_ORIGINALS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, tuple[torch.Tensor, torch.Tensor]]]" = (
    weakref.WeakKeyDictionary())


def _register(lm: LoadedModel, saved: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """Record saved originals that no outer context has recorded yet; returns the ids this call owns."""
    registry = _ORIGINALS.setdefault(lm.model, {})
    owned = [key for key in saved if key not in registry]
    for key in owned:
        registry[key] = saved[key]
    return owned


def _unregister(lm: LoadedModel, owned: Iterable[int]) -> None:
    registry = _ORIGINALS.get(lm.model, {})
    for key in owned:
        registry.pop(key, None)


def is_edited(lm: LoadedModel) -> bool:
    """Whether any edit (``applied`` or an :class:`EditStack`) currently changes the model's weights."""
    return bool(_ORIGINALS.get(lm.model))


@contextmanager
def original_weights(lm: LoadedModel) -> Iterator[LoadedModel]:
    """Within the block the model has its unedited weights, whatever edits are applied; on exit they are back.

    Example::

        with applied(lm, visitor_edits):
            with original_weights(lm):
                templates = sample_from(lm)      # the model's own behaviour, for a shared cache
            generate(lm, prompts)                # edited again here

    Used by everything that caches what *the model* does (context templates,
    key statistics), so that a cache filled while edits are applied is still
    right for everyone. The edited values are copied aside and copied back
    bit for bit, also on exceptions.
    """
    registry = _ORIGINALS.get(lm.model)
    if not registry:
        yield lm
        return
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for weight, original in list(registry.values()):
                swapped.append((weight, weight.detach().clone()))
                weight.copy_(original)
        yield lm
    finally:
        with torch.no_grad():
            for weight, edited in swapped:
                weight.copy_(edited)


def _weight(lm: LoadedModel, edit: Edit) -> torch.nn.Parameter:
    """The weight an edit changes, after checking that it fits this model."""
    if not 0 <= edit.layer < lm.n_layers:
        raise ValueError(
            f"This edit targets layer {edit.layer}, but {lm.name} has layers 0 to {lm.n_layers - 1}; "
            "it was made for another model."
        )
    name = lm.module_name("down_proj", edit.layer)
    if edit.module and edit.module != name:
        raise ValueError(f"This edit changes {edit.module!r}, but this model's layer {edit.layer} is {name!r}; "
                         "it was made for another architecture.")
    weight = lm.down_proj(edit.layer).weight
    expected = (len(edit.u), len(edit.v)) if lm.spec.conv1d else (len(edit.v), len(edit.u))
    if tuple(weight.shape) != expected:
        raise ValueError(
            f"This edit's update has shape {expected}, but {name}.weight of {lm.name} is {tuple(weight.shape)}; "
            "it was made for another model."
        )
    if edit.fingerprint and edit.fingerprint != lm.fingerprint:
        log.info("Edit computed on %s (%s) applied to %s (%s)", edit.model, edit.fingerprint, lm.name, lm.fingerprint)
    return weight


def check_edits(lm: LoadedModel, edits: Iterable[Edit], *, same_model: bool = True) -> None:
    """A ValueError naming the first edit that does not fit ``lm``; the weights are never touched.

    Checks the layer, the module and the update's shape, and with
    ``same_model`` also that the edit was computed on these very weights (its
    fingerprint): an edit carries a value vector v* that only means something
    to the model it was optimised on, even when another model has the same
    shapes.
    """
    for i, edit in enumerate(edits):
        where = f"Edit {i + 1} ({edit.request.text!r} → {edit.request.target!r})"
        try:
            _weight(lm, edit)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if same_model and edit.fingerprint != lm.fingerprint:
            made_for = f"{edit.model or 'an unnamed model'} (fingerprint {edit.fingerprint or 'missing'})"
            raise ValueError(
                f"{where} was made for {made_for}, not for the loaded {lm.name} (fingerprint {lm.fingerprint}). "
                "An edit only carries over to the exact weights it was computed on: compute it again on this model."
            )


def _add(lm: LoadedModel, edit: Edit, weight: torch.Tensor) -> None:
    """weight += ΔW, computed in float32 and stored in the weight's dtype."""
    update = edit.update(conv1d=lm.spec.conv1d, device=weight.device)
    with torch.no_grad():
        weight.copy_((weight.float() + update).to(weight.dtype))


@contextmanager
def applied(lm: LoadedModel, edits: Iterable[Edit] | Edit) -> Iterator[LoadedModel]:
    """Apply edits in order for the duration of a ``with`` block; restore every weight bit for bit on exit.

    Example::

        with applied(lm, visitor_edits):
            text = generate(lm, prompts)
        # lm's weights are the originals here, also if the block raised

    Every edit is checked against the model before any weight changes, so a
    bad edit leaves the model untouched. The originals of the touched weights
    are copied (a few MB) and copied back, never recovered by subtraction.
    """
    edits = [edits] if isinstance(edits, Edit) else list(edits)
    _ = lm.fingerprint  # fix the model's identity (cache keys) on the unedited weights
    weights = [_weight(lm, edit) for edit in edits]
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    owned: list[int] = []
    try:
        for weight in weights:
            if id(weight) not in saved:
                saved[id(weight)] = (weight, weight.detach().clone())
        owned = _register(lm, saved)
        for edit, weight in zip(edits, weights):
            _add(lm, edit, weight)
        yield lm
    finally:
        with torch.no_grad():
            for weight, original in saved.values():
                weight.copy_(original)
        _unregister(lm, owned)


class EditStack:
    """Edits applied to a model one after another, with undo-last and reset.

    Example::

        stack = EditStack(lm)
        stack.push(edit1); stack.push(compute_edit(lm, request2))   # the second builds on the first
        stack.undo()          # -> edit2; the weights are exactly those after edit1 alone
        stack.reset()         # every weight bitwise the original

    Also a context manager that resets on exit. The first time a layer is
    touched its weight is copied; undo copies the originals back and re-applies
    the remaining edits, so the result never depends on floating-point
    subtraction.
    """

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self._edits: list[Edit] = []
        self._originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._owned: list[int] = []  # originals this stack registered (see original_weights)

    @property
    def edits(self) -> tuple[Edit, ...]:
        return tuple(self._edits)

    def __len__(self) -> int:
        return len(self._edits)

    def push(self, edit: Edit) -> None:
        """Apply ``edit`` on top of the current ones."""
        _ = self.lm.fingerprint
        weight = _weight(self.lm, edit)
        if id(weight) not in self._originals:
            self._originals[id(weight)] = (weight, weight.detach().clone())
            self._owned.extend(_register(self.lm, {id(weight): self._originals[id(weight)]}))
        try:
            _add(self.lm, edit, weight)
        except BaseException:
            self._rebuild(self._edits)
            raise
        self._edits.append(edit)

    def undo(self) -> Edit:
        """Remove the last edit and return it."""
        if not self._edits:
            raise LookupError("There is no edit to undo.")
        last = self._edits[-1]
        self._rebuild(self._edits[:-1])
        self._edits.pop()
        return last

    def reset(self) -> None:
        """Remove every edit: all weights bitwise the originals."""
        self._rebuild([])
        self._edits.clear()
        self._originals.clear()
        _unregister(self.lm, self._owned)
        self._owned.clear()

    def _rebuild(self, edits: Sequence[Edit]) -> None:
        with torch.no_grad():
            for weight, original in self._originals.values():
                weight.copy_(original)
        for edit in edits:
            _add(self.lm, edit, _weight(self.lm, edit))

    def __enter__(self) -> "EditStack":
        return self

    def __exit__(self, *exc) -> None:
        self.reset()


# ---------------------------------------------------------------------------
# Files


def save_edits(edits: Sequence[Edit], path: str | Path) -> Path:
    """Write edits to one ``.safetensors`` file (vectors as tensors, everything else as JSON metadata)."""
    from safetensors.numpy import save_file

    edits = list(edits)
    tensors, records = {}, []
    for i, edit in enumerate(edits):
        for name in ("u", "v", "key", "value"):
            tensors[f"edit{i}.{name}"] = np.ascontiguousarray(getattr(edit, name), dtype=np.float32)
        records.append(edit.metadata())
    if not tensors:  # safetensors needs at least one tensor; an empty history is still a valid file
        tensors["empty"] = np.zeros(0, dtype=np.float32)
    metadata = {"format": FILE_FORMAT, "version": FILE_VERSION, "edits": json.dumps(records)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


MAX_VECTOR = 1 << 20  # longest vector an edits file may hold (d_model / d_ff of any supported model is far below)


def load_edits(path: str | Path, *, max_bytes: int | None = None, max_edits: int | None = None) -> list[Edit]:
    """Read edits written by :func:`save_edits`; ValueError with the reason for anything else.

    Example::

        edits = load_edits("edits.safetensors", max_bytes=2_000_000, max_edits=20)
        check_edits(lm, edits)            # made for this model? (nothing is applied)

    Cheap checks come first: the file's size (before it is opened), the
    header's format and number of edits, then each named tensor's shape;
    only the tensors the header names are read, and every request is
    validated as a typed one would be. Nothing is ever unpickled.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Edit file {path.name} does not exist.")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{path.name} is {size:,} bytes; edits files are accepted up to {max_bytes:,} bytes.")
    if size < 8:
        raise ValueError(f"{path.name} is not a readable edits file (expected a .safetensors file saved by locate-edit): "
                         f"it is only {size} bytes.")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    if header_len > size - 8:
        raise ValueError(f"{path.name} is not a readable edits file (expected a .safetensors file saved by locate-edit): "
                         "its header is longer than the file.")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            names = set(f.keys())
            records = _records(path, metadata, max_edits)
            wanted = [f"edit{i}.{name}" for i in range(len(records)) for name in ("u", "v", "key", "value")]
            missing = [name for name in wanted if name not in names]
            if missing:
                raise ValueError(f"{path.name} is missing tensor {missing[0]!r}.")
            for name in wanted:
                shape = tuple(f.get_slice(name).get_shape())
                if len(shape) != 1 or not 0 < shape[0] <= MAX_VECTOR:
                    raise ValueError(f"{path.name}: tensor {name!r} has shape {shape}; edit vectors are 1-D.")
            tensors = {name: f.get_tensor(name) for name in wanted}
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(
            f"{path.name} is not a readable edits file (expected a .safetensors file saved by locate-edit): {exc}"
        ) from None
    edits = []
    for i, record in enumerate(records):
        vectors = {name: tensors[f"edit{i}.{name}"] for name in ("u", "v", "key", "value")}
        try:
            edits.append(Edit.from_dict(record, vectors))
        except ValueError as exc:
            raise ValueError(f"{path.name}, edit {i + 1}: {exc}") from None
    return edits


def _records(path: Path, metadata: dict, max_edits: int | None) -> list:
    """The edit records of a file's header, after checking its format, version and count."""
    if metadata.get("format") != FILE_FORMAT:
        raise ValueError(f"{path.name} is a safetensors file but not a locate-edit edits file (no {FILE_FORMAT!r} header).")
    if metadata.get("version") != FILE_VERSION:
        raise ValueError(f"{path.name} has edits file version {metadata.get('version')!r}; this version reads {FILE_VERSION!r}.")
    try:
        records = json.loads(metadata["edits"])
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise TypeError("the edits header is not a list of records")
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{path.name} has a corrupt edits header: {exc}") from None
    if max_edits is not None and len(records) > max_edits:
        raise ValueError(f"{path.name} holds {len(records)} edits; at most {max_edits} are accepted at once.")
    return records
