"""Applying edits reversibly: :func:`applied` for a ``with`` block, :class:`EditStack` for undo and reset.

Applying edits never loses the original weights: :func:`applied` and
:class:`EditStack` keep a copy of each touched weight and copy it back, byte
for byte, when the context ends (also on exceptions) or on undo/reset; a
MEMIT batch is one edit, undone in one step. :func:`original_weights` lends
the unedited weights for a block (caches of the model's own behaviour), and
:func:`edits_on` says which edits a model carries now.

Example::

    with applied(lm, [edit]):
        generate(lm, ["The Eiffel Tower is located in the city of"])   # [' Rome, Italy...']
    # every weight is bitwise the original here

    stack = EditStack(lm); stack.push(edit); stack.undo(); stack.reset()
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from tracing.models import LoadedModel, editable_weight

from .deltas import WeightDelta
from .edit import ROME, Edit

log = logging.getLogger(__name__)



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
