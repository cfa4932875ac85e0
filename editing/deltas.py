"""Weight deltas: how edits other than ROME's rank-one update change a weight, and the bounds on their sizes.

A :class:`WeightDelta` is a change of one layer's weight: the whole weight
(FT, FT+L), the value vectors of a few neurons (KN) or a low-rank product
along a few input directions (MEMIT). :func:`check_delta_header` checks the
sizes a file announces before any tensor is read (:mod:`editing.edit_files`).

Example::

    delta = WeightDelta("model.layers.1.mlp.down_proj", 1, np.zeros((576, 1536), np.float32))
    delta.norm                          # 0.0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_VECTOR = 1 << 20  # longest vector or matrix side in an edits file (any supported d_model / d_ff is far below)
MAX_DENSE = 1 << 27  # most elements of one weight delta (GPT-J's down-projection has 2^26)
MAX_DELTAS = 256  # most weight deltas one edit may carry (KN: one per layer it touches)


def float_vector(raw, name: str) -> np.ndarray:
    """A non-empty finite 1-D float32 array, else a ValueError naming it."""
    arr = np.asarray(raw, dtype=np.float32)
    if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
        raise ValueError(f"vector {name!r} must be a non-empty finite 1-D array")
    return arr


@dataclass(frozen=True, eq=False)
class WeightDelta:
    """A change of one layer's weight: the whole weight, the value vectors of some neurons, or a low-rank product.

    Without ``neurons`` or ``basis`` ``delta`` has the weight's own shape and
    layout ((out, in) for ``nn.Linear``, (in, out) for GPT-2's Conv1D) and is
    added to all of it. With ``neurons`` (k,) int64 indices of the module's
    input units, ``delta`` is (k, d_out), neuron-major whatever the layout, and
    only those neurons' value vectors change (KN). With ``basis`` (r, d_in),
    ``delta`` is (r, d_out) and the change is ``ΔW = deltaᵀ basis`` in (out,
    in) orientation: the value ``delta[i]`` is written along the input
    direction ``basis[i]`` (MEMIT; neurons are the special case of one-hot
    directions).

    Example::

        WeightDelta("model.layers.1.mlp.down_proj", 1, np.zeros((576, 1536), np.float32))
        WeightDelta("model.layers.1.mlp.down_proj", 1, values, basis=directions)   # (r, 576), (r, 1536)
    """

    module: str  # dotted name of the module whose .weight changes
    layer: int  # the block it belongs to
    delta: np.ndarray  # float32, see above
    neurons: np.ndarray | None = None  # (k,) int64, or None
    basis: np.ndarray | None = None  # (r, d_in) float32, or None

    def __post_init__(self):
        if self.neurons is not None and self.basis is not None:
            raise ValueError(f"the delta of {self.module!r} has both neurons and a basis; it can have one of them")
        if self.basis is not None and (self.basis.ndim != 2 or self.basis.shape[0] != self.delta.shape[0]):
            raise ValueError(f"the delta of {self.module!r} needs one basis row per value row")

    @classmethod
    def low_rank(cls, module: str, layer: int, values: np.ndarray, basis: np.ndarray, conv1d: bool) -> "WeightDelta":
        """``ΔW = valuesᵀ basis`` ((r, d_out), (r, d_in)), stored as factors, or dense when that is smaller."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        basis = np.ascontiguousarray(basis, dtype=np.float32)
        rank, d_out = values.shape
        d_in = basis.shape[1]
        if rank * (d_in + d_out) < d_in * d_out:
            return cls(module, layer, values, basis=basis)
        dense = basis.T @ values if conv1d else values.T @ basis  # (in, out) or (out, in)
        return cls(module, layer, np.ascontiguousarray(dense, dtype=np.float32))

    @property
    def norm(self) -> float:
        """Frobenius norm of this change."""
        delta = self.delta.astype(np.float64)
        if self.basis is None:
            return float(np.linalg.norm(delta))
        basis = self.basis.astype(np.float64)
        return float(np.sqrt(max(0.0, float(np.sum((delta @ delta.T) * (basis @ basis.T))))))  # ‖Dᵀ B‖_F

    def header(self) -> dict:
        """What a file's header says about this change (checked before its tensors are read)."""
        out = {"module": self.module, "layer": self.layer, "shape": list(self.delta.shape),
               "neurons": None if self.neurons is None else int(len(self.neurons))}
        if self.basis is not None:
            out["basis"] = list(self.basis.shape)
        return out

    @classmethod
    def from_header(cls, entry: dict, delta, neurons=None, basis=None) -> "WeightDelta":
        """Rebuild from :meth:`header` and the arrays; ValueError when they disagree or are malformed."""
        check_delta_header(entry)
        delta = np.asarray(delta, dtype=np.float32)
        if delta.shape != tuple(entry["shape"]) or not np.isfinite(delta).all():
            raise ValueError(f"the delta of {entry['module']!r} must be a finite array of shape {tuple(entry['shape'])}")
        if entry.get("basis") is not None:
            basis = np.asarray(basis, dtype=np.float32) if basis is not None else None
            if basis is None or basis.shape != tuple(entry["basis"]) or not np.isfinite(basis).all():
                raise ValueError(f"the basis of {entry['module']!r} must be a finite array of shape "
                                 f"{tuple(entry['basis'])}")
            return cls(entry["module"], int(entry["layer"]), delta, basis=basis)
        if basis is not None:
            raise ValueError(f"the delta of {entry['module']!r} has a basis its header does not announce")
        if entry.get("neurons") is None:
            if neurons is not None:
                raise ValueError(f"the delta of {entry['module']!r} has neuron indices its header does not announce")
            return cls(entry["module"], int(entry["layer"]), delta)
        index = np.asarray(neurons)
        if index.dtype.kind not in "iu" or index.shape != (entry["neurons"],):
            raise ValueError(f"the neurons of {entry['module']!r} must be {entry['neurons']} integer indices")
        index = index.astype(np.int64)
        if (index < 0).any() or len(np.unique(index)) != len(index):
            raise ValueError(f"the neurons of {entry['module']!r} must be distinct non-negative indices")
        return cls(entry["module"], int(entry["layer"]), delta, index)


def _bounded_shape(shape) -> bool:
    return (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_VECTOR for n in shape)
            and shape[0] * shape[1] <= MAX_DENSE)


def check_delta_header(entry) -> None:
    """A ValueError unless ``entry`` describes a bounded weight change: module, layer, 2-D shapes, neuron count."""
    if not isinstance(entry, dict):
        raise ValueError("a weight delta's header must be an object")
    module, layer, shape, neurons = entry.get("module"), entry.get("layer"), entry.get("shape"), entry.get("neurons")
    basis = entry.get("basis")
    if not isinstance(module, str) or not module or len(module) > 200:
        raise ValueError("a weight delta must name its module")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"the delta of {module!r} has no valid layer")
    if not _bounded_shape(shape):
        raise ValueError(f"the delta of {module!r} has shape {shape!r}; weight deltas are 2-D with at most "
                         f"{MAX_DENSE:,} elements")
    if neurons is not None and (isinstance(neurons, bool) or not isinstance(neurons, int) or neurons != shape[0]):
        raise ValueError(f"the delta of {module!r} announces {neurons!r} neurons but has {shape[0]} rows")
    if basis is not None:
        if neurons is not None:
            raise ValueError(f"the delta of {module!r} announces both neurons and a basis")
        if not _bounded_shape(basis) or basis[0] != shape[0]:
            raise ValueError(f"the delta of {module!r} announces a basis of shape {basis!r}; it must be 2-D, at most "
                             f"{MAX_DENSE:,} elements, with one row per value row ({shape[0]})")
