"""Every bad input to the mechanism gets a clear qem error; randomness and reports are honest."""

import json
import warnings

import numpy as np
import pytest

from qem.errors import (
    CurvatureError,
    InvalidParameterError,
    NonFiniteError,
    PrivacyWarning,
    RejectionSamplingError,
    ShapeError,
)
from qem.mechanism import QuadraticExponentialMechanism

K = 3
A_GOOD = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]])
A_NOT_PD = A_GOOD - (np.linalg.eigvalsh(A_GOOD)[0] + 0.1) * np.eye(K)  # lambda_min = -0.1
BAD_POSITIVE = [0.0, -1.0, np.nan, np.inf, -np.inf]


def mechanism(A: np.ndarray = A_GOOD, **kw) -> QuadraticExponentialMechanism:
    return QuadraticExponentialMechanism(A, **({"N": 1000, "clip_norm": 1.0, "seed": 0} | kw))


def gdp(**kw) -> QuadraticExponentialMechanism:
    mech = mechanism(**kw)
    mech.calibrate(1.0, 1e-5)
    return mech


@pytest.mark.parametrize("mode", ["gdp", "pure"])
@pytest.mark.parametrize("eps", BAD_POSITIVE)
def test_bad_epsilon(mode, eps):
    with pytest.raises(InvalidParameterError, match="epsilon"):
        mechanism(mode=mode).calibrate(eps, 1e-5)


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, 1.5, np.nan, np.inf])
def test_bad_delta(delta):
    with pytest.raises(InvalidParameterError, match="delta"):
        mechanism().calibrate(1.0, delta)


def test_gdp_mode_needs_delta():
    with pytest.raises(InvalidParameterError, match="needs delta"):
        mechanism().calibrate(1.0)


@pytest.mark.parametrize("name", ["N", "lam", "clip_norm"])
@pytest.mark.parametrize("value", BAD_POSITIVE)
def test_bad_positive_parameters(name, value):
    with pytest.raises(InvalidParameterError, match=name):
        mechanism(**{name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [("adjacency", "swap"), ("clipping", "l1"), ("mode", "renyi"), ("seed", -1), ("seed", 1.5)],
)
def test_bad_choices(name, value):
    with pytest.raises(InvalidParameterError, match=name):
        mechanism(**{name: value})


@pytest.mark.parametrize(("name", "value"), [("radius", 1.0), ("n_max", 10)])
def test_pure_only_settings_rejected_in_gdp_mode(name, value):
    with pytest.raises(InvalidParameterError, match="mode='pure'"):
        mechanism(**{name: value})


@pytest.mark.parametrize(("name", "value"), [("radius", 0.0), ("n_max", -5), ("radius", np.nan)])
def test_bad_pure_settings(name, value):
    with pytest.raises(InvalidParameterError, match=name):
        mechanism(mode="pure", **{name: value})


@pytest.mark.parametrize(
    ("A", "match"),
    [
        (A_GOOD + np.triu(np.full((K, K), 1e-3), 1), "not symmetric"),
        (np.where(np.eye(K) > 0, np.nan, A_GOOD), "NaN"),
        (np.ones((K, K + 1)), "square"),
        (A_NOT_PD, "smallest eigenvalue is -0.1 "),
    ],
)
def test_bad_curvature(A, match):
    with pytest.raises(CurvatureError, match=match):
        mechanism(A=A)


def test_not_positive_definite_suggests_damping():
    with pytest.raises(CurvatureError, match="gamma"):
        mechanism(A=A_NOT_PD)


@pytest.mark.parametrize("S", [np.ones(K + 1), np.ones((1, K)), np.float64(1.0), np.ones((K, 1))])
@pytest.mark.parametrize("method", ["mean", "sample"])
def test_gradient_sum_wrong_shape(S, method):
    with pytest.raises(ShapeError, match=f"\\({K},\\)"):
        getattr(gdp(), method)(S)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", ["mean", "sample"])
def test_gradient_sum_non_finite(bad, method):
    S = np.ones(K)
    S[1] = bad
    with pytest.raises(NonFiniteError):
        getattr(gdp(), method)(S)


@pytest.mark.parametrize("size", [0, -2, 1.5, True])
def test_bad_size(size):
    with pytest.raises(InvalidParameterError, match="size"):
        gdp().sample(np.ones(K), size=size)


def test_pure_radius_with_tiny_acceptance_is_refused():
    mech = mechanism(mode="pure", radius=1e-4)
    with pytest.raises(RejectionSamplingError, match="acceptance"):
        mech.calibrate(1.0)
    assert not mech.is_calibrated  # nothing was set


def test_pure_sample_refuses_sum_larger_than_n_max_records():
    mech = mechanism(mode="pure", n_max=2)
    mech.calibrate(1.0)
    e = np.zeros(K)
    e[0] = 1.0
    S = 3.0 * e / np.sqrt(e @ np.linalg.solve(A_GOOD, e))  # dual norm 3 > n_max C = 2
    with pytest.raises(InvalidParameterError, match="n_max"):
        mech.sample(S)
    mech.sample(S * 2.0 / 3.0)  # exactly n_max C is allowed


def test_delta_at_least_one_over_n_warns():
    with pytest.warns(PrivacyWarning, match="1/N"):
        mechanism(N=100).calibrate(1.0, 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mechanism(N=100).calibrate(1.0, 0.0099)


@pytest.mark.parametrize(
    "use",
    [
        lambda m: m.sample(np.ones(K)),
        lambda m: m.preview(),
        lambda m: m.privacy_statement(),
        lambda m: m.beta,
    ],
    ids=["sample", "preview", "privacy_statement", "beta"],
)
def test_use_before_calibrate(use):
    mech = mechanism()
    with pytest.raises(InvalidParameterError, match="calibrate"):
        use(mech)


def test_mean_needs_no_calibration():
    expected = -np.linalg.solve(1000 * A_GOOD, np.ones(K))
    assert np.allclose(mechanism().mean(np.ones(K)), expected, rtol=1e-12)


def test_seeds():
    S = np.ones(K)
    assert np.array_equal(gdp(seed=5).sample(S), gdp(seed=5).sample(S))
    assert not np.array_equal(gdp(seed=5).sample(S), gdp(seed=6).sample(S))
    assert gdp(seed=5).seed_info() == {"seed_source": "user_seed", "seed": 5}
    unseeded = gdp(seed=None)
    assert unseeded.seed_info() == {"seed_source": "os_entropy", "seed": None}
    assert not np.array_equal(unseeded.sample(S), gdp(seed=None).sample(S))


def test_privacy_statement_and_preview_are_consistent_and_serialisable():
    mech = gdp(adjacency="add_remove", clipping="euclidean", seed=None, N=5000, lam=0.5)
    statement = mech.privacy_statement()
    preview = mech.preview().to_dict()
    json.dumps(statement)
    json.dumps(preview)
    lambda_min = np.linalg.eigvalsh(A_GOOD)[0]
    assert statement["sensitivity"]["lambda_min_A"] == pytest.approx(lambda_min, rel=1e-12)
    assert statement["sensitivity"]["dual_norm_bound"] == pytest.approx(1 / np.sqrt(lambda_min))
    assert statement["noise"]["seed_source"] == "os_entropy"
    for key in ("mode", "adjacency", "clipping", "epsilon", "delta", "mu", "beta", "N", "lam"):
        assert statement[key] == preview[key]
    assert (statement["mode"], statement["adjacency"], statement["clipping"]) == (
        "gdp",
        "add_remove",
        "euclidean",
    )
    assert statement["k"] == K and statement["clip_norm"] == 1.0
    # beta = mu^2 N lam / (s b)^2 with s = 1, b = C / sqrt(lambda_min)
    assert preview["beta"] == pytest.approx(preview["mu"] ** 2 * 5000 * 0.5 * lambda_min)
    assert preview["radius"] is None and preview["worst_case_acceptance"] is None

    pure = mechanism(mode="pure")
    pure.calibrate(1.0, 1e-5)  # delta is ignored: the release is (eps, 0)-DP
    statement = pure.privacy_statement()
    json.dumps(statement)
    assert statement["delta"] == 0.0 and statement["mu"] is None
    assert statement["worst_case_acceptance"] == pytest.approx(0.5, abs=1e-6)
    assert statement["utility_sensitivity"] == pytest.approx(2.0 * statement["radius"])
