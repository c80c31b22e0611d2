"""The public quadratic of a round (docs/theory.md §1, §13): A = P^T H0 P + gamma I_k, checked,
symmetrised and factored once in float64 as A = L L^T (lower Cholesky factor) with
lambda_min(A), and handed to every later stage (the clip-norm pass, the private pass, the
mechanism), so that none factors A again. numpy only: the mechanism imports it, and so does the
torch side that builds A.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qem.errors import CurvatureError

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
