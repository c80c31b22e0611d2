"""Pure eps-DP mode (qem.privacy.pure, docs/theory.md §6): the calibration, the privacy of the
restricted exponential mechanism, and the worst-case acceptance of the rejection sampler."""

import math

import numpy as np
import pytest
from scipy import special

from qem.errors import InvalidParameterError, RejectionSamplingError
from qem.privacy import (
    MIN_ACCEPTANCE,
    Adjacency,
    ClipNorm,
    Sensitivity,
    acceptance_at_radius,
    check_acceptance,
    choose_radius,
    pure_beta,
    utility_sensitivity,
    worst_case_acceptance,
)


def _spd(k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return (q * np.geomspace(0.1, 10.0, k)) @ q.T


@pytest.mark.parametrize(
    ("sens", "s_bound"),
    [
        (Sensitivity(0.5), 2 * 0.5),
        (Sensitivity(0.5, Adjacency.ADD_REMOVE), 0.5),
        (Sensitivity(0.5, clipping=ClipNorm.EUCLIDEAN, lambda_min=0.04), 2 * 0.5 / 0.2),
    ],
)
def test_pure_beta_is_eps_over_twice_the_utility_sensitivity(sens, s_bound):
    eps, R = 2.0, 3.0
    assert utility_sensitivity(R, sens) == pytest.approx(s_bound * R, rel=1e-15)
    assert pure_beta(eps, R, sens) == pytest.approx(eps / (2 * s_bound * R), rel=1e-15)


def test_utility_sensitivity_bounds_the_utility_change_and_is_attained():
    """|u(w; D) - u(w; D')| = |(gh_j - gh_j')^T w| <= s C R on W_R, with equality for
    w = R A^-1 v / ||v||_{A^-1}, v = gh_j - gh_j'."""
    k, C, R, N, lam = 4, 0.8, 2.0, 10, 0.5
    A = _spd(k, 0)
    L = np.linalg.cholesky(A)
    rng = np.random.default_rng(1)
    grads = rng.standard_normal((N, k))
    grads *= np.minimum(1.0, C / np.sqrt(np.sum(grads * np.linalg.solve(A, grads.T).T, 1)))[:, None]
    replaced = grads.copy()
    replaced[0] = -grads[0]

    def utility(w: np.ndarray, g: np.ndarray) -> np.ndarray:
        return -(w @ g.sum(0) + N * lam / 2 * np.einsum("ni,ij,nj->n", w, A, w))

    z = rng.standard_normal((5000, k))
    w = np.linalg.solve(L.T, (R * z / np.linalg.norm(z, axis=1)[:, None]).T).T  # ||w||_A = R
    bound = utility_sensitivity(R, Sensitivity(C))
    assert np.max(np.abs(utility(w, grads) - utility(w, replaced))) <= bound * (1 + 1e-12)
    v = grads[0] - replaced[0]
    v *= 2 * C / math.sqrt(v @ np.linalg.solve(A, v))  # make the pair extreme
    w_star = R * np.linalg.solve(A, v) / math.sqrt(v @ np.linalg.solve(A, v))
    assert abs(v @ w_star) == pytest.approx(bound, rel=1e-12)


def _max_log_ratio(beta: float, c: float, r: float, sums: np.ndarray, v: float) -> float:
    """k = 1: the density prop. to exp(-beta (S w + c w^2 / 2)) on [-r, r]; the largest
    log p_S(w) - log p_{S+v}(w) over w and over the dataset sums S."""
    scale = 1 / math.sqrt(beta * c)

    def log_z(S: np.ndarray) -> np.ndarray:
        m = -S / c
        upper, lower = special.ndtr((r - m) / scale), special.ndtr((-r - m) / scale)
        return beta * S**2 / (2 * c) + np.log(scale * math.sqrt(2 * math.pi) * (upper - lower))

    return float(np.max(beta * abs(v) * r + log_z(sums + v) - log_z(sums)))


@pytest.mark.parametrize("adjacency", list(Adjacency))
def test_restricted_mechanism_is_eps_dp_in_one_dimension(adjacency):
    """The exact density ratio of the mechanism on W_R between neighbours stays below e^eps;
    without the factor 2 of McSherry-Talwar it would not."""
    a, N, lam, C, R, eps = 2.0, 20, 0.5, 1.0, 1.0, 1.0
    sens = Sensitivity(C, adjacency)
    c, r = N * lam * a, R / math.sqrt(a)
    g_max = C * math.sqrt(a)  # |g| / sqrt(a) <= C in one dimension
    s = adjacency.multiplier
    sums = np.linspace(-(N - 1) * g_max, (N - 1) * g_max, 4001)
    beta = pure_beta(eps, R, sens)
    worst = max(_max_log_ratio(beta, c, r, sums, sign * s * g_max) for sign in (-1, 1))
    assert worst <= eps + 1e-9
    assert worst > 0.5 * eps  # the bound is not vacuous
    too_big = max(_max_log_ratio(2 * beta, c, r, sums, sign * s * g_max) for sign in (-1, 1))
    assert too_big > eps


def test_worst_case_acceptance_against_monte_carlo():
    """Draw w ~ Normal(m_D, (beta N lam A)^-1) for the dataset of n_max identical extreme
    clipped gradients (||m_D||_A = n_max C / (N lam)) and count ||w||_A <= R."""
    k, C, N, lam, beta, R = 5, 0.6, 40.0, 0.5, 3.0, 1.25
    n_max = N
    A = _spd(k, 2)
    L = np.linalg.cholesky(A)
    rng = np.random.default_rng(3)
    u = rng.standard_normal(k)
    g = -C * L @ (u / np.linalg.norm(u))  # ||g||_{A^-1} = C
    m = -np.linalg.solve(N * lam * A, n_max * g)
    assert math.sqrt(m @ A @ m) == pytest.approx(n_max * C / (N * lam), rel=1e-12)
    z = rng.standard_normal((200_000, k))
    w = m + np.linalg.solve(L.T, z.T).T / math.sqrt(beta * N * lam)
    accepted = np.linalg.norm(w @ L, axis=1) <= R  # ||w||_A = ||L^T w||
    predicted = worst_case_acceptance(k, R, beta, N, lam, Sensitivity(C), n_max)
    assert 0.05 < predicted < 0.95
    standard_error = math.sqrt(predicted * (1 - predicted) / len(z))
    assert abs(accepted.mean() - predicted) < 5 * standard_error
    # any other dataset of n_max clipped gradients is accepted at least as often
    softer = -np.linalg.solve(N * lam * A, 0.3 * n_max * g)
    w_soft = softer + np.linalg.solve(L.T, z.T).T / math.sqrt(beta * N * lam)
    assert np.mean(np.linalg.norm(w_soft @ L, axis=1) <= R) > accepted.mean() + 0.05


def test_acceptance_grows_with_the_radius():
    radii = np.geomspace(0.01, 100.0, 30)
    sens = Sensitivity(1.0)
    acc = [acceptance_at_radius(1.0, 8, R, 1000, 0.1, sens, 1000) for R in radii]
    assert np.all(np.diff(acc) >= 0)
    assert acc[0] < 1e-3 < 0.99 < acc[-1]


@pytest.mark.parametrize("target", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("adjacency", list(Adjacency))
def test_choose_radius_hits_the_target(target, adjacency):
    sens = Sensitivity(0.5, adjacency)
    args = dict(epsilon=2.0, k=16, N=500, lam=0.2, sensitivity=sens, n_max=501)
    R = choose_radius(target_acceptance=target, **args)
    assert acceptance_at_radius(radius=R, **args) == pytest.approx(target, abs=1e-8)
    assert acceptance_at_radius(radius=0.99 * R, **args) < target  # the smallest such R


def test_check_acceptance_refuses_slow_samplers():
    check_acceptance(MIN_ACCEPTANCE)
    check_acceptance(0.5)
    assert MIN_ACCEPTANCE == 1e-3
    for bad in [9.9e-4, 1e-9, 0.0, math.nan]:
        with pytest.raises(RejectionSamplingError, match="radius"):
            check_acceptance(bad)


BAD_POSITIVE = [0.0, -1.0, math.nan, math.inf]


@pytest.mark.parametrize("bad", BAD_POSITIVE)
def test_bad_positive_inputs(bad):
    sens = Sensitivity(1.0)
    good = dict(k=4, radius=1.0, beta=1.0, N=100, lam=1.0, sensitivity=sens, n_max=100)
    for name in ["radius", "beta", "N", "lam", "n_max"]:
        with pytest.raises(InvalidParameterError, match=name):
            worst_case_acceptance(**{**good, name: bad})
    with pytest.raises(InvalidParameterError, match="epsilon"):
        pure_beta(bad, 1.0, sens)
    with pytest.raises(InvalidParameterError, match="radius"):
        pure_beta(1.0, bad, sens)
    with pytest.raises(InvalidParameterError, match="radius"):
        utility_sensitivity(bad, sens)
    with pytest.raises(InvalidParameterError, match="epsilon"):
        choose_radius(bad, 4, 100, 1.0, sens, 100)


@pytest.mark.parametrize("bad", [0, -3, 2.5, math.nan, True, "4"])
def test_bad_dimension(bad):
    with pytest.raises(InvalidParameterError, match="dimension k"):
        worst_case_acceptance(bad, 1.0, 1.0, 100, 1.0, Sensitivity(1.0), 100)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 1.5, math.nan])
def test_bad_target_acceptance(bad):
    with pytest.raises(InvalidParameterError, match="target_acceptance"):
        choose_radius(1.0, 4, 100, 1.0, Sensitivity(1.0), 100, target_acceptance=bad)
