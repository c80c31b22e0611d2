"""The statistics of the audits (docs/theory.md §17): numpy and scipy only, on samples of a test
statistic, with nothing that knows about models or mechanisms.

* ``standardized_shift``: the standardised mean difference of two samples with a normal-
  approximation interval (Hedges & Olkin 1985, §5.B): for two Normals of one variance it
  estimates their mu (the GDP parameter of a Gaussian release, Dong, Roth & Su 2022).
* ``clopper_pearson_upper``: exact one-sided binomial bounds (Clopper & Pearson 1934).
* ``threshold_epsilon`` / ``epsilon_lower_bound``: the eps lower bound of a threshold test from
  Clopper-Pearson bounds on its error rates (Jagielski, Ullman & Oprea 2020; Nasr et al. 2021).
* ``profile_tradeoff`` / ``tradeoff_excess``: the trade-off curve a privacy profile delta(eps)
  implies, and by how much an empirical ROC, widened by a simultaneous DKW band, lies below it.
* ``one_run_p_value`` / ``one_run_epsilon``: the one-run bound of Steinke, Nasr & Jagielski
  (2023, arXiv:2305.08846, Theorem 3.1 with the delta term of their Appendix D): the number of
  correct guesses about m independently included canaries is dominated by a binomial tail.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats


def two_sided_z(confidence: float) -> float:
    """The standard normal quantile z with P(|Z| <= z) = confidence."""
    return float(special.ndtri(1.0 - (1.0 - confidence) / 2.0))


def standardized_shift(
    stat0: np.ndarray, stat1: np.ndarray, confidence: float
) -> tuple[float, float, float]:
    """(|d|, lower, upper): d = (mean1 - mean0) / pooled sd and a normal-approximation interval
    of confidence ``confidence`` for |d|, se^2 = (n0 + n1) / (n0 n1) + d^2 / (2 (n0 + n1))
    (Hedges & Olkin 1985). The interval of the signed d is folded: if it holds 0, |d| lies in
    [0, max(|lo|, |hi|)]."""
    stat0, stat1 = np.asarray(stat0, np.float64), np.asarray(stat1, np.float64)
    n0, n1 = stat0.size, stat1.size
    pooled = math.sqrt(
        ((n0 - 1) * stat0.var(ddof=1) + (n1 - 1) * stat1.var(ddof=1)) / (n0 + n1 - 2)
    )
    d = (stat1.mean() - stat0.mean()) / pooled
    se = math.sqrt((n0 + n1) / (n0 * n1) + d * d / (2.0 * (n0 + n1)))
    lo, hi = d - two_sided_z(confidence) * se, d + two_sided_z(confidence) * se
    if lo > 0:
        return float(d), float(lo), float(hi)
    if hi < 0:
        return float(-d), float(-hi), float(-lo)
    return float(abs(d)), 0.0, float(max(-lo, hi))


def clopper_pearson_upper(
    successes: np.ndarray | int, trials: int, alpha: float
) -> np.ndarray | float:
    """Exact one-sided upper bound at level 1 - alpha on a binomial rate (Clopper & Pearson
    1934): the (1 - alpha) quantile of Beta(k + 1, n - k), and 1 when k = n."""
    k = np.asarray(successes, dtype=np.float64)
    full = k >= trials
    bound = np.where(
        full, 1.0, special.betaincinv(k + 1.0, np.where(full, 1.0, trials - k), 1.0 - alpha)
    )
    return float(bound) if bound.ndim == 0 else bound


def threshold_epsilon(
    stat0: np.ndarray, stat1: np.ndarray, thresholds: np.ndarray, delta: float, alpha: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each threshold tau of the test "D' if t > tau": (eps lower bound, FPR_ub, FNR_ub).

    FPR = P_D(t > tau), FNR = P_D'(t <= tau), each bounded above by Clopper-Pearson at alpha/2;
    eps_lb = max(log((1 - delta - FNR_ub) / FPR_ub), log((1 - delta - FPR_ub) / FNR_ub), 0).
    """
    sorted0, sorted1 = np.sort(stat0), np.sort(stat1)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    false_pos = sorted0.size - np.searchsorted(sorted0, thresholds, side="right")
    false_neg = np.searchsorted(sorted1, thresholds, side="right")
    fpr_ub = np.asarray(clopper_pearson_upper(false_pos, sorted0.size, alpha / 2.0))
    fnr_ub = np.asarray(clopper_pearson_upper(false_neg, sorted1.size, alpha / 2.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        forward = np.log(np.maximum(1.0 - delta - fnr_ub, 0.0) / fpr_ub)
        backward = np.log(np.maximum(1.0 - delta - fpr_ub, 0.0) / fnr_ub)
    eps = np.maximum(np.nan_to_num(np.maximum(forward, backward), nan=0.0, neginf=0.0), 0.0)
    return eps, fpr_ub, fnr_ub


@dataclass(frozen=True)
class EpsilonBound:
    """A threshold test's eps lower bound and the numbers behind it."""

    epsilon: float
    threshold: float
    fpr_upper: float
    fnr_upper: float


def epsilon_lower_bound(
    stat0: np.ndarray, stat1: np.ndarray, delta: float, confidence: float, seed: int = 0
) -> EpsilonBound:
    """Clopper-Pearson eps lower bound of the best threshold test, with the threshold chosen on
    a random half of each sample (permutation from ``seed``) and the bound computed on the other
    half, so that the choice does not bias the bound. Valid with probability >= confidence.

    Candidate thresholds are the midpoints between consecutive values of the selection half;
    among equally good ones the middle one is taken."""
    rng = np.random.default_rng(seed)
    halves = [np.array_split(rng.permutation(np.asarray(s, np.float64)), 2) for s in (stat0, stat1)]
    (select0, held0), (select1, held1) = halves
    alpha = 1.0 - confidence
    pooled = np.unique(np.concatenate([select0, select1]))
    candidates = (pooled[1:] + pooled[:-1]) / 2.0 if pooled.size > 1 else pooled
    eps, _, _ = threshold_epsilon(select0, select1, candidates, delta, alpha)
    best = np.flatnonzero(eps == eps.max())
    threshold = float(candidates[best[best.size // 2]])
    eps, fpr_ub, fnr_ub = threshold_epsilon(held0, held1, np.array([threshold]), delta, alpha)
    return EpsilonBound(float(eps[0]), threshold, float(fpr_ub[0]), float(fnr_ub[0]))


# -- trade-off curves -----------------------------------------------------------------------


def gaussian_tradeoff(alpha: np.ndarray, mu: float) -> np.ndarray:
    """The mu-GDP trade-off curve G_mu(alpha) = Phi(Phi^-1(1 - alpha) - mu) (Dong, Roth & Su
    2022, Def. 2.7): the smallest type II error of a level-alpha test of N(0,1) against
    N(mu,1)."""
    alpha = np.clip(np.asarray(alpha, dtype=np.float64), 0.0, 1.0)
    return special.ndtr(special.ndtri(1.0 - alpha) - mu)


def profile_tradeoff(
    epsilons: np.ndarray, deltas: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    """The trade-off curve a privacy profile implies (Dong, Roth & Su 2022, Prop. 2.12): a
    mechanism that is (eps_j, delta_j)-DP for every j has type II error at least

        f(alpha) = max_j max(0, 1 - delta_j - e^eps_j alpha, e^-eps_j (1 - delta_j - alpha))

    for every level-alpha test. A finite grid of the profile gives a curve below the true one,
    so a violation of it is a violation of the profile."""
    e = np.exp(np.asarray(epsilons, dtype=np.float64))[None, :]
    d = np.asarray(deltas, dtype=np.float64)[None, :]

    def tradeoff(alpha: np.ndarray) -> np.ndarray:
        a = np.clip(np.asarray(alpha, dtype=np.float64), 0.0, 1.0)[:, None]
        bounds = np.maximum(1.0 - d - e * a, (1.0 - d - a) / e)
        return np.maximum(bounds.max(axis=1), 0.0)

    return tradeoff


def dkw_radius(n: int, alpha: float) -> float:
    """r with P(sup_t |F_n(t) - F(t)| > r) <= alpha for an empirical CDF of n draws
    (Dvoretzky-Kiefer-Wolfowitz inequality with Massart's constant: 2 exp(-2 n r^2))."""
    return math.sqrt(math.log(2.0 / alpha) / (2.0 * n))


def tradeoff_excess(
    stat0: np.ndarray,
    stat1: np.ndarray,
    tradeoff: Callable[[np.ndarray], np.ndarray],
    confidence: float,
) -> float:
    """How far the threshold tests on t certainly fall below the claimed trade-off curve: the
    largest f(FPR_ub) - FNR_ub over thresholds tau of "D' if t > tau" (and of the reverse test,
    "D' if t <= tau", with D and D' swapped), where FPR_ub and FNR_ub are the empirical rates
    widened by a DKW band of level (1 - confidence) / 2 per sample. The band holds for all
    thresholds at once, so a positive value certifies, with probability >= confidence, that some
    test beats f, i.e. that the mechanism is not f-DP. Negative: no certified violation."""
    s0, s1 = np.sort(np.asarray(stat0, np.float64)), np.sort(np.asarray(stat1, np.float64))
    alpha = (1.0 - confidence) / 2.0
    r0, r1 = dkw_radius(s0.size, alpha), dkw_radius(s1.size, alpha)
    thresholds = np.concatenate([[-np.inf], s0, s1])
    below0 = np.searchsorted(s0, thresholds, side="right") / s0.size  # F0(tau)
    below1 = np.searchsorted(s1, thresholds, side="right") / s1.size  # F1(tau)
    excess = -np.inf
    for fpr, fnr in ((1.0 - below0, below1), (below0, 1.0 - below1)):  # "> tau", "<= tau"
        fpr_ub = np.minimum(fpr + r0, 1.0)
        fnr_ub = np.minimum(fnr + r1, 1.0)
        excess = max(excess, float(np.max(tradeoff(fpr_ub) - fnr_ub)))
    return excess


# -- one-run audits (Steinke, Nasr & Jagielski 2023) -----------------------------------------


def one_run_p_value(
    canaries: int, guesses: int, correct: int, epsilon: float, delta: float
) -> float:
    """The p-value of ``correct`` or more right guesses out of ``guesses`` (the rest abstain)
    about ``canaries`` canaries included independently with probability 1/2, under the
    hypothesis that the mechanism is (epsilon, delta)-DP (Steinke, Nasr & Jagielski 2023,
    Theorem 3.1; the delta term as in their Appendix D):

        p = f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i,
        f(u) = P[Binomial(r, e^eps / (1 + e^eps)) >= u],

    with m canaries, r guesses, v correct ones; capped at 1. (The maximum over i in 1..m of
    the theorem stops at v: for i > v, f(v - i) = 1 and the ratio only falls.)"""
    m, r, v = int(canaries), int(guesses), int(correct)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}.")
    q = special.expit(epsilon)
    tail = stats.binom.sf(v - 1, r, q)  # f(v)
    if delta == 0 or v == 0:
        return float(min(tail, 1.0))
    i = np.arange(1, v + 1)
    gaps = stats.binom.sf(v - i - 1, r, q) - tail  # f(v - i) - f(v)
    return float(min(tail + 2.0 * m * delta * np.max(gaps / i), 1.0))


def one_run_epsilon(
    canaries: int, guesses: int, correct: int, delta: float, confidence: float
) -> float:
    """The largest eps whose (eps, delta) claim the guesses reject at level 1 - confidence
    (p-value below it), i.e. an eps lower bound valid with probability >= confidence; 0 when
    no eps >= 0 is rejected. The p-value grows with eps, so the bound is found by bisection
    (brentq) on p(eps) = 1 - confidence."""
    alpha = 1.0 - confidence

    def gap(epsilon: float) -> float:
        return one_run_p_value(canaries, guesses, correct, epsilon, delta) - alpha

    if guesses == 0 or gap(0.0) >= 0:
        return 0.0
    high = 1.0
    while gap(high) < 0:
        high *= 2.0
        if high > 1e3:
            return math.inf  # every finite eps rejected (cannot happen with guesses < inf)
    return float(optimize.brentq(gap, 0.0, high, xtol=1e-9))


@dataclass(frozen=True)
class OneRunBound:
    """The best one-run bound over a pre-declared grid of guess counts (``one_run_bound``)."""

    epsilon: float
    positive_guesses: int
    negative_guesses: int
    correct: int
    candidates: int


def one_run_bound(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float,
    guess_fractions: tuple[float, ...],
) -> OneRunBound:
    """The one-run eps lower bound of Steinke, Nasr & Jagielski (2023, Algorithm 1): guess
    "included" for the k+ highest scores and "excluded" for the k- lowest, abstain on the
    rest, and bound eps from the number of correct guesses (``one_run_epsilon``). k+ = k- =
    fraction * m for each fraction of ``guess_fractions``, fixed before the scores are seen;
    trying several is paid for by Bonferroni (each bound at level (1 - confidence) / count),
    so the best of them is valid with probability >= confidence."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = scores.size
    order = np.argsort(scores, kind="stable")
    level = 1.0 - (1.0 - confidence) / len(guess_fractions)
    best = OneRunBound(0.0, 0, 0, 0, len(guess_fractions))
    for fraction in guess_fractions:
        k = max(1, min(m // 2, round(fraction * m)))
        correct = int(included[order[-k:]].sum() + (~included[order[:k]]).sum())
        epsilon = one_run_epsilon(m, 2 * k, correct, delta, level)
        if epsilon > best.epsilon or best.positive_guesses == 0:
            best = OneRunBound(epsilon, k, k, correct, len(guess_fractions))
    return best
