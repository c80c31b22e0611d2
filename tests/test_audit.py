"""The empirical privacy audits (qem.audit, ``qem audit``).

The pair audits draw their releases from qem's mechanisms with operating-system noise, so they
are random. Every pair audit runs at confidence 1 - 1e-4 (DEFAULT_CONFIDENCE): a correct
implementation fails a PASS assertion with probability at most 2.5e-4 (mu check 5e-5, eps bound
1e-4, trade-off band 1e-4) and a "the claim lies in the interval" assertion with probability
1e-4; about 5e-3 for this file in all. The seeded bugs inflate the true mu at least 2-fold
(0.27 -> 0.54), and at n = 2000 the interval's lower end, mu_hat - 3.89 * 0.032, clears the
claim 0.27 unless mu_hat falls 4.4 standard errors short: each is missed with probability about
5e-6 (docs/theory.md §17).
"""

from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

import qem.mechanism.quadratic
from qem.audit import (
    DEFAULT_CONFIDENCE,
    PATHS,
    REACH,
    clopper_pearson_upper,
    epsilon_lower_bound,
    gaussian_tradeoff,
    gdp_mu,
    one_run_bound,
    one_run_epsilon,
    one_run_p_value,
    profile_tradeoff,
    run_audit,
    standardized_shift,
    tradeoff_excess,
    worst_case_pair,
)
from qem.audit.one_run import (
    CANARY_KINDS,
    GradientCanaries,
    inclusion_coins,
    one_run_audit,
    synthetic_task,
)
from qem.audit.release_paths import clipped_along
from qem.audit.run import poisson_accountant
from qem.cli.main import main
from qem.errors import InvalidParameterError
from qem.losses import cross_entropy
from qem.privacy.gdp import calibrate_gdp_mu, gdp_delta, gdp_epsilon
from qem.privacy.sensitivity import Adjacency

# -- the statistics, on synthetic samples --------------------------------------------------


@pytest.mark.parametrize(("k", "n"), [(0, 50), (3, 50), (49, 50), (50, 50), (120, 1000)])
def test_clopper_pearson_matches_scipy_exact_interval(k, n):
    alpha = 1e-3
    expected = stats.binomtest(k, n).proportion_ci(1.0 - 2.0 * alpha, method="exact").high
    assert clopper_pearson_upper(k, n, alpha) == pytest.approx(expected, rel=1e-9)


def test_standardized_shift_interval_has_its_coverage():
    """400 synthetic audits of N(0, 1) against N(mu, 1): a 90% interval covers mu about 360
    times (binomial sd 6); the random numbers are the test's own and fixed."""
    rng = np.random.default_rng(0)
    mu, n = 0.5, 300
    covered = 0
    for _ in range(400):
        d, lo, hi = standardized_shift(rng.normal(0, 1, n), rng.normal(mu, 1, n), 0.9)
        covered += lo <= mu <= hi
        assert lo <= d <= hi
    assert 336 <= covered <= 384


def test_standardized_shift_is_folded_and_scale_free():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 3, 500), rng.normal(6, 3, 500)
    d, lo, hi = standardized_shift(a, b, 0.99)
    assert (d, lo, hi) == pytest.approx(standardized_shift(b, a, 0.99))
    assert 1.5 < lo < d < hi < 2.5


@pytest.mark.parametrize("seed", range(5))
def test_epsilon_lower_bound_is_below_the_truth(seed):
    """For mu-GDP samples the bound stays below the exact eps(delta) of the mu-GDP profile."""
    rng = np.random.default_rng(seed)
    mu, delta = 1.0, 1e-5
    bound = epsilon_lower_bound(rng.normal(0, 1, 2000), rng.normal(mu, 1, 2000), delta, 0.99)
    assert 0.0 <= bound.epsilon <= gdp_epsilon(mu, delta)


def test_epsilon_lower_bound_detects_a_large_shift():
    rng = np.random.default_rng(2)
    mu, delta = 4.0, 1e-5
    bound = epsilon_lower_bound(rng.normal(0, 1, 2000), rng.normal(mu, 1, 2000), delta, 0.9999)
    assert 1.5 < bound.epsilon <= gdp_epsilon(mu, delta)
    assert 0.0 < bound.threshold < mu


def test_the_claimed_mu_is_the_library_calibration_computed_independently():
    for epsilon, delta in ((0.5, 1e-5), (1.0, 1e-5), (8.0, 1e-6)):
        mu = gdp_mu(epsilon, delta)
        assert mu == pytest.approx(calibrate_gdp_mu(epsilon, delta), rel=1e-8)
        assert gdp_delta(mu, epsilon) == pytest.approx(delta, rel=1e-8)


def test_a_profile_tradeoff_lies_below_and_close_to_the_exact_gaussian_one():
    """The trade-off curve built from a grid of the exact mu-GDP profile is a lower bound of
    G_mu (a finite grid drops constraints) and within 0.01 of it on a fine grid."""
    mu, grid = 1.0, np.linspace(0.0, 8.0, 400)
    curve = profile_tradeoff(grid, [gdp_delta(mu, e) for e in grid])
    alpha = np.linspace(0.0, 1.0, 201)
    exact = gaussian_tradeoff(alpha, mu)
    assert np.all(curve(alpha) <= exact + 1e-12)
    assert np.max(exact - curve(alpha)) < 0.01


def test_tradeoff_excess_certifies_only_violations():
    rng = np.random.default_rng(3)
    null, shifted = rng.normal(0, 1, 2000), rng.normal(0.5, 1, 2000)
    claim = lambda a: gaussian_tradeoff(a, 0.5)  # noqa: E731
    assert tradeoff_excess(null, shifted, claim, 0.9999) < 0
    assert tradeoff_excess(null, rng.normal(1.5, 1, 2000), claim, 0.9999) > 0.1
    # the reverse test counts too: D' lower than D
    assert tradeoff_excess(null, rng.normal(-1.5, 1, 2000), claim, 0.9999) > 0.1


# -- the one-run bound (Steinke, Nasr & Jagielski 2023) --------------------------------------


def brute_force_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The theorem's p-value in exact rational arithmetic for q = e^eps / (1 + e^eps) (as a
    fraction of the float), with the maximum over every i in 1..m, not only 1..v."""
    q = Fraction(1.0 / (1.0 + math.exp(-epsilon)))

    def tail(u: int) -> Fraction:  # P[Binomial(r, q) >= u]
        return sum(
            (math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(max(u, 0), r + 1)),
            Fraction(0),
        )

    f_v = tail(v)
    alpha = max(((tail(v - i) - f_v) / i for i in range(1, m + 1)), default=Fraction(0))
    return float(min(f_v + 2 * m * Fraction(delta) * alpha, Fraction(1)))


@pytest.mark.parametrize(
    ("m", "r", "v", "epsilon", "delta"),
    [
        (40, 20, 15, 0.5, 0.0),
        (40, 20, 15, 0.5, 1e-3),
        (60, 30, 30, 2.0, 1e-4),
        (30, 30, 16, 0.1, 1e-2),
    ],
)
def test_one_run_p_value_is_the_binomial_tail_of_the_theorem(m, r, v, epsilon, delta):
    expected = brute_force_p_value(m, r, v, epsilon, delta)
    assert one_run_p_value(m, r, v, epsilon, delta) == pytest.approx(expected, rel=1e-9)


def test_one_run_epsilon_is_the_largest_rejected_epsilon():
    m, r, v, delta, confidence = 1000, 200, 170, 1e-5, 0.95
    epsilon = one_run_epsilon(m, r, v, delta, confidence)
    assert epsilon > 0.5
    assert one_run_p_value(m, r, v, epsilon, delta) == pytest.approx(0.05, rel=1e-5)
    assert one_run_p_value(m, r, v, epsilon - 1e-3, delta) < 0.05
    assert one_run_p_value(m, r, v, epsilon + 1e-3, delta) > 0.05
    assert one_run_epsilon(m, r, r // 2, delta, confidence) == 0.0  # chance accuracy


def test_one_run_bound_holds_for_randomized_response_at_its_level():
    """The theorem is tight for eps-randomized response: each guess correct with probability
    e^eps / (1 + e^eps), independently. 400 audits of 1000 canaries, all guessed: the bound
    exceeds the true eps in at most 5% of them in expectation (binomial sd 4.4)."""
    rng = np.random.default_rng(4)
    epsilon, m = 1.0, 1000
    q = 1.0 / (1.0 + math.exp(-epsilon))
    exceed = sum(
        one_run_epsilon(m, m, int(rng.binomial(m, q)), 0.0, 0.95) > epsilon for _ in range(400)
    )
    assert exceed <= 20 + 4 * 4.4


def test_one_run_bound_of_scores_guesses_the_extremes():
    included = np.array([True] * 50 + [False] * 50)
    scores = np.where(included, 1.0, -1.0) + np.linspace(0, 0.1, 100)  # perfectly separated
    bound = one_run_bound(scores, included, 0.0, 0.95, (0.1, 0.5))
    assert bound.positive_guesses == bound.negative_guesses == 50
    assert bound.correct == 100
    assert bound.epsilon == pytest.approx(one_run_epsilon(100, 100, 100, 0.0, 1 - 0.05 / 2))
    assert one_run_bound(-scores, included, 0.0, 0.95, (0.1, 0.5)).epsilon == 0.0


# -- the worst-case pair ---------------------------------------------------------------------


def _record_gradient(pair, data, index: int) -> torch.Tensor:
    model = pair.model
    model.zero_grad()
    x, y = data
    cross_entropy(model(x[index : index + 1]), y[index : index + 1]).sum().backward()
    gradient = model.weight.grad.reshape(-1).clone()
    model.zero_grad(set_to_none=True)
    return gradient


def test_replace_one_pair_differs_in_one_extreme_record_with_opposite_gradients():
    pair = worst_case_pair("replace_one")
    (x, y), (x2, y2) = pair.private, pair.neighbour
    last = pair.record
    assert last == len(y) - 1  # the last chunk of a partitioned schedule
    assert torch.equal(x, x2) and torch.equal(y[:last], y2[:last]) and (y[last], y2[last]) == (0, 1)
    assert pair.N is None
    g, g2 = _record_gradient(pair, pair.private, last), _record_gradient(pair, pair.neighbour, last)
    assert torch.allclose(g, -g2)
    assert torch.allclose(pair.direction, (g - g2) / (g - g2).norm())
    # every other private record has gradient 0, the "without" dataset zeroes the record too
    assert torch.all(x[:last] == 0) and torch.all(pair.without[0] == 0)
    assert torch.all(pair.public[0][:, -1] == 0) and x[last, -1] == REACH


def test_add_remove_pair_adds_one_record_and_declares_N():
    pair = worst_case_pair("add_remove")
    (x, y), (x2, y2) = pair.private, pair.neighbour
    assert torch.equal(x2[:-1], x) and torch.equal(y2[:-1], y)
    assert len(x2) == pair.N and pair.without is pair.private
    g = _record_gradient(pair, pair.neighbour, pair.record)
    assert torch.allclose(pair.direction, -g / g.norm())


def test_audit_refuses_what_would_hide_the_noise_path():
    for bad in ({"seed": 0}, {"noise": False}, {"adjacency": "neighbours"}):
        with pytest.raises(InvalidParameterError):
            run_audit(bad, n=20)
    for bad in ({"clip_norm": None}, {"clip_norm": 1.0}):  # would not bind end to end
        with pytest.raises(InvalidParameterError):
            run_audit(bad, n=20, end_to_end=True)
    with pytest.raises(InvalidParameterError):
        run_audit(n=5)
    with pytest.raises(InvalidParameterError):
        run_audit("kronecker", end_to_end=True)
    with pytest.raises(InvalidParameterError):
        run_audit(seeded_bug="no such bug")


# -- pair audits of every release path (batched) ------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
def test_every_release_path_passes_and_its_pair_is_worst_case(path):
    """Without a bug every path passes; in every round that reads the differing record the
    clipped gradients' difference attains the sensitivity bound (the pair is worst case), and on
    the Gaussian-DP paths the interval holds the claim: the mechanism spends exactly its mu."""
    result = run_audit(path)
    assert result.verdict == "PASS", result.reasons
    assert result.n == 2000 and all(s.size == 2000 for s in result.statistics)
    assert result.epsilon_bound.epsilon <= result.claimed_epsilon
    reading = [a for a in result.attained if a > 0]
    assert reading and all(a == pytest.approx(1.0, rel=1e-9) for a in reading), result.attained
    schedule = PATHS[path].get("schedule", {"kind": "sequential"})
    if schedule["kind"] == "partitioned":  # the record sits in the last chunk of every epoch
        chunks = schedule["rounds"]
        assert [a > 0 for a in result.attained] == [
            t % chunks == chunks - 1 for t in range(len(result.attained))
        ]
    if result.claimed_mu is not None:
        assert result.claimed_mu == pytest.approx(calibrate_gdp_mu(1.0, 1e-5))
        assert result.pair_mu == pytest.approx(result.claimed_mu, rel=1e-9)
        assert result.mu_interval[0] <= result.claimed_mu <= result.mu_interval[1]
    if schedule["kind"] == "poisson":
        assert result.mu is None and result.claimed_mu is None  # never a Gaussian mu
        assert result.accountant_epsilon == pytest.approx(1.0, abs=0.01)


def test_seeded_bug_dropping_the_factor_two_of_replace_one_fails_the_sequential_audit():
    result = run_audit("sequential", seeded_bug="sensitivity/2")
    assert result.verdict == "FAIL"
    assert result.mu_interval[0] > result.claimed_mu
    assert result.pair_mu == pytest.approx(2 * result.claimed_mu, rel=1e-9)
    assert "above the claimed mu" in result.reasons[0]


def test_seeded_bug_dividing_the_noise_by_four_fails_the_poisson_audit():
    """noise/4 on Poisson q = 0.5, T = 2: judged against dp-accounting's PLD, the trade-off
    band and the eps bound (never a Gaussian mu)."""
    result = run_audit("poisson", noise_scale=0.25)
    assert result.verdict == "FAIL"
    assert result.mu is None
    assert result.tradeoff_excess > 0 or result.epsilon_bound.epsilon > 1.0


def test_seeded_bug_of_overlapping_chunks_fails_the_partitioned_audit():
    """Every round reads every record while the accountant charges one round: 4 rounds of the
    full mu, sqrt(4) = 2 times the claim, seen because every round's release is observed."""
    result = run_audit("partitioned", seeded_bug="overlapping_chunks")
    assert result.verdict == "FAIL"
    assert result.attained == pytest.approx([1.0] * 4)
    assert result.mu_interval[0] > result.claimed_mu


def test_pure_mode_gross_bug_is_caught_by_the_epsilon_bound(monkeypatch):
    """beta 1000 times the calibrated one: the releases separate and eps_lb > eps."""
    pure_beta = qem.mechanism.quadratic.pure_beta
    monkeypatch.setattr(
        qem.mechanism.quadratic, "pure_beta", lambda *args: 1000.0 * pure_beta(*args)
    )
    result = run_audit("pure", n=200)
    assert result.claimed_mu is None
    assert result.verdict == "FAIL"
    assert result.epsilon_bound.epsilon > result.claimed_epsilon


def test_poisson_accountant_is_the_calibrated_target():
    schedule = {"sampling_rate": 0.5, "rounds": 2, "noise_multiplier": 3.0}
    for adjacency in ("replace_one", "add_remove"):
        accountant = poisson_accountant(schedule, adjacency)
        assert accountant.get_epsilon(1e-5) > 0
    looser = poisson_accountant({**schedule, "noise_multiplier": 6.0}, "replace_one")
    assert looser.get_epsilon(1e-5) < poisson_accountant(schedule, "replace_one").get_epsilon(1e-5)


# -- end to end: n full fine_tune runs ----------------------------------------------------------


def test_end_to_end_audit_passes_and_catches_a_gross_bug(monkeypatch):
    result = run_audit("sequential", end_to_end=True, n=60)
    assert result.method == "end_to_end" and result.verdict == "PASS", result.reasons
    monkeypatch.setattr(Adjacency, "multiplier", property(lambda self: 0.05))
    result = run_audit("sequential", end_to_end=True, n=30)
    assert result.verdict == "FAIL" and "above the claimed mu" in result.reasons[0]


# -- one-run audits --------------------------------------------------------------------------


def test_inclusion_coins_are_fair_and_fresh():
    a, b = inclusion_coins(4000), inclusion_coins(4000)
    assert abs(a.mean() - 0.5) < 0.04 and not np.array_equal(a, b)


def test_one_run_audit_of_a_synthetic_task_passes_and_flags_noise_divided_by_eight():
    """500 orthogonal canaries, one round at eps 1: each canary is a mu = 0.27 test, whose
    bound exceeded 1 in none of 3,000 simulated audits (max 0.87); with the noise divided by 8
    each is a mu = 2.1 test, whose bound was at least 2.2 in 1,000 simulated audits."""
    task = synthetic_task()
    correct = one_run_audit(task)
    assert correct.verdict == "PASS" and correct.bound.epsilon <= 1.0
    assert correct.accountant_epsilon == pytest.approx(1.0, abs=1e-6)
    buggy = one_run_audit(task, noise_scale=1 / 8)
    assert buggy.verdict == "FAIL" and buggy.bound.epsilon > 1.0


def test_one_run_scores_are_the_canaries_likelihood_ratios():
    """At eps 4 each orthogonal canary is a Gaussian test of mu = mu(4, 1e-5): the scores
    z_i = S_hat_i / se_i of included and excluded canaries are N(mu, 1) and N(0, 1), so their
    standardised shift holds mu and their spread is 1."""
    task = synthetic_task(configuration={"epsilon": 4.0})
    result = one_run_audit(task)
    mu = calibrate_gdp_mu(4.0, 1e-5)
    inside, outside = result.scores[result.included], result.scores[~result.included]
    _, lo, hi = standardized_shift(outside, inside, DEFAULT_CONFIDENCE)
    assert lo <= mu <= hi
    assert np.std(outside) == pytest.approx(1.0, rel=0.2)  # about 250 scores: sd within 5%
    # a strong mechanism is seen, within its claim: 161 of 200 guesses correct here; the
    # one-run bound of m = 500 canaries stays far below eps = 4 (Steinke et al. 2023, Fig. 1)
    assert 0.5 < result.bound.epsilon <= 4.0
    assert result.verdict == "PASS"


@pytest.mark.parametrize("clipping", ["dual", "euclidean"])
def test_gradient_canaries_sit_at_the_clip_bound_along_their_whitened_directions(clipping):
    """clipped_along(r, context) is the engine's clipping of L r_i: norm C in the round's
    clipping norm (dual: ||L^-1 gh||, Euclidean: ||gh||), along L r_i (dense float64 check)."""
    rng = np.random.default_rng(0)
    k, m, clip = 40, 25, 0.7
    root = rng.standard_normal((k, k))
    cholesky = np.linalg.cholesky(root @ root.T / k + 0.1 * np.eye(k))
    context = {"cholesky": cholesky, "clip_norm": clip, "clipping": clipping}
    directions = rng.standard_normal((m, k))
    rows = clipped_along(directions, context)
    measured = rows.T if clipping == "euclidean" else np.linalg.solve(cholesky, rows.T)
    np.testing.assert_allclose(np.linalg.norm(measured, axis=0), clip, rtol=1e-12)
    along = directions @ cholesky.T
    scale = np.sum(rows * along, axis=1) / np.sum(along * along, axis=1)
    np.testing.assert_allclose(rows, scale[:, None] * along, rtol=1e-12, atol=1e-15)


def test_gradient_canaries_have_orthogonal_whitened_shifts_when_m_is_at_most_k():
    """With dual clipping, m <= k gradient canaries' whitened clipped gradients L^-1 gh_i are
    orthogonal with norm C in every round (so each canary's GLS estimate is its own test), and
    the directions are fresh per round but fixed by (seed, t)."""
    rng = np.random.default_rng(1)
    k, m, clip = 30, 30, 2.0
    root = rng.standard_normal((k, k))
    cholesky = np.linalg.cholesky(root @ root.T / k + 0.1 * np.eye(k))
    context = {
        "cholesky": cholesky,
        "clip_norm": clip,
        "clipping": "dual",
        "subspace": type("Basis", (), {"k": k})(),
    }
    canaries = GradientCanaries(m)
    first, second = canaries.clipped(context, 0), canaries.clipped(context, 1)
    whitened = np.linalg.solve(cholesky, first.T)
    np.testing.assert_allclose(whitened.T @ whitened, clip**2 * np.eye(m), atol=1e-12)
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(first, GradientCanaries(m).clipped(context, 0))


def test_one_run_audit_with_gradient_canaries_passes_and_flags_noise_divided_by_four():
    """1,000 orthogonal gradient canaries, one round at eps 1: each is a mu = 0.27 test whose
    bound exceeded 1 in none of 500 simulated audits (max 0.84); with the noise divided by 4
    each is a mu = 1.07 test, whose bound was at least 1.2 in 500 simulated audits (median
    1.65)."""
    task = synthetic_task(canaries=1000)
    task = dataclasses.replace(task, canaries=GradientCanaries(1000))
    correct = one_run_audit(task)
    assert correct.verdict == "PASS" and correct.canary_kind == "gradients"
    buggy = one_run_audit(task, noise_scale=1 / 4)
    assert buggy.verdict == "FAIL" and buggy.bound.epsilon > 1.0
    assert buggy.to_dict()["canary_kind"] == "gradients"


def test_the_command_offers_the_canary_kinds_of_the_audit():
    """cli/audit.py spells the kinds out (it may not import torch to build --help)."""
    import argparse

    from qem.cli import audit as cli_audit

    subparsers = argparse.ArgumentParser().add_subparsers()
    cli_audit.add_parser(subparsers)
    action = next(a for a in subparsers.choices["audit"]._actions if a.dest == "canary_kind")
    assert tuple(action.choices) == CANARY_KINDS and action.default == CANARY_KINDS[0]


# -- the command ----------------------------------------------------------------------------------


def test_cli_audit_json_passes(capsys):
    assert main(["audit", "--n", "200", "--epsilon", "2", "--path", "kronecker", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "PASS" and out["path"] == "kronecker"
    assert out["n_per_dataset"] == 200
    assert out["configuration"]["curvature"] == "kfac"
    assert out["claimed_mu"] == pytest.approx(calibrate_gdp_mu(2.0, 1e-5))
    lo, hi = out["empirical_mu_interval"]
    assert lo <= out["empirical_mu"] <= hi


def test_cli_audit_table_exits_1_on_a_seeded_bug(capsys):
    assert main(["audit", "--path", "partitioned", "--seeded-bug", "overlapping_chunks"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("qem audit")
    assert "FAIL" in out and "above the claimed mu" in out and "overlapping_chunks" in out


def test_cli_audit_all_lists_every_path(capsys):
    assert main(["audit", "--all", "--n", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in out] == list(PATHS)
    assert all(r["verdict"] == "PASS" for r in out)
    poisson = next(r for r in out if r["path"] == "poisson")
    assert poisson["empirical_mu"] is None and poisson["accountant_epsilon"] is not None


@pytest.mark.slow
def test_one_run_audit_of_mnist_flags_noise_divided_by_four(capsys):
    """The MNIST S1 demo with 1,000 gradient canaries and the noise multiplier divided by 4,
    one run (2 rounds of k = 2,048: the canaries' shifts are orthogonal in each)."""
    assert main(["audit", "--one-run", "--noise-scale", "0.25", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "FAIL" and out["epsilon_lower_bound"] > 1.0
