"""The empirical privacy audit (qem.audit, ``qem audit``).

The audits below draw their releases through qem.fine_tune with operating-system noise, so they
are random. Every audit runs at confidence 1 - 1e-4 (DEFAULT_CONFIDENCE): a correct
implementation fails a PASS assertion with probability 5e-5 (one-sided) and a "the claim lies in
the interval" assertion with probability 1e-4 (two-sided), about 8e-4 for this file in all.
The seeded bug (the factor 2 of replace-one dropped) doubles the true mu, 0.27 -> 0.54; at
n = 2000 the interval's lower end, mu_hat - 3.89 * 0.032, clears the claim 0.27 unless mu_hat
falls 4.4 standard errors short: it is missed with probability about 5e-6.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

import qem.mechanism.quadratic
from qem.audit import (
    AUDIT_DEFAULTS,
    CONFIGURATIONS,
    DEFAULT_CONFIDENCE,
    REACH,
    clopper_pearson_upper,
    epsilon_lower_bound,
    run_audit,
    standardized_shift,
    worst_case_pair,
)
from qem.cli.main import main
from qem.errors import InvalidParameterError
from qem.losses import cross_entropy
from qem.privacy.gdp import calibrate_gdp_mu, gdp_epsilon
from qem.privacy.sensitivity import Adjacency

CONFIG_EPSILON = 2.0
"""Budget of the per-configuration audits: mu = 0.50, so that n = 200 resolves a factor 2."""
CONFIG_N = 200

VISIBLE_MU_FRACTION = {"partition_rounds": 1.0 / math.sqrt(2.0)}
"""Fraction of the claimed mu that the final model shows (1 where not listed). With two
partitioned rounds, the round without the differing record adds noise of the same size to t."""
NOT_TIGHT = {"pure"}
"""No interval check: the pure mode has no mu claim (its eps bound is checked)."""


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


# -- the worst-case pair ---------------------------------------------------------------------


def _record_gradient(pair, data, index: int) -> torch.Tensor:
    model = pair.model
    model.zero_grad()
    x, y = data
    cross_entropy(model(x[index : index + 1]), y[index : index + 1]).sum().backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return gradient


def test_replace_one_pair_differs_in_one_extreme_record_with_opposite_gradients():
    pair = worst_case_pair("replace_one")
    (x, y), (x2, y2) = pair.private, pair.neighbour
    assert torch.equal(x, x2) and torch.equal(y[1:], y2[1:]) and (y[0], y2[0]) == (0, 1)
    assert pair.N is None
    g, g2 = _record_gradient(pair, pair.private, 0), _record_gradient(pair, pair.neighbour, 0)
    assert torch.allclose(g, -g2)
    assert g.norm() > 1e4 * AUDIT_DEFAULTS["clip_norm"]  # clipping binds, with room
    assert torch.allclose(pair.direction, (g - g2) / (g - g2).norm())
    # only the differing record and nothing public touches the last feature
    assert torch.all(x[1:, -1] == 0) and torch.all(pair.public[0][:, -1] == 0)
    assert x[0, -1] == REACH


def test_add_remove_pair_adds_one_record_and_declares_N():
    pair = worst_case_pair("add_remove")
    (x, y), (x2, y2) = pair.private, pair.neighbour
    assert torch.equal(x2[1:], x) and torch.equal(y2[1:], y)
    assert len(x2) == pair.N
    g = _record_gradient(pair, pair.neighbour, 0)
    assert torch.allclose(pair.direction, -g / g.norm())


def test_audit_refuses_what_would_hide_the_noise_path():
    bad_configurations = (
        {"seed": 0},
        {"noise": False},
        {"clip_norm": None},
        {"clip_norm": 1.0},  # would not bind in later rounds
        {"adjacency": "neighbours"},
    )
    for bad in bad_configurations:
        with pytest.raises(InvalidParameterError):
            run_audit(bad, n=20)
    with pytest.raises(InvalidParameterError):
        run_audit(n=5)


# -- audits through qem.fine_tune ---------------------------------------------------------------


def test_seeded_bug_dropping_the_factor_two_of_replace_one_fails(monkeypatch):
    monkeypatch.setattr(Adjacency, "multiplier", property(lambda self: 1))
    result = run_audit(n=2000)
    assert result.verdict == "FAIL"
    assert result.mu_interval[0] > result.claimed_mu
    assert "above the claimed mu" in result.reasons[0]


def test_default_audit_passes_and_is_tight():
    """Without the bug the same audit passes, and the interval holds the claim: the pair is
    worst case and the mechanism spends exactly its budget."""
    result = run_audit(n=2000)
    claimed = calibrate_gdp_mu(1.0, 1e-5)
    assert result.verdict == "PASS", result.reasons
    assert result.claimed_mu == pytest.approx(claimed)
    assert result.mu_interval[0] <= claimed <= result.mu_interval[1]
    assert result.epsilon_bound.epsilon <= 1.0
    assert result.confidence == DEFAULT_CONFIDENCE
    assert all(s.size == 2000 for s in result.statistics)


@pytest.mark.parametrize("name", sorted(set(CONFIGURATIONS) - {"replace_one"}))
def test_configuration_passes(name):
    result = run_audit({**CONFIGURATIONS[name], "epsilon": CONFIG_EPSILON}, n=CONFIG_N)
    assert result.verdict == "PASS", result.reasons
    assert result.epsilon_bound.epsilon <= CONFIG_EPSILON
    if name not in NOT_TIGHT:
        visible = VISIBLE_MU_FRACTION.get(name, 1.0) * result.claimed_mu
        assert result.mu_interval[0] <= visible <= result.mu_interval[1]


def test_pure_mode_gross_bug_is_caught_by_the_epsilon_bound(monkeypatch):
    """beta 1000 times the calibrated one: the releases separate and eps_lb > eps."""
    pure_beta = qem.mechanism.quadratic.pure_beta
    monkeypatch.setattr(
        qem.mechanism.quadratic, "pure_beta", lambda *args: 1000.0 * pure_beta(*args)
    )
    result = run_audit(CONFIGURATIONS["pure"], n=100)
    assert result.claimed_mu is None
    assert result.verdict == "FAIL"
    assert result.epsilon_bound.epsilon > result.claimed_epsilon
    assert "epsilon lower bound" in result.reasons[0]


# -- the command ----------------------------------------------------------------------------------


def test_cli_audit_json_passes(capsys):
    argv = ["audit", "--n", "40", "--epsilon", "2", "--line-search", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "PASS"
    assert out["n_per_dataset"] == 40
    assert out["configuration"]["prior_weight"] is None
    assert out["claimed_mu"] == pytest.approx(calibrate_gdp_mu(2.0, 1e-5))
    lo, hi = out["empirical_mu_interval"]
    assert lo <= out["empirical_mu"] <= hi
    assert out["mu_interval_method"].startswith("normal approximation")


def test_cli_audit_table_exits_1_on_a_gross_bug(capsys, monkeypatch):
    monkeypatch.setattr(Adjacency, "multiplier", property(lambda self: 0.05))
    assert main(["audit", "--n", "30", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("qem audit")
    assert "FAIL" in out and "above the claimed mu" in out
