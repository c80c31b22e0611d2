"""Round schedules (docs/theory.md §13): their DpEvents against dp-accounting, which rows each
round reads, the public weight of the quadratic, and one round of each as an exact mechanism."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

import qem.schedules.sampling
from cases import make_linear, make_task
from qem.errors import InvalidParameterError
from qem.finetune import fine_tune
from qem.losses import cross_entropy
from qem.mechanism import QuadraticExponentialMechanism
from qem.privacy.budget import Budget
from qem.privacy.gdp import calibrate_gdp_mu, gdp_delta
from qem.privacy.ledger import PrivacyLedger, dp_event_from_json
from qem.privacy.pld import PLD_DISCRETIZATION
from qem.privacy.sensitivity import Adjacency
from qem.schedules import partitioned, poisson, sequential

DELTA = 1e-5
RELATIONS = {
    "REPLACE_ONE": dp_accounting.NeighboringRelation.REPLACE_ONE,
    "ADD_OR_REMOVE_ONE": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
}


def independent_epsilon(event_json: dict, relation: str) -> float:
    """epsilon(DELTA) of a serialised event, by a fresh dp-accounting PLD accountant."""
    accountant = PLDAccountant(RELATIONS[relation], value_discretization_interval=1e-4)
    return accountant.compose(dp_event_from_json(event_json)).get_epsilon(DELTA)


CASES = [
    (sequential(1), "replace_one"),
    (sequential(4), "replace_one"),
    (sequential(4), "add_remove"),
    (partitioned(5, epochs=3), "replace_one"),
    (poisson(0.05, 30), "replace_one"),
    (poisson(0.05, 30), "add_remove"),
]


@pytest.mark.parametrize(("schedule", "adjacency"), CASES, ids=repr)
def test_each_schedule_event_gives_back_the_target_epsilon(schedule, adjacency):
    """The whole run's DpEvent, serialised to JSON and read by an independent accountant under
    the recorded relation, spends the target epsilon (within the calibration tolerance: the
    Poisson z is the smallest meeting the target to 0.1%)."""
    plan = schedule.plan(Budget(2.0, DELTA, "gdp", Adjacency(adjacency), N=1000), 1000)
    ledger = PrivacyLedger(plan)
    for executed in plan.rounds():
        ledger.record(executed)
    record = ledger.to_dict()
    epsilon = independent_epsilon(record["dp_event"], record["neighboring_relation"])
    assert 2.0 * (1 - 0.02) <= epsilon <= 2.0 * (1 + 1e-3)
    assert ledger.epsilon() == pytest.approx(epsilon, abs=2 * PLD_DISCRETIZATION)
    if plan.mu is not None:  # a GDP statement: the closed form agrees
        assert plan.mu == pytest.approx(calibrate_gdp_mu(2.0, DELTA), rel=1e-12)


def test_schedules_refuse_what_they_cannot_account():
    add_remove = Budget(1.0, DELTA, "gdp", Adjacency.ADD_REMOVE)
    with pytest.raises(InvalidParameterError, match="replace_one neighbours only"):
        partitioned(4).plan(add_remove, 100)
    with pytest.raises(InvalidParameterError, match="supports mode gdp"):
        poisson(0.1, 5).plan(Budget(1.0, None, "pure", Adjacency.REPLACE_ONE), 100)
    with pytest.raises(InvalidParameterError, match="sampling rate"):
        poisson(1.5, 5)
    with pytest.raises(InvalidParameterError, match="rounds"):
        sequential(0)


def test_partitioned_epochs_read_each_record_once_per_epoch():
    plan = partitioned(4, epochs=3).plan(Budget(1.0, DELTA, "gdp", Adjacency.REPLACE_ONE), 10)
    rounds = list(plan.rounds())
    assert len(rounds) == 12
    for epoch in range(3):
        rows = np.concatenate([r.rows for r in rounds if r.epoch == epoch])
        assert sorted(rows.tolist()) == list(range(10))  # each record exactly once per epoch
    assert [r.N for r in rounds[:4]] == [2.0, 3.0, 2.0, 3.0]  # N_t: the chunk's size
    assert plan.mu == pytest.approx(calibrate_gdp_mu(1.0, DELTA), rel=1e-12)
    # a started epoch costs one release per record, as a finished one
    assert plan.mu_after(5) == plan.mu_after(8) == pytest.approx(plan.mu * np.sqrt(2 / 3))


FAST = dict(subspace="dense", k=12, damping=0.1, clip_norm=0.5, prior_weight=1.0)


def test_partitioned_epochs_leave_rounds_before_a_changed_record_bit_identical():
    public, private = make_task(60, 1), make_task(40, 2)
    x, y = private[0].clone(), private[1].clone()
    x[25], y[25] = -x[25], (y[25] + 1) % 3  # record 25 lies in chunk 3 of 4 (rows 20..29)
    releases = [
        fine_tune(
            make_linear(), cross_entropy, public, data, epsilon=2.0,
            schedule=partitioned(4, epochs=2), seed=7, **FAST,
        ).releases
        for data in (private, (x, y))
    ]  # fmt: skip
    for t in range(2):
        assert np.array_equal(releases[0][t], releases[1][t])
    assert not np.allclose(releases[0][2], releases[1][2])


def test_poisson_weight_is_the_expected_size_never_the_realised_one(monkeypatch):
    """The same included rows with a different realised batch size (extra records that
    contribute zero: labels outside the model's outputs) give the same exact mean: N_t = q N."""
    public, (x, y) = make_task(60, 1), make_task(40, 2)
    padded = (torch.cat([x, x[:10]]), torch.cat([y, torch.full((10,), 9)]))  # 10 void records
    rows = {40: np.arange(0, 40, 2), 50: np.concatenate([np.arange(0, 40, 2), np.arange(40, 50)])}
    monkeypatch.setattr(
        qem.schedules.sampling,
        "inclusion_mask",
        lambda n, q, rng=None, shard=None: np.isin(np.arange(n), rows[n]),
    )
    results = [
        fine_tune(
            make_linear(), cross_entropy, public, data, epsilon=2.0, N=50,
            adjacency="add_remove", schedule=poisson(0.4, 1), noise=False, **FAST,
        )
        for data in ((x, y), padded)
    ]  # fmt: skip
    np.testing.assert_array_equal(results[0].releases[0], results[1].releases[0])
    assert pytest.approx(0.4 * 50) == results[0].report.rounds[0].N


def test_poisson_inclusions_come_from_the_csprng_unless_the_switch_is_on():
    budget = Budget(1.0, DELTA, "gdp", Adjacency.REPLACE_ONE)

    def first_rows(seed):
        plan = poisson(0.5, 2).plan(budget, 200, seed=seed)
        return next(iter(plan.rounds())).rows, plan.describe()["sampling"]

    (a, source_a), (b, _) = first_rows(None), first_rows(None)
    assert source_a == "os_csprng" and not np.array_equal(a, b)
    (c, source_c), (d, _) = first_rows(3), first_rows(3)
    assert source_c == "user_seed" and np.array_equal(c, d)
    assert abs(len(a) - 100) < 50  # Bernoulli(1/2) of 200 records


@pytest.mark.parametrize(("schedule", "adjacency"), CASES, ids=repr)
def test_one_round_of_each_schedule_is_exactly_its_accounted_gaussian(schedule, adjacency):
    """The round's mechanism, built as fine_tune builds it (N_t, z), shifts its mean between
    the worst-case neighbouring gradient sums by exactly s/z in the metric of its covariance,
    so its exact privacy profile is the Gaussian's the schedule's event accounts for."""
    adjacency = Adjacency(adjacency)
    plan = schedule.plan(Budget(2.0, DELTA, "gdp", adjacency, N=1000), 1000)
    executed = next(iter(plan.rounds()))
    rng = np.random.default_rng(0)
    root = rng.normal(size=(5, 5))
    A = root @ root.T + 0.5 * np.eye(5)
    C = 0.7
    mechanism = QuadraticExponentialMechanism(A, N=executed.N, clip_norm=C, adjacency=adjacency)
    mechanism.set_noise_multiplier(executed.noise_multiplier)
    L = np.linalg.cholesky(A)
    u = rng.normal(size=5)
    extreme = C * L @ (u / np.linalg.norm(u))  # ||extreme||_{A^-1} = C: attains the bound
    other = -extreme if adjacency is Adjacency.REPLACE_ONE else np.zeros(5)
    shift = mechanism.mean(extreme) - mechanism.mean(other)
    precision = mechanism.beta * executed.N * A  # Sigma^-1
    mahalanobis = float(np.sqrt(shift @ precision @ shift))
    expected = adjacency.multiplier / executed.noise_multiplier
    assert mahalanobis == pytest.approx(expected, rel=1e-10)
    assert mechanism.mu == pytest.approx(expected, rel=1e-12)
    if getattr(plan, "round_mu", None) is not None:
        assert expected == pytest.approx(plan.round_mu, rel=1e-12)
    eps = np.linspace(0.0, 3.0, 7)
    np.testing.assert_allclose(gdp_delta(mahalanobis, eps), gdp_delta(expected, eps), rtol=1e-8)


def test_fine_tune_with_a_poisson_schedule_reports_q_t_z_and_the_accountant():
    result = fine_tune(
        make_linear(),
        cross_entropy,
        make_task(60, 1),
        make_task(200, 2),
        epsilon=2.0,
        schedule=poisson(0.25, 6),
        validation_data=make_task(40, 3),
        seed=0,
        subspace="dense",
        k=12,
        damping=0.1,
        clip_norm=0.5,
    )
    report = result.report
    assert report.schedule["kind"] == "poisson" and report.schedule["sampling_rate"] == 0.25
    assert report.schedule["rounds"] == 6 and report.schedule["noise_multiplier"] > 0
    assert report.mu is None and report.accountant["epsilon"] == pytest.approx(2.0, abs=0.02)
    assert report.accountant["neighboring_relation"] == "REPLACE_ONE"
    assert all(r.N == 50.0 for r in report.rounds) and len(result.releases) == 6
    assert report.schedule["sampling"] == "user_seed"
    with pytest.raises(InvalidParameterError, match="not both"):
        fine_tune(make_linear(), cross_entropy, make_task(60, 1), make_task(20, 2),
                  epsilon=1.0, schedule=poisson(0.5, 2), rounds=3)  # fmt: skip


def test_poisson_expected_batch_sets_q_from_the_public_size():
    budget = Budget(1.0, DELTA, "gdp", Adjacency.REPLACE_ONE)
    plan = poisson(expected_batch=250, rounds=3).plan(budget, 1000)
    assert plan.sampling_rate == 0.25 and plan.describe()["sampling_rate"] == 0.25
    assert poisson(expected_batch=5000, rounds=3).plan(budget, 1000).sampling_rate == 1.0
    with pytest.raises(InvalidParameterError, match="exactly one"):
        poisson(0.1, 3, expected_batch=100)


@pytest.mark.filterwarnings("ignore:round .* step length is 0")
@pytest.mark.parametrize("curvature_every", [1, 2])
def test_each_rounds_quadratic_is_factored_once(monkeypatch, curvature_every):
    """The public quadratic is one object per curvature computation (docs/theory.md §13): A is
    factored once and its factor reaches the clip norm, the private pass and the mechanism."""
    factorisations = []
    real_cholesky = np.linalg.cholesky

    def counting_cholesky(matrix):
        factorisations.append(matrix.shape)
        return real_cholesky(matrix)

    monkeypatch.setattr(np.linalg, "cholesky", counting_cholesky)
    rounds = 4
    fine_tune(
        make_linear(),
        cross_entropy,
        make_task(60, 1),
        make_task(200, 2),
        epsilon=2.0,
        rounds=rounds,
        curvature_every=curvature_every,
        validation_data=make_task(40, 3),
        seed=0,
        subspace="dense",
        k=12,
        damping=0.1,
    )
    assert factorisations == [(12, 12)] * (rounds // curvature_every)
