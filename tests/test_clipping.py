"""Curvature validation and per-example clipping in the dual norm ||g||_{A^-1} or Euclidean."""

import numpy as np
import pytest

from qem.errors import CurvatureError, InvalidParameterError, NonFiniteError, ShapeError
from qem.mechanism import clip_gradients, dual_norms
from qem.quadratic import curvature_factor, symmetric_curvature, validate_curvature


def spd(rng: np.random.Generator, k: int, eigenvalues: np.ndarray | None = None) -> np.ndarray:
    """A random symmetric positive definite k x k matrix with the given spectrum."""
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    lam = np.logspace(-1, 1, k) if eigenvalues is None else np.asarray(eigenvalues, float)
    return (q * lam) @ q.T


def test_validate_curvature_returns_cholesky_of_symmetrised_matrix():
    rng = np.random.default_rng(0)
    A = spd(rng, 6)
    noise = 1e-13 * rng.standard_normal((6, 6))  # asymmetry within the relative tolerance
    L = validate_curvature(A + noise)
    assert L.dtype == np.float64
    assert np.allclose(np.triu(L, 1), 0.0)
    target = A + (noise + noise.T) / 2
    assert np.allclose(L @ L.T, target, rtol=0, atol=1e-13)
    assert np.array_equal(symmetric_curvature(A + noise), symmetric_curvature(A + noise).T)


@pytest.mark.parametrize(
    ("A", "match"),
    [
        (np.ones(3), "square"),
        (np.ones((2, 3)), "square"),
        (np.ones((0, 0)), "square"),
        (np.array([[1.0, 0.0], [0.0, np.nan]]), "NaN"),
        (np.array([[1.0, np.inf], [np.inf, 1.0]]), "NaN"),
        (np.array([[2.0, 0.5], [0.4, 2.0]]), "not symmetric"),
        (np.array([[2.0, 1e-8], [0.0, 2.0]]), "not symmetric"),
    ],
)
def test_validate_curvature_rejects_bad_matrices(A, match):
    with pytest.raises(CurvatureError, match=match):
        validate_curvature(A)


@pytest.mark.parametrize("bad_eigenvalue", [-0.25, 0.0])
def test_not_positive_definite_names_smallest_eigenvalue_and_gamma(bad_eigenvalue):
    A = spd(np.random.default_rng(1), 4, [bad_eigenvalue, 1.0, 2.0, 3.0])
    with pytest.raises(CurvatureError, match="gamma") as info:
        validate_curvature(A)
    reported = float(str(info.value).split("smallest eigenvalue is ")[1].split(" ")[0])
    assert reported == pytest.approx(bad_eigenvalue, abs=1e-12)


def test_numerically_singular_matrix_is_rejected():
    A = spd(np.random.default_rng(2), 4, [1e-17, 1.0, 2.0, 3.0])
    with pytest.raises(CurvatureError, match="smallest eigenvalue"):
        validate_curvature(A)


def test_curvature_factor():
    A = spd(np.random.default_rng(2), 5, [0.03, 0.5, 1.0, 2.0, 9.0])
    A_sym, L, lambda_min = curvature_factor(A)
    assert lambda_min == pytest.approx(0.03, rel=1e-10)
    assert np.allclose(L @ L.T, A_sym, rtol=0, atol=1e-14)
    assert np.array_equal(A_sym, A_sym.T)


def test_dual_norms_match_definition():
    rng = np.random.default_rng(3)
    A = spd(rng, 7)
    g = rng.standard_normal((11, 7))
    expected = np.sqrt(np.einsum("ni,ij,nj->n", g, np.linalg.inv(A), g))
    assert np.allclose(dual_norms(g, validate_curvature(A)), expected, rtol=1e-12)


@pytest.mark.parametrize("clipping", ["dual", "euclidean"])
def test_clipping_bounds_norms_and_keeps_directions(clipping):
    rng = np.random.default_rng(4)
    k, C = 5, 0.7
    A = spd(rng, k)
    L = validate_curvature(A)
    g = rng.standard_normal((40, k)) * rng.uniform(0.01, 3.0, size=(40, 1))
    g[0] = 0.0

    def norm(x):
        if clipping == "euclidean":
            return np.linalg.norm(x, axis=1)
        return np.sqrt(np.einsum("ni,ij,nj->n", x, np.linalg.inv(A), x))

    clipped, n_clipped = clip_gradients(g, C, clipping, cholesky=L)
    before, after = norm(g), norm(clipped)
    assert 0 < n_clipped < len(g)
    assert n_clipped == np.count_nonzero(before > C)
    assert np.allclose(after, np.minimum(before, C), rtol=1e-12, atol=0)
    small = before <= C
    assert np.array_equal(clipped[small], g[small])
    # each row is g_i times a factor in (0, 1]
    factors = np.einsum("ni,ni->n", clipped, g)[1:] / np.einsum("ni,ni->n", g, g)[1:]
    assert np.allclose(clipped[1:], g[1:] * factors[:, None], rtol=1e-12, atol=1e-15)
    assert np.all((factors > 0) & (factors <= 1.0))


def test_dual_and_euclidean_clipping_differ():
    rng = np.random.default_rng(5)
    A = spd(rng, 4, [0.01, 1.0, 2.0, 50.0])
    g = rng.standard_normal((20, 4))
    L = validate_curvature(A)
    dual, _ = clip_gradients(g, 1.0, "dual", cholesky=L)
    euclid, _ = clip_gradients(g, 1.0, "euclidean")
    assert not np.allclose(dual, euclid)


def test_non_finite_gradient_names_first_bad_row():
    g = np.ones((8, 3))
    g[5, 0] = np.inf
    g[3, 1] = np.nan
    with pytest.raises(NonFiniteError, match=r"gradient 3 .*2 rows"):
        clip_gradients(g, 1.0, "euclidean")


def test_shape_errors():
    L = validate_curvature(np.eye(3))
    with pytest.raises(ShapeError):
        clip_gradients(np.ones(3), 1.0, "dual", cholesky=L)
    with pytest.raises(ShapeError):
        clip_gradients(np.ones((2, 3, 1)), 1.0, "euclidean")
    with pytest.raises(ShapeError, match="k = 4"):
        clip_gradients(np.ones((2, 4)), 1.0, "dual", cholesky=L)
    with pytest.raises(ShapeError):
        dual_norms(np.ones(3), L)


def test_dual_clipping_needs_cholesky():
    with pytest.raises(InvalidParameterError, match="cholesky"):
        clip_gradients(np.ones((2, 3)), 1.0)


@pytest.mark.parametrize("C", [0.0, -1.0, np.nan, np.inf])
def test_bad_clip_norm(C):
    with pytest.raises(InvalidParameterError, match="clip_norm"):
        clip_gradients(np.ones((2, 3)), C, "euclidean")


def test_bad_clipping_name():
    with pytest.raises(InvalidParameterError, match="euclidean"):
        clip_gradients(np.ones((2, 3)), 1.0, "l1")


def test_empty_batch():
    clipped, n_clipped = clip_gradients(np.zeros((0, 3)), 1.0, "euclidean")
    assert clipped.shape == (0, 3)
    assert n_clipped == 0
