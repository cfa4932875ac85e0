"""Step 2 of MEMIT (and AlphaEdit's projection): one layer's update from its keys, residuals and key statistics.

:func:`layer_update` solves MEMIT's least-squares problem for one layer, optionally restricted to an allowed
subspace: the null space of the preserved knowledge's keys (:func:`nullspace_basis`, AlphaEdit) less the keys of
earlier edits that must keep their outputs (:func:`allowed_basis`). See :mod:`editing.methods.memit`.

Example::

    basis = allowed_basis(nullspace_basis(stats, 0.02), kept_keys, d_in)
    directions, values = layer_update(keys, resid, mom2, 15000.0, basis=basis)   # ΔW = valuesᵀ directions
"""

from __future__ import annotations

import os

import torch

_PROJECTIONS: dict[tuple, torch.Tensor] = {}  # null-space bases keyed by (stats file, mtime, threshold, device)
_PROJECTIONS_MAX = 16


def nullspace_basis(stats, threshold: float | None, device=None) -> torch.Tensor | None:
    """Eigenvectors of the key statistics C with eigenvalues below ``threshold`` × their mean: (d_in, r) float64.

    The directions that the preserved knowledge's keys (the statistics'
    corpus) use least: AlphaEdit's null space. None when ``threshold`` is None
    (no such restriction: the whole key space).
    """
    if threshold is None:
        return None
    mtime = os.stat(stats.path).st_mtime_ns if stats.path and os.path.exists(stats.path) else id(stats.mom2)
    key = (stats.path or id(stats), mtime, float(threshold), str(device))
    basis = _PROJECTIONS.get(key)
    if basis is None:
        c = torch.from_numpy(stats.mom2).to(device=device, dtype=torch.float64)
        values, vectors = torch.linalg.eigh(c)  # ascending
        basis = vectors[:, values < threshold * values.mean()]
        if len(_PROJECTIONS) >= _PROJECTIONS_MAX:
            _PROJECTIONS.pop(next(iter(_PROJECTIONS)))
        _PROJECTIONS[key] = basis
    return basis


def allowed_basis(null: torch.Tensor | None, kept: torch.Tensor | None, d_in: int, *, device=None,
                  tol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis (d_in, s) of the directions an update may use: span(``null``) ⊖ span(``kept``).

    ``null``: (d_in, r) orthonormal, or None for the whole space; ``kept``:
    (d_in, m) keys whose outputs must not change, or None. Directions of the
    kept keys below ``tol`` of the largest are numerical noise and stay allowed.
    """
    base = null if null is not None else torch.eye(d_in, dtype=torch.float64, device=device)
    if kept is None or kept.shape[1] == 0:
        return base
    coords = base.T @ kept.to(base)  # (r, m): the kept keys inside the allowed space
    u, s, _ = torch.linalg.svd(coords, full_matrices=True)
    rank = int((s > tol * s.max()).sum()) if s.numel() and float(s.max()) > 0 else 0
    return base @ u[:, rank:]  # (d_in, r - rank)


def layer_update(keys: torch.Tensor, resid: torch.Tensor, mom2: torch.Tensor, weight: float, *,
                 basis: torch.Tensor | None = None, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's update as factors (directions (n, d_in), values (n, d_out)): ΔW = valuesᵀ directions.

    ``keys`` (n, d_in), ``resid`` (n, d_out), ``mom2`` C (d_in, d_in), all
    float64. Without ``basis`` it is MEMIT's ``ΔW = R Kᵀ (λC + KKᵀ)⁻¹``, the
    minimiser of ``‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ)``. With ``basis`` B (d_in, s)
    orthonormal, the same objective over updates whose rows lie in span(B):
    ``ΔW = R Kᵀ B (Bᵀ(λC + KKᵀ)B + ρI)⁻¹ Bᵀ``, so ΔW x = 0 for every x ⊥ B.
    """
    k = keys.T  # (d_in, n)
    a = weight * mom2 + k @ k.T  # (d_in, d_in)
    if basis is None:
        directions = torch.linalg.solve(a, k).T  # (n, d_in); a is symmetric
    else:
        small = basis.T @ a @ basis + ridge * torch.eye(basis.shape[1], dtype=a.dtype, device=a.device)  # (s, s)
        directions = (basis @ torch.linalg.solve(small, basis.T @ k)).T  # (n, d_in)
    return directions, resid
