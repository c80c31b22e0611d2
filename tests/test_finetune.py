"""End to end on a small synthetic task: fine_tune, the private pass, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qem.io
from cases import blob_task, make_model, run, with_options
from qem.curvature.factory import make_curvature
from qem.errors import (
    DataError,
    InvalidParameterError,
    NonFiniteError,
    OutputExistsError,
    ShapeError,
)
from qem.io import load
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


@pytest.fixture(scope="module")
def task():
    """The blob task; the common arguments of this file's runs: epsilon 1 in an SRHT subspace
    of k = 8, the line search on the task's validation data."""
    return with_options(blob_task(), epsilon=1.0, subspace="srht", k=8)


@pytest.fixture(scope="module")
def step_task(task):
    """The blob task at a fixed weight lam = 2 (alpha = 1: no line search) in the dense subspace
    of k = 20 with the GGN, gamma = 0.1 and C = 0.5: the step brute_force_statistics predicts."""
    return with_options(task, subspace="dense", k=20, damping=0.1, clip_norm=0.5, prior_weight=2.0)


@pytest.fixture(scope="module")
def released(task):
    """One private release of the synthetic task, reused by the save/load tests."""
    return run(task, seed=1)


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


def test_noise_off_equals_closed_form_step(step_task):
    result = run(step_task, noise=False)
    P, A, gradient_sum = brute_force_statistics(
        step_task["model"], step_task["public"], step_task["private"]
    )
    expected_w = -np.linalg.solve(400 * 2.0 * A, gradient_sum)
    step = parameter_step(step_task["model"], result.model)
    np.testing.assert_allclose(step, P @ expected_w, atol=1e-10)
    assert "NOT PRIVATE" in result.report.noise["source"]


def test_one_round_is_the_plain_mechanism(step_task):
    result = run(step_task, seed=5)
    P, A, gradient_sum = brute_force_statistics(
        step_task["model"], step_task["public"], step_task["private"]
    )
    mechanism = QuadraticExponentialMechanism(
        A, N=400, lam=2.0, clip_norm=0.5, seed=SeedTree(5, 1).noise[0]
    )
    mechanism.calibrate(1.0, 1e-5)
    w = mechanism.sample(gradient_sum)
    np.testing.assert_allclose(parameter_step(step_task["model"], result.model), P @ w, atol=1e-9)
    assert result.report.mu == pytest.approx(mechanism.mu, rel=1e-12)
    np.testing.assert_allclose(result.releases[0], w, rtol=1e-12)


def test_improves_validation_loss_at_large_epsilon(task):
    before = evaluate_loss(task["model"], cross_entropy, task["validation"])
    result = run(task, epsilon=50.0, subspace="dense", k=40, damping=0.05, rounds=2, seed=3)
    after = evaluate_loss(result.model, cross_entropy, task["validation"])
    assert after < before - 0.05
    assert result.report.step_lengths and all(a >= 0 for a in result.report.step_lengths)


@pytest.mark.parametrize("rounds", [1, 3])
def test_reported_mu_equals_calibration(task, rounds):
    result = run(task, epsilon=2.0, delta=1e-6, k=16, rounds=rounds, seed=0)
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
    model = task["model"]
    before = {n: p.clone() for n, p in model.state_dict().items()}
    result = run(task)
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
    model, private = task["model"], task["private"]
    x, y = private[0].clone(), private[1].clone()
    x[37, 2] = float("nan")
    y[12] = 7  # the model has 3 outputs
    basis = make_subspace("srht", model, k=8, seed=0)
    kwargs = dict(clip_norm=1.0, clipping="euclidean", batch_size=16)
    got = private_gradient_sum(model, cross_entropy, basis, (x, y), **kwargs)
    keep = [i for i in range(len(y)) if i not in (12, 37)]
    expected = private_gradient_sum(model, cross_entropy, basis, (x[keep], y[keep]), **kwargs)
    # Batches of 16 cut the 400 and the 398 rows differently: per-example gradients (float64
    # model) from other batch shapes may round differently on another CPU, a few ulps of each
    # clipped term (norm <= C = 1), so the sums may differ by ~400 * 8 * 2^-53 ~ 4e-13.
    np.testing.assert_allclose(got.gradient_sum, expected.gradient_sum, rtol=1e-12, atol=4e-12)
    for data in ((x, private[1]), (private[0], y)):
        with pytest.raises((NonFiniteError, DataError)) as info:
            private_gradient_sum(
                model, cross_entropy, basis, data, invalid_records="raise", **kwargs
            )
        assert not any(ch.isdigit() for ch in str(info.value))


def test_bad_inputs(task):
    (x, y), public = task["private"], task["public"]
    with pytest.raises(DataError, match="empty"):
        run(task, private=(x[:0], y[:0]))
    with pytest.raises(ShapeError):
        run(task, private=(x, y[:-1]))
    with pytest.raises(DataError, match="outside"):  # public labels: the error may name them
        run(task, public=(public[0], public[1] + 5))
    with pytest.raises(DataError, match="invalid_records") as info:  # private: strict mode
        run(task, private=(x, y + 5), invalid_records="raise")
    assert not any(ch.isdigit() for ch in str(info.value))
    with pytest.raises(InvalidParameterError, match="invalid_records"):
        run(task, invalid_records="skip")
    with pytest.raises(ShapeError, match="one loss per example"):
        run(task, loss_fn=lambda o, t: cross_entropy(o, t).mean())
    with pytest.raises(InvalidParameterError):
        run(task, k=10_000)
    with pytest.raises(InvalidParameterError, match="declared"):
        run(task, adjacency="add_remove")
    with pytest.raises(InvalidParameterError):
        run(task, epsilon=0.0)
    broken = make_model()
    with torch.no_grad():
        broken[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"0\.weight"):
        run(task, model=broken)


def test_pure_mode_and_add_remove_reach_the_report(task):
    declared = dict(adjacency="add_remove", N=500, k=6, clip_norm=0.5, seed=2)
    result = run(task, epsilon=4.0, mode="pure", **declared)
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
    gdp = run(task, epsilon=2.0, prior_weight=1.0, **declared)
    assert gdp.report.rounds[0].N == 500
    assert gdp.report.mu == pytest.approx(calibrate_gdp_mu(2.0, 1e-5), rel=1e-12)


def test_public_sample_size_limits_the_public_passes(task):
    result = run(task, k=6, public_sample_size=50, seed=0)
    assert result.report.curvature["n_public"] == 50
    with pytest.raises(InvalidParameterError, match="public_sample_size"):
        run(task, k=6, public_sample_size=0)


def test_resampled_subspace_draws_a_new_basis_each_round(task):
    model = task["model"]
    options = dict(epsilon=50.0, subspace="dense", k=10, rounds=3, damping=0.1, seed=2)
    result = run(task, subspace_seed=7, resample_subspace=True, **options)
    report = result.report
    assert [r.subspace_seed for r in report.rounds] == [7, 8, 9]
    assert report.subspace["resample_every"] == 1
    assert report.mu == pytest.approx(calibrate_gdp_mu(50.0, 1e-5), rel=1e-12)
    assert all(alpha > 0 for alpha in report.step_lengths)  # every round moved theta
    fixed = run(task, subspace_seed=7, **options)
    assert [r.subspace_seed for r in fixed.report.rounds] == [7, 7, 7]
    # with a fixed basis every round's step lies in the span of the same k = 10 columns
    P = make_subspace("dense", model, k=10, seed=7).materialize().numpy()
    step = parameter_step(model, fixed.model)
    np.testing.assert_allclose(P @ (P.T @ step), step, atol=1e-10)
    resampled_step = parameter_step(model, result.model)
    assert np.linalg.norm(resampled_step - P @ (P.T @ resampled_step)) > 1e-3 * np.linalg.norm(
        resampled_step
    )
    built = make_subspace("dense", model, k=10, seed=7)
    with pytest.raises(InvalidParameterError, match="resamples the subspace"):
        run(task, subspace=built, k=None, resample_subspace=True)


def test_partitioned_rounds_read_disjoint_chunks_with_the_whole_budget(step_task):
    """Round t is exactly the plain mechanism on the t-th chunk with N_t = its size and the
    full mu; changing a record of the last chunk leaves every earlier round's release as it was
    (the basis of the parallel-composition argument); the report states mu, not sqrt(T) mu."""
    model, public, private = (step_task[key] for key in ("model", "public", "private"))
    searched = dict(prior_weight=None, seed=4)
    partitioned = dict(searched, rounds=3, partition_rounds=True)
    result = run(step_task, **partitioned)
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
    one_round = run(step_task, private=first_chunk, **searched)
    alpha = one_round.report.step_lengths[0]
    np.testing.assert_allclose(parameter_step(model, one_round.model), alpha * P @ w, atol=1e-9)
    first = report.rounds[0]
    assert (first.step_length, first.public_validation_loss) == (
        alpha,
        one_round.report.rounds[0].public_validation_loss,
    )

    changed_x, changed_y = private[0].clone(), private[1].clone()
    changed_x[-1], changed_y[-1] = -changed_x[-1], (changed_y[-1] + 1) % 3
    neighbour = run(step_task, private=(changed_x, changed_y), **partitioned)
    # theta_1, theta_2 unchanged: the public validation loss after each round is bit-identical
    before = [r.public_validation_loss for r in report.rounds]
    after = [r.public_validation_loss for r in neighbour.report.rounds]
    assert after[:2] == before[:2] and after[2] != before[2]
    assert not np.allclose(
        parameter_step(model, neighbour.model), parameter_step(model, result.model)
    )


@pytest.mark.parametrize(
    "bad",
    [dict(adjacency="add_remove", N=400), dict(mode="pure", radius=5.0), dict(N=500),
     dict(rounds=401)],
)  # fmt: skip
def test_partitioned_rounds_refuse_what_they_cannot_account(step_task, bad):
    with pytest.raises(InvalidParameterError, match="partitioned"):
        run(step_task, **{"rounds": 2, "partition_rounds": True, **bad})


def test_momentum_steps_along_the_heavy_ball_of_the_releases(step_task):
    """With alpha fixed (prior_weight), two rounds with momentum m move theta by
    P w_1 + (P w_2 + m P w_1): post-processing of the two releases only."""
    model = step_task["model"]
    result = run(step_task, rounds=2, seed=6, momentum=0.5)
    P = make_subspace("dense", model, k=20, seed=0).materialize().numpy()
    w1, w2 = result.releases
    expected = P @ w1 + P @ w2 + 0.5 * P @ w1
    np.testing.assert_allclose(parameter_step(model, result.model), expected, atol=1e-10)
    assert result.report.momentum == 0.5
    with pytest.raises(InvalidParameterError, match="momentum"):
        run(step_task, rounds=2, momentum=1.0)


def test_a_release_whose_step_was_not_taken_joins_the_next_step():
    """docs/theory.md §9b: with P = I, the model moves by sum_t alpha_t d_t where d_t is round
    t's release plus every release since the last step taken; the report counts them."""
    task = blob_task()
    result = run(task, epsilon=0.2, rounds=4, subspace="identity", seed=6)  # steps 0, 0, +, +
    steps = result.report.step_lengths
    counts = [r.releases_in_step for r in result.report.rounds]
    assert 0.0 in steps[:-1]  # a zero step before the last round: something was carried
    expected, carried = np.zeros_like(result.releases[0]), np.zeros_like(result.releases[0])
    pending = 0  # releases carried into the next step
    for alpha, w, count in zip(steps, result.releases, counts, strict=True):
        direction = carried + w
        assert count == 1 + pending
        expected += alpha * direction
        carried, pending = (direction, count) if alpha == 0.0 else (np.zeros_like(w), 0)
    np.testing.assert_allclose(
        parameter_step(task["model"], result.model), expected, rtol=1e-10, atol=1e-14
    )
    assert result.report.unapplied_releases == (counts[-1] if steps[-1] == 0.0 else 0)


def test_the_acceptance_test_runs_on_confirmation_examples_the_search_does_not_read(
    monkeypatch,
):
    """confirmation_size = c: the search reads the first n - c validation examples, the
    paired test the last c (so it is not biased by the search's choice of alpha); the releases
    are those of the run without it (post-processing)."""
    import qem.finetune.step
    import qem.linesearch
    from qem.finetune.inputs import RunData

    task = blob_task()
    n = len(task["validation"][1])
    data = RunData.build(
        task["public"], task["private"], task["validation"], searches=True, confirmation_size=7
    )
    assert len(data.validation) == n - 7 and len(data.confirmation) == 7
    assert data.validation_source["confirmation_n"] == 7
    tested, searched = [], []
    decrease, search = qem.finetune.step.significant_decrease, qem.finetune.step.line_search_step
    monkeypatch.setattr(
        qem.finetune.step,
        "significant_decrease",
        lambda a, b, z: tested.append(len(a)) or decrease(a, b, z),
    )
    monkeypatch.setattr(
        qem.finetune.step,
        "line_search_step",
        lambda model, loss, step, validation, **kw: (
            searched.append(len(validation)) or search(model, loss, step, validation, **kw)
        ),
    )
    options = dict(epsilon=4.0, rounds=3, subspace="identity", seed=0)
    plain = run(task, **options)
    confirmed = run(task, **options, confirmation_size=7)
    np.testing.assert_array_equal(confirmed.releases[0], plain.releases[0])
    assert set(searched[len(searched) // 2 :]) == {n - 7}
    assert tested and set(tested) == {7}
    assert qem.linesearch.significant_decrease is decrease
    with pytest.raises(InvalidParameterError, match="confirmation_size"):
        run(task, **options, confirmation_size=n)


def test_a_step_within_the_validation_noise_is_not_taken():
    """The same seeded release: any decrease is a step without the test (None); with a high
    threshold round 1's step is not kept and its release joins round 2's direction."""
    task = blob_task()
    loose = run(task, epsilon=1.0, rounds=2, subspace="identity", seed=0, step_significance=None)
    strict = run(task, epsilon=1.0, rounds=2, subspace="identity", seed=0, step_significance=9.0)
    assert all(alpha > 0 for alpha in loose.report.step_lengths)
    assert strict.report.step_lengths[0] == 0.0
    assert [r.releases_in_step for r in strict.report.rounds] == [1, 2]
    assert strict.report.unapplied_releases == (2 if strict.report.step_lengths[1] == 0 else 0)
    np.testing.assert_array_equal(strict.releases[0], loose.releases[0])
