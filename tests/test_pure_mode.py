"""Pure eps-DP mode (docs/theory.md §6): the rejection sampler and the exact privacy of its output.

The output of the pure mode is Normal(m_D, Sigma) conditioned on W_R = {w : ||w||_A <= R}, with
density phi(w; m_D, Sigma) / Z(m_D) on W_R, where Z(m) = P(||w||_A <= R) is a noncentral
chi-square probability (k >= 2) or a Normal integral (k = 1). The log density ratio of two
neighbouring datasets, normalisers included, must stay within eps everywhere on W_R.
"""

import numpy as np
import pytest
from scipy import integrate, stats

from qem.mechanism import QuadraticExponentialMechanism, clip_gradients
from qem.quadratic import validate_curvature

EPS = 1.0
N, LAM, C = 40, 1.0, 1.0


def spd(rng: np.random.Generator, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return (q * np.logspace(-1, 0.5, k)) @ q.T


def a_norm(w: np.ndarray, A: np.ndarray) -> np.ndarray:
    """||w_i||_A for the rows of w."""
    return np.sqrt(np.einsum("ni,ij,nj->n", w, A, w))


def pure_mechanism(A: np.ndarray, clipping: str = "dual", adjacency: str = "replace_one", **kw):
    mech = QuadraticExponentialMechanism(
        A, N=N, lam=LAM, clip_norm=C, clipping=clipping, adjacency=adjacency, mode="pure", **kw
    )
    mech.calibrate(EPS)
    return mech


def record_direction(A: np.ndarray, clipping: str, rng: np.random.Generator) -> np.ndarray:
    """A gradient far outside the clipping ball: any direction (dual), or along the eigenvector
    of lambda_min(A) (Euclidean), where the dual norm of a clipped gradient is largest."""
    k = A.shape[0]
    v = rng.standard_normal(k) if clipping == "dual" else np.linalg.eigh(A)[1][:, 0]
    return 100.0 * C * v / np.linalg.norm(v)


def worst_case_sums(A, clipping, adjacency, rng) -> tuple[np.ndarray, np.ndarray]:
    """N records: N - 1 shared clipped gradients along v and one differing record.

    ||S||_{A^-1} reaches N b (the n_max = N bound), so ||m_D|| differs between D and D' and the
    normalisers Z(m_D) != Z(m_D') matter.
    """
    v = record_direction(A, clipping, rng)
    gh, _ = clip_gradients(np.stack([v, -v]), C, clipping, cholesky=validate_curvature(A))
    common = (N - 1) * gh[0]
    if adjacency == "replace_one":
        return common + gh[0], common + gh[1]
    return common + gh[0], common


def log_acceptance(m: np.ndarray, A: np.ndarray, beta: float, radius: float) -> float:
    """log P(||w||_A <= R) for w ~ Normal(m, (beta N lam A)^-1)."""
    precision = beta * N * LAM
    if A.shape[0] == 1:
        sd = 1.0 / np.sqrt(precision * A[0, 0])
        bound = radius / np.sqrt(A[0, 0])
        value, _ = integrate.quad(
            lambda x: stats.norm.pdf(x, m[0], sd), -bound, bound, epsabs=0, epsrel=1e-12
        )
        return float(np.log(value))
    nc = precision * float(m @ A @ m)
    return float(stats.ncx2.logcdf(precision * radius**2, A.shape[0], nc))


def max_log_ratio(mech, A, S, S2, beta: float, points: np.ndarray) -> float:
    """max over points of |log p_D(w) - log p_D'(w)| for the truncated Normals at this beta."""
    m, m2 = mech.mean(S), mech.mean(S2)
    precision = beta * N * LAM * A
    quad = np.einsum("ni,ij,nj->n", points - m, precision, points - m)
    quad2 = np.einsum("ni,ij,nj->n", points - m2, precision, points - m2)
    log_z = log_acceptance(m, A, beta, mech.radius)
    log_z2 = log_acceptance(m2, A, beta, mech.radius)
    ratio = -0.5 * (quad - quad2) - log_z + log_z2
    return float(np.max(np.abs(ratio)))


def points_in_ball(A, S, S2, radius, rng, n=2000) -> np.ndarray:
    """Uniform points of W_R, its centre, and the two boundary points along A^-1 (S - S')."""
    k = A.shape[0]
    u = rng.standard_normal((n, k))
    u *= (radius * rng.uniform(size=(n, 1)) ** (1.0 / k)) / np.linalg.norm(u, axis=1)[:, None]
    w = np.linalg.solve(validate_curvature(A).T, u.T).T  # ||w||_A = ||u||
    extreme = np.linalg.solve(A, S - S2)
    extreme *= radius / np.sqrt(extreme @ A @ extreme)
    points = np.vstack([w, np.zeros(k), extreme, -extreme])
    assert np.all(a_norm(points, A) <= radius * (1 + 1e-12))
    return points


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("clipping", ["dual", "euclidean"])
@pytest.mark.parametrize("adjacency", ["replace_one", "add_remove"])
def test_log_density_ratio_within_eps(k, clipping, adjacency):
    rng = np.random.default_rng(10 * k + len(clipping) + len(adjacency))
    A = spd(rng, k)
    mech = pure_mechanism(A, clipping, adjacency)
    S, S2 = worst_case_sums(A, clipping, adjacency, rng)
    points = points_in_ball(A, S, S2, mech.radius, rng)
    assert max_log_ratio(mech, A, S, S2, mech.beta, points) <= EPS + 1e-9
    # the same check catches an inverse temperature twice too large
    assert max_log_ratio(mech, A, S, S2, 2.0 * mech.beta, points) > EPS + 1e-3


def test_normaliser_matches_monte_carlo():
    """The ncx2 normaliser used above is P(||w||_A <= R) (checked by simulation, k = 3)."""
    rng = np.random.default_rng(5)
    A = spd(rng, 3)
    mech = pure_mechanism(A)
    S, _ = worst_case_sums(A, "dual", "replace_one", rng)
    m, n = mech.mean(S), 200_000
    cov = np.linalg.inv(mech.beta * N * LAM * A)
    w = rng.multivariate_normal(m, cov, size=n)
    p = np.mean(a_norm(w, A) <= mech.radius)
    expected = np.exp(log_acceptance(m, A, mech.beta, mech.radius))
    assert abs(p - expected) < 5 * np.sqrt(expected * (1 - expected) / n)


@pytest.mark.parametrize("clipping", ["dual", "euclidean"])
def test_sampler_is_the_truncated_normal(clipping):
    rng = np.random.default_rng(7)
    k, n = 4, 20_000
    A = spd(rng, k)
    mech = pure_mechanism(A, clipping, seed=3)
    S, _ = worst_case_sums(A, clipping, "replace_one", rng)  # ||S|| = N b: worst-case acceptance
    w = mech.sample(S, size=n)
    R = mech.radius
    assert w.shape == (n, k)
    assert np.all(a_norm(w, A) <= R * (1 + 1e-12))

    precision = mech.beta * N * LAM
    m = mech.mean(S)
    accept = stats.ncx2.cdf(precision * R**2, k, precision * m @ A @ m)
    assert accept == pytest.approx(mech.preview().worst_case_acceptance, rel=1e-6)
    assert accept < 0.9  # rejections happen, so the containment check above is not vacuous
    # accepted / proposals: binomial with success probability accept
    draws = mech.last_draws
    assert abs(n / draws - accept) < 5 * np.sqrt(accept * (1 - accept) / draws)

    # squared whitened norms of the accepted draws follow ncx2 truncated at beta N lam R^2
    def truncated_cdf(t):
        return stats.ncx2.cdf(t, k, precision * m @ A @ m) / accept

    t = precision * a_norm(w, A) ** 2
    assert stats.kstest(t, truncated_cdf).pvalue > 1e-3
    # and the direction is that of the Normal: the mean of accepted draws lies along m
    mean = w.mean(axis=0)
    cosine = (mean @ A @ m) / np.sqrt((mean @ A @ mean) * (m @ A @ m))
    assert cosine > 0.99


def test_user_radius_and_set_beta():
    rng = np.random.default_rng(8)
    A = spd(rng, 3)
    mech = pure_mechanism(A, radius=2.0)
    assert mech.radius == 2.0
    beta = mech.beta
    preview = mech.set_beta(beta / 2)
    assert preview.epsilon == pytest.approx(EPS / 2, rel=1e-12)
    assert preview.delta == 0.0
    assert preview.mu is None


def test_seeded_rejection_is_reproducible():
    rng = np.random.default_rng(9)
    A = spd(rng, 2)
    S, _ = worst_case_sums(A, "dual", "replace_one", rng)
    first, second = pure_mechanism(A, seed=4), pure_mechanism(A, seed=4)
    assert np.array_equal(first.sample(S, size=50), second.sample(S, size=50))
    assert first.last_draws == second.last_draws
