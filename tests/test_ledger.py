"""The privacy ledger (qem.privacy.ledger): what each executed round records, the DpEvent of
every prefix of a run, the epsilon spent against a fresh dp-accounting PLD accountant and the
exact Gaussian privacy profile, the JSON form of DpEvents, the budget several releases spent
together, and the report's accountant block.

Independent references: ``exact_epsilon`` solves the analytic Gaussian profile (Balle & Wang
2018) with scipy; ``fresh_epsilon`` is dp-accounting's own PLD accountant, built here; expected
events are built here from dp-accounting's classes."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from scipy import optimize, stats

from cases import blob_task, make_linear, run
from qem.errors import InvalidParameterError
from qem.privacy.budget import Budget
from qem.privacy.ledger import (
    PrivacyLedger,
    accountant_block,
    dp_event_from_json,
    dp_event_to_json,
    spent_epsilon,
    total_spent,
)
from qem.privacy.pld import PLD_DISCRETIZATION
from qem.schedules import partitioned, poisson, sequential

DELTA = 1e-5
PLD_SLACK = 2 * PLD_DISCRETIZATION
"""How far a connect-the-dots PLD upper bound at interval 1e-3 may lie above the exact epsilon
(or above another PLD bound of the same event)."""
SAME = 1e-9
"""Relative agreement of two PLD accountants at the same interval on the same event (the same
float64 computation, up to the order of its sums)."""

REPLACE, ADD_REMOVE = NeighboringRelation.REPLACE_ONE, NeighboringRelation.ADD_OR_REMOVE_ONE


def exact_epsilon(mu: float, delta: float) -> float:
    """epsilon at delta of mu-GDP: the root of Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
    = delta, in log space (Balle & Wang 2018, Thm 8; Dong, Roth & Su 2022, Cor 2.13)."""

    def excess(eps: float) -> float:
        high = stats.norm.cdf(-eps / mu + mu / 2)
        low = math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2))
        return high - low - delta

    return optimize.brentq(excess, 0.0, mu * mu / 2 + 40 * mu + 1, xtol=1e-14, rtol=1e-14)


def exact_mu(epsilon: float, delta: float) -> float:
    """The mu whose exact profile gives delta at epsilon."""
    return optimize.brentq(lambda mu: exact_epsilon(mu, delta) - epsilon, 1e-3, 50.0, xtol=1e-14)


def fresh_epsilon(event: dp_event.DpEvent, relation: NeighboringRelation, delta: float) -> float:
    """epsilon at delta of ``event`` by a new dp-accounting PLD accountant at qem's interval."""
    accountant = PLDAccountant(relation, value_discretization_interval=PLD_DISCRETIZATION)
    return accountant.compose(event).get_epsilon(delta)


def executed_ledger(plan, completed: int | None = None) -> PrivacyLedger:
    """The ledger after the first ``completed`` rounds of ``plan`` (all by default)."""
    ledger = PrivacyLedger(plan)
    for executed in plan.rounds():
        if completed is not None and ledger.completed == completed:
            break
        ledger.record(executed)
    return ledger


def gdp_plan(schedule, epsilon: float = 2.0, adjacency: str = "replace_one"):
    return schedule.plan(Budget(epsilon, DELTA, "gdp", adjacency, N=1000), 1000, seed=0)


PLAN_BUILDERS = {
    "sequential": lambda: gdp_plan(sequential(4)),
    "sequential_add_remove": lambda: gdp_plan(sequential(3), adjacency="add_remove"),
    "partitioned": lambda: gdp_plan(partitioned(3, epochs=2)),
    "poisson": lambda: gdp_plan(poisson(0.1, 4)),
    "pure": lambda: sequential(2).plan(Budget(3.0, None, "pure", "replace_one"), 100),
}


@functools.cache
def make_plan(name: str):
    """The calibrated plan ``name`` (built once: the Poisson calibration runs a PLD bisection)."""
    return PLAN_BUILDERS[name]()


def expected_event(name: str, plan, completed: int) -> dp_event.DpEvent:
    """The DpEvent of the first ``completed`` rounds, from the schedule's definition: T Gaussian
    rounds (sequential), one Gaussian per started epoch (partitioned: parallel composition),
    Poisson-sampled Gaussians, or randomized response with ratio e^eps per pure round."""
    if completed == 0:
        return dp_event.NoOpDpEvent()
    z = plan.noise_multiplier
    if name == "pure":
        p = 2.0 / (1.0 + math.exp(3.0 / 2))
        one = dp_event.RandomizedResponseDpEvent(noise_parameter=p, num_buckets=2)
        return dp_event.SelfComposedDpEvent(one, completed)
    if name == "partitioned":
        return dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), math.ceil(completed / 3))
    if name == "poisson":
        sampled = dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(z))
        return dp_event.SelfComposedDpEvent(sampled, completed)
    return dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), completed)


@pytest.mark.parametrize("name", PLAN_BUILDERS)
def test_the_ledger_records_each_executed_round_and_no_rows(name):
    plan = make_plan(name)
    rounds = list(plan.rounds())
    ledger = PrivacyLedger(plan)
    assert ledger.completed == 0 and ledger.to_dict()["rounds"] == []
    for count, executed in enumerate(rounds, start=1):
        ledger.record(executed)
        assert ledger.completed == count
    record = ledger.to_dict()
    assert record["rounds"] == [
        {"round": r.index + 1, "epoch": r.epoch + 1, "N": r.N,
         "noise_multiplier": r.noise_multiplier, "epsilon": r.epsilon}
        for r in rounds
    ]  # fmt: skip
    relation = REPLACE if name != "sequential_add_remove" else ADD_REMOVE
    assert record["neighboring_relation"] == relation.name
    assert "rows" not in json.dumps(record)  # a Poisson round's realised rows are private
    if name == "partitioned":
        assert [e["epoch"] for e in record["rounds"]] == [1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("name", PLAN_BUILDERS)
def test_the_event_of_every_prefix_is_the_schedules(name):
    plan = make_plan(name)
    total = plan.schedule.total_rounds
    for completed in range(total + 1):
        ledger = executed_ledger(plan, completed)
        assert ledger.completed == completed
        assert ledger.dp_event() == expected_event(name, plan, completed)


def test_gaussian_rounds_carry_the_noise_of_the_exact_calibration():
    """T sequential rounds of z are sqrt(T) s / z GDP: the mu whose exact profile spends the
    target (eps, delta), for both adjacencies (s = 2 replace-one, 1 add/remove)."""
    mu = exact_mu(2.0, DELTA)
    for T, adjacency, s in ((4, "replace_one", 2.0), (3, "add_remove", 1.0)):
        plan = gdp_plan(sequential(T), adjacency=adjacency)
        assert math.sqrt(T) * s / plan.noise_multiplier == pytest.approx(mu, rel=1e-9)


@pytest.mark.parametrize("name", ["sequential", "sequential_add_remove", "partitioned"])
def test_spent_epsilon_of_gaussian_prefixes_bounds_the_exact_profile(name):
    """After j rounds the ledger's epsilon is a PLD upper bound: never below the exact epsilon
    of the composed mu (releases per record times (s / z)^2) and within the PLD slack of it,
    and a fresh accountant's value of the schedule's event, at the budget's delta and another."""
    plan = make_plan(name)
    s = 1.0 if name == "sequential_add_remove" else 2.0
    relation = ADD_REMOVE if name == "sequential_add_remove" else REPLACE
    for completed in range(1, plan.schedule.total_rounds + 1):
        ledger = executed_ledger(plan, completed)
        releases = math.ceil(completed / 3) if name == "partitioned" else completed
        mu = math.sqrt(releases) * s / plan.noise_multiplier
        for delta in (DELTA, 1e-3):
            spent = ledger.epsilon() if delta == DELTA else ledger.epsilon(delta)
            exact = exact_epsilon(mu, delta)
            assert exact - 1e-9 <= spent <= exact + PLD_SLACK, (completed, delta)
            event = expected_event(name, plan, completed)
            assert spent == pytest.approx(fresh_epsilon(event, relation, delta), rel=SAME)
    assert math.isclose(ledger.epsilon(), 2.0, abs_tol=PLD_SLACK)  # the whole run: the target
    assert spent_epsilon(plan, 0) == 0.0


def test_spent_epsilon_of_poisson_prefixes_matches_a_fresh_accountant():
    plan = make_plan("poisson")
    previous = 0.0
    for completed in range(1, 5):
        spent = executed_ledger(plan, completed).epsilon()
        event = expected_event("poisson", plan, completed)
        assert spent == pytest.approx(fresh_epsilon(event, REPLACE, DELTA), rel=SAME)
        assert spent > previous  # every round costs something
        previous = spent
    assert previous == pytest.approx(2.0, abs=0.02)  # z calibrated to meet the target


def test_pure_rounds_add_up_and_each_event_is_epsilon_dp():
    """Pure rounds: the ledger reports the sum of the rounds' epsilons (basic composition); the
    event of one round, randomized response with ratio e^eps, spends eps at delta -> 0 by a fresh
    accountant, and the PLD of two rounds stays below the sum."""
    plan = make_plan("pure")
    assert [executed_ledger(plan, j).epsilon() for j in range(3)] == [0.0, 1.5, 3.0]
    one = fresh_epsilon(expected_event("pure", plan, 1), REPLACE, 1e-12)
    assert one == pytest.approx(1.5, abs=PLD_SLACK)
    assert fresh_epsilon(expected_event("pure", plan, 2), REPLACE, 1e-12) <= 3.0 + PLD_SLACK


EVENTS = [
    dp_event.NoOpDpEvent(),
    dp_event.GaussianDpEvent(1.5),
    dp_event.LaplaceDpEvent(0.7),
    dp_event.RandomizedResponseDpEvent(noise_parameter=0.3, num_buckets=2),
    dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(2.0), 7),
    dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(0.9)), 30
    ),
    dp_event.ComposedDpEvent(
        [dp_event.GaussianDpEvent(3.0), dp_event.SelfComposedDpEvent(dp_event.NoOpDpEvent(), 2)]
    ),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_dp_events_survive_a_json_round_trip(event):
    """Through json.dumps/loads and back: an equal event (attrs compares every field, nested),
    so another DP stage reading the file accounts exactly what qem accounted."""
    back = dp_event_from_json(json.loads(json.dumps(dp_event_to_json(event))))
    assert back == event and type(back) is type(event)


def test_the_json_form_of_a_nested_event():
    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.5)), 3
    )
    assert dp_event_to_json(event) == {
        "class_name": "SelfComposedDpEvent",
        "event": {
            "class_name": "PoissonSampledDpEvent",
            "sampling_probability": 0.1,
            "event": {"class_name": "GaussianDpEvent", "noise_multiplier": 1.5},
        },
        "count": 3,
    }


@pytest.mark.parametrize(
    "data",
    [
        {"class_name": "PLDAccountant"},  # in dp_accounting, not an event
        {"class_name": "os.system", "command": "true"},
        {"class_name": "__import__", "name": "os"},
        {"noise_multiplier": 1.0},  # no class name
        {"class_name": "ComposedDpEvent", "events": [{"class_name": "Popen", "args": "ls"}]},
        {"class_name": "SelfComposedDpEvent", "event": {"class_name": "eval"}, "count": 2},
        "GaussianDpEvent",
        None,
        [{"class_name": "GaussianDpEvent", "noise_multiplier": 1.0}],
    ],
    ids=repr,
)
def test_only_dp_accountings_event_classes_are_read(data):
    with pytest.raises(InvalidParameterError, match="not a serialised dp-accounting event"):
        dp_event_from_json(data)


@pytest.mark.parametrize(
    "data",
    [{"class_name": "GaussianDpEvent"}, {"class_name": "GaussianDpEvent", "sigma": 1.0}],
    ids=repr,
)
def test_an_event_with_wrong_fields_is_refused_with_a_qem_error(data):
    with pytest.raises(InvalidParameterError):
        dp_event_from_json(data)


def grid_point_report(schedule, epsilon: float, adjacency: str = "replace_one") -> dict:
    """The accounting part of a release's report, as fine_tune writes it."""
    plan = schedule.plan(Budget(epsilon, DELTA, "gdp", adjacency, N=1000), 1000)
    ledger = executed_ledger(plan)
    return {"epsilon": epsilon, "accountant": {**ledger.to_dict(), "epsilon": ledger.epsilon()}}


def test_the_budget_a_tuning_grid_spent_composes_every_release():
    """Two grid points at epsilon = 1 each: their composition is the GDP of sqrt(2) mu (the exact
    profile, and a fresh accountant on their events), not 1; a DP-SGD-like Poisson release under
    the same relation composes with them; releases under different relations fall back to basic
    composition; a non-private one has no total; one that reads no private data costs nothing."""
    mu = exact_mu(1.0, DELTA)
    two = [grid_point_report(sequential(1), 1.0), grid_point_report(sequential(3), 1.0)]
    total = total_spent(two, DELTA)
    exact = exact_epsilon(np.sqrt(2) * mu, DELTA)
    assert exact - 1e-9 <= total["epsilon"] <= exact + PLD_SLACK
    assert total["epsilon"] > 1.3 and total["delta"] == DELTA and "PLD" in total["method"]
    events = [dp_event_from_json(r["accountant"]["dp_event"]) for r in two]
    composed = fresh_epsilon(dp_event.ComposedDpEvent(events), REPLACE, DELTA)
    assert total["epsilon"] == pytest.approx(composed, rel=SAME)

    dpsgd_style = grid_point_report(poisson(0.1, 10), 1.0)  # DP-SGD's report: epsilon on top
    dpsgd_style["accountant"].pop("epsilon")
    with_poisson = total_spent([*two, dpsgd_style], DELTA)
    events.append(dp_event_from_json(dpsgd_style["accountant"]["dp_event"]))
    composed = fresh_epsilon(dp_event.ComposedDpEvent(events), REPLACE, DELTA)
    assert with_poisson["epsilon"] == pytest.approx(composed, rel=SAME)
    assert with_poisson["epsilon"] > total["epsilon"] and "PLD" in with_poisson["method"]

    pair = [two[0], grid_point_report(sequential(1), 1.0, "add_remove")]
    mixed = total_spent(pair, DELTA)
    # basic composition at the delta asked for: each release's epsilon at DELTA / 2, summed
    halves = [
        fresh_epsilon(dp_event_from_json(r["accountant"]["dp_event"]), relation, DELTA / 2)
        for r, relation in zip(pair, (REPLACE, ADD_REMOVE), strict=True)
    ]
    assert mixed["epsilon"] == pytest.approx(sum(halves), rel=SAME) and "basic" in mixed["method"]
    assert mixed["delta"] == DELTA and mixed["epsilon"] > 2.0  # more than the stated 1 + 1
    nonprivate = {"epsilon": None, "accountant": None}  # qem.baselines.nonprivate's report
    assert total_spent([two[0], nonprivate], DELTA)["epsilon"] is None
    assert total_spent([two[0], {"epsilon": 1.0, "accountant": {}}], DELTA)["epsilon"] is None
    untouched = {"epsilon": 0.0, "accountant": None}  # qem.baselines.none's report
    assert total_spent([untouched], DELTA)["epsilon"] == 0.0
    assert total_spent([*two, untouched], DELTA) == total
    with pytest.raises(InvalidParameterError, match="delta"):
        total_spent(two, 1.0)


def test_the_total_at_another_delta_is_recomputed_from_the_events():
    """The same releases at delta = 1e-3: each event is re-read at that delta (the exact profile
    of sqrt(2) mu), not the epsilons their reports state at 1e-5."""
    two = [grid_point_report(sequential(1), 1.0), grid_point_report(sequential(2), 1.0)]
    total = total_spent(two, 1e-3)
    exact = exact_epsilon(np.sqrt(2) * exact_mu(1.0, DELTA), 1e-3)
    assert exact - 1e-9 <= total["epsilon"] <= exact + PLD_SLACK


def test_mixed_relations_at_another_delta_do_not_understate_the_total():
    mixed = [
        grid_point_report(sequential(1), 1.0),
        grid_point_report(sequential(1), 1.0, "add_remove"),
    ]
    total = total_spent(mixed, 1e-7)
    at_delta = [
        fresh_epsilon(dp_event_from_json(r["accountant"]["dp_event"]), relation, 1e-7)
        for r, relation in zip(mixed, (REPLACE, ADD_REMOVE), strict=True)
    ]
    assert total["epsilon"] >= sum(at_delta) - PLD_SLACK


def test_the_accountant_block_states_what_a_release_spent():
    event = dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(2.5), 4)
    block = accountant_block(
        event, ADD_REMOVE, name="pld", epsilon=1.25, delta=DELTA, rounds=[{"round": 1}]
    )
    assert block == {
        "name": "pld",
        "epsilon": 1.25,
        "delta": DELTA,
        "neighboring_relation": "ADD_OR_REMOVE_ONE",
        "dp_event": dp_event_to_json(event),
        "rounds": [{"round": 1}],
    }
    assert dp_event_from_json(json.loads(json.dumps(block))["dp_event"]) == event
    plan = gdp_plan(sequential(2))
    ledger = executed_ledger(plan)
    assert ledger.report_block("pld", 2.0, DELTA) == accountant_block(
        ledger.dp_event(), REPLACE, name="pld", epsilon=2.0, delta=DELTA,
        rounds=ledger.to_dict()["rounds"],
    )  # fmt: skip


def test_a_fine_tune_report_s_event_gives_back_its_epsilon():
    """What another DP stage reads from privacy_report.json: the event, composed by a fresh
    accountant under the stated relation, spends the report's epsilon."""
    task = blob_task(sizes=(60, 80, 30), shift=0.0, model=make_linear)
    options = dict(epsilon=1.5, rounds=2, subspace="dense", k=6, prior_weight=1.0, seed=0)
    report = run(task, **options).report.to_dict()
    accountant = report["accountant"]
    relation = NeighboringRelation[accountant["neighboring_relation"]]
    event = dp_event_from_json(accountant["dp_event"])
    assert event == dp_event.SelfComposedDpEvent(
        dp_event.GaussianDpEvent(report["schedule"]["noise_multiplier"]), 2
    )
    assert fresh_epsilon(event, relation, accountant["delta"]) == pytest.approx(
        accountant["epsilon"], rel=SAME
    )
    assert accountant["epsilon"] == pytest.approx(1.5, abs=PLD_SLACK)
