"""The curvature A as a metric, and per-example clipping in it (docs/theory.md §1, §2).

A = L L^T (lower Cholesky factor, float64) defines the norm ||w||_A = ||L^T w|| on parameters and
its dual ||g||_{A^-1} = sqrt(g^T A^-1 g) = ||L^-1 g|| on gradients. Clipping

    gh_i = g_i min(1, C / ||g_i||)

in the dual norm (default) or the Euclidean norm bounds each record's influence on the mechanism's
mean m_D = -(N lam A)^-1 sum_i gh_i; qem.privacy.sensitivity turns that bound into mu.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from qem.checks import check_positive
from qem.errors import InvalidParameterError, NonFiniteError, ShapeError
from qem.privacy.sensitivity import ClipNorm


def _check_cholesky(cholesky: np.ndarray, k: int) -> np.ndarray:
    L = np.asarray(cholesky, dtype=np.float64)
    if L.shape != (k, k):
        raise ShapeError(
            f"the Cholesky factor has shape {L.shape}, but the gradients have k = {k} "
            "coordinates; pass validate_curvature(A) for the k x k curvature A."
        )
    return L


def dual_norms(g: np.ndarray, L: np.ndarray) -> np.ndarray:
    """||g_i||_{A^-1} = sqrt(g_i^T A^-1 g_i) = ||L^-1 g_i|| for each row of g (n, k)."""
    g = np.asarray(g, dtype=np.float64)
    if g.ndim != 2:
        raise ShapeError(f"gradients must have shape (n, k), got {g.shape}.")
    L = _check_cholesky(L, g.shape[1])
    whitened = linalg.solve_triangular(L, g.T, lower=True)
    return np.sqrt(np.sum(whitened * whitened, axis=0))


def clip_gradients(
    g: np.ndarray,
    clip_norm: float,
    clipping: ClipNorm | str = ClipNorm.DUAL,
    cholesky: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Clipped per-example gradients gh_i = g_i min(1, C / ||g_i||) and how many were clipped.

    ``g`` is (n, k) float64; the norm is ||.||_{A^-1} (``clipping="dual"``, needs ``cholesky``
    = validate_curvature(A)) or the Euclidean norm. Rows are scaled by C / max(||g_i||, C), so a
    zero gradient stays zero.
    """
    g = np.asarray(g, dtype=np.float64)
    if g.ndim != 2:
        raise ShapeError(f"per-example gradients must have shape (n, k), got {g.shape}.")
    clip_norm = check_positive("clip_norm C", clip_norm, "Use a clipping bound such as 1.0.")
    try:
        clipping = ClipNorm(clipping)
    except ValueError:
        raise InvalidParameterError(
            f"clipping must be one of {[c.value for c in ClipNorm]}, got {clipping!r}."
        ) from None
    bad_rows = np.flatnonzero(~np.all(np.isfinite(g), axis=1))
    if bad_rows.size:
        raise NonFiniteError(
            f"per-example gradient {int(bad_rows[0])} of this batch ({bad_rows.size} rows in all) "
            "holds NaN or infinity; check the model, the loss and that record."
        )
    if clipping is ClipNorm.DUAL:
        if cholesky is None:
            raise InvalidParameterError(
                "dual-norm clipping needs the Cholesky factor of A: pass "
                "cholesky=validate_curvature(A), or use clipping='euclidean'."
            )
        norms = dual_norms(g, cholesky)
    else:
        norms = np.linalg.norm(g, axis=1)
    clipped = g * (clip_norm / np.maximum(norms, clip_norm))[:, None]
    return clipped, int(np.count_nonzero(norms > clip_norm))
