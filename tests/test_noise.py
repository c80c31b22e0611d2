"""The mechanism's normals, how the release depends on them, and secure mode (docs/theory.md §10a).

(a) The release is w = m + L^-T z / sqrt(beta N lam), bit for bit, and its last coordinate is one
scaled normal added to the mean (Mironov's one-dimensional setting). (b) SecureNoise's normals
are standard normal: its inverse-CDF map is checked exactly (symmetry, tail, accuracy, the law's
distance from Phi), its draws statistically. (c) Snapping puts the whitened release on the grid
and rounds the exact sum; its exact law meets the privacy claim. (d) The report names the source.

The statistical tests on operating-system randomness use level 1e-6.
"""

import json
import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
from scipy import linalg, special, stats

from qem.errors import InvalidParameterError
from qem.mechanism import (
    NoiseSource,
    QuadraticExponentialMechanism,
    SecureNoise,
    SeededNoise,
    clip_gradients,
)
from qem.mechanism.noise import (
    NDTRI_RELATIVE_ERROR,
    SNAP_BITS,
    float_tv_bound,
    normals_from_uint64,
    snap_grid,
    snap_to_grid,
)
from qem.privacy.gdp import gdp_delta
from qem.quadratic import validate_curvature

U = 2.0**-53  # unit roundoff of float64
LEVEL = 1e-6
SIGN = np.uint64(1 << 63)
N, LAM, C = 800, 0.9, 1.5
EPS_GRID = np.linspace(0.0, 8.0, 81)


def curvature(k: int, seed: int = 0) -> np.ndarray:
    """A random positive definite A with eigenvalues from 1e-2 to 10."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((k, k)))
    return (q * np.logspace(-2, 1, k)) @ q.T


def mechanism(A: np.ndarray, mode: str = "gdp", **kw) -> QuadraticExponentialMechanism:
    mech = QuadraticExponentialMechanism(A, N=N, lam=LAM, clip_norm=C, mode=mode, **kw)
    if mode == "gdp":
        mech.calibrate(1.0, 1e-5)
    else:
        mech.calibrate(2.0)
    return mech


def gradient_sum(A: np.ndarray, seed: int = 1) -> np.ndarray:
    g = 3.0 * np.random.default_rng(seed).standard_normal((50, A.shape[0]))
    return clip_gradients(g, C, "dual", cholesky=validate_curvature(A))[0].sum(axis=0)


def noise_scale(mech: QuadraticExponentialMechanism) -> float:
    """sqrt(beta N lam) as the sampler computes it."""
    return math.sqrt(mech.beta * mech.N * mech.lam)


class FixedNoise(NoiseSource):
    """Hands out the given normals, to change some coordinates of z and not others."""

    def __init__(self, z: np.ndarray) -> None:
        self.z = z

    def standard_normal(self, shape):
        assert shape == self.z.shape
        return self.z.copy()

    def describe(self) -> dict:
        return {"seed_source": "fixed", "seed": None}


# -- (a) the release as a function of the normals ----------------------------------------------


def test_release_is_the_mean_plus_back_substituted_normals():
    A = curvature(5)
    mech, S = mechanism(A, seed=11), gradient_sum(A)
    w = mech.sample(S, size=64)
    z = SeededNoise(11).standard_normal((5, 64))
    L = validate_curvature(A)
    noise = linalg.solve_triangular(L, z, lower=True, trans="T")
    np.testing.assert_array_equal(w, mech.mean(S) + noise.T / noise_scale(mech))


def test_last_coordinate_is_one_scaled_normal():
    """w_k = m_k + z_k / (L_kk sqrt(beta N lam)): it depends on z_k alone, bit for bit, and
    equals the exact value up to three roundings of the noise and one of the sum."""
    A, k, n = curvature(6), 6, 200
    S = gradient_sum(A)
    z = SeededNoise(3).standard_normal((k, n))
    other = z.copy()
    other[:-1] = SeededNoise(4).standard_normal((k - 1, n))
    w = mechanism(A, noise=FixedNoise(z)).sample(S, size=n)
    w_other = mechanism(A, noise=FixedNoise(other)).sample(S, size=n)
    np.testing.assert_array_equal(w[:, -1], w_other[:, -1])
    assert np.all(w[:, :-1] != w_other[:, :-1])

    mech = mechanism(A, seed=0)
    m_k = Fraction(float(mech.mean(S)[-1]))
    denominator = Fraction(float(validate_curvature(A)[-1, -1])) * Fraction(noise_scale(mech))
    for w_k, z_k in zip(w[:, -1], z[-1], strict=True):
        exact = Fraction(float(z_k)) / denominator  # real-valued noise of the float normal z_k
        error = abs(Fraction(float(w_k)) - m_k - exact)
        # (m_k + exact (1 + t3)) (1 + t1), |t3| <= 3u (1 + u), |t1| <= u
        assert error <= Fraction(1.001 * U) * abs(Fraction(float(w_k))) + Fraction(3.01 * U) * abs(
            exact
        )


def test_snapped_release_is_the_grid_point_through_the_same_back_substitution():
    """Snapped: w = L^-T (Lambda t), t = rint((L^T m + z / sqrt(beta N lam)) / Lambda)."""
    A = curvature(4)
    mech, S = mechanism(A, seed=5, snap=True), gradient_sum(A)
    w = mech.sample(S, size=64)
    z = SeededNoise(5).standard_normal((4, 64))
    L = validate_curvature(A)
    grid = snap_grid(1.0 / noise_scale(mech))
    t = snap_to_grid(mech.mean(S) @ L, z.T / noise_scale(mech), grid)
    assert np.array_equal(t, np.rint(t))
    np.testing.assert_array_equal(
        w, linalg.solve_triangular(L, (grid * t).T, lower=True, trans="T").T
    )


# -- (b) the secure source --------------------------------------------------------------------


def test_inverse_cdf_map_is_symmetric_and_reaches_the_tail():
    words = np.random.default_rng(0).integers(0, 1 << 63, size=10_000, dtype=np.uint64)
    z = normals_from_uint64(words)
    assert np.all(z >= 0.0)
    np.testing.assert_array_equal(normals_from_uint64(words | SIGN), -z)
    extremes = normals_from_uint64(np.array([0, (1 << 63) - 1], dtype=np.uint64))
    assert extremes[0] == pytest.approx(-special.ndtri(2.0**-65), rel=1e-15)
    assert extremes[0] > 9.1  # a 53-bit uniform and 1 - u would stop at 8.2
    assert extremes[1] == 0.0


def test_ndtri_meets_the_assumed_accuracy():
    """|ndtri(u) - Phi^-1(u)| <= NDTRI_RELATIVE_ERROR |Phi^-1(u)| at u the map produces, from
    the far tail to the centre and densely near u = 0.13, where Cephes switches approximations
    and errs most, against Newton's method on Phi in 200-bit arithmetic."""
    rng = np.random.default_rng(1)
    words = np.unique(np.floor(2.0 ** rng.uniform(0.0, 63.0, 300)).astype(np.uint64))
    u = np.ldexp(words.astype(np.float64) + 0.5, -64)
    u = np.concatenate([u, rng.uniform(0.11, 0.15, 300)])
    mpmath.mp.prec = 200
    for u_i, z_i in zip(u, special.ndtri(u), strict=True):
        x, target = mpmath.mpf(float(z_i)), mpmath.mpf(float(u_i))
        for _ in range(4):
            x -= (mpmath.ncdf(x) - target) / mpmath.npdf(x)
        assert abs(mpmath.mpf(float(z_i)) - x) <= NDTRI_RELATIVE_ERROR * abs(x)


def test_law_of_the_inverse_cdf_map_is_within_rounding_of_the_normal():
    """P[|z| > x] over all 2^63 inputs, found by bisection (|z| falls as the input grows),
    equals 2 Phi(-x) up to one input, the rounding of u and ndtri's error."""
    x = np.linspace(0.01, 9.0, 60)
    lo = np.zeros(x.size, dtype=np.uint64)
    hi = np.full(x.size, (1 << 63) - 1, dtype=np.uint64)
    for _ in range(64):
        mid = lo + (hi - lo) // np.uint64(2)
        below = normals_from_uint64(mid) <= x
        hi = np.where(below, mid, hi)
        lo = np.where(below, lo, mid + np.uint64(1))
    assert np.array_equal(lo, hi)
    tail = np.ldexp(lo.astype(np.float64), -63)  # inputs 0 .. first-1 give |z| > x
    exact = 2.0 * special.ndtr(-x)
    allowed = 2.0**-62 + 2.0 * (2 * U * exact + NDTRI_RELATIVE_ERROR * x * stats.norm.pdf(x))
    assert np.all(np.abs(tail - exact) <= allowed)


def test_secure_normals_are_standard_normal():
    n = 400_000
    z = SecureNoise().standard_normal(n)
    assert z.shape == (n,) and z.dtype == np.float64
    assert stats.kstest(z, "norm").pvalue > LEVEL
    bound = stats.norm.isf(LEVEL / 2)  # two-sided, about 4.9 standard errors
    assert abs(z.mean()) <= bound / math.sqrt(n)
    assert abs(z.var() - 1.0) <= bound * math.sqrt(2.0 / n)
    assert abs(stats.skew(z)) <= bound * math.sqrt(6.0 / n)
    assert abs(stats.kurtosis(z)) <= bound * math.sqrt(24.0 / n)
    for threshold in (2.0, 3.0):
        p = 2.0 * stats.norm.sf(threshold)
        count = np.count_nonzero(np.abs(z) > threshold)
        assert abs(count - n * p) <= bound * math.sqrt(n * p * (1 - p))
    assert SecureNoise().standard_normal((3, 4)).shape == (3, 4)


def test_secure_sources_ignore_seeding_and_never_share_a_stream():
    np.random.seed(0)
    first = SecureNoise().standard_normal(1000)
    np.random.seed(0)
    second = SecureNoise().standard_normal(1000)
    source = SecureNoise()
    assert np.intersect1d(first, second).size == 0
    assert np.intersect1d(source.standard_normal(1000), source.standard_normal(1000)).size == 0
    A = curvature(3)
    S = gradient_sum(A)
    w1 = mechanism(A, noise=SecureNoise()).sample(S)
    w2 = mechanism(A, noise=SecureNoise()).sample(S)
    assert not np.any(w1 == w2)


# -- (c) snapping ----------------------------------------------------------------------------


def test_snap_grid_is_a_power_of_two_just_below_the_noise_scale():
    stds = np.concatenate([10.0 ** np.linspace(-8, 8, 97), 2.0 ** np.arange(-20.0, 21.0)])
    for s in stds:
        grid = snap_grid(float(s))
        assert math.frexp(grid)[0] == 0.5
        assert s * 2.0 ** -(SNAP_BITS + 1) < grid <= s * 2.0**-SNAP_BITS


def exact_rounding(value: Fraction) -> int:
    return round(value)  # to nearest (ties to even: a null event for continuous noise)


def test_snap_rounds_the_exact_sum_whatever_the_size_of_the_mean():
    """t = rint((c + y) / Lambda) for the exact real c + y: no float artefact of the mean. The
    naive rint(fl(c + y) / Lambda) gets large means wrong, which shows the check can fail."""
    rng = np.random.default_rng(2)
    s = 0.37
    grid = snap_grid(s)
    means = s * rng.uniform(-1, 1, 4000) * 2.0 ** rng.choice([-10, 0, 10, 20, 40], 4000)
    noise = s * rng.standard_normal(4000)
    t = snap_to_grid(means, noise, grid)
    naive = np.rint((means + noise) / grid)
    wrong_naive = 0
    for c, y, t_i, naive_i in zip(means, noise, t, naive, strict=True):
        exact = (Fraction(float(c)) + Fraction(float(y))) / Fraction(grid)
        assert t_i == exact_rounding(exact)
        assert abs(Fraction(float(t_i)) - exact) <= Fraction(1, 2)
        wrong_naive += naive_i != exact_rounding(exact)
    assert wrong_naive >= 10


def snapped_law(centre: float, s: float, grid: float, cells: np.ndarray) -> np.ndarray:
    """P[rint(V / grid) = t] for V ~ Normal(centre, s^2), computed on the side of the tail."""
    a = (grid * (cells - 0.5) - centre) / s
    b = (grid * (cells + 0.5) - centre) / s
    return np.where(b <= 0, special.ndtr(b) - special.ndtr(a), special.ndtr(-a) - special.ndtr(-b))


def exact_delta(law: dict, other: dict, eps: float) -> float:
    """sup_E P[E] - e^eps P'[E] of two laws on countable sets (dicts point -> probability)."""
    return sum(max(0.0, p - math.exp(eps) * other.get(x, 0.0)) for x, p in law.items())


def worst_case_pair(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace-one neighbours whose clipped gradients are opposite, of full dual norm C."""
    L = validate_curvature(A)
    v = np.full(A.shape[0], 10.0)
    differing, clipped = clip_gradients(np.stack([v, -v]), C, "dual", cholesky=L)
    assert clipped == 2
    common = gradient_sum(A)
    return common + differing[0], common + differing[1]


def test_snapped_release_meets_the_exact_privacy_profile():
    """k = 1: the snapped release's exact law on the grid meets the claimed mu-GDP profile and
    nearly attains it. Snapping only the noise (w = m + Lambda rint(noise / Lambda), Mironov's flaw
    in discrete form) puts the two laws on disjoint sets: delta = 1."""
    A = np.array([[0.3]])
    mech = mechanism(A, seed=0, snap=True)
    S, S2 = worst_case_pair(A)
    L, s = validate_curvature(A), 1.0 / noise_scale(mech)
    grid = snap_grid(s)
    centres = [float((mech.mean(x) @ L)[0]) for x in (S, S2)]
    assert abs(centres[0] - centres[1]) / s == pytest.approx(mech.mu, rel=1e-9)
    low = math.floor((min(centres) - 15 * s) / grid)
    high = math.ceil((max(centres) + 15 * s) / grid)
    cells = np.arange(low, high + 1, dtype=np.float64)
    laws = [dict(zip(cells, snapped_law(c, s, grid, cells), strict=True)) for c in centres]
    assert sum(laws[0].values()) == pytest.approx(1.0, abs=1e-12)
    snapped = np.array([exact_delta(laws[0], laws[1], eps) for eps in EPS_GRID])
    claimed = gdp_delta(mech.mu, EPS_GRID)
    assert np.all(snapped <= claimed + 1e-12)
    assert exact_delta(laws[0], laws[1], 1.0) >= 0.99 * 1e-5

    offsets = [Fraction(c) - Fraction(grid) * round(Fraction(c) / Fraction(grid)) for c in centres]
    noise_only = [
        {offset + Fraction(grid) * int(t): p for t, p in zip(cells, law.values(), strict=True)}
        for offset, law in zip(offsets, laws, strict=True)
    ]
    assert exact_delta(noise_only[0], noise_only[1], 1.0) > 0.99


@pytest.mark.parametrize("source", ["seeded", "secure"])
def test_snapped_release_lies_on_the_grid_and_follows_its_exact_law(source):
    A, n = curvature(2, seed=3), 40_000
    noise = {"seeded": SeededNoise(8), "secure": SecureNoise()}[source]
    mech, S = mechanism(A, noise=noise, snap=True), gradient_sum(A)
    L, s = validate_curvature(A), 1.0 / noise_scale(mech)
    grid = snap_grid(s)
    whitened = mech.sample(S, size=n) @ L
    t = np.rint(whitened / grid)
    assert np.max(np.abs(whitened - grid * t)) <= 1e-6 * grid
    for j, centre in enumerate(mech.mean(S) @ L):
        cells = np.arange(np.floor((centre - 8 * s) / grid), np.ceil((centre + 8 * s) / grid) + 1)
        law = snapped_law(centre, s, grid, cells)
        cut = np.searchsorted(np.cumsum(law), np.linspace(0, 1, 31)[1:-1])  # 30 equal bins
        expected = np.diff(np.concatenate([[0.0], np.cumsum(law)[cut], [1.0]])) * n
        observed = np.bincount(np.searchsorted(cells[cut], t[:, j], side="right"), minlength=30)
        assert stats.chisquare(observed, expected).pvalue > LEVEL


def test_pure_mode_snaps_then_accepts_and_reports_its_epsilon():
    A = curvature(3, seed=4)
    mech, S = mechanism(A, mode="pure", noise=SecureNoise()), gradient_sum(A)
    L = validate_curvature(A)
    whitened = mech.sample(S, size=500) @ L
    grid = snap_grid(1.0 / noise_scale(mech))
    assert np.max(np.abs(whitened - grid * np.rint(whitened / grid))) <= 1e-6 * grid
    assert np.all(np.linalg.norm(whitened, axis=1) <= mech.radius * (1 + 1e-12))
    snapping = mech.privacy_statement()["noise"]["snapping"]
    epsilon = 2.0 * (1.0 + math.sqrt(3) * grid / (2.0 * mech.radius))
    assert snapping["epsilon"] == pytest.approx(epsilon, rel=1e-12)
    assert 2.0 < snapping["epsilon"] < 2.0 * 1.01
    tv = float_tv_bound(3, 1.0 / noise_scale(mech), grid) / mech.preview().worst_case_acceptance
    assert snapping["float_tv_bound"] == pytest.approx(tv, rel=1e-12)


# -- (d) the report ---------------------------------------------------------------------------


def seeds_in(report: object) -> list:
    """Every value stored under a key named "seed", at any depth."""
    if isinstance(report, dict):
        found = [v for key, v in report.items() if key == "seed"]
        return found + [s for v in report.values() for s in seeds_in(v)]
    if isinstance(report, list | tuple):
        return [s for v in report for s in seeds_in(v)]
    return []


def test_reports_name_the_source():
    A = curvature(3)
    seeded = mechanism(A, seed=7)
    assert seeded.seed_info() == {"seed_source": "user_seed", "seed": 7}
    assert "PCG64" in seeded.privacy_statement()["noise"]["generator"]
    assert seeded.privacy_statement()["noise"]["snapping"] is None
    system = mechanism(A)
    assert system.seed_info() == {"seed_source": "os_entropy", "seed": None}
    assert "entropy" in system.privacy_statement()["noise"]["generator"]
    # snapping a PCG64 ziggurat draw is reported, but its float bound is not claimed
    assert (
        mechanism(A, seed=7, snap=True).privacy_statement()["noise"]["snapping"]["float_tv_bound"]
        is None
    )

    secure = mechanism(A, noise=SecureNoise())
    assert secure.seed_info() == {"seed_source": "os_csprng", "seed": None}
    noise = secure.privacy_statement()["noise"]
    assert "CSPRNG" in noise["generator"] and "inverse CDF" in noise["normal_sampler"]
    s = secure.preview().noise_scale
    assert noise["snapping"]["grid"] == snap_grid(s)
    assert noise["snapping"]["float_tv_bound"] == pytest.approx(3 * 2.0**-47 * s / snap_grid(s))
    assert noise["snapping"]["float_tv_bound"] <= 3 * 2.0 ** (SNAP_BITS + 1 - 47)
    json.dumps(secure.privacy_statement())
    assert (
        mechanism(A, noise=SecureNoise(), snap=False).privacy_statement()["noise"]["snapping"]
        is None
    )


def test_secure_mode_never_records_a_seed():
    A = curvature(3)
    with pytest.raises(InvalidParameterError, match="seed"):
        QuadraticExponentialMechanism(A, N=N, clip_norm=C, seed=3, noise=SecureNoise())
    statement = mechanism(A, noise=SecureNoise()).privacy_statement()
    assert seeds_in(statement) == [None]
    assert "user_seed" not in json.dumps(statement)


@pytest.mark.parametrize(("name", "value"), [("noise", "secure"), ("noise", 3), ("snap", "yes")])
def test_bad_noise_arguments(name, value):
    with pytest.raises(InvalidParameterError, match=name):
        QuadraticExponentialMechanism(curvature(3), N=N, clip_norm=C, **{name: value})
