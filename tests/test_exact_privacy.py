"""Exact privacy of the Gaussian-DP mode on worst-case neighbouring datasets (docs/theory.md §3).

For a neighbouring pair the two outputs are Normal(m, Sigma) and Normal(m', Sigma) with the same
Sigma = (beta N lam A)^-1. With d the Mahalanobis distance between m and m', the privacy loss
log p/p' is N(d^2/2, d^2) under the first and N(-d^2/2, d^2) under the second, so

    delta(eps) = P[L > eps] - e^eps P'[L > eps].

d is computed here from the mechanism's actual means and covariance, and delta from scipy's
Normal, independently of qem.privacy. The pair is built by clipping real gradients: two records
whose clipped gradients are opposite and of full norm C (dual norm: any direction; Euclidean:
along the eigenvector of A's smallest eigenvalue, where the dual norm is largest).
"""

import numpy as np
import pytest
from scipy import stats

from qem.mechanism import QuadraticExponentialMechanism, clip_gradients
from qem.quadratic import validate_curvature

EPS, DELTA = 1.0, 1e-5
EPS_GRID = np.linspace(0.0, 8.0, 81)


def loss_profile(distance: float, eps: np.ndarray) -> np.ndarray:
    """delta(eps) of two Normals with equal covariance and Mahalanobis distance ``distance``."""
    mean, sd = distance * distance / 2.0, distance
    return stats.norm.sf(eps, loc=mean, scale=sd) - np.exp(eps) * stats.norm.sf(
        eps, loc=-mean, scale=sd
    )


def scenario(seed: int) -> dict:
    """Random public parameters: A with lambda_min(A) < 1, C, N, lam, k."""
    rng = np.random.default_rng(seed)
    k = 1 + 3 * seed
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    A = (q * np.logspace(-2, 1, k)) @ q.T if k > 1 else np.array([[0.05]])
    return {
        "A": A,
        "C": float(rng.uniform(0.1, 5.0)),
        "N": int(rng.integers(100, 10_000)),
        "lam": float(rng.uniform(0.1, 3.0)),
        "rng": rng,
    }


def worst_case_sums(sc: dict, adjacency: str, clipping: str) -> tuple[np.ndarray, np.ndarray]:
    """Clipped-gradient sums of a worst-case neighbouring pair D, D'."""
    A, C, rng = sc["A"], sc["C"], sc["rng"]
    k = A.shape[0]
    L = validate_curvature(A)
    if clipping == "dual":
        v = rng.standard_normal(k)
        v *= 10.0 * C / np.sqrt(v @ np.linalg.solve(A, v))
    else:
        v = 10.0 * C * np.linalg.eigh(A)[1][:, 0]
    others, _ = clip_gradients(3.0 * rng.standard_normal((7, k)), C, clipping, cholesky=L)
    differing, n_clipped = clip_gradients(np.stack([v, -v]), C, clipping, cholesky=L)
    assert n_clipped == 2
    common = others.sum(axis=0)
    if adjacency == "replace_one":
        return common + differing[0], common + differing[1]
    return common + differing[0], common


def mahalanobis_distance(mech: QuadraticExponentialMechanism, sc: dict, S, S2) -> float:
    """d between the two actual output Normals, covariance (beta N lam A)^-1."""
    diff = mech.mean(S) - mech.mean(S2)
    precision = mech.beta * sc["N"] * sc["lam"] * sc["A"]
    return float(np.sqrt(diff @ precision @ diff))


def privacy_excess(mech: QuadraticExponentialMechanism, sc: dict, S, S2) -> tuple[float, float]:
    """(largest excess of the actual delta(eps) over the claim, smallest excess).

    The claim is (EPS, DELTA) at the target and the stated mu-GDP profile on EPS_GRID.
    """
    d = mahalanobis_distance(mech, sc, S, S2)
    at_target = float(loss_profile(d, np.array(EPS))) - DELTA
    on_grid = loss_profile(d, EPS_GRID) - loss_profile(mech.mu, EPS_GRID)
    return max(at_target, float(on_grid.max())), min(at_target, float(on_grid.min()))


def calibrated(sc: dict, adjacency: str, clipping: str) -> QuadraticExponentialMechanism:
    mech = QuadraticExponentialMechanism(
        sc["A"],
        N=sc["N"],
        lam=sc["lam"],
        clip_norm=sc["C"],
        adjacency=adjacency,
        clipping=clipping,
        seed=0,
    )
    mech.calibrate(EPS, DELTA)
    return mech


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("clipping", ["dual", "euclidean"])
@pytest.mark.parametrize("adjacency", ["replace_one", "add_remove"])
def test_worst_case_pair_meets_claim_tightly(seed, adjacency, clipping):
    sc = scenario(seed)
    mech = calibrated(sc, adjacency, clipping)
    S, S2 = worst_case_sums(sc, adjacency, clipping)
    largest, smallest = privacy_excess(mech, sc, S, S2)
    assert largest <= 1e-9
    assert smallest >= -1e-6
    assert mahalanobis_distance(mech, sc, S, S2) == pytest.approx(mech.mu, rel=1e-8)


def test_typical_pair_is_within_claim():
    """Pairs that differ by less than the worst case leak less."""
    sc = scenario(1)
    mech = calibrated(sc, "replace_one", "dual")
    S, _ = worst_case_sums(sc, "replace_one", "dual")
    S2 = S + 0.3 * sc["rng"].standard_normal(S.shape) * sc["C"] / np.sqrt(S.size)
    largest, _ = privacy_excess(mech, sc, S, S2)
    assert largest <= 0.0


def test_matches_dp_accounting_pld():
    from dp_accounting.pld import privacy_loss_distribution

    sc = scenario(2)
    mech = calibrated(sc, "replace_one", "euclidean")
    S, S2 = worst_case_sums(sc, "replace_one", "euclidean")
    d = mahalanobis_distance(mech, sc, S, S2)
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=1.0, sensitivity=d, value_discretization_interval=1e-4
    )
    # the PLD is a pessimistic discretisation: at least the exact delta, and close to it
    assert DELTA * (1 - 1e-6) <= pld.get_delta_for_epsilon(EPS) <= DELTA * 1.01


# -- mutations: the check above must catch a wrong calibration -------------------------------


@pytest.mark.parametrize("clipping", ["dual", "euclidean"])
def test_check_detects_dropped_replace_one_factor(clipping):
    """Calibrating as if s = 1 while neighbours replace a record (s = 2) violates the claim."""
    sc = scenario(1)
    wrong = calibrated(sc, "add_remove", clipping)
    S, S2 = worst_case_sums(sc, "replace_one", clipping)
    largest, _ = privacy_excess(wrong, sc, S, S2)
    assert largest > 1e-3


@pytest.mark.parametrize("adjacency", ["replace_one", "add_remove"])
def test_check_detects_euclidean_clipping_with_dual_bound(adjacency):
    """Ignoring lambda_min(A) < 1 under Euclidean clipping violates the claim."""
    sc = scenario(2)
    wrong = calibrated(sc, adjacency, "dual")
    S, S2 = worst_case_sums(sc, adjacency, "euclidean")
    largest, _ = privacy_excess(wrong, sc, S, S2)
    assert largest > 1e-3
