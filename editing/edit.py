"""Edits as data: requests and edits (weight deltas: editing.deltas; applying them: editing.applying).

An :class:`Edit` is one request (MEMIT: a batch of requests) written into the
model by one method, as a change of named weights: ROME's is rank-one, ``ΔW =
v uᵀ`` of one layer's MLP down-projection (stored ``u ⊗ v`` for GPT-2's
Conv1D, whose weight is (in, out)); FT, FT+L, KN and MEMIT
(:mod:`editing.methods`) carry deltas of the weights they touch
(:class:`WeightDelta`: a whole weight, the value vectors of a few neurons, or
a low-rank change along a few input directions). Applying edits, which never
loses the original weights, is :mod:`editing.applying`; weight deltas are
:mod:`editing.deltas`; files of edits are :mod:`editing.edit_files`.

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
from dataclasses import dataclass, field

import numpy as np
import torch


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
