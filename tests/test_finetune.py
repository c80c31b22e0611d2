"""End to end on a small synthetic task: fine_tune, the private pass, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qem.io
from qem.curvature.factory import make_curvature
from qem.errors import (
    DataError,
    InvalidParameterError,
    NonFiniteError,
    OutputExistsError,
    ShapeError,
)
from qem.finetune import fine_tune
from qem.io import load
from qem.linesearch import line_search_step
from qem.losses import cross_entropy
from qem.mechanism import QuadraticExponentialMechanism
from qem.mechanism.clipping import clip_gradients
from qem.metrics import evaluate_loss
from qem.privacy.gdp import calibrate_gdp_mu
from qem.privacy.sensitivity import gdp_beta
from qem.quadratic import validate_curvature
from qem.seeds import SeedTree
from qem.statistics import private_gradient_sum
from qem.subspace.factory import make_subspace

REQUIRED_REPORT_FIELDS = {
    "mode",
    "adjacency",
    "epsilon",
    "delta",
    "mu",
    "C",
    "N",
    "lam",
    "gamma",
    "k",
    "subspace",
    "curvature",
    "qem_version",
    "noise",
    "schedule",
    "accountant",
}


def make_task(n: int, seed: int, shift: float = 0.0):
    """Two Gaussian blobs in 6 dimensions (3 classes); ``shift`` moves the private data."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0, 0]])
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + torch.randn(n, 6, generator=g) + shift
    return x.double(), y


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


@pytest.fixture(scope="module")
def task():
    model = make_model()
    public = make_task(200, 1)
    private = make_task(400, 2, shift=0.8)
    valid = make_task(200, 3, shift=0.8)
    return model, public, private, valid


@pytest.fixture(scope="module")
def released(task):
    """One private release of the synthetic task, reused by the save/load tests."""
    model, public, private, valid = task
    return fine_tune(
        model,
        cross_entropy,
        public,
        private,
        epsilon=1.0,
        subspace="srht",
        k=8,
        validation_data=valid,
        seed=1,
        progress=False,
    )


STEP_KWARGS = dict(
    epsilon=1.0,
    delta=1e-5,
    subspace="dense",
    k=20,
    curvature="ggn",
    damping=0.1,
    clip_norm=0.5,
    prior_weight=2.0,
    progress=False,
)


def brute_force_statistics(model, public, private):
    """P, A and sum_i gh_i by a Python loop of autograd gradients (float64, dense P)."""
    basis = make_subspace("dense", model, k=20, seed=0)
    A = make_curvature("ggn", 0.1, progress=False).matrix(model, cross_entropy, basis, public)
    P = basis.materialize().numpy()
    grads = []
    for x, y in zip(*private, strict=True):
        model.zero_grad()
        cross_entropy(model(x[None]), y[None]).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy() @ P)
    clipped, _ = clip_gradients(np.array(grads), 0.5, "dual", validate_curvature(A))
    return P, A, clipped.sum(axis=0)


def parameter_step(before: nn.Module, after: nn.Module) -> np.ndarray:
    flat = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in (before, after)]
    return (flat[1] - flat[0]).numpy()


def test_noise_off_equals_closed_form_step(task):
    model, public, private, _ = task
    result = fine_tune(model, cross_entropy, public, private, noise=False, **STEP_KWARGS)
    P, A, gradient_sum = brute_force_statistics(model, public, private)
    expected_w = -np.linalg.solve(400 * 2.0 * A, gradient_sum)
    np.testing.assert_allclose(parameter_step(model, result.model), P @ expected_w, atol=1e-10)
    assert "NOT PRIVATE" in result.report.noise["source"]


def test_one_round_is_the_plain_mechanism(task):
    model, public, private, _ = task
    result = fine_tune(model, cross_entropy, public, private, seed=5, **STEP_KWARGS)
    P, A, gradient_sum = brute_force_statistics(model, public, private)
    mechanism = QuadraticExponentialMechanism(
        A, N=400, lam=2.0, clip_norm=0.5, seed=SeedTree(5, 1).noise[0]
    )
    mechanism.calibrate(1.0, 1e-5)
    w = mechanism.sample(gradient_sum)
    np.testing.assert_allclose(parameter_step(model, result.model), P @ w, atol=1e-9)
    assert result.report.mu == pytest.approx(mechanism.mu, rel=1e-12)
    np.testing.assert_allclose(result.releases[0], w, rtol=1e-12)


def test_improves_validation_loss_at_large_epsilon(task):
    model, public, private, valid = task
    before = evaluate_loss(model, cross_entropy, valid)
    result = fine_tune(
        model,
        cross_entropy,
        public,
        private,
        epsilon=50.0,
        delta=1e-5,
        subspace="dense",
        k=40,
        damping=0.05,
        validation_data=valid,
        rounds=2,
        seed=3,
        progress=False,
    )
    after = evaluate_loss(result.model, cross_entropy, valid)
    assert after < before - 0.05
    assert result.report.step_lengths and all(a >= 0 for a in result.report.step_lengths)


@pytest.mark.parametrize("rounds", [1, 3])
def test_reported_mu_equals_calibration(task, rounds):
    model, public, private, valid = task
    result = fine_tune(
        model,
        cross_entropy,
        public,
        private,
        epsilon=2.0,
        delta=1e-6,
        subspace="srht",
        k=16,
        rounds=rounds,
        validation_data=valid,
        seed=0,
        progress=False,
    )
    report = result.report
    target = calibrate_gdp_mu(2.0, 1e-6)
    assert report.mu == pytest.approx(target, rel=1e-12)
    per_round = [r.mu for r in report.rounds]
    assert len(per_round) == rounds
    np.testing.assert_allclose(per_round, target / np.sqrt(rounds), rtol=1e-12)
    assert set(report.to_dict()) >= REQUIRED_REPORT_FIELDS
    # the seed is a diagnostic: never in the publishable report, whose guarantee says so
    assert report.noise["source"] == "user_seed" and "seed" not in report.noise
    assert result.diagnostics.seed == 0
    assert "NOT private against anyone who knows the seed" in report.guarantee
    assert report.accountant["epsilon"] == pytest.approx(2.0, abs=0.02)
    assert len(report.C) == rounds  # one schema: C is a list for any number of rounds


def test_input_model_not_modified_and_os_entropy_default(task):
    model, public, private, valid = task
    before = {n: p.clone() for n, p in model.state_dict().items()}
    result = fine_tune(
        model,
        cross_entropy,
        public,
        private,
        epsilon=1.0,
        subspace="srht",
        k=8,
        validation_data=valid,
        progress=False,
    )
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert result.report.noise["source"] == "os_entropy" and result.diagnostics.seed is None
    assert "REPRODUCIBLE" not in result.report.guarantee


def test_save_load_round_trip(released, tmp_path):
    result = released
    out = tmp_path / "run"
    result.save(out)
    saved = load(out)
    assert saved.report == result.report  # typed, read back through the JSON
    assert not saved.report.partial
    assert saved.report.spent_epsilon == result.report.accountant["epsilon"]
    assert saved.diagnostics["warning"].startswith("NOT FOR PUBLICATION")
    assert "seconds" not in saved.report.to_dict() and "seconds" in saved.diagnostics
    restored = saved.into(make_model(5))
    for name, value in result.model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value)
    with pytest.raises(OutputExistsError):
        result.save(out)
    result.save(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failure_between_writes_leaves_nothing(released, tmp_path, monkeypatch):
    result = released
    calls = []
    original = qem.io.write_atomically

    def fail_on_second(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        original(path, data)

    monkeypatch.setattr(qem.io, "write_atomically", fail_on_second)
    with pytest.raises(OSError, match="injected"):
        result.save(tmp_path / "run")
    assert calls == ["model.safetensors", "privacy_report.json"]
    assert list(tmp_path.iterdir()) == []
    result.save(tmp_path / "run")  # a failed save leaves nothing that blocks the next one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_invalid_private_records_contribute_zero_and_strict_mode_names_none(task):
    """A NaN input and an out-of-range label: by default each record contributes a zero
    gradient (the sum equals the sum without them); strict mode raises without naming the
    record or quoting its values."""
    model, _, private, _ = task
    x, y = private[0].clone(), private[1].clone()
    x[37, 2] = float("nan")
    y[12] = 7  # the model has 3 outputs
    basis = make_subspace("srht", model, k=8, seed=0)
    kwargs = dict(clip_norm=1.0, clipping="euclidean", batch_size=16)
    got = private_gradient_sum(model, cross_entropy, basis, (x, y), **kwargs)
    keep = [i for i in range(len(y)) if i not in (12, 37)]
    expected = private_gradient_sum(model, cross_entropy, basis, (x[keep], y[keep]), **kwargs)
    np.testing.assert_allclose(got.gradient_sum, expected.gradient_sum, rtol=1e-12, atol=1e-14)
    for data in ((x, private[1]), (private[0], y)):
        with pytest.raises((NonFiniteError, DataError)) as info:
            private_gradient_sum(
                model, cross_entropy, basis, data, invalid_records="raise", **kwargs
            )
        assert not any(ch.isdigit() for ch in str(info.value))


def test_bad_inputs(task):
    model, public, private, _ = task
    base = dict(epsilon=1.0, subspace="srht", k=8, progress=False)
    x, y = private
    with pytest.raises(DataError, match="empty"):
        fine_tune(model, cross_entropy, public, (x[:0], y[:0]), **base)
    with pytest.raises(ShapeError):
        fine_tune(model, cross_entropy, public, (x, y[:-1]), **base)
    with pytest.raises(DataError, match="outside"):  # public labels: the error may name them
        fine_tune(model, cross_entropy, (public[0], public[1] + 5), private, **base)
    with pytest.raises(DataError, match="invalid_records") as info:  # private: strict mode
        fine_tune(model, cross_entropy, public, (x, y + 5), invalid_records="raise", **base)
    assert not any(ch.isdigit() for ch in str(info.value))
    with pytest.raises(InvalidParameterError, match="invalid_records"):
        fine_tune(model, cross_entropy, public, private, invalid_records="skip", **base)
    with pytest.raises(ShapeError, match="one loss per example"):
        fine_tune(model, lambda o, t: cross_entropy(o, t).mean(), public, private, **base)
    with pytest.raises(InvalidParameterError):
        fine_tune(model, cross_entropy, public, private, **{**base, "k": 10_000})
    with pytest.raises(InvalidParameterError, match="declared"):
        fine_tune(model, cross_entropy, public, private, adjacency="add_remove", **base)
    with pytest.raises(InvalidParameterError):
        fine_tune(model, cross_entropy, public, private, **{**base, "epsilon": 0.0})
    broken = make_model()
    with torch.no_grad():
        broken[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"0\.weight"):
        fine_tune(broken, cross_entropy, public, private, **base)


def test_pure_mode_and_add_remove_reach_the_report(task):
    model, public, private, _ = task
    result = fine_tune(
        model,
        cross_entropy,
        public,
        private,
        epsilon=4.0,
        mode="pure",
        adjacency="add_remove",
        N=500,
        subspace="srht",
        k=6,
        clip_norm=0.5,
        seed=2,
        progress=False,
    )
    report = result.report
    assert (report.mode, report.adjacency, report.delta, report.N) == (
        "pure",
        "add_remove",
        0.0,
        500,
    )
    assert report.mu is None and report.accountant["epsilon"] == pytest.approx(4.0)
    preview = result.preview[0]
    assert preview["epsilon"] == pytest.approx(4.0)
    assert preview["worst_case_acceptance"] == pytest.approx(0.5)  # the chooser's target
    assert report.step_lengths == [1.0]
    assert report.rounds[0].N == 500  # the mechanism uses the declared N, not len(data)
    gdp = fine_tune(
        model,
        cross_entropy,
        public,
        private,
        epsilon=2.0,
        adjacency="add_remove",
        N=500,
        subspace="srht",
        k=6,
        clip_norm=0.5,
        prior_weight=1.0,
        seed=2,
        progress=False,
    )
    assert gdp.report.rounds[0].N == 500
    assert gdp.report.mu == pytest.approx(calibrate_gdp_mu(2.0, 1e-5), rel=1e-12)


def test_public_sample_size_limits_the_public_passes(task):
    model, public, private, valid = task
    result = fine_tune(
        model,
        cross_entropy,
        public,
        private,
        epsilon=1.0,
        subspace="srht",
        k=6,
        validation_data=valid,
        public_sample_size=50,
        seed=0,
        progress=False,
    )
    assert result.report.curvature["n_public"] == 50
    with pytest.raises(InvalidParameterError, match="public_sample_size"):
        fine_tune(
            model,
            cross_entropy,
            public,
            private,
            epsilon=1.0,
            subspace="srht",
            k=6,
            public_sample_size=0,
            progress=False,
        )


def descent_direction(model, valid, scale):
    """``scale`` times the unit negative validation gradient, in identity-subspace coordinates."""
    model.zero_grad()
    cross_entropy(model(valid[0]), valid[1]).mean().backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    return -scale * gradient / np.linalg.norm(gradient)


@pytest.mark.parametrize("start", [1.0, 2.0**12, 2.0**-6])
@pytest.mark.parametrize("scale", [1e-5, 1e-2, 1.0])
def test_line_search_finds_the_grid_minimum_however_short_the_step(scale, start):
    """Linear softmax regression: the validation loss is convex along the line, so the coarse-
    to-fine search must return the minimum over the whole grid {0} and 2^(j/2), 2^-8..2^20,
    which a brute force evaluates, whether the best step is short (scale 1) or long (1e-5),
    and whatever the warm start (the previous round's step) is."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    valid = make_task(300, 4, shift=0.8)
    basis = make_subspace("identity", model)
    w = descent_direction(model, valid, scale)
    step = basis.direction(model, torch.as_tensor(w))
    alpha, loss, _ = line_search_step(model, cross_entropy, step, valid, start=start)
    grid = [0.0, *(2.0 ** (j / 2) for j in range(-16, 41))]
    brute = []
    for a in grid:
        trial = nn.Linear(6, 3).double()
        trial.load_state_dict(model.state_dict())
        basis.apply_step(trial, a * torch.as_tensor(w))
        brute.append(evaluate_loss(trial, cross_entropy, valid))
    assert alpha == pytest.approx(grid[int(np.argmin(brute))], rel=1e-12)
    assert loss == pytest.approx(min(brute), rel=1e-12)
    if scale != 1e-2:  # the search had to go far up (1e-5) or stay short (1)
        assert alpha > 256 if scale == 1e-5 else alpha < 16


def test_line_search_keeps_the_model_for_an_ascent_direction():
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    valid = make_task(300, 4, shift=0.8)
    basis = make_subspace("identity", model)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    ascent = basis.direction(model, torch.as_tensor(-descent_direction(model, valid, 1.0)))
    alpha, loss, _ = line_search_step(model, cross_entropy, ascent, valid)
    assert alpha == 0.0
    assert loss == pytest.approx(evaluate_loss(model, cross_entropy, valid), rel=1e-12)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_resampled_subspace_draws_a_new_basis_each_round(task):
    model, public, private, valid = task
    kwargs = dict(
        epsilon=50.0, subspace="dense", k=10, rounds=3, damping=0.1, validation_data=valid
    )
    result = fine_tune(
        model,
        cross_entropy,
        public,
        private,
        seed=2,
        progress=False,
        subspace_seed=7,
        resample_subspace=True,
        **kwargs,
    )
    report = result.report
    assert [r.subspace_seed for r in report.rounds] == [7, 8, 9]
    assert report.subspace["resample_every"] == 1
    assert report.mu == pytest.approx(calibrate_gdp_mu(50.0, 1e-5), rel=1e-12)
    assert all(alpha > 0 for alpha in report.step_lengths)  # every round moved theta
    fixed = fine_tune(
        model, cross_entropy, public, private, seed=2, progress=False, subspace_seed=7, **kwargs
    )
    assert [r.subspace_seed for r in fixed.report.rounds] == [7, 7, 7]
    # with a fixed basis every round's step lies in the span of the same k = 10 columns
    P = make_subspace("dense", model, k=10, seed=7).materialize().numpy()
    step = parameter_step(model, fixed.model)
    np.testing.assert_allclose(P @ (P.T @ step), step, atol=1e-10)
    resampled_step = parameter_step(model, result.model)
    assert np.linalg.norm(resampled_step - P @ (P.T @ resampled_step)) > 1e-3 * np.linalg.norm(
        resampled_step
    )
    with pytest.raises(InvalidParameterError, match="resamples the subspace"):
        fine_tune(
            model,
            cross_entropy,
            public,
            private,
            epsilon=1.0,
            subspace=make_subspace("dense", model, k=10, seed=7),
            resample_subspace=True,
        )


def test_partitioned_rounds_read_disjoint_chunks_with_the_whole_budget(task):
    """Round t is exactly the plain mechanism on the t-th chunk with N_t = its size and the
    full mu; changing a record of the last chunk leaves every earlier round's release as it was
    (the basis of the parallel-composition argument); the report states mu, not sqrt(T) mu."""
    model, public, private, valid = task
    kwargs = dict(STEP_KWARGS, prior_weight=None, rounds=3, partition_rounds=True, seed=4)
    result = fine_tune(model, cross_entropy, public, private, validation_data=valid, **kwargs)
    report = result.report
    target = calibrate_gdp_mu(1.0, 1e-5)
    assert [r.N for r in report.rounds] == [133, 133, 134]
    assert [r.mu for r in report.rounds] == pytest.approx([target] * 3, rel=1e-12)
    assert report.mu == pytest.approx(target, rel=1e-12)
    assert report.schedule["kind"] == "partitioned" and report.schedule["epochs"] == 1
    assert report.accountant["epsilon"] == pytest.approx(1.0, abs=0.02)

    first_chunk = (private[0][:133], private[1][:133])
    P, A, gradient_sum = brute_force_statistics(model, public, first_chunk)
    mechanism = QuadraticExponentialMechanism(
        A, N=133, lam=1.0, clip_norm=0.5, seed=SeedTree(4, 3).noise[0]
    )
    mechanism.set_beta(gdp_beta(target, 133, 1.0, mechanism.sensitivity))
    w = mechanism.sample(gradient_sum)
    one_round = fine_tune(
        model,
        cross_entropy,
        public,
        first_chunk,
        validation_data=valid,
        **dict(STEP_KWARGS, prior_weight=None, seed=4),
    )
    alpha = one_round.report.step_lengths[0]
    np.testing.assert_allclose(parameter_step(model, one_round.model), alpha * P @ w, atol=1e-9)
    first = report.rounds[0]
    assert (first.step_length, first.public_validation_loss) == (
        alpha,
        one_round.report.rounds[0].public_validation_loss,
    )

    changed_x, changed_y = private[0].clone(), private[1].clone()
    changed_x[-1], changed_y[-1] = -changed_x[-1], (changed_y[-1] + 1) % 3
    neighbour = fine_tune(
        model, cross_entropy, public, (changed_x, changed_y), validation_data=valid, **kwargs
    )
    # theta_1, theta_2 unchanged: the public validation loss after each round is bit-identical
    before = [r.public_validation_loss for r in report.rounds]
    after = [r.public_validation_loss for r in neighbour.report.rounds]
    assert after[:2] == before[:2] and after[2] != before[2]
    assert not np.allclose(
        parameter_step(model, neighbour.model), parameter_step(model, result.model)
    )


def test_partitioned_rounds_refuse_what_they_cannot_account(task):
    model, public, private, _ = task
    for bad in (
        dict(adjacency="add_remove", N=400),
        dict(mode="pure", radius=5.0),
        dict(N=500),
        dict(rounds=401),
    ):
        with pytest.raises(InvalidParameterError, match="partitioned"):
            fine_tune(
                model,
                cross_entropy,
                public,
                private,
                **{**STEP_KWARGS, "rounds": 2, **bad},
                partition_rounds=True,
            )


def test_momentum_steps_along_the_heavy_ball_of_the_releases(task):
    """With alpha fixed (prior_weight), two rounds with momentum m move theta by
    P w_1 + (P w_2 + m P w_1): post-processing of the two releases only."""
    model, public, private, _ = task
    kwargs = dict(STEP_KWARGS, rounds=2, seed=6, momentum=0.5)
    result = fine_tune(model, cross_entropy, public, private, **kwargs)
    P = make_subspace("dense", model, k=20, seed=0).materialize().numpy()
    w1, w2 = result.releases
    expected = P @ w1 + P @ w2 + 0.5 * P @ w1
    np.testing.assert_allclose(parameter_step(model, result.model), expected, atol=1e-10)
    assert result.report.momentum == 0.5
    with pytest.raises(InvalidParameterError, match="momentum"):
        fine_tune(model, cross_entropy, public, private, **{**kwargs, "momentum": 1.0})
