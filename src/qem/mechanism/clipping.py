"""The curvature A as a metric, and per-example clipping in it (docs/theory.md §1, §2).

A = L L^T (lower Cholesky factor, float64) defines the norm ||w||_A = ||L^T w|| on parameters and
its dual ||g||_{A^-1} = sqrt(g^T A^-1 g) = ||L^-1 g|| on gradients. Clipping

    gh_i = g_i min(1, C / ||g_i||)

in the dual norm (default) or the Euclidean norm bounds each record's influence on the mechanism's
mean m_D = -(N lam A)^-1 sum_i gh_i; qem.privacy.sensitivity turns that bound into mu.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

from qem.errors import CurvatureError, InvalidParameterError, NonFiniteError, ShapeError
from qem.privacy.sensitivity import ClipNorm, check_positive

SYMMETRY_RTOL = 1e-10
"""Largest |A - A^T| accepted, relative to max |A|, before A is symmetrised."""


def symmetric_curvature(A: np.ndarray) -> np.ndarray:
    """A as a float64 array, symmetrised as (A + A^T)/2 after checking shape, finiteness and
    symmetry up to SYMMETRY_RTOL. Positive definiteness is checked by ``validate_curvature``."""
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise CurvatureError(f"A must be a non-empty square k x k matrix, got shape {A.shape}.")
    if not np.all(np.isfinite(A)):
        raise CurvatureError(
            "A holds NaN or infinity; check the public data and model used for the curvature."
        )
    scale = float(np.max(np.abs(A)))
    asym = float(np.max(np.abs(A - A.T)))
    if asym > SYMMETRY_RTOL * scale:
        raise CurvatureError(
            f"A is not symmetric: max |A - A^T| = {asym:.3g} with max |A| = {scale:.3g}; "
            "pass a symmetric curvature matrix (for example (A + A.T) / 2)."
        )
    return (A + A.T) / 2.0


def curvature_factor(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(symmetrised A, its lower Cholesky factor L with A = L L^T, lambda_min(A)), in float64.

    A counts as positive definite when lambda_min(A) > k eps_64 lambda_max(A); below that the
    Cholesky factor is dominated by rounding. Otherwise CurvatureError names lambda_min(A).
    """
    A = symmetric_curvature(A)
    eigenvalues = np.linalg.eigvalsh(A)
    lambda_min, lambda_max = float(eigenvalues[0]), float(eigenvalues[-1])
    floor = A.shape[0] * np.finfo(np.float64).eps * max(lambda_max, 0.0)
    try:
        if not lambda_min > floor:
            raise np.linalg.LinAlgError
        L = np.linalg.cholesky(A)
    except np.linalg.LinAlgError:
        raise CurvatureError(
            f"A is not positive definite: its smallest eigenvalue is {lambda_min:.6g} "
            f"(largest {lambda_max:.6g}). Increase the damping gamma in "
            f"A = P^T H0 P + gamma I (for example by {max(-lambda_min, 0.0) + 1e-3:.3g} or more)."
        ) from None
    return A, L, lambda_min


@dataclass(frozen=True, eq=False)
class PublicQuadratic:
    """The public quadratic of one round as one object (docs/theory.md §13): the symmetrised
    float64 A, its lower Cholesky factor L (A = L L^T) and lambda_min(A), computed once by
    ``from_matrix`` and handed to the clip-norm pass, the private pass and the mechanism, so
    that no later stage factors A again."""

    A: np.ndarray
    cholesky: np.ndarray
    lambda_min: float

    @classmethod
    def from_matrix(cls, A: np.ndarray) -> PublicQuadratic:
        """Check, symmetrise and factor A (see ``curvature_factor``)."""
        return cls(*curvature_factor(A))

    @property
    def k(self) -> int:
        """The subspace dimension."""
        return int(self.A.shape[0])


def validate_curvature(A: np.ndarray) -> np.ndarray:
    """The lower Cholesky factor L (A = L L^T, float64) of the symmetrised A.

    Raises CurvatureError when A is not square, not finite, not symmetric or not positive
    definite (see ``curvature_factor``); the last message names lambda_min(A).
    """
    return curvature_factor(A)[1]


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
