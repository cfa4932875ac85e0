"""Edits as data: requests and edits, their reversible application, edit stacks (weight deltas: editing.deltas).

An :class:`Edit` is one request (MEMIT: a batch of requests) written into the
model by one method, as a change of named weights: ROME's is rank-one, ``ΔW =
v uᵀ`` of one layer's MLP down-projection (stored ``u ⊗ v`` for GPT-2's
Conv1D, whose weight is (in, out)); FT, FT+L, KN and MEMIT
(:mod:`editing.methods`) carry deltas of the weights they touch
(:class:`WeightDelta`: a whole weight, the value vectors of a few neurons, or
a low-rank change along a few input directions). Applying edits never loses
the original weights: :func:`applied` and :class:`EditStack` keep a copy of
each touched weight and copy it back, byte for byte, when the context ends
(also on exceptions) or on undo/reset; a MEMIT batch is one edit, undone in
one step. Weight deltas are :mod:`editing.deltas`; files of edits are
:mod:`editing.edit_files`.

Example::

    edit = compute_edit(lm, EditRequest("The Eiffel Tower", "{} is located in the city of", "Rome"))
    with applied(lm, [edit]):
        generate(lm, ["The Eiffel Tower is located in the city of"])   # [' Rome, Italy...']
    # every weight is bitwise the original here

    stack = EditStack(lm); stack.push(edit); stack.undo(); stack.reset()
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from tracing.models import LoadedModel, editable_weight

from .deltas import MAX_DELTAS, WeightDelta, float_vector

log = logging.getLogger(__name__)



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

    @classmethod
    def from_counterfact(cls, record: dict, *, old_required: bool = True) -> "EditRequest":
        """The request of a CounterFact record: ``requested_rewrite`` with ``prompt`` (``{}`` for the subject),
        ``subject``, ``target_new.str`` and ``target_true.str`` (which may be missing unless ``old_required``);
        KeyError or TypeError for a record without these fields."""
        rw = record["requested_rewrite"]
        old = rw["target_true"]["str"] if old_required else (rw.get("target_true") or {}).get("str")
        return cls(subject=rw["subject"], prompt=rw["prompt"], target=rw["target_new"]["str"], target_true=old)


ROME = "rome"
METHOD_NAME = re.compile(r"[a-z][a-z0-9+\-]{0,31}")  # a method's name in files: "rome", "ft", "ft-l", "kn", ...
MAX_REQUESTS = 4096  # most requests one edit may write (a MEMIT batch)


@dataclass(frozen=True, eq=False)
class Edit:
    """Requests written into the model by one method: ROME's rank-one update or other methods' weight deltas.

    ROME (``method="rome"``): ``ΔW = v uᵀ`` of ``module`` in (out, in)
    orientation, with ``u`` (d_in,) the unit vector C⁻¹k*/‖C⁻¹k*‖, ``v``
    (d_out,), ``key`` k* (d_in,) and ``value`` v* (d_out,), the pair the edited
    layer maps (``W' k* + b = v*``). Other methods (``"ft"``, ``"ft-l"``,
    ``"kn"``, ``"memit"``): ``deltas``, one :class:`WeightDelta` per touched
    weight, and ``u``/``v``/``key``/``value`` None; ``layer``/``module`` name
    the main one. ``requests`` holds every request the edit writes (a MEMIT
    batch: several, undone as one step); ``request`` is the first, and the only
    one of every other method. ``timings`` holds seconds per stage, which add
    up to :attr:`seconds`; ``info`` the method's diagnostics; ``hparams`` its
    settings.
    """

    request: EditRequest
    layer: int  # the edited layer (several: the main one)
    module: str  # dotted name of the edited weight's module (several: the main one)
    u: np.ndarray | None = None  # ROME: (d_in,) float32
    v: np.ndarray | None = None  # ROME: (d_out,) float32
    key: np.ndarray | None = None  # ROME: (d_in,) float32: k*
    value: np.ndarray | None = None  # ROME: (d_out,) float32: v*
    variant: str = "r-rome"  # ROME's variant; "" for other methods
    model: str = ""
    fingerprint: str = ""
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    hparams: dict = field(default_factory=dict)
    method: str = ROME  # "rome", "ft", "ft-l", "kn", "memit" (editing.methods.METHODS)
    deltas: tuple[WeightDelta, ...] = ()  # other methods: the weight changes, applied in order
    requests: tuple[EditRequest, ...] = ()  # every request written, the first being `request`; () = (request,)

    def __post_init__(self):
        rank_one = [getattr(self, n) is not None for n in ("u", "v", "key", "value")]
        if self.method == ROME and not all(rank_one):
            raise ValueError("A ROME edit needs its vectors u, v, key and value.")
        if self.method != ROME and (any(rank_one) or not self.deltas):
            raise ValueError(f"A {self.method!r} edit carries weight deltas (and no rank-one vectors).")
        requests = tuple(self.requests) or (self.request,)
        if requests[0] != self.request:
            raise ValueError("An edit's first request must be its `request`.")
        if len(requests) > MAX_REQUESTS:
            raise ValueError(f"An edit writes at most {MAX_REQUESTS} requests, not {len(requests)}.")
        if self.method == ROME and len(requests) != 1:
            raise ValueError("A ROME edit writes exactly one request; batches are MEMIT's (method 'memit').")
        object.__setattr__(self, "requests", requests)

    @property
    def seconds(self) -> float:
        """Wall time of the computation (the stages in ``timings`` add up to it)."""
        return float(sum(self.timings.values()))

    @property
    def layers(self) -> tuple[int, ...]:
        """Every layer this edit changes, ascending."""
        return (self.layer,) if self.method == ROME else tuple(sorted({d.layer for d in self.deltas}))

    @property
    def norm(self) -> float:
        """Frobenius norm of the whole update ΔW (ROME: = ‖u‖‖v‖; several weights: of all of them together)."""
        if self.method == ROME:
            return float(np.linalg.norm(self.u.astype(np.float64)) * np.linalg.norm(self.v.astype(np.float64)))
        return float(np.sqrt(sum(d.norm ** 2 for d in self.deltas)))

    def update(self, conv1d: bool = False, device=None) -> torch.Tensor:
        """ROME's ΔW as a float32 tensor in the weight's orientation: (out, in), or (in, out) for Conv1D."""
        if self.method != ROME:
            raise ValueError(f"A {self.method!r} edit has no single rank-one update; read its deltas.")
        u = torch.from_numpy(np.ascontiguousarray(self.u, dtype=np.float32)).to(device)
        v = torch.from_numpy(np.ascontiguousarray(self.v, dtype=np.float32)).to(device)
        return torch.outer(u, v) if conv1d else torch.outer(v, u)

    def describe(self) -> str:
        """One line for logs and tables."""
        r = self.request
        old = f" (was {r.target_true!r})" if r.target_true else ""
        if self.method == ROME:
            return f"{r.text!r} -> {r.target!r}{old} at layer {self.layer}, |ΔW| = {self.norm:.3g}"
        layers = self.layers
        where = f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"
        neurons = sum(len(d.neurons) for d in self.deltas if d.neurons is not None)
        what = f" ({neurons} neuron{'s' * (neurons != 1)})" if neurons else ""
        fact = f"{r.text!r} -> {r.target!r}{old}"
        if len(self.requests) > 1:
            fact = f"{len(self.requests)} facts ({fact}, ...)"
        return f"{fact} by {method_label(self.method)} at {where}{what}, |ΔW| = {self.norm:.3g}"

    def title(self) -> str:
        """The edit in a few words, for messages: its fact, or the first of its facts and how many there are."""
        r = self.request
        text = f"{r.text!r} → {r.target!r}"
        return text if len(self.requests) == 1 else f"{len(self.requests)} facts: {text}, ..."

    def metadata(self) -> dict:
        """Everything but the arrays, JSON-serialisable (dense edits list their deltas' headers)."""
        data = {"request": self.request.to_dict(), "layer": self.layer, "module": self.module,
                "variant": self.variant, "model": self.model, "fingerprint": self.fingerprint,
                "norm": self.norm, "timings": dict(self.timings), "info": dict(self.info),
                "hparams": dict(self.hparams), "method": self.method}
        if self.method != ROME:
            data["deltas"] = [d.header() for d in self.deltas]
        if len(self.requests) > 1:
            data["requests"] = [r.to_dict() for r in self.requests]
        return data

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by their names in files: u, v, key, value (ROME), or delta{j}, neurons{j} and basis{j}."""
        if self.method == ROME:
            return {name: np.ascontiguousarray(getattr(self, name), dtype=np.float32)
                    for name in ("u", "v", "key", "value")}
        out = {}
        for j, d in enumerate(self.deltas):
            out[f"delta{j}"] = np.ascontiguousarray(d.delta, dtype=np.float32)
            if d.neurons is not None:
                out[f"neurons{j}"] = np.ascontiguousarray(d.neurons, dtype=np.int64)
            if d.basis is not None:
                out[f"basis{j}"] = np.ascontiguousarray(d.basis, dtype=np.float32)
        return out

    def to_dict(self) -> dict:
        """JSON-serialisable form (arrays as lists)."""
        data = self.metadata()
        data.update({name: arr.tolist() for name, arr in self.arrays().items()})
        return data

    @classmethod
    def from_dict(cls, data: dict, vectors: dict[str, np.ndarray] | None = None) -> "Edit":
        """Rebuild from :meth:`to_dict` output (or metadata plus ``vectors``, named as by :meth:`arrays`).

        ValueError when malformed.
        """
        try:
            source = vectors if vectors is not None else data
            method = data.get("method", ROME)
            if not isinstance(method, str) or not METHOD_NAME.fullmatch(method):
                raise ValueError(f"unknown method {method!r}")
            arrays: dict = {}
            if method == ROME:
                for name in ("u", "v", "key", "value"):
                    arrays[name] = float_vector(source[name], name)
                if arrays["u"].shape != arrays["key"].shape or arrays["v"].shape != arrays["value"].shape:
                    raise ValueError("u/key and v/value shapes disagree")
            else:
                headers = data["deltas"]
                if not isinstance(headers, list) or not 0 < len(headers) <= MAX_DELTAS:
                    raise ValueError(f"a {method!r} edit needs 1 to {MAX_DELTAS} weight deltas")
                arrays["deltas"] = tuple(
                    WeightDelta.from_header(entry, source[f"delta{j}"], source.get(f"neurons{j}"),
                                            source.get(f"basis{j}"))
                    for j, entry in enumerate(headers))
            layer = int(data["layer"])
            if layer < 0:
                raise ValueError("negative layer")
            request = EditRequest.from_dict(data["request"])
            request.validate()
            requests = (request,)
            if data.get("requests") is not None:
                check_request_count(data["requests"])
                requests = tuple(EditRequest.from_dict(r) for r in data["requests"])
                for r in requests:
                    r.validate()
                if requests[0] != request:
                    raise ValueError("its first request differs from its request")
            return cls(request=request, requests=requests, layer=layer, module=str(data["module"]), method=method,
                       variant=str(data.get("variant", "r-rome" if method == ROME else "")),
                       model=str(data.get("model", "")), fingerprint=str(data.get("fingerprint", "")),
                       timings=dict(data.get("timings") or {}), info=dict(data.get("info") or {}),
                       hparams=dict(data.get("hparams") or {}), **arrays)
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise ValueError(f"Malformed edit record: {exc}") from None


def check_request_count(requests) -> int:
    """How many requests a record's ``requests`` list holds; ValueError unless it is a list of 1 to MAX_REQUESTS."""
    if not isinstance(requests, list) or not 0 < len(requests) <= MAX_REQUESTS:
        raise ValueError(f"an edit's requests must be a list of 1 to {MAX_REQUESTS}")
    return len(requests)


def method_label(method: str) -> str:
    """How tables and the page name a method: ROME, FT, FT+L, KN, MEMIT."""
    return {"rome": "ROME", "ft": "FT", "ft-l": "FT+L", "kn": "KN", "memit": "MEMIT"}.get(method, method.upper())


# ---------------------------------------------------------------------------
# Applying edits


# The unedited originals of the weights that edits currently change, per model: {id(weight): (weight, original)}.
# `applied` and `EditStack` register what they save, so that caches of the model's own behaviour (context
# templates, key statistics) can always be computed on the original weights (`original_weights`).
_ORIGINALS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, tuple[torch.Tensor, torch.Tensor]]]" = (
    weakref.WeakKeyDictionary())


# The edits on each model now, in the order they were applied (by `applied` and `EditStack`), so that `applied`
# does not apply again edits that an outer context (the page's engine) has applied already.
_ON_MODEL: "weakref.WeakKeyDictionary[torch.nn.Module, list[Edit]]" = weakref.WeakKeyDictionary()


def edits_on(lm: LoadedModel) -> tuple[Edit, ...]:
    """The edits applied to ``lm`` now (by :func:`applied` or an :class:`EditStack`), in order."""
    return tuple(_ON_MODEL.get(lm.model, ()))


def _new_edits(lm: LoadedModel, edits: list[Edit]) -> list[Edit]:
    """``edits`` without the ones that the model carries already as the start of the list (same objects, order)."""
    on = _ON_MODEL.get(lm.model, [])
    if on and len(edits) >= len(on) and all(a is b for a, b in zip(edits, on)):
        return edits[len(on):]
    return edits


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


def original_of(lm: LoadedModel, weight: torch.Tensor) -> torch.Tensor | None:
    """The unedited value of ``weight`` while applied edits change it, else None."""
    entry = (_ORIGINALS.get(lm.model) or {}).get(id(weight))
    return None if entry is None else entry[1]


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


def _targets(lm: LoadedModel, edit: Edit) -> list[tuple[torch.nn.Parameter, WeightDelta | None]]:
    """The weights an edit changes, each with its dense change (None: ROME's rank-one update), after checking they fit."""
    if not 0 <= edit.layer < lm.n_layers:
        raise ValueError(
            f"This edit targets layer {edit.layer}, but {lm.name} has layers 0 to {lm.n_layers - 1}; "
            "it was made for another model."
        )
    if edit.fingerprint and edit.fingerprint != lm.fingerprint:
        log.info("Edit computed on %s (%s) applied to %s (%s)", edit.model, edit.fingerprint, lm.name, lm.fingerprint)
    if edit.method != ROME:
        return [(delta_weight(lm, d), d) for d in edit.deltas]
    name = lm.module_name("down_proj", edit.layer)
    if edit.module and edit.module != name:
        raise ValueError(f"This edit changes {edit.module!r}, but this model's layer {edit.layer} is {name!r}; "
                         "it was made for another architecture.")
    weight = editable_weight(lm, edit.layer)  # refuses a layer offloaded by accelerate
    expected = (len(edit.u), len(edit.v)) if lm.spec.conv1d else (len(edit.v), len(edit.u))
    if tuple(weight.shape) != expected:
        raise ValueError(
            f"This edit's update has shape {expected}, but {name}.weight of {lm.name} is {tuple(weight.shape)}; "
            "it was made for another model."
        )
    return [(weight, None)]


def delta_weight(lm: LoadedModel, change: WeightDelta | dict) -> torch.nn.Parameter:
    """The weight a dense change (or its file header) names, after checking module, layer and shape against ``lm``."""
    header = change.header() if isinstance(change, WeightDelta) else change
    module, layer, shape = header["module"], header["layer"], tuple(header["shape"])
    if not 0 <= layer < lm.n_layers:
        raise ValueError(f"This edit changes layer {layer}, but {lm.name} has layers 0 to {lm.n_layers - 1}; "
                         "it was made for another model.")
    name = lm.module_name("down_proj", layer)
    if module != name:
        raise ValueError(f"This edit changes {module!r}, but this model's editable weight at layer {layer} is {name!r}; "
                         "it was made for another architecture.")
    weight = editable_weight(lm, layer)  # refuses a layer offloaded by accelerate
    d_in, d_out = weight.shape if lm.spec.conv1d else tuple(reversed(weight.shape))
    if header.get("basis") is not None:
        expected = (header["shape"][0], d_out)
        if header["basis"][1] != d_in:
            raise ValueError(f"This edit writes along directions of {header['basis'][1]} inputs, but {name} has {d_in}; "
                             "it was made for another model.")
    elif header.get("neurons") is None:
        expected = tuple(weight.shape)
    else:
        d_in, d_out = weight.shape if lm.spec.conv1d else tuple(reversed(weight.shape))
        expected = (header.get("neurons"), d_out)
        if isinstance(change, WeightDelta) and len(change.neurons) and int(change.neurons.max()) >= d_in:
            raise ValueError(f"This edit changes neuron {int(change.neurons.max())} of {name}, which has {d_in}; "
                             "it was made for another model.")
    if shape != expected:
        raise ValueError(f"This edit's change of {name}.weight has shape {shape}, but {lm.name} needs {expected}; "
                         "it was made for another model.")
    return weight


def check_edits(lm: LoadedModel, edits: Iterable[Edit], *, same_model: bool = True) -> None:
    """A ValueError naming the first edit that does not fit ``lm``; the weights are never touched.

    Checks the layers, the modules and the updates' shapes, and with
    ``same_model`` also that the edit was computed on these very weights (its
    fingerprint): an edit carries values (ROME's v*, a fine-tuned delta) that
    only mean something to the model they were optimised on, even when another
    model has the same shapes.
    """
    for i, edit in enumerate(edits):
        where = f"Edit {i + 1} ({edit.title()})"
        try:
            _targets(lm, edit)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if same_model and edit.fingerprint != lm.fingerprint:
            made_for = f"{edit.model or 'an unnamed model'} (fingerprint {edit.fingerprint or 'missing'})"
            raise ValueError(
                f"{where} was made for {made_for}, not for the loaded {lm.name} (fingerprint {lm.fingerprint}). "
                "An edit only carries over to the exact weights it was computed on: compute it again on this model."
            )


def _add(lm: LoadedModel, edit: Edit, targets: Sequence[tuple[torch.Tensor, WeightDelta | None]]) -> None:
    """weight += ΔW for every target, computed in float32 and stored in the weight's dtype."""
    with torch.no_grad():
        for weight, change in targets:
            if change is None:
                update = edit.update(conv1d=lm.spec.conv1d, device=weight.device)
                weight.copy_((weight.float() + update).to(weight.dtype))
                continue
            delta = torch.from_numpy(np.ascontiguousarray(change.delta, dtype=np.float32)).to(weight.device)
            if change.basis is not None:  # ΔW = deltaᵀ basis, (out, in)
                basis = torch.from_numpy(np.ascontiguousarray(change.basis, dtype=np.float32)).to(weight.device)
                update = basis.T @ delta if lm.spec.conv1d else delta.T @ basis  # (in, out) or (out, in)
                weight.copy_((weight.float() + update).to(weight.dtype))
                continue
            if change.neurons is None:
                weight.copy_((weight.float() + delta).to(weight.dtype))
                continue
            index = torch.from_numpy(np.ascontiguousarray(change.neurons, dtype=np.int64)).to(weight.device)
            if lm.spec.conv1d:  # (in, out): a neuron's value vector is a row
                weight[index] = (weight[index].float() + delta).to(weight.dtype)
            else:  # (out, in): a column
                weight[:, index] = (weight[:, index].float() + delta.T).to(weight.dtype)


def _save(saved: dict[int, tuple[torch.Tensor, torch.Tensor]], targets) -> None:
    for weight, _ in targets:
        if id(weight) not in saved:
            saved[id(weight)] = (weight, weight.detach().clone())


@contextmanager
def applied(lm: LoadedModel, edits: Iterable[Edit] | Edit) -> Iterator[LoadedModel]:
    """Apply edits in order for the duration of a ``with`` block; restore every weight bit for bit on exit.

    Example::

        with applied(lm, visitor_edits):
            text = generate(lm, prompts)
        # lm's weights are the originals here, also if the block raised

    Every edit is checked against the model before any weight changes, so a
    bad edit leaves the model untouched. The originals of the touched weights
    are copied (a few MB each) and copied back, never recovered by subtraction.
    When the list starts with exactly the edits the model carries now (an
    outer ``applied``, e.g. the page's engine applying a visitor's edits), only
    the rest are applied: ``applied(lm, [*previous, edit])`` inside
    ``applied(lm, previous)`` adds ``edit`` alone.
    """
    edits = _new_edits(lm, [edits] if isinstance(edits, Edit) else list(edits))
    _ = lm.fingerprint  # fix the model's identity (cache keys) on the unedited weights
    plan = [(edit, _targets(lm, edit)) for edit in edits]
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    owned: list[int] = []
    on = _ON_MODEL.setdefault(lm.model, [])
    depth = len(on)
    try:
        for _, targets in plan:
            _save(saved, targets)
        owned = _register(lm, saved)
        for edit, targets in plan:
            _add(lm, edit, targets)
            on.append(edit)
        yield lm
    finally:
        with torch.no_grad():
            for weight, original in saved.values():
                weight.copy_(original)
        del on[depth:]
        _unregister(lm, owned)


class EditStack:
    """Edits applied to a model one after another, with undo-last and reset.

    Example::

        stack = EditStack(lm)
        stack.push(edit1); stack.push(compute_edit(lm, request2))   # the second builds on the first
        stack.undo()          # -> edit2; the weights are exactly those after edit1 alone
        stack.reset()         # every weight bitwise the original

    Also a context manager that resets on exit. The first time a weight is
    touched it is copied; undo copies the originals back and re-applies the
    remaining edits, so the result never depends on floating-point
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
        targets = _targets(self.lm, edit)
        new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for weight, _ in targets:
            if id(weight) not in self._originals and id(weight) not in new:
                new[id(weight)] = (weight, weight.detach().clone())
        self._originals.update(new)
        self._owned.extend(_register(self.lm, new))
        try:
            _add(self.lm, edit, targets)
        except BaseException:
            self._rebuild(self._edits)
            raise
        self._edits.append(edit)
        _ON_MODEL.setdefault(self.lm.model, []).append(edit)

    def undo(self) -> Edit:
        """Remove the last edit and return it."""
        if not self._edits:
            raise LookupError("There is no edit to undo.")
        last = self._edits[-1]
        self._rebuild(self._edits[:-1])
        self._edits.pop()
        self._forget([last])
        if not self._edits:  # back to the originals: the model is no longer edited (is_edited, shipped results)
            self._release()
        return last

    def reset(self) -> None:
        """Remove every edit: all weights bitwise the originals."""
        self._rebuild([])
        self._forget(self._edits)
        self._edits.clear()
        self._release()

    def _forget(self, edits: Sequence[Edit]) -> None:
        """Take ``edits`` off the model's list of applied edits (see :func:`edits_on`)."""
        on = _ON_MODEL.get(self.lm.model, [])
        for edit in edits:
            for i in range(len(on) - 1, -1, -1):
                if on[i] is edit:
                    del on[i]
                    break

    def _release(self) -> None:
        """Forget the saved originals (the weights are the originals again)."""
        self._originals.clear()
        _unregister(self.lm, self._owned)
        self._owned.clear()

    def _rebuild(self, edits: Sequence[Edit]) -> None:
        with torch.no_grad():
            for weight, original in self._originals.values():
                weight.copy_(original)
        for edit in edits:
            _add(self.lm, edit, _targets(self.lm, edit))

    def __enter__(self) -> "EditStack":
        return self

    def __exit__(self, *exc) -> None:
        self.reset()
