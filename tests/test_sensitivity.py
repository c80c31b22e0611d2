"""Sensitivity of the clipped-gradient sum and the GDP parameter it gives (qem.privacy.sensitivity,
docs/theory.md §2, §3): the bounds hold, are attained, and mu is the Mahalanobis shift of the mean.
"""

import dataclasses
import json
import math

import numpy as np
import pytest

from qem.errors import InvalidParameterError
from qem.privacy import Adjacency, ClipNorm, Sensitivity, gdp_beta, gdp_mu


def _spd(k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return (q * np.geomspace(0.05, 20.0, k)) @ q.T


def _dual_norm(g: np.ndarray, A: np.ndarray) -> np.ndarray:
    """||g||_{A^-1} = sqrt(g^T A^-1 g), row-wise."""
    return np.sqrt(np.einsum("...i,...i->...", g, np.linalg.solve(A, g.T).T))


def test_neighbour_multiplier():
    assert Adjacency.REPLACE_ONE.multiplier == 2
    assert Adjacency.ADD_REMOVE.multiplier == 1
    assert Sensitivity(1.5).dual_norm_bound == 3.0
    assert Sensitivity(1.5, Adjacency.ADD_REMOVE).dual_norm_bound == 1.5


@pytest.mark.parametrize("adjacency", list(Adjacency))
def test_dual_clipping_bound_holds_and_is_attained(adjacency):
    k, C = 6, 0.7
    A = _spd(k, 1)
    bound = Sensitivity(C, adjacency).dual_norm_bound
    rng = np.random.default_rng(2)
    g = rng.standard_normal((2000, k)) * 5
    clipped = g * np.minimum(1.0, C / _dual_norm(g, A))[:, None]
    # replace-one: the sums differ by gh_j - gh_j'; add/remove: by one gh_j
    diffs = clipped[:1000] - clipped[1000:] if adjacency is Adjacency.REPLACE_ONE else clipped
    assert np.max(_dual_norm(diffs, A)) <= bound * (1 + 1e-12)
    # attained: gh_j = C L u (dual norm C), gh_j' = -gh_j
    L = np.linalg.cholesky(A)
    u = rng.standard_normal(k)
    extreme = C * L @ (u / np.linalg.norm(u))
    worst = 2 * extreme if adjacency is Adjacency.REPLACE_ONE else extreme
    assert _dual_norm(worst[None], A)[0] == pytest.approx(bound, rel=1e-12)


@pytest.mark.parametrize("adjacency", list(Adjacency))
def test_euclidean_clipping_bound_holds_and_is_attained(adjacency):
    k, C = 5, 1.3
    A = _spd(k, 3)
    eigenvalues, eigenvectors = np.linalg.eigh(A)
    sens = Sensitivity(C, adjacency, ClipNorm.EUCLIDEAN, lambda_min=eigenvalues[0])
    s = adjacency.multiplier
    assert sens.dual_norm_bound == pytest.approx(s * C / math.sqrt(eigenvalues[0]), rel=1e-15)
    rng = np.random.default_rng(4)
    g = rng.standard_normal((1000, k)) * 5
    clipped = g * np.minimum(1.0, C / np.linalg.norm(g, axis=1))[:, None]
    assert np.max(_dual_norm(s * clipped, A)) <= sens.dual_norm_bound * (1 + 1e-12)
    # attained along the eigenvector of lambda_min(A)
    extreme = s * C * eigenvectors[:, 0]
    assert _dual_norm(extreme[None], A)[0] == pytest.approx(sens.dual_norm_bound, rel=1e-12)
    # and the dual-norm clipping bound would be wrong here: it is smaller
    assert Sensitivity(C, adjacency).dual_norm_bound < sens.dual_norm_bound


def test_mu_is_the_mahalanobis_shift_of_the_mean():
    """m_D = -(N lam A)^-1 sum gh_i, Sigma = (beta N lam A)^-1; for the worst neighbours
    ||Sigma^-1/2 (m_D - m_D')|| equals gdp_mu."""
    k, C, N, lam, beta = 4, 0.9, 50.0, 0.3, 7.0
    A = _spd(k, 5)
    L = np.linalg.cholesky(A)
    rng = np.random.default_rng(6)
    rest = rng.standard_normal((int(N) - 1, k)) * 0.01
    u = rng.standard_normal(k)
    g_j = C * L @ (u / np.linalg.norm(u))
    for adjacency, g_jp in [(Adjacency.REPLACE_ONE, -g_j), (Adjacency.ADD_REMOVE, 0 * g_j)]:
        m = -np.linalg.solve(N * lam * A, rest.sum(0) + g_j)
        m_p = -np.linalg.solve(N * lam * A, rest.sum(0) + g_jp)
        shift = m - m_p
        mahalanobis = math.sqrt(shift @ (beta * N * lam * A) @ shift)
        assert gdp_mu(beta, N, lam, Sensitivity(C, adjacency)) == pytest.approx(
            mahalanobis, rel=1e-10
        )


def test_beta_inverts_mu():
    sens = Sensitivity(0.5, clipping="euclidean", lambda_min=0.2)
    beta = gdp_beta(0.8, 1000, 0.1, sens)
    assert beta == pytest.approx(0.8**2 * 1000 * 0.1 / sens.dual_norm_bound**2, rel=1e-15)
    assert gdp_mu(beta, 1000, 0.1, sens) == pytest.approx(0.8, rel=1e-14)


def test_to_dict_names_every_assumption():
    record = Sensitivity(2.0, "add_remove", "euclidean", lambda_min=0.25).to_dict()
    assert record == {
        "clip_norm": 2.0,
        "adjacency": "add_remove",
        "clipping": "euclidean",
        "lambda_min_A": 0.25,
        "neighbour_multiplier": 1,
        "dual_norm_bound": 4.0,
    }
    json.dumps(record)
    dual = Sensitivity(1.0).to_dict()
    assert dual["lambda_min_A"] is None
    assert dual["adjacency"] == "replace_one"
    assert dual["dual_norm_bound"] == 2.0


def test_strings_are_coerced_and_the_bound_is_frozen():
    sens = Sensitivity(1.0, "replace_one", "dual")
    assert sens.adjacency is Adjacency.REPLACE_ONE
    assert sens.clipping is ClipNorm.DUAL
    with pytest.raises(dataclasses.FrozenInstanceError):
        sens.clip_norm = 2.0


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_bad_clip_norm(bad):
    with pytest.raises(InvalidParameterError, match="clip_norm"):
        Sensitivity(bad)


def test_bad_sensitivity_settings():
    with pytest.raises(InvalidParameterError, match="lambda_min"):
        Sensitivity(1.0, clipping=ClipNorm.EUCLIDEAN)
    for bad in [0.0, -0.1, math.nan, math.inf]:
        with pytest.raises(InvalidParameterError, match="lambda_min"):
            Sensitivity(1.0, clipping=ClipNorm.EUCLIDEAN, lambda_min=bad)
        with pytest.raises(InvalidParameterError, match="lambda_min"):
            Sensitivity(1.0, lambda_min=bad)
    with pytest.raises(InvalidParameterError, match="adjacency must be one of"):
        Sensitivity(1.0, adjacency="swap")
    with pytest.raises(InvalidParameterError, match="clipping must be one of"):
        Sensitivity(1.0, clipping="l1")


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_bad_mu_beta_inputs(bad):
    sens = Sensitivity(1.0)
    for name, call in [
        ("beta", lambda: gdp_mu(bad, 100, 1.0, sens)),
        ("N", lambda: gdp_mu(1.0, bad, 1.0, sens)),
        ("lam", lambda: gdp_mu(1.0, 100, bad, sens)),
        ("mu", lambda: gdp_beta(bad, 100, 1.0, sens)),
        ("N", lambda: gdp_beta(1.0, bad, 1.0, sens)),
        ("lam", lambda: gdp_beta(1.0, 100, bad, sens)),
    ]:
        with pytest.raises(InvalidParameterError, match=name):
            call()


def _release(S: np.ndarray, A: np.ndarray, N: float, lam: float, beta: float, z: np.ndarray):
    """w = -(N lam A)^-1 S + L^-T z / sqrt(beta N lam), A = L L^T (docs/theory.md §1)."""
    L = np.linalg.cholesky(A)
    return -np.linalg.solve(N * lam * A, S) + np.linalg.solve(L.T, z) / math.sqrt(beta * N * lam)


@pytest.mark.parametrize("clipping", list(ClipNorm))
def test_gdp_release_at_lam_is_the_release_at_one_divided_by_lam(clipping):
    """docs/theory.md §9: at a fixed mu, beta N lam grows like lam^2, so the same noise draw gives
    w(lam) = w(1) / lam: choosing the step length after the draw is post-processing."""
    k, N, mu = 5, 300.0, 0.7
    A = _spd(k, 7)
    sens = Sensitivity(0.4, clipping=clipping, lambda_min=float(np.linalg.eigvalsh(A)[0]))
    rng = np.random.default_rng(8)
    S, z = rng.standard_normal(k) * 20, rng.standard_normal(k)
    w_one = _release(S, A, N, 1.0, gdp_beta(mu, N, 1.0, sens), z)
    for lam in [0.01, 0.3, 7.0]:
        w_lam = _release(S, A, N, lam, gdp_beta(mu, N, lam, sens), z)
        np.testing.assert_allclose(w_lam, w_one / lam, rtol=1e-10)
        assert gdp_mu(gdp_beta(mu, N, lam, sens), N, lam, sens) == pytest.approx(mu, rel=1e-14)
