"""The Gaussian-DP sampler draws exactly Normal(-(N lam A)^-1 S, (beta N lam A)^-1)
(docs/theory.md §1).

Draws are whitened with the symmetric square root of the claimed precision beta N lam A
(an eigendecomposition, independent of the sampler's Cholesky factor); the whitened draws must
be i.i.d. Normal(0, I_k). Tolerances come from the sampling distribution of each statistic.
"""

import numpy as np
import pytest
from scipy import stats

from qem.mechanism import QuadraticExponentialMechanism

N_DRAWS = 100_000


def spd(rng: np.random.Generator, k: int) -> np.ndarray:
    """A random symmetric positive definite k x k matrix, eigenvalues from 0.1 to 10."""
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return (q * np.logspace(-1, 1, k)) @ q.T


def whiten(w: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Rows precision^{1/2} (w_i - mean), with the symmetric square root."""
    evals, evecs = np.linalg.eigh(precision)
    root = (evecs * np.sqrt(evals)) @ evecs.T
    return (w - mean) @ root


def make_mechanism(k: int, seed: int) -> tuple[QuadraticExponentialMechanism, np.ndarray]:
    rng = np.random.default_rng(seed)
    A = spd(rng, k)
    mech = QuadraticExponentialMechanism(A, N=500, lam=0.7, clip_norm=1.3, seed=seed)
    mech.calibrate(2.0, 1e-6)
    return mech, 10.0 * rng.standard_normal(k)


def test_mean_is_newton_step():
    mech, S = make_mechanism(10, 0)
    expected = -np.linalg.solve(500 * 0.7 * mech.A, S)
    assert np.allclose(mech.mean(S), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("k", [2, 10, 50])
def test_sampler_distribution(k):
    mech, S = make_mechanism(k, 100 + k)
    w = mech.sample(S, size=N_DRAWS)
    assert w.shape == (N_DRAWS, k)
    assert mech.last_draws == N_DRAWS
    mean = -np.linalg.solve(500 * 0.7 * mech.A, S)
    z = whiten(w, mean, mech.beta * 500 * 0.7 * mech.A)

    # mean of Normal(0, I/n): every coordinate within 5 standard deviations
    assert np.max(np.abs(z.mean(axis=0))) < 5.0 / np.sqrt(N_DRAWS)
    # second moments about the known mean: Var(S_ij) = (1 + [i == j]) / n (Wishart)
    second = np.einsum("ni,nj->ij", z, z) / N_DRAWS
    std = np.sqrt((1.0 + np.eye(k)) / N_DRAWS)
    assert np.max(np.abs(second - np.eye(k)) / std) < 6.0
    # squared Mahalanobis norms ~ chi-square(k)
    assert stats.kstest(np.sum(z * z, axis=1), stats.chi2(k).cdf).pvalue > 1e-3
    # every whitened coordinate ~ Normal(0, 1), Bonferroni over the k coordinates
    pvalues = [stats.kstest(z[:, j], "norm").pvalue for j in range(k)]
    assert min(pvalues) > 1e-3 / k


def test_sampler_detects_wrong_covariance():
    """The moment check used above rejects draws whose covariance is off by 10 %."""
    mech, S = make_mechanism(10, 7)
    w = mech.sample(S, size=N_DRAWS)
    mean = mech.mean(S)
    z = whiten(w, mean, 1.1 * mech.beta * 500 * 0.7 * mech.A)
    second = np.einsum("ni,nj->ij", z, z) / N_DRAWS
    std = np.sqrt((1.0 + np.eye(10)) / N_DRAWS)
    assert np.max(np.abs(second - np.eye(10)) / std) > 6.0


def test_preview_predicts_noise_and_excess_loss():
    k, n = 10, 20_000
    mech, S = make_mechanism(k, 3)
    N, lam = 500, 0.7
    preview = mech.preview()
    covariance = np.linalg.inv(mech.beta * N * lam * mech.A)
    assert preview.max_euclidean_std == pytest.approx(
        np.sqrt(np.linalg.eigvalsh(covariance)[-1]), rel=1e-10
    )
    assert preview.noise_scale == pytest.approx(1.0 / np.sqrt(mech.beta * N * lam), rel=1e-12)

    w = mech.sample(S, size=n)
    m = mech.mean(S)

    def surrogate(x: np.ndarray) -> np.ndarray:  # F_D(w) = (1/N) S^T w + (lam/2) w^T A w
        return x @ S / N + 0.5 * lam * np.einsum("ni,ij,nj->n", x, mech.A, x)

    excess = surrogate(w) - surrogate(m[None, :])[0]
    # excess = chi2_k / (2 beta N): std of its mean is sqrt(2k/n) / (2 beta N)
    tolerance = 5.0 * np.sqrt(2.0 * k / n) / (2.0 * mech.beta * N)
    assert abs(excess.mean() - preview.expected_excess_loss) < tolerance
    # the noise in the A-metric: coordinates of L^T (w - m) have std noise_scale
    u = (w - m) @ mech.cholesky
    assert np.allclose(u.std(axis=0), preview.noise_scale, rtol=5.0 * np.sqrt(0.5 / n))


def test_single_draw_has_shape_k():
    mech, S = make_mechanism(4, 11)
    w = mech.sample(S)
    assert w.shape == (4,)
    assert mech.last_draws == 1
